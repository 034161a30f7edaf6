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

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dipid import __version__
from dipid.errors import CheckpointError
from dipid.files import atomic_path
from dipid.models.sslm import SSLM, SSLMConfig
from dipid.models.tensorfile import (
    CHECKPOINT_FORMAT,
    INT8_KEEP_FLOAT,
    INT8_MIN_ELEMENTS,
    SCALE_SUFFIX,
    compare_state_dicts,
    format_state_dict_diff,
    quantize_per_channel,
    read_checkpoint_metadata,
    read_checkpoint_tensors,
    sha256_file,
)
from dipid.models.tlm import TLM, TLMConfig

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_metadata", "sha256_file"]

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8"}
#: Model name -> (model class, config class): what :func:`load_checkpoint` can rebuild.
_MODEL_CLASSES: dict[str, tuple[type, type]] = {TLM.name: (TLM, TLMConfig), SSLM.name: (SSLM, SSLMConfig)}


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
    classes = _MODEL_CLASSES
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


def _dipid_version() -> str:
    return str(__version__)
