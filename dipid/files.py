"""Files written whole or not at all, and values made JSON-ready: the one home of both.

Every file dipid writes (results, labels, checkpoints, run folders, simulated scans, reports) goes
through :func:`atomic_path`: the bytes are written to a temporary file in the target's folder and
renamed over the target only once complete, so a crash or Ctrl-C never leaves a half-written file
where a finished one is expected. The rename is atomic on POSIX and Windows when both names are in
the same folder, which is why the temporary file is made there and not in ``/tmp``.

This module imports nothing else of dipid (it sits at the bottom, beside ``errors``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_copy", "atomic_path", "atomic_write_json", "atomic_write_text", "new_file_mode", "to_jsonable"]


def new_file_mode(path: str | Path) -> int:
    """Permission bits for a file written to ``path``: those of the file it replaces, else what a
    plain ``open(path, "w")`` would give under the process umask."""
    try:
        return Path(path).stat().st_mode & 0o777
    except OSError:
        pass
    try:  # /proc reads the umask without changing it (os.umask would race with other threads)
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    The caller writes the whole file to the yielded path (with any library: h5py, safetensors,
    open). The temporary name does not exist yet when yielded, so libraries that create the file
    themselves (HDF5's ``"w-"`` mode) work too. The finished file keeps the permissions of the
    file it replaces, or gets those a plain ``open()`` would give it. The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        os.chmod(temp, new_file_mode(path))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns the path."""
    path = Path(path)
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return path


def atomic_write_json(path: str | Path, value: Any, *, indent: int | None = 2) -> Path:
    """Write ``to_jsonable(value)`` as JSON to ``path`` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(to_jsonable(value), indent=indent) + "\n")


def atomic_copy(source: str | Path, target: str | Path) -> Path:
    """Copy the file ``source`` to ``target`` atomically. Returns the target."""
    target = Path(target)
    with atomic_path(target) as temp:
        shutil.copyfile(source, temp)
    return target


def to_jsonable(value: Any) -> Any:
    """Plain JSON values from what dipid records (options, settings, metrics, metadata).

    Mappings -> dicts with str keys; lists, tuples and numpy arrays -> lists; numpy scalars ->
    Python scalars; NaN and infinities -> None (JSON has no spelling for them); paths and anything
    else unknown (a ``torch.device``, an enum) -> ``str(value)``.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)
