"""Training loops (functions, not model methods); imported lazily so ``dipid.train`` stays light."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"fit_sslm": "dipid.train.sslm", "train_sslm": "dipid.train.sslm"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dipid.train' has no attribute {name!r}")
