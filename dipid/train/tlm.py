"""Training the TLM (Mask R-CNN) into a resumable run folder.

:func:`train_tlm` is what ``dipid train tlm`` calls. The run folder (layout, state files, error
handling) and the life cycle of a run (resume, config, best and last checkpoints, history) are
:mod:`dipid.train.run`; this module is the TLM's part, :class:`TLMTask`: its model, optimiser,
epochs and validation.

Choices, and why:

* **Crops centred on peaks** (``crop_size=128``, 4 crops a frame, a quarter of them anywhere;
  :class:`dipid.train.datasets.PeakCrops`). A 195 x 487 frame is mostly background and holds a
  few peaks; a 128 x 128 window is 1/6 of its pixels, so a batch of 16 crops costs about what 3
  frames cost and shows the heads 12 peaks where 3 frames show about 6, at every position in the
  window. Validation stays on whole frames, as the models are used. ``crop_size=None`` trains
  on whole frames.
* **From scratch on a CPU: AdamW (lr 3e-4, weight decay 1e-4), linear warm-up, cosine decay to
  1 % over the whole run, gradient norm clipped at 10** (``optimizer="adamw"``,
  ``schedule="cosine"``). Adam's per-parameter steps need no lr search across the randomly
  initialised body and heads, and a cosine schedule over a known budget ends each run at a low
  lr with nothing to tune; the plateau schedule needs epochs of evidence a CPU budget does not
  have. Fine-tuning a pretrained start keeps the SGD recipe below (``optimizer="sgd"``).
* **Weight EMA** (``ema_decay=0.999``, ramped up over the first steps): validation, ``best`` and
  ``last`` use the exponential moving average of the weights (BatchNorm statistics copied from
  the live model), which removes most of the epoch-to-epoch swing of validation IoU seen when
  training from scratch with small batches.
* **Optimiser for fine-tuning: SGD, momentum 0.9, weight decay 1e-4**, the recipe torchvision's detection
  reference scripts and Detectron2 train Mask R-CNN with; the pretrained heads and the COCO
  learning-rate schedule were tuned for it, and AdamW gave no better masks in fine-tuning
  reports while needing a new learning-rate search. Default lr 0.005 is the reference
  0.02 / 16 images scaled to 4 images per batch. The first ``warmup_steps`` steps ramp the lr up
  linearly from 1/1000 (as the reference does), because the new two-class heads start random and
  a full-size first step can blow the RPN losses up to NaN.
* **ReduceLROnPlateau on the validation loss** (factor 0.1, patience 2 epochs): peak datasets
  differ too much in size for a fixed step schedule.
* **Best checkpoint by validation mean IoU** (:func:`dipid.metrics.evaluate_frames`, DiPID's
  union-IoU measure, with detections kept as the JointPredictor keeps them); ties are broken by
  the lower validation loss. When the validation frames hold no peaks at all, IoU is undefined
  and the validation loss decides. COCO mask AP is recorded too.
* **Validation loss** is computed in train mode (torchvision only returns losses there) under
  ``torch.no_grad()`` with every BatchNorm and dropout layer in eval mode (:func:`loss_mode`;
  the TLM's ResNet body already uses FrozenBatchNorm2d, and v1 heads have no BatchNorm, but v2
  heads do), with the proposal sampler's RNG forked and seeded the same way every epoch, so
  validation neither changes the model nor the training RNG stream, and epochs compare fairly.
* **Validation frames are materialised once per run** (the first ``val_frames`` samples, with
  the dataset's epoch set to 0), so a ``sim:`` spec gives the same frames every epoch.
* **Reproducibility**: python, numpy and torch are seeded from ``seed``; each epoch's shuffling
  uses its own generator seeded from (seed, epoch); the global RNG states are saved with every
  epoch and restored on resume, so 2 epochs straight and 1 + resume 1 give the same history.
"""

from __future__ import annotations

import copy
import logging
import math
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from dipid.errors import TrainingError, UnknownNameError
from dipid.files import to_jsonable
from dipid.io.coco import FrameLabels
from dipid.metrics import coco_mask_ap, evaluate_frames
from dipid.models import TLM, build_tlm
from dipid.models.device import resolve_device
from dipid.train.augment import build_augmentation
from dipid.train.datasets import PeakCrops, collate_detection, load_training_data
from dipid.train.run import (
    AmpSettings,
    BestRule,
    HistoryLayout,
    RunContext,
    RunSummary,
    TrainEvent,
    amp_settings,
    check_option_names,
    derive_seed,
    loss_mode,
    run_training,
    seed_worker,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TLMTrainOptions",
    "TLMTask",
    "TrainEvent",
    "ValidationResult",
    "HISTORY_COLUMNS",
    "LOSS_PARTS",
    "train_tlm",
    "warmup_factor",
    "cosine_factor",
    "ema_update",
]

#: torchvision Mask R-CNN loss terms, in history column order.
LOSS_PARTS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
#: Columns of history.csv.
HISTORY_COLUMNS = ("epoch", "train_loss", *LOSS_PARTS, "val_loss", "val_iou", "val_ap", "lr", "seconds")
#: Options that cannot change when a run is resumed (they shape the model or the random stream).
_FIXED_ON_RESUME = ("freeze", "version", "model_options", "seed")
_OPTIMIZERS = ("adamw", "sgd")
_SCHEDULES = ("cosine", "plateau")
#: Frames taken from an unbounded (iterable) validation dataset when ``val_frames`` is None.
DEFAULT_ITERABLE_VAL_FRAMES = 32


@dataclass
class TLMTrainOptions:
    """Every option of a TLM training run (stored in config.json).

    Attributes:
        train, val: data specs for :func:`dipid.train.datasets.load_training_data` (a COCO JSON,
            a folder of ``*_labels.json``, or ``"sim:<preset>"``).
        out: the run folder.
        base_weights: "coco", a weights file, or None (random initialisation).
        freeze: "backbone", "none" or an int 0..5 (trainable ResNet stages).
        version: TLM architecture, "v1" or "v2".
        model_options: further keyword options of :func:`dipid.models.build_tlm` (anchor sizes,
            detections_per_img, rpn_post_nms_top_n_test, ...); stored in the checkpoints.
        rois_per_image: proposals sampled per sample (crop or frame) to train the box and mask
            heads. torchvision's default is 512, sized for COCO's dozens of objects per
            photograph; a 128 x 128 crop holds one to three peaks, so 32 a crop (512 a step of 16
            crops, what 128 a frame gave a step of 4 frames) keeps the positives at a fraction of
            the cost. Use about 128 when training on whole frames.
        epochs: total epochs (a resumed run continues up to this).
        batch_size: samples (crops, or frames with ``crop_size=None``) per optimiser step.
        lr: learning rate (None: 3e-4 for AdamW, 0.005 for SGD; see the module docstring).
        momentum: SGD momentum; weight_decay: SGD or AdamW weight decay.
        optimizer: "adamw" or "sgd".
        schedule: "cosine" (warm-up, then cosine decay to ``min_lr_factor`` x lr at the last step
            of ``epochs`` x ``steps_per_epoch``) or "plateau" (ReduceLROnPlateau on the
            validation loss).
        min_lr_factor: the cosine schedule's final lr as a fraction of ``lr``.
        ema_decay: decay of the weight EMA that is validated and saved (None: no EMA).
        crop_size: train on square crops of this size centred on peaks (None: whole frames).
        crops_per_frame, background_crops: crops cut from each training frame, and the share of
            them placed anywhere rather than on a peak.
        warmup_steps: linear lr warm-up steps at the start (capped to the first epoch).
        plateau_factor, plateau_patience: ReduceLROnPlateau settings (on the validation loss).
        grad_clip: clip the gradient norm to this (None: no clipping).
        augment: augment training frames (:func:`dipid.train.augment.build_augmentation`: flips,
            rot180, intensity, background, Poisson noise); validation frames never are.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler).
        seed: seeds everything (weights of the new heads, data order, augmentation).
        resume: continue the run in ``out`` from its last finished epoch.
        num_workers: DataLoader worker processes.
        steps_per_epoch: optimiser steps per epoch (None: one pass over the training data).
        val_frames: validation frames used (None: all of a finite set, 32 of an unbounded one).
        score_threshold, mask_threshold: how detections become masks for the validation IoU
            (the JointPredictor's defaults).
        progress: show tqdm progress bars.
    """

    train: str | Path
    val: str | Path
    out: str | Path
    base_weights: str | Path | None = None
    freeze: str | int = "backbone"
    version: str = "v1"
    model_options: dict[str, Any] = field(default_factory=dict)
    rois_per_image: int = 32
    epochs: int = 10
    batch_size: int = 16
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    grad_clip: float | None = 10.0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    min_lr_factor: float = 0.01
    ema_decay: float | None = 0.999
    crop_size: int | None = 128
    crops_per_frame: int = 4
    background_crops: float = 0.25
    augment: bool = True
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    resume: bool = False
    num_workers: int = 0
    steps_per_epoch: int | None = None
    val_frames: int | None = None
    score_threshold: float = 0.4
    mask_threshold: float = 0.5
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "rois_per_image"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and int(self.steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        if self.val_frames is not None and int(self.val_frames) < 1:
            raise ValueError(f"val_frames must be >= 1 or None, got {self.val_frames}")
        if self.optimizer not in _OPTIMIZERS:
            raise UnknownNameError("optimizer", self.optimizer, _OPTIMIZERS)
        if self.schedule not in _SCHEDULES:
            raise UnknownNameError("schedule", self.schedule, _SCHEDULES)
        if self.lr is None:
            self.lr = 3e-4 if self.optimizer == "adamw" else 0.005
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.crop_size is not None and int(self.crop_size) < 32:
            raise ValueError(f"crop_size must be >= 32 or None, got {self.crop_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as str)."""
        return to_jsonable(asdict(self))

    def resume_command(self) -> str:
        """The shell command that resumes this run."""
        q = lambda value: shlex.quote(str(value))  # noqa: E731 - tiny local helper
        return f"dipid train tlm --train {q(self.train)} --val {q(self.val)} --out {q(self.out)} --resume"


@dataclass
class ValidationResult:
    """Validation of one epoch.

    Attributes:
        loss: mean summed Mask R-CNN loss over validation batches (train-mode losses, no updates).
        parts: mean of each loss term.
        iou: mean union IoU over frames with peaks (NaN when none has peaks).
        ap: COCO mask AP (0.50:0.95; NaN when there are no true peaks).
        metrics: everything :func:`dipid.metrics.evaluate_frames` returned, plus AP50/AP75.
    """

    loss: float
    parts: dict[str, float]
    iou: float
    ap: float
    metrics: dict[str, float]


# ================================================================================ pure maths
def warmup_factor(step: int, warmup_steps: int, *, start: float = 1e-3) -> float:
    """Linear lr warm-up multiplier: ``start`` at step 0 rising to 1 at ``warmup_steps``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    alpha = step / warmup_steps
    return start * (1 - alpha) + alpha


def cosine_factor(step: int, total_steps: int, *, final: float = 0.01) -> float:
    """Cosine lr multiplier: 1 at step 0 falling to ``final`` at ``total_steps`` (and after).

        factor = final + (1 - final) * (1 + cos(pi * min(step, total) / total)) / 2
    """
    if total_steps <= 0:
        return 1.0
    progress = min(max(step, 0), total_steps) / total_steps
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(average: torch.nn.Module, model: torch.nn.Module, *, decay: float, step: int) -> None:
    """One step of the weight EMA: ``average <- d * average + (1 - d) * model`` for every parameter.

    ``d = min(decay, (1 + step) / (10 + step))`` so the average follows the fast-moving first steps
    instead of remembering the random initialisation. Buffers (BatchNorm statistics) are copied.
    """
    d = min(decay, (1.0 + step) / (10.0 + step))
    for avg, live in zip(average.parameters(), model.parameters()):
        avg.lerp_(live.detach(), 1.0 - d)
    for avg, live in zip(average.buffers(), model.buffers()):
        avg.copy_(live)


# ================================================================================ public API
def train_tlm(
    *,
    train: str | Path,
    val: str | Path,
    out: str | Path,
    base_weights: str | Path | None = None,
    freeze: str | int = "backbone",
    epochs: int = 10,
    batch_size: int = 16,
    lr: float | None = None,
    device: str = "auto",
    amp: bool = True,
    seed: int = 0,
    resume: bool = False,
    num_workers: int = 0,
    steps_per_epoch: int | None = None,
    val_frames: int | None = None,
    progress: bool = True,
    callback: Callable[[TrainEvent], None] | None = None,
    **options: Any,
) -> RunSummary:
    """Train a TLM into the run folder ``out`` (see :class:`TLMTrainOptions` for every option).

    Args:
        callback: called with a :class:`TrainEvent` after every step and every saved epoch; an
            exception it raises stops training (KeyboardInterrupt is handled like Ctrl-C).
        **options: further :class:`TLMTrainOptions` fields (version, momentum, warmup_steps, ...).
    Returns:
        :class:`RunSummary`; the weights are in ``out/best.safetensors`` and ``out/last.safetensors``.
    Raises:
        TrainingError: NaN/inf loss, out of memory or Ctrl-C; the message names the run folder
            and the command that resumes it. The last finished epoch is always on disk.
    """
    check_option_names(TLMTrainOptions, options, caller="train_tlm")
    opts = TLMTrainOptions(
        train=train, val=val, out=out, base_weights=base_weights, freeze=freeze, epochs=epochs,
        batch_size=batch_size, lr=lr, device=device, amp=amp, seed=seed, resume=resume,
        num_workers=num_workers, steps_per_epoch=steps_per_epoch, val_frames=val_frames,
        progress=progress, **options,
    )
    return run_training(TLMTask(opts), callback=callback)


# ================================================================================ the task
class TLMTask:
    """The TLM's part of a run (a :class:`dipid.train.run.TrainingTask`); the life cycle is
    :func:`dipid.train.run.run_training`.
    """

    kind = "tlm"
    history = HistoryLayout(
        columns=HISTORY_COLUMNS,
        x="epoch",
        loss_columns=("train_loss", *LOSS_PARTS, "val_loss"),
        metric_columns=("val_iou", "val_ap"),
        log_columns=("train_loss", "val_loss", "val_iou", "val_ap"),
    )
    fixed_on_resume = _FIXED_ON_RESUME

    def __init__(self, opts: TLMTrainOptions):
        self.opts = opts
        self.device = resolve_device(opts.device)
        self.amp: AmpSettings = amp_settings(self.device, opts.amp)

    @property
    def epochs(self) -> int:
        return int(self.opts.epochs)

    # ------------------------------------------------------------------ setup
    def load_data(self) -> None:
        opts = self.opts
        self.train_data = _load_dataset(opts.train, augment=opts.augment, seed=opts.seed)
        self.val_data = _load_dataset(opts.val, augment=False, seed=derive_seed(opts.seed, "val"))

    def build(self, run: RunContext, existing: Mapping[str, Any] | None, *, resumed: bool) -> None:
        opts = self.opts
        # The order below is the order of random draws after seeding: keep it, or runs change.
        self.model = self._build_model(existing, resumed=resumed)
        params = self.model.trainable_parameters()
        if not params:
            raise TrainingError(f"{run.folder.path}: freeze={opts.freeze!r} leaves no trainable parameters")
        if opts.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum,
                                             weight_decay=opts.weight_decay)
        self.ema = _ema_copy(self.model) if opts.ema_decay is not None else None
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=opts.plateau_factor, patience=opts.plateau_patience
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp.use_scaler)
        if opts.crop_size is not None:
            self.train_data = PeakCrops(self.train_data, size=(opts.crop_size, opts.crop_size),
                                        crops_per_frame=opts.crops_per_frame,
                                        background_fraction=opts.background_crops, seed=opts.seed)
        self.val_samples = _materialise(self.val_data, opts.val_frames, spec=opts.val)
        if any(len(t["masks"]) for _, t in self.val_samples):
            self.best_rule = BestRule("val_iou", higher_is_better=True, tie_loss="val_loss")
        else:
            logger.warning("validation data %s has no peaks: the best checkpoint is chosen by validation loss", opts.val)
            self.best_rule = BestRule("val_loss", higher_is_better=False, tie_loss="val_loss")

    def _build_model(self, existing: Mapping[str, Any] | None, *, resumed: bool) -> TLM:
        opts = self.opts
        # A resumed run gets its weights from the state: the base weights are not fetched again.
        # But they chose the architecture's BatchNorm (frozen when starting from weights, trained
        # from scratch), so a resumed run takes it from the model config it wrote: rebuilt without
        # base weights it would get trainable BatchNorm, another optimiser layout and other maths.
        stored = dict((existing or {}).get("model") or {}) if resumed else {}
        norm = {key: stored[key] for key in ("batchnorm", "batchnorm_eps") if key in stored}
        model = build_tlm(base_weights=None if resumed else opts.base_weights, freeze=opts.freeze,
                          version=opts.version, **{**norm, **opts.model_options})
        if resumed and existing is not None:
            model.config.base_weights = existing.get("base_weights_source")
        # A training-time setting of torchvision's RoIHeads, not part of the architecture.
        model.net.roi_heads.fg_bg_sampler.batch_size_per_image = int(opts.rois_per_image)
        return model.to(self.device)

    def config_sections(self) -> dict[str, Any]:
        opts = self.opts
        scheduler = "ReduceLROnPlateau(val_loss)" if opts.schedule == "plateau" else f"cosine to {opts.min_lr_factor} x lr"
        return {
            "base_weights_source": self.model.config.base_weights,
            "data": {"train": str(opts.train), "val": str(opts.val), "val_frames_used": len(self.val_samples)},
            "model": to_jsonable(asdict(self.model.config)),
            "optimizer": {"name": type(self.optimizer).__name__, "lr": opts.lr, "momentum": opts.momentum,
                          "weight_decay": opts.weight_decay, "scheduler": scheduler,
                          "warmup_steps": opts.warmup_steps, "ema_decay": opts.ema_decay,
                          "grad_clip": opts.grad_clip,
                          "trainable_parameters": sum(p.numel() for p in self.model.trainable_parameters())},
            "device": str(self.device),
            "amp": {"enabled": self.amp.enabled, "dtype": self.amp.dtype_name, "grad_scaler": self.amp.use_scaler},
        }

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            # Run folders from before the EMA have none: the average starts from the live weights.
            self.ema.load_state_dict(state.get("ema") or state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            # A run resumed with another --optimizer: the moments cannot carry over; start them afresh.
            logger.warning("%s: optimiser state not restored (%s); starting it afresh", self.opts.out, exc)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """The weights that are validated and saved: the EMA when there is one."""
        return self.ema if self.ema is not None else self.model

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, run: RunContext, epoch: int) -> dict[str, Any]:
        opts = self.opts
        loader = self._train_loader(epoch)
        n_steps = _steps_in_epoch(loader, opts.steps_per_epoch, spec=opts.train)
        base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        warmup = min(opts.warmup_steps, n_steps) if epoch == 1 else 0
        total_steps = opts.epochs * n_steps
        sums = dict.fromkeys(("train_loss", *LOSS_PARTS), 0.0)
        done = 0
        last_lr = base_lrs[0]
        self.model.train()
        bar = tqdm(total=n_steps, desc=f"epoch {epoch}/{opts.epochs}", unit="step", disable=not opts.progress,
                   leave=False)
        try:
            for images, targets in _cycle(loader, n_steps):
                factor = warmup_factor(done, warmup) if warmup else 1.0
                if opts.schedule == "cosine":
                    factor *= cosine_factor(run.global_step, total_steps, final=opts.min_lr_factor)
                if factor != 1.0:
                    for group, base in zip(self.optimizer.param_groups, base_lrs):
                        group["lr"] = base * factor
                losses = self._step(run, images, targets, epoch, done + 1)
                done += 1
                for key in sums:
                    sums[key] += losses.get(key, 0.0)
                last_lr = self.optimizer.param_groups[0]["lr"]
                bar.update(1)
                bar.set_postfix(loss=f"{losses['train_loss']:.3f}", lr=f"{last_lr:.2g}")
                run.after_step(epoch, done, losses)
        finally:
            bar.close()
            for group, base in zip(self.optimizer.param_groups, base_lrs):
                group["lr"] = base
        if done == 0:
            raise TrainingError(f"{opts.train}: the training data yielded no batches; check the data spec")
        return {**{k: v / done for k, v in sums.items()}, "lr": last_lr}

    def _train_loader(self, epoch: int) -> DataLoader:
        data = self.train_data
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        generator = torch.Generator().manual_seed(derive_seed(self.opts.seed, "train-loader", epoch))
        iterable = isinstance(data, IterableDataset)
        return DataLoader(
            data,
            batch_size=self.opts.batch_size,
            shuffle=not iterable,
            drop_last=False,
            collate_fn=collate_detection,
            num_workers=self.opts.num_workers,
            worker_init_fn=seed_worker,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _step(self, run: RunContext, images: Any, targets: list[dict[str, torch.Tensor]], epoch: int,
              step: int) -> dict[str, float]:
        images = _to_device(images, self.device)
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, dtype=self.amp.dtype, enabled=self.amp.enabled):
            loss_dict = self.model(images, targets)
        loss = sum(v.float() for v in loss_dict.values())
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        if not math.isfinite(float(loss.detach())):
            parts = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            raise TrainingError(
                f"the training loss became {float(loss.detach())} in epoch {epoch}, step {step} ({parts}); "
                f"{run.stopped()} and a lower --lr (now {self.optimizer.param_groups[0]['lr']:.3g}), or check the "
                "training labels"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.opts.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.opts.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            ema_update(self.ema, self.model, decay=self.opts.ema_decay, step=run.global_step)
        return {"train_loss": float(loss.detach()), **values}

    # ------------------------------------------------------------------ validation
    def validate(self, run: RunContext, epoch: int) -> dict[str, Any]:
        self.validation = self._validate()
        if self.opts.schedule == "plateau":
            self.scheduler.step(self.validation.loss)
        return {"val_loss": self.validation.loss, "val_iou": self.validation.iou, "val_ap": self.validation.ap}

    def _validate(self) -> ValidationResult:
        opts = self.opts
        model = self.evaluated_model
        # Whole frames: a smaller batch than the crops keeps memory bounded.
        frames_per_batch = max(1, opts.batch_size // opts.crops_per_frame if opts.crop_size else opts.batch_size)
        batches = [self.val_samples[i : i + frames_per_batch] for i in range(0, len(self.val_samples), frames_per_batch)]
        loss_sum, part_sums = 0.0, dict.fromkeys(LOSS_PARTS, 0.0)
        # Forked so the proposal samplers' draws neither vary between epochs nor shift training's RNG stream.
        fork_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad(), loss_mode(model):
            torch.manual_seed(derive_seed(opts.seed, "val-loss"))
            for batch in batches:
                images, targets = _stack(batch, self.device)
                with torch.autocast(self.device.type, dtype=self.amp.dtype, enabled=self.amp.enabled):
                    loss_dict = model(images, targets)
                loss_sum += float(sum(v.float() for v in loss_dict.values())) * len(batch)
                for key in part_sums:
                    part_sums[key] += float(loss_dict.get(key, torch.zeros(()))) * len(batch)
        n = len(self.val_samples)

        # Detections are kept as the JointPredictor keeps them (score, then mask threshold); the
        # metrics are the pure functions of dipid.metrics, so validation needs no predictor.
        gt_masks, kept, everything = [], [], []
        model.eval()
        with torch.no_grad():
            for batch in batches:
                images, _ = _stack(batch, self.device)
                with torch.autocast(self.device.type, dtype=self.amp.dtype, enabled=self.amp.enabled):
                    outputs = model(images)
                for (_, target), output in zip(batch, outputs):
                    gt_masks.append(target["masks"].cpu().numpy().astype(bool))
                    masks = (output["masks"][:, 0].float() >= opts.mask_threshold).cpu().numpy()
                    scores = output["scores"].float().cpu().numpy()
                    everything.append((masks, scores))
                    keep = scores >= opts.score_threshold
                    kept.append((masks[keep], scores[keep]))
        model.train()
        metrics = evaluate_frames(gt_masks, kept)
        labels = [FrameLabels.from_masks("val", i, m) for i, m in enumerate(gt_masks)]
        ap = coco_mask_ap(labels, everything)
        metrics.update(ap)
        return ValidationResult(
            loss=loss_sum / n,
            parts={k: v / n for k, v in part_sums.items()},
            iou=float(metrics["mean_iou"]),
            ap=float(ap["AP"]),
            metrics={k: float(v) for k, v in metrics.items()},
        )

    # ------------------------------------------------------------------ saving
    def checkpoint(self, row: Mapping[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
        opts, validation = self.opts, self.validation
        return self.evaluated_model, {
            "seed": opts.seed,
            "train_data": str(opts.train),
            "val_data": str(opts.val),
            "val_frames": len(self.val_samples),
            "val_metrics": {"val_loss": validation.loss, **{f"val_{k}": v for k, v in validation.metrics.items()}},
        }


def _ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` to hold the weight average."""
    average = copy.deepcopy(model)
    for parameter in average.parameters():
        parameter.requires_grad_(False)
    return average


# ================================================================================ data helpers
def _load_dataset(spec: str | Path, *, augment: bool, seed: int) -> Dataset:
    """A dataset from a spec (see :func:`dipid.train.datasets.load_training_data`), augmented or not."""
    return load_training_data(spec, augment=build_augmentation() if augment else None, seed=seed)


def _materialise(data: Dataset, limit: int | None, *, spec: str | Path) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The first ``limit`` samples of a dataset, held in memory (epoch 0 for datasets that have epochs)."""
    if hasattr(data, "set_epoch"):
        data.set_epoch(0)
    if isinstance(data, IterableDataset):
        limit = limit or DEFAULT_ITERABLE_VAL_FRAMES
        samples = []
        for sample in data:
            samples.append(sample)
            if len(samples) >= limit:
                break
    else:
        n = len(data)  # type: ignore[arg-type]
        samples = [data[i] for i in range(min(n, limit) if limit else n)]
    if not samples:
        raise TrainingError(f"{spec}: the validation data holds no frames; pass a --val spec with labelled frames")
    return [(image.detach().cpu(), {k: v.detach().cpu() for k, v in target.items()}) for image, target in samples]


def _steps_in_epoch(loader: DataLoader, steps_per_epoch: int | None, *, spec: str | Path) -> int:
    if steps_per_epoch is not None:
        return int(steps_per_epoch)
    try:
        return len(loader)
    except TypeError as exc:
        raise TrainingError(
            f"{spec}: the training data has no fixed length; pass steps_per_epoch to set how long an epoch is"
        ) from exc


def _cycle(loader: DataLoader, n_steps: int) -> Iterable[Any]:
    """``n_steps`` batches, restarting the loader when it runs out (epochs are step counts)."""
    produced = 0
    while produced < n_steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            produced += 1
            if produced >= n_steps:
                return
        if empty:
            return


def _to_device(images: Any, device: torch.device) -> Any:
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [image.to(device, non_blocking=True) for image in images]


def _stack(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]], device: torch.device):
    """Materialised samples -> (list of (1, H, W) images, list of targets) on ``device``."""
    images = [image.to(device) for image, _ in batch]
    targets = [{k: v.to(device) for k, v in target.items()} for _, target in batch]
    return images, targets
