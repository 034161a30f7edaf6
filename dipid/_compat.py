"""Checks that the installed torch and torchvision work together."""

from __future__ import annotations

from dipid.errors import TorchInstallError

_FIX = (
    "Install a matching pair in a fresh virtual environment: `pip install -e \".[dev]\"` "
    "(or `pip install torch torchvision` together) lets torchvision choose its torch; "
    "do not mix a CPU-only torch wheel with a CUDA torchvision."
)


def check_torch_install() -> None:
    """Raise :class:`TorchInstallError` if torch/torchvision are missing or their compiled ops do not load."""
    try:
        import torch
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TorchInstallError(f"dipid needs torch and torchvision: {exc}. {_FIX}") from exc
    try:
        torch.ops.torchvision.nms  # noqa: B018 - looking the op up is the check
    except (AttributeError, RuntimeError) as exc:
        raise TorchInstallError(
            f"torchvision {torchvision.__version__} cannot load its compiled operators with torch "
            f"{torch.__version__} ({exc}). {_FIX}"
        ) from exc
