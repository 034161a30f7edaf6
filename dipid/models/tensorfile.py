"""Tensors in safetensors files: int8 per-channel quantisation, reading, comparing, hashing.

The low layer of :mod:`dipid.models.checkpoint`: it knows the checkpoint's file format (the
metadata keys, the ``::scale`` companions of int8 tensors) but no model class, so the model
modules (``tlm.py`` reads torchvision and dipid weight files through it) and the checkpoint
writer can both import it without a cycle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dipid.errors import CheckpointError, WeightsNotFoundError

__all__ = [
    "CHECKPOINT_FORMAT", "SCALE_SUFFIX", "INT8_MIN_ELEMENTS", "INT8_KEEP_FLOAT", "StateDictDiff",
    "quantize_per_channel", "dequantize_per_channel", "compare_state_dicts", "format_state_dict_diff",
    "read_checkpoint_metadata", "read_checkpoint_tensors", "sha256_file",
]

CHECKPOINT_FORMAT = "dipid"
# BatchNorm's step counter is not a weight: FrozenBatchNorm2d has none and BatchNorm2d recreates
# it, so its presence or absence never makes a checkpoint incompatible.
_IGNORED_SUFFIXES = ("num_batches_tracked",)
#: Suffix of the per-output-channel scales of an int8 tensor.
SCALE_SUFFIX = "::scale"
#: Floating tensors smaller than this stay float32 in an int8 checkpoint (biases, norms: tiny and sensitive).
INT8_MIN_ELEMENTS = 1024
#: Name fragments of tensors that stay float32 in an int8 checkpoint: the layers whose outputs are scores.
INT8_KEEP_FLOAT = ("rpn.head.", "box_predictor.", "mask_predictor.")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale`` along dimension 0.

        scale[c] = max |weight[c, ...]| / 127   (1 where a channel is all zero)
        q        = round(weight / scale), in [-127, 127]

    Args:
        weight: (C, ...) floating tensor.
    Returns:
        ``q`` (C, ...) int8 and ``scale`` (C,) float32; the error is at most scale / 2 per element.
    """
    w = weight.detach().float()
    peak = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    q = torch.round(w / scale.reshape(-1, *([1] * (w.dim() - 1)))).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_per_channel`: (C, ...) int8 and (C,) scales -> float32."""
    return q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))


@dataclass
class StateDictDiff:
    """How a set of tensors differs from what a model expects.

    Attributes:
        missing: names the model has and the file lacks.
        unexpected: names the file has and the model lacks.
        mismatched: name -> (shape in the file, shape in the model).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def without(self, names: Iterable[str]) -> StateDictDiff:
        """A copy that ignores ``names``."""
        drop = set(names)
        return StateDictDiff(
            missing=[k for k in self.missing if k not in drop],
            unexpected=[k for k in self.unexpected if k not in drop],
            mismatched={k: v for k, v in self.mismatched.items() if k not in drop},
        )


def compare_state_dicts(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> StateDictDiff:
    """Names missing from ``given``, unexpected in it, and with other shapes than in ``expected``."""
    want = {k: tuple(v.shape) for k, v in expected.items() if not k.endswith(_IGNORED_SUFFIXES)}
    have = {k: tuple(v.shape) for k, v in given.items() if not k.endswith(_IGNORED_SUFFIXES)}
    return StateDictDiff(
        missing=sorted(k for k in want if k not in have),
        unexpected=sorted(k for k in have if k not in want),
        mismatched={k: (have[k], want[k]) for k in sorted(want) if k in have and have[k] != want[k]},
    )


def format_state_dict_diff(diff: StateDictDiff, *, limit: int = 5) -> str:
    """One line naming the first ``limit`` tensors of each kind of difference, with counts."""

    def listing(names: list[str]) -> str:
        more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    parts = []
    if diff.missing:
        parts.append(f"{len(diff.missing)} missing tensors ({listing(diff.missing)})")
    if diff.unexpected:
        parts.append(f"{len(diff.unexpected)} unexpected tensors ({listing(diff.unexpected)})")
    if diff.mismatched:
        shown = [f"{k}: file {list(a)} vs model {list(b)}" for k, (a, b) in diff.mismatched.items()]
        parts.append(f"{len(shown)} shape-mismatched tensors ({listing(shown)})")
    return "; ".join(parts) if parts else "no differences"


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: checkpoint not found; pass the path of a .safetensors file written by dipid "
            "(dipid.models.save_checkpoint or a training run)."
        )


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded dipid metadata of a checkpoint (no tensors are read).

    Returns:
        dict with ``format``, ``model``, ``config`` (dict), ``dipid_version``, ``dtype`` and
        ``metadata`` (the caller's dict).
    """
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for non-safetensors files
        hint = ""
        if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
            hint = (
                " It looks like a PyTorch pickle: dipid never loads those as checkpoints (pass a "
                "torchvision state dict as build_tlm(base_weights=path) instead)."
            )
        raise CheckpointError(f"{path}: not a safetensors file ({exc}).{hint}") from exc
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: a safetensors file but not a dipid checkpoint (metadata 'format' is "
            f"{raw.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); dipid writes its checkpoints with "
            "dipid.models.save_checkpoint. For torchvision weights use build_tlm(base_weights=path)."
        )
    decoded: dict[str, Any] = dict(raw)
    for key in ("config", "metadata"):
        try:
            decoded[key] = json.loads(raw.get(key, "{}"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({exc}); the file is damaged.") from exc
        if not isinstance(decoded[key], dict):
            raise CheckpointError(f"{path}: metadata {key!r} is not a JSON object; the file is damaged.")
    return decoded


def read_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU, in their stored dtype (int8 ones dequantised
    to float32 with their ``::scale`` companions, which are not returned)."""
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: cannot read its tensors ({exc}); the file is damaged or not safetensors."
        ) from exc
    scales = {key[: -len(SCALE_SUFFIX)]: tensors.pop(key) for key in list(tensors) if key.endswith(SCALE_SUFFIX)}
    for key, scale in scales.items():
        q = tensors.get(key)
        if q is None or q.dtype != torch.int8 or scale.shape != (q.shape[0],):
            raise CheckpointError(
                f"{path}: tensor {key!r} has int8 scales that do not fit it (tensor "
                f"{None if q is None else (q.dtype, tuple(q.shape))}, scales {tuple(scale.shape)}); the file is damaged."
            )
        tensors[key] = dequantize_per_channel(q, scale)
    return tensors


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
