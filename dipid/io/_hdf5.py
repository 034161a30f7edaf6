"""Low-level HDF5 helpers: open files with dipid errors, follow external links by hand.

External links are never followed through h5py/HDF5's own resolution: HDF5 looks for a relative
target in the current working directory among other places, which can silently pick up the wrong
file. Here a link target is looked up next to the file holding the link (and, for absolute
beamline paths such as ``/dls/i16/data/...``, in the same relative place next to the file), so the
error when it is missing can name the exact file expected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dipid.errors import CorruptFileError, LinkTargetMissingError, NotHDF5Error, ScanFileNotFoundError

logger = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

try:  # registers the bitshuffle/LZ4/... filters that Dectris and Odin writers use
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover - hdf5plugin is a dependency; degrade to gzip-only reading
    logger.debug("hdf5plugin not importable; compressed detector data may be unreadable")


def has_hdf5_signature(path: Path) -> bool:
    """True if the file starts with the HDF5 signature (at 0 or after a 512·2^k byte user block)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            offset = 0
            while offset + len(HDF5_SIGNATURE) <= size:
                fh.seek(offset)
                if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


def open_h5(path: Path, *, role: str = "scan file") -> h5py.File:
    """Open an HDF5 file read-only, turning every failure into a dipid ScanError.

    Raises:
        ScanFileNotFoundError, NotHDF5Error, CorruptFileError.
    """
    if not path.exists():
        raise ScanFileNotFoundError(
            f"{role} not found; check the path (current folder: {Path.cwd()})", file=path
        )
    if path.is_dir():
        raise NotHDF5Error(f"{role} is a folder, not an HDF5/NeXus file; pass the .nxs/.h5 file inside it", file=path)
    if not has_hdf5_signature(path):
        raise NotHDF5Error(
            f"{role} is not an HDF5/NeXus file (no HDF5 signature); dipid reads NeXus/HDF5 scans "
            "(TIFF frames are read when a NeXus file lists them)",
            file=path,
        )
    try:
        # locking=False: beamline file systems are often read-only or do not support locks.
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise CorruptFileError(
            f"{role} is HDF5 but cannot be opened ({exc}); it is probably truncated or still being "
            "written: copy it again from the beamline storage",
            file=path,
        ) from exc


def as_str(value: Any) -> str:
    """An HDF5 string-ish value (bytes, numpy bytes, 0-d or 1-element array) as str."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def attr_str(obj: h5py.HLObject, name: str) -> str | None:
    """A string attribute, or None if absent or unreadable."""
    try:
        if name not in obj.attrs:
            return None
        return as_str(obj.attrs[name])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def attr_str_list(obj: h5py.HLObject, name: str) -> list[str]:
    """A string or string-array attribute as a list (``"a:b"`` old-style lists are split on ':')."""
    try:
        if name not in obj.attrs:
            return []
        value = obj.attrs[name]
    except (OSError, KeyError, TypeError, ValueError):
        return []
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return [as_str(v) for v in value.reshape(-1)]
    text = as_str(value)
    return [part.strip() for part in text.replace(",", ":").split(":")] if text else []


def nx_class(obj: h5py.HLObject) -> str | None:
    return attr_str(obj, "NX_class")


def external_target_candidates(link_file: Path, target: str) -> list[Path]:
    """Where an external link's target file may be, best first (absolute paths)."""
    folder = link_file.resolve().parent
    target_path = Path(target)
    if not target_path.is_absolute():
        return [(folder / target_path).resolve()]
    # An absolute beamline path (e.g. /dls/i16/data/2024/cm1/1040323-pilatus3_100k-files/x.hdf):
    # use it where it exists, else look for the same folder name / file name next to the scan.
    candidates = [target_path]
    if len(target_path.parts) >= 2:
        candidates.append(folder / target_path.parent.name / target_path.name)
    candidates.append(folder / target_path.name)
    return candidates


@dataclass
class MissingTarget:
    """An external link whose target file (or path inside it) is absent."""

    link_file: Path
    link_path: str
    target_file: str
    target_path: str
    expected: Path
    file_exists: bool = False

    def describe(self) -> str:
        if self.file_exists:
            return (
                f"{self.link_path} is an external link to {self.expected} : {self.target_path}; "
                f"that file is there but holds nothing at {self.target_path}"
            )
        return (
            f"{self.link_path} is an external link to {self.target_file!r} : {self.target_path}, "
            f"expected at {self.expected}, which does not exist"
        )

    def error(self, extra: str = "") -> LinkTargetMissingError:
        msg = self.describe()
        if extra:
            msg += "; " + extra
        else:
            msg += (
                f"; copy the detector files folder ({Path(self.target_file).parent.name or self.target_file}) "
                f"next to {self.link_file.name}, keeping its name, or pass dataset= to read other data"
            )
        err = LinkTargetMissingError(msg, file=self.link_file, path_in_file=self.link_path)
        err.expected_path = self.expected  # type: ignore[attr-defined]
        return err


@dataclass
class FileSet:
    """The scan file plus every external file opened while following links (closed together)."""

    main_path: Path
    main: h5py.File
    others: dict[Path, h5py.File] = field(default_factory=dict)

    def file_for(self, path: Path) -> h5py.File:
        path = path.resolve()
        if path == self.main_path.resolve():
            return self.main
        if path not in self.others:
            self.others[path] = open_h5(path, role="linked detector file")
        return self.others[path]

    def close(self) -> None:
        for f in [*self.others.values(), self.main]:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing a dead handle must not mask the real error
                logger.debug("closing %s failed", f, exc_info=True)
        self.others.clear()


def resolve(files: FileSet, path: str, *, start: h5py.File | None = None, depth: int = 0) -> h5py.HLObject | MissingTarget | None:
    """Look ``path`` up, following external links by hand.

    Returns:
        the h5py object, a :class:`MissingTarget` if an external link on the way points to a file
        or path that is not there, or None if ``path`` does not exist.
    """
    if depth > 8:
        return None
    f = files.main if start is None else start
    f_path = Path(f.filename)
    parts = [p for p in path.split("/") if p]
    node: h5py.Group = f["/"]
    for i, part in enumerate(parts):
        try:
            link = node.get(part, getlink=True)
        except (KeyError, OSError, ValueError):
            return None
        if link is None:
            return None
        if isinstance(link, h5py.ExternalLink):
            here = (node.name.rstrip("/") + "/" + part) if node.name != "/" else "/" + part
            rest = "/".join(parts[i + 1 :])
            candidates = external_target_candidates(f_path, link.filename)
            existing = next((c for c in candidates if c.is_file()), None)
            if existing is None:
                return MissingTarget(f_path, here, link.filename, link.path, candidates[0])
            target_file = files.file_for(existing)
            inner = link.path.rstrip("/") + ("/" + rest if rest else "")
            found = resolve(files, inner, start=target_file, depth=depth + 1)
            if found is None:
                return MissingTarget(f_path, here, link.filename, inner, existing, file_exists=True)
            return found
        try:
            child = node[part]
        except (KeyError, OSError, ValueError):
            return None
        if i < len(parts) - 1:
            if not isinstance(child, h5py.Group):
                return None
            node = child
        else:
            return child
    return node


def missing_virtual_sources(dataset: h5py.Dataset) -> list[Path]:
    """Source files of a virtual dataset that are not on disk (HDF5 would read them as fill values)."""
    if not getattr(dataset, "is_virtual", False):
        return []
    folder = Path(dataset.file.filename).resolve().parent
    missing = []
    try:
        sources = dataset.virtual_sources()
    except (OSError, RuntimeError):
        return []
    for source in sources:
        name = source.file_name
        if name in (".", ""):
            continue
        if not any(c.is_file() for c in external_target_candidates(Path(dataset.file.filename), name)):
            missing.append((folder / name).resolve() if not Path(name).is_absolute() else Path(name))
    return missing


#: Without ``chunk_iter`` (h5py < 3.8 or old HDF5), listing chunks one by one can cost O(n) each.
_MAX_CHUNKS_LISTED_BY_INDEX = 100_000


def frames_with_data(dataset: h5py.Dataset) -> np.ndarray | None:
    """Which frames of an (n, ...) dataset have storage written, from the chunk index (no data read).

    A dataset can be declared at its full size before the acquisition and then never (or only
    partly) filled: HDF5 returns the fill value for every frame that was never written, so a
    scan aborted at frame 12 of 10 000 would otherwise read as 10 000 frames. Compressed chunks
    are legitimately smaller than their data, so chunked datasets are judged by which chunks
    exist, never by bytes.

    Returns:
        (n,) bool, True = the frame has written storage (for chunks spanning several frames, every
        frame of a written chunk counts as written); or None when every frame has storage, or
        when the layout cannot tell (compact, virtual, external storage) or the index is unreadable.
    """
    try:
        n = int(dataset.shape[0]) if dataset.ndim else 0
        if n == 0 or dataset.size == 0 or getattr(dataset, "is_virtual", False) or dataset.external:
            return None
        layout = dataset.id.get_create_plist().get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            # contiguous storage is allocated whole at the first write: it only tells "nothing written"
            return np.zeros(n, bool) if dataset.id.get_storage_size() == 0 else None
        if layout != h5py.h5d.CHUNKED or dataset.chunks is None:
            return None
        chunks = dataset.chunks
        per_dim = [-(-size // step) for size, step in zip(dataset.shape, chunks)]
        total = int(np.prod(per_dim, dtype=np.int64))
        stored = int(dataset.id.get_num_chunks())
        if stored >= total:
            return None
        written = np.zeros(n, bool)
        if stored == 0:
            return written
        firsts: list[int] = []
        if hasattr(dataset.id, "chunk_iter"):
            dataset.id.chunk_iter(lambda info: firsts.append(info.chunk_offset[0]))
        elif stored <= _MAX_CHUNKS_LISTED_BY_INDEX:
            firsts = [dataset.id.get_chunk_info(i).chunk_offset[0] for i in range(stored)]
        else:
            return None
        for first in set(firsts):
            written[first : first + chunks[0]] = True
        return written
    except (OSError, RuntimeError, ValueError, TypeError, AttributeError):
        logger.debug("cannot list the written chunks of %s", dataset.name, exc_info=True)
        return None


def walk_links(group: h5py.Group, prefix: str = "") -> list[tuple[str, h5py.HLObject | h5py.ExternalLink]]:
    """Every (path, object) under ``group`` without following external links (listed as links)."""
    out: list[tuple[str, Any]] = []
    seen: set = set()

    def visit(g: h5py.Group, base: str) -> None:
        for name in g:
            p = f"{base}/{name}"
            try:
                link = g.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    out.append((p, link))
                    continue
                obj = g[name]
            except (KeyError, OSError, ValueError):
                continue
            out.append((p, obj))
            if isinstance(obj, h5py.Group):
                key = hash(obj.id)  # same object reached through two hard links -> same hash
                if key in seen:
                    continue
                seen.add(key)
                visit(obj, p)

    visit(group, prefix.rstrip("/"))
    return out


def read_scalar_or_array(obj: h5py.HLObject | None) -> np.ndarray | None:
    """A numeric dataset's value as a float64 array (0-d for scalars), or None."""
    if not isinstance(obj, h5py.Dataset):
        return None
    try:
        if obj.dtype.kind not in "biuf":
            return None
        if obj.size > 10_000_000:  # never pull a detector-sized array in by accident
            return None
        return np.asarray(obj[()], dtype=np.float64)
    except (OSError, TypeError, ValueError):
        return None
