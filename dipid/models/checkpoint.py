"""dipid checkpoints: safetensors files that carry their model's configuration.

A checkpoint is one ``.safetensors`` file. Its string metadata holds::

    format        "dipid"
    model         "tlm" | "sslm"
    config        JSON of the model's config dataclass (enough to rebuild the architecture)
    dipid_version the dipid version that wrote it
    dtype         "float32", "float16", "bfloat16" or "int8" (how floating tensors are stored)
    metadata      JSON of the caller's metadata (training run, data, scores, ...)

so :func:`load_checkpoint` rebuilds the right model from the file alone.

``dtype="int8"`` stores every floating weight of two or more dimensions with at least
``INT8_MIN_ELEMENTS`` elements (convolution and linear weights: 99 % of a ResNet-50 Mask R-CNN)
as symmetric per-output-channel int8 (:func:`quantize_per_channel`), with its float32 scales in a
companion tensor ``<name>::scale`` in the same file; smaller tensors (biases, BatchNorm
statistics) and the final layers that turn features into scores (``INT8_KEEP_FLOAT``: the RPN
and box/mask predictors, 3 MB together) stay float32, because a score that moves across the
confidence threshold adds or removes a whole peak. Reading dequantises (:func:`dequantize_per_channel`), so a model
loaded from such a file is an ordinary float32 model, 4x smaller on disk. Nothing is ever
unpickled. Files are written to a temporary file in the target folder and renamed into place,
so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dipid.errors import CheckpointError, WeightsNotFoundError
from dipid.files import atomic_path

if TYPE_CHECKING:
    from dipid.models.sslm import SSLM
    from dipid.models.tlm import TLM

__all__ = [
    "CHECKPOINT_FORMAT",
    "StateDictDiff",
    "compare_state_dicts",
    "format_state_dict_diff",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "read_checkpoint_tensors",
    "quantize_per_channel",
    "dequantize_per_channel",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dipid"
# BatchNorm's step counter is not a weight: FrozenBatchNorm2d has none and BatchNorm2d recreates
# it, so its presence or absence never makes a checkpoint incompatible.
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8"}
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


def _model_classes() -> dict[str, tuple[type, type]]:
    # Imported here: tlm.py uses this module's readers, so a module-level import would be circular.
    from dipid.models.sslm import SSLM, SSLMConfig
    from dipid.models.tlm import TLM, TLMConfig

    return {TLM.name: (TLM, TLMConfig), SSLM.name: (SSLM, SSLMConfig)}


def save_checkpoint(
    model: TLM | SSLM,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s weights and configuration to a ``.safetensors`` file, atomically.

    Args:
        model: a TLM or SSLM (anything with ``name`` and a dataclass ``config``).
        path: destination file; its folder must exist.
        metadata: JSON-serialisable extra information stored alongside.
        dtype: store floating tensors in this dtype (``torch.float16`` halves the file,
            ``torch.int8`` quarters it: see the module docstring); :func:`load_checkpoint`
            always returns float32 weights.
    Returns:
        the path written.
    """
    path = Path(path)
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if dtype is torch.int8 and value.is_floating_point():
            if value.dim() >= 2 and value.numel() >= INT8_MIN_ELEMENTS and not any(f in key for f in INT8_KEEP_FLOAT):
                value, tensors[key + SCALE_SUFFIX] = quantize_per_channel(value)
            else:
                value = value.float()
        elif dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        # clone: safetensors refuses tensors that share storage or are not contiguous.
        tensors[key] = value.contiguous().clone()
    header = {
        "format": CHECKPOINT_FORMAT,
        "model": model.name,
        "config": json.dumps(asdict(model.config)),
        "dipid_version": _dipid_version(),
        "dtype": _DTYPE_NAMES[dtype] if dtype is not None else "float32",
        "metadata": json.dumps(dict(metadata or {})),
    }
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: folder {path.parent} does not exist; create it before saving.")
    with atomic_path(path) as temp:
        save_file(tensors, temp, metadata=header)
    logger.info("saved %s checkpoint %s (%d tensors, %s)", model.name, path, len(tensors), header["dtype"])
    return path


def _dipid_version() -> str:
    import dipid

    return str(getattr(dipid, "__version__", "unknown"))


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


def _config_from_dict(config_cls: type, values: Mapping[str, Any], path: Path) -> Any:
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        # A newer dipid may add options; an older reader keeps what it understands.
        logger.warning("%s: ignoring unknown config keys %s", path, ", ".join(unknown))
    try:
        return config_cls(**{k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its stored config cannot build a model ({exc}); the file is damaged.") from exc


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> TLM | SSLM:
    """Rebuild the model a checkpoint describes and load its weights strictly.

    Returns:
        the TLM or SSLM, float32, on ``device``, in eval mode.
    Raises:
        WeightsNotFoundError: no such file.
        CheckpointError: not safetensors, not dipid, or tensors that do not fit the architecture
            (the message names the missing, unexpected and shape-mismatched tensors).
    """
    path = Path(path)
    header = read_checkpoint_metadata(path)
    classes = _model_classes()
    kind = header.get("model")
    if kind not in classes:
        raise CheckpointError(
            f"{path}: holds a model named {kind!r}, which this dipid does not know (valid: "
            f"{', '.join(classes)}); it may come from a newer dipid."
        )
    model_cls, config_cls = classes[kind]
    model = model_cls(_config_from_dict(config_cls, header["config"], path))
    tensors = read_checkpoint_tensors(path)
    diff = compare_state_dicts(model.state_dict(), tensors)
    if diff:
        raise CheckpointError(
            f"{path}: tensors do not match the {kind} architecture in its own metadata: "
            f"{format_state_dict_diff(diff)}. The file was edited or written by an incompatible dipid."
        )
    expected = model.state_dict()
    tensors = {k: v.to(expected[k].dtype) if k in expected else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
