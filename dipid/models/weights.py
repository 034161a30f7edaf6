"""Where dipid's checkpoints are found and how they are checked before loading.

A weights location is one of:

* a folder holding ``tlm.safetensors`` and/or ``sslm.safetensors`` (:data:`WEIGHT_FILES`), like
  the shipped ``weights/`` (:data:`DEFAULT_WEIGHTS_DIR`);
* a training run folder holding ``best.safetensors`` (:data:`RUN_CHECKPOINT`);
* one checkpoint file.

A folder may also hold ``SHA256SUMS`` (``"<hex>  <file name>"`` lines, as ``sha256sum`` writes
them): a checkpoint listed there must match its sum, so a damaged or replaced shipped file is
refused. It may hold ``settings.json`` (:data:`SETTINGS_FILE`): predictor settings tuned for
these checkpoints; this module only finds it, :mod:`dipid.predict` reads what it means.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dipid.errors import WeightsNotFoundError
from dipid.models.checkpoint import load_checkpoint, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "WEIGHT_FILES",
    "RUN_CHECKPOINT",
    "SHA256_FILE",
    "SETTINGS_FILE",
    "LoadedWeights",
    "find_checkpoints",
    "read_sha256sums",
    "verify_checkpoint",
    "load_weights",
]

#: Where :func:`load_weights` (and ``JointPredictor.from_pretrained()``) looks when given no path.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
#: Model name -> file name of its checkpoint inside a weights folder.
WEIGHT_FILES = {"tlm": "tlm.safetensors", "sslm": "sslm.safetensors"}
#: The checkpoint a training run folder keeps (its best epoch).
RUN_CHECKPOINT = "best.safetensors"
#: File of sha256 sums beside shipped weights.
SHA256_FILE = "SHA256SUMS"
#: Optional JSON object of predictor settings tuned for the checkpoints beside it (e.g. the fusion
#: thresholds ``benchmarks/fusion.py`` chooses on validation scans).
SETTINGS_FILE = "settings.json"


@dataclass
class LoadedWeights:
    """The checkpoints of one weights location, verified and loaded (on the CPU, eval mode).

    Attributes:
        models: model name ("tlm", "sslm") -> model.
        info: model name -> {"path": checkpoint file, "sha256": its hex digest} (provenance).
        settings_file: the location's ``settings.json``, or None when it has none.
    """

    models: dict[str, nn.Module] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings_file: Path | None = None


def find_checkpoints(path: str | Path | None = None) -> list[Path]:
    """The checkpoint files at a weights location (see the module docstring); None: the shipped ``weights/``.

    Raises:
        WeightsNotFoundError: nothing loadable there; the message says how to get weights.
    """
    where = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
    files: list[Path] = []
    if where.is_file():
        files = [where]
    elif where.is_dir():
        files = [where / name for name in WEIGHT_FILES.values() if (where / name).is_file()]
        if not files and (where / RUN_CHECKPOINT).is_file():
            files = [where / RUN_CHECKPOINT]
    if not files:
        raise WeightsNotFoundError(
            f"{where}: no dipid checkpoints found (expected {' and/or '.join(WEIGHT_FILES.values())}). "
            "Train them with `dipid train tlm --train sim:realistic --val sim:hard --out runs/tlm` and "
            "`dipid train sslm --scans SCAN.nxs --out runs/sslm`, then pass the run folder or checkpoint "
            "to JointPredictor.from_pretrained(...), or copy them into weights/ as tlm.safetensors/sslm.safetensors."
        )
    return files


def read_sha256sums(path: str | Path) -> dict[str, str]:
    """File name -> lower-case hex sha256 from a ``sha256sum``-style file ({} when there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()  # "*" marks binary mode in sha256sum's output
    return sums


def verify_checkpoint(file: str | Path, sums: dict[str, str], sums_file: str | Path) -> str:
    """The sha256 of ``file``, checked against ``sums`` (read from ``sums_file``) when it is listed there.

    Raises:
        WeightsNotFoundError: the file does not match its listed sum.
    """
    file = Path(file)
    digest = sha256_file(file)
    expected = sums.get(file.name)
    if expected is not None and expected != digest:
        raise WeightsNotFoundError(
            f"{file}: sha256 {digest} does not match {expected} in {sums_file}; "
            "the file is damaged or was replaced: restore it (git checkout weights/) or pass another path."
        )
    return digest


def load_weights(path: str | Path | None = None) -> LoadedWeights:
    """Find, verify and load the checkpoints at ``path`` (None: the shipped ``weights/``).

    Raises:
        WeightsNotFoundError: no checkpoint there, or one (or ``settings.json``) that fails its
            ``SHA256SUMS`` check.
        CheckpointError: a file that is not a dipid checkpoint (see :func:`load_checkpoint`).
    """
    files = find_checkpoints(path)
    folder = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
    sums_file = folder / SHA256_FILE
    sums = read_sha256sums(sums_file) if folder.is_dir() else {}
    loaded = LoadedWeights()
    for file in files:
        digest = verify_checkpoint(file, sums, sums_file)
        model = load_checkpoint(file, device="cpu")
        loaded.models[model.name] = model
        loaded.info[model.name] = {"path": str(file), "sha256": digest}
        logger.debug("loaded %s from %s (sha256 %s)", model.name, file, digest)
    settings_file = folder / SETTINGS_FILE
    if folder.is_dir() and settings_file.is_file():
        verify_checkpoint(settings_file, sums, sums_file)  # the fusion rule travels with the checkpoints
        loaded.settings_file = settings_file
    return loaded
