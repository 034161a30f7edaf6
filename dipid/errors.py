"""Exception types raised by dipid.

Every error a user can cause (a bad file, a wrong path inside a file, a checkpoint that does not
match) is one of these, with a message that names the file, the path inside it and what to do.
The CLI turns them into one line on stderr and a non-zero exit code.

Problems dipid can work around (a few NaN pixels, a scan axis of the wrong length, frames that
were never written) are :class:`DipidWarning` warnings instead (``warnings.warn``), with messages in
the same style; the CLI prints each as one line on stderr.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DipidError",
    "ScanError",
    "ScanFileNotFoundError",
    "NotHDF5Error",
    "CorruptFileError",
    "DetectorDataNotFoundError",
    "LinkTargetMissingError",
    "ScanShapeError",
    "EmptyScanError",
    "NoValidPixelsError",
    "FrameIndexError",
    "MaskFileError",
    "LabelError",
    "CheckpointError",
    "WeightsNotFoundError",
    "UnknownNameError",
    "TorchInstallError",
    "TrainingError",
    "DipidWarning",
    "ScanWarning",
    "BadPixelWarning",
    "ScanAxisWarning",
    "PartialScanWarning",
]


class DipidError(Exception):
    """Base class of every error dipid raises on purpose."""


class _InFile:
    """Mixin of the exceptions and warnings about one place in a file: ``"<file> [<path in file>]: <message>"``.

    Attributes:
        file: the file on disk the problem is in.
        path_in_file: the HDF5 path inside it, when there is one.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, path_in_file: str | None = None):
        self.file = None if file is None else Path(file)
        self.path_in_file = path_in_file
        where = []
        if file is not None:
            where.append(str(file))
        if path_in_file:
            where.append(f"[{path_in_file}]")
        prefix = " ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ScanError(_InFile, DipidError):
    """A scan file cannot be read (``file`` and ``path_in_file`` say where)."""


class ScanFileNotFoundError(ScanError, FileNotFoundError):
    """The scan file does not exist."""


class NotHDF5Error(ScanError):
    """The file exists but is not HDF5/NeXus (nor a TIFF stack dipid reads)."""


class CorruptFileError(ScanError):
    """The file is HDF5 but truncated or corrupt."""


class DetectorDataNotFoundError(ScanError):
    """No 3D detector dataset was found where dipid looked."""


class LinkTargetMissingError(ScanError):
    """An external link or a TIFF listed in the scan points to a file that is not there."""


class ScanShapeError(ScanError):
    """The detector data has the wrong number of dimensions."""


class EmptyScanError(ScanError):
    """The detector data holds no frames (none declared, or none ever written)."""


class NoValidPixelsError(ScanError):
    """Every pixel of every frame is bad (NaN, dead/negative or saturated): nothing can be measured."""


class FrameIndexError(ScanError, IndexError):
    """A frame number outside the scan was asked for."""


class MaskFileError(ScanError):
    """A user-supplied bad-pixel mask cannot be used."""


class LabelError(DipidError):
    """A label file (COCO JSON, Zooniverse CSV) cannot be read."""


class CheckpointError(DipidError):
    """A checkpoint cannot be loaded or does not match the model."""


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """Asked-for weights are not present."""


class UnknownNameError(DipidError, ValueError):
    """A name (model, preset, detector, ...) is not one dipid knows; the message lists the valid ones."""

    def __init__(self, kind: str, name: object, valid: list[str] | tuple[str, ...]):
        self.kind = kind
        self.name = name
        self.valid = tuple(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(map(str, self.valid))}")


class TorchInstallError(DipidError, ImportError):
    """torch and torchvision are installed but do not work together."""


class TrainingError(DipidError):
    """A training run stopped (NaN loss, out of memory); the run folder can be resumed."""


# --------------------------------------------------------------------------------- warnings


class DipidWarning(UserWarning):
    """Base class of every warning dipid issues on purpose."""


class ScanWarning(_InFile, DipidWarning):
    """Something is wrong with a scan that dipid works around; the message says what it did
    (``file`` and ``path_in_file`` say where)."""



class BadPixelWarning(ScanWarning):
    """Some pixels are NaN or infinite, or some frames are all zero or have no good pixel."""


class ScanAxisWarning(ScanWarning):
    """The scan axis does not have one value per frame; frame numbers are used instead."""


class PartialScanWarning(ScanWarning):
    """Some of the declared frames were never written (an aborted acquisition)."""
