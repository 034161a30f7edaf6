"""User bad-pixel masks: .npy, TIFF, or HDF5/NeXus (e.g. an NXdetector ``pixel_mask``).

Nonzero = bad. The file type is decided from its content, not its name.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from dipid.errors import MaskFileError
from dipid.io._hdf5 import HDF5_SIGNATURE, has_hdf5_signature, walk_links

__all__ = ["read_mask", "check_mask_shape"]

_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def read_mask(source: str | Path | np.ndarray, *, frame_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Load a bad-pixel mask.

    Args:
        source: an array, or a path to an .npy, a TIFF, or an HDF5/NeXus file holding a 2D dataset
            (``pixel_mask`` preferred, then any dataset whose name contains "mask", then the only 2D
            dataset of the frame shape).
        frame_shape: (H, W) the mask must have; None = not checked here.

    Returns:
        (H, W) bool, True = bad.

    Raises:
        MaskFileError: missing, unreadable, not 2D, or the wrong shape.
    """
    if isinstance(source, np.ndarray):
        mask = _as_2d(source, file=None, where="mask array")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise MaskFileError("mask file not found; pass an existing .npy, .tif or .h5/.nxs file", file=path)
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
        except OSError as exc:
            raise MaskFileError(f"cannot read the mask file ({exc})", file=path) from exc
        if head.startswith(_NPY_MAGIC):
            mask = _read_npy(path)
        elif head[:4] in _TIFF_MAGICS:
            mask = _read_tiff(path)
        elif head.startswith(HDF5_SIGNATURE) or has_hdf5_signature(path):
            mask = _read_hdf5(path, frame_shape)
        else:
            raise MaskFileError(
                "not a mask file dipid reads (expected .npy, TIFF or HDF5/NeXus content)", file=path
            )
    if frame_shape is not None:
        check_mask_shape(mask, frame_shape, file=None if isinstance(source, np.ndarray) else Path(source))
    return mask


def check_mask_shape(mask: np.ndarray, frame_shape: tuple[int, int], *, file: Path | None) -> None:
    """Raise MaskFileError unless ``mask.shape == frame_shape``."""
    if tuple(mask.shape) != tuple(frame_shape):
        raise MaskFileError(
            f"mask has shape {tuple(mask.shape)} but the frames are {tuple(frame_shape)} (rows, columns); "
            "make a mask of the frame shape (transposed? a different detector?)",
            file=file,
        )


def _as_2d(array: np.ndarray, *, file: Path | None, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise MaskFileError(f"{where} must be 2D (rows, columns), got shape {array.shape}", file=file)
    if array.dtype.kind not in "biuf":
        raise MaskFileError(f"{where} must be numeric or boolean, got dtype {array.dtype}", file=file)
    return array != 0


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle user files
    except (OSError, ValueError) as exc:
        raise MaskFileError(f"cannot read the .npy mask ({exc})", file=path) from exc
    return _as_2d(array, file=path, where="the .npy mask")


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for bad files
        raise MaskFileError(f"cannot read the TIFF mask ({exc})", file=path) from exc
    return _as_2d(array, file=path, where="the TIFF mask")


def _read_hdf5(path: Path, frame_shape: tuple[int, int] | None) -> np.ndarray:
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise MaskFileError(f"cannot open the HDF5 mask file ({exc})", file=path) from exc
    with f:
        candidates = []
        for p, obj in walk_links(f["/"]):
            if not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "biuf":
                continue
            shape = obj.shape[1:] if obj.ndim == 3 and obj.shape[0] == 1 else obj.shape
            if len(shape) != 2:
                continue
            name = p.rsplit("/", 1)[-1].lower()
            rank = 0 if name == "pixel_mask" else (1 if "mask" in name else 2)
            fits = frame_shape is None or tuple(shape) == tuple(frame_shape)
            candidates.append((rank, not fits, p))
        if not candidates:
            raise MaskFileError("the HDF5 file holds no 2D dataset to use as a mask (e.g. pixel_mask)", file=path)
        candidates.sort()
        best = candidates[0]
        named = [c for c in candidates if c[0] < 2]
        if not named and len([c for c in candidates if not c[1]]) > 1:
            listed = ", ".join(c[2] for c in candidates[:10])
            raise MaskFileError(
                f"several 2D datasets could be the mask ({listed}); name it pixel_mask or save it as .npy",
                file=path,
            )
        try:
            array = f[best[2]][()]
        except OSError as exc:
            raise MaskFileError(f"cannot read {best[2]} ({exc})", file=path) from exc
        return _as_2d(array, file=path, where=f"mask dataset {best[2]}")
