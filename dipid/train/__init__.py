"""Training loops (functions, not model methods); imported lazily so ``dipid.train`` stays light."""

from __future__ import annotations

from dipid._lazy import lazy_exports

_LAZY = {
    # Run folders (what `dipid train tlm|sslm` calls), one life cycle: dipid.train.run.run_training.
    "train_tlm": "dipid.train.tlm",
    "TLMTrainOptions": "dipid.train.tlm",
    "train_sslm": "dipid.train.sslm_run",
    "SSLMTrainOptions": "dipid.train.sslm_run",
    "RunSummary": "dipid.train.run",
    "run_training": "dipid.train.run",
    # Frames in memory, model out, no run folder.
    "fit_sslm": "dipid.train.sslm",
    "train_sslm_on_frames": "dipid.train.sslm",
    "load_training_data": "dipid.train.datasets",
    "build_augmentation": "dipid.train.augment",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
