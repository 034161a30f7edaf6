"""dipid's two models, their builders and their checkpoints.

* TLM: transfer-learned Mask R-CNN (ResNet-50-FPN), :func:`build_tlm`.
* SSLM: self-supervised clustering CNN, :func:`build_sslm`.

Both take (B, 1, H, W) float32 frames normalised by :func:`normalize_counts`; checkpoints are
safetensors files that carry the model's configuration (:func:`save_checkpoint`,
:func:`load_checkpoint`). :func:`dipid.models.inference.inference_copy` makes the faster
eval-only copies the JointPredictor runs (BatchNorm folded, channels-last weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dipid._compat import check_torch_install

# Every model module is imported through this package: the one place where a torch/torchvision
# pair that cannot work together is reported as a TorchInstallError instead of an obscure
# operator error deep inside torchvision.
check_torch_install()

from torch import nn  # noqa: E402 - after the check above

from dipid.errors import UnknownNameError
from dipid.models.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint, sha256_file
from dipid.models.normalize import normalize_counts
from dipid.models.sslm import SSLM, SSLMConfig, build_sslm
from dipid.models.tlm import TLM, TLMConfig, build_tlm

__all__ = [
    "build_tlm",
    "build_sslm",
    "build_model",
    "TLM",
    "SSLM",
    "TLMConfig",
    "SSLMConfig",
    "MODEL_BUILDERS",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "sha256_file",
    "normalize_counts",
]

#: Model name -> builder (keyword-only options).
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {TLM.name: build_tlm, SSLM.name: build_sslm}


def build_model(name: str, **options: Any) -> TLM | SSLM:
    """Build the model called ``name`` ("tlm" or "sslm") with the builder's keyword options."""
    if name not in MODEL_BUILDERS:
        raise UnknownNameError("model", name, list(MODEL_BUILDERS))
    return MODEL_BUILDERS[name](**options)
