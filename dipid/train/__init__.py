"""Training loops (functions, not model methods); imported lazily so ``dipid.train`` stays light."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "fit_sslm": "dipid.train.sslm",
    "train_sslm": "dipid.train.sslm",
    "train_tlm": "dipid.train.tlm",
    "TLMTrainOptions": "dipid.train.tlm",
    "train_sslm_run": "dipid.train.sslm_run",
    "SSLMTrainOptions": "dipid.train.sslm_run",
    "RunSummary": "dipid.train.run",
    "load_training_data": "dipid.train.datasets",
    "build_augmentation": "dipid.train.augment",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dipid.train' has no attribute {name!r}")
