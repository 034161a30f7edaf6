"""Training the SSLM into a resumable run folder (:func:`train_sslm`, what ``dipid train sslm`` calls).

The optimisation itself is :func:`dipid.train.sslm.fit_sslm`, and the life cycle of the run folder
(resume, config, checkpoints, history, state) is :func:`dipid.train.run.run_training`; this
module is the SSLM's part, :class:`SSLMTask`: reading unlabelled frames, epochs of
``steps_per_epoch`` steps, and the channel-role assignment
(:func:`dipid.models.sslm.assign_channels`) stored in every checkpoint so each one is usable by
the JointPredictor.

Choices, and why:

* **Frames are read once into memory**, normalised (:func:`normalize_counts`), at most
  ``max_frames`` of them, evenly spaced over the scans: the SSLM trains on random batches across
  every frame, and re-reading HDF5 per step would dominate the run.
* **Epochs are chunks of steps.** Each epoch draws its batches from a generator seeded by
  (seed, epoch), so an epoch's batches do not depend on how the run got there and a resumed run
  repeats an uninterrupted one.
* **Momentum restarts each epoch.** :func:`fit_sslm` builds its SGD optimiser per call and does
  not hand it out, so there is no optimiser state to save; restarting it at every epoch boundary
  in every run (not only after a resume) keeps resumed runs identical to straight ones. With the
  default 50 steps per epoch the restart costs a few steps of momentum build-up (0.9: ~10 steps).
* **Best checkpoint**: highest validation IoU (mean union IoU of the peak mask against labelled
  frames) when ``labels`` are given, the earlier epoch on a tie (later ones have merged more
  clusters); otherwise the lowest mean training loss of the epoch.
* **Random 128 x 128 windows and 32 channels by default** (``crop``, :data:`DEFAULT_MODEL_OPTIONS`).
  On one CPU thread a step of 4 whole Pilatus frames took 8.3 s with 100 channels and 2.0 s
  with 32; on 128 x 128 windows 1.0 s and 0.12 s. The network is fully convolutional, so
  windows train the same filters; 32 channels is what ``benchmarks/sslm_quick.py`` measured
  its loss weights with, and training merges the clusters down to a handful either way (4-7
  after 100 steps). A 100-step run then takes under a minute on a CPU.
* **Short runs, best epoch by validation IoU.** The clusters keep merging as training goes on,
  and the halo merges into the background: on simulated realistic scans the validation IoU
  was 0.55 / 0.65 / 0.55 / 0.41 after 50 / 100 / 150 / 200 steps and 0.36 after 600 (mixing
  all presets: 0.67 after 50, 0.57 after 100, 0.34 after 150). Pass ``--labels`` with a few
  labelled frames (simulated ones will do) so that ``best.safetensors`` is the best epoch,
  not the one with the lowest loss, which is always the last.
* **Training frames from every kind of scan.** The significance test at inference (see
  :mod:`dipid.models.sslm`) handles hot pixels and sloped backgrounds whatever the training
  frames, but the channels are brightness bands of whatever frames the network saw, so train
  on frames like the ones it will see: for simulated data ``--scans sim:easy sim:realistic
  sim:hard`` (each source keeps its share of ``max_frames``, so all three are there). On the
  accuracy test set an SSLM trained on all three presets and one trained on realistic scans
  only, each at its best epoch, scored alike (mean IoU 0.81 / 0.82, F1 0.71 / 0.72).
* **Channel roles** are assigned after every epoch from the statistics of ``assign_frames``
  evenly spaced training frames (or by majority vote on the labelled frames with
  ``assign_with_labels``; the validation IoU is then measured on the frames the roles were
  chosen on, so it is optimistic).
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dipid.errors import TrainingError
from dipid.files import to_jsonable
from dipid.io import open_scan, read_coco
from dipid.metrics import mean_union_iou
from dipid.models import build_sslm
from dipid.models.device import resolve_device
from dipid.models.normalize import normalize_counts
from dipid.models.sslm import assign_channels
from dipid.train.datasets import load_training_data
from dipid.train.run import (
    BestRule,
    HistoryLayout,
    RunContext,
    RunSummary,
    TrainEvent,
    check_option_names,
    derive_seed,
    run_training,
)
from dipid.train.sslm import fit_sslm, random_crops

logger = logging.getLogger(__name__)

__all__ = [
    "SSLMTrainOptions",
    "SSLMTask",
    "SSLM_HISTORY_COLUMNS",
    "DEFAULT_MODEL_OPTIONS",
    "TrainingFrames",
    "train_sslm",
    "load_unlabelled_frames",
    "epoch_batches",
    "epoch_lengths",
]

#: SSLM loss terms as :func:`dipid.models.sslm.sslm_loss` names them.
SSLM_LOSS_PARTS = ("similarity", "continuity", "context")
#: Columns of an SSLM run's history.csv.
SSLM_HISTORY_COLUMNS = ("epoch", "step", "loss", *SSLM_LOSS_PARTS, "clusters", "peak_channels", "val_iou", "lr",
                        "seconds")
_FIXED_ON_RESUME = ("model_options", "seed", "steps_per_epoch", "batch_size", "max_frames")
#: Architecture of a run's SSLM where ``model_options`` says nothing (see "Choices, and why").
DEFAULT_MODEL_OPTIONS: dict[str, Any] = {"channels": 32}


@dataclass
class SSLMTrainOptions:
    """Every option of an SSLM training run (stored in config.json).

    Attributes:
        scans: scan files (NeXus/HDF5) and/or ``"sim:<preset>"`` specs of unlabelled frames.
        out: the run folder.
        steps: optimiser steps in total (a resumed run continues up to this).
        steps_per_epoch: steps between history rows and checkpoints.
        batch_size: frames per step.
        lr, momentum: SGD settings of :func:`dipid.train.sslm.fit_sslm`.
        device: "auto", "cpu", "cuda", ...
        seed: seeds the initial weights and the batches.
        resume: continue the run in ``out`` from its last finished epoch.
        labels: COCO JSON of labelled frames: validation IoU each epoch, best by IoU.
        assign_with_labels: assign channel roles by majority vote on ``labels`` instead of from
            the training frames' statistics.
        max_frames: most training frames held in memory (evenly spaced over the scans).
        assign_frames: training frames used for the statistical channel assignment.
        val_threshold: peak probability that counts as peak for the validation IoU.
        model_options: keyword options of :func:`dipid.models.build_sslm` (channels, num_conv, ...),
            over :data:`DEFAULT_MODEL_OPTIONS`.
        crop: train on random (rows, cols) windows of the frames, a new window per frame and step;
            None = whole frames.
        progress: show tqdm progress bars.
    """

    scans: Sequence[str | Path] | str | Path
    out: str | Path
    steps: int = 100
    steps_per_epoch: int = 50
    batch_size: int = 4
    lr: float = 0.1
    momentum: float = 0.9
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    labels: str | Path | None = None
    assign_with_labels: bool = False
    max_frames: int = 1024
    assign_frames: int = 32
    val_threshold: float = 0.5
    model_options: dict[str, Any] = field(default_factory=dict)
    crop: tuple[int, int] | None = (128, 128)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.scans, (str, Path)):
            self.scans = [self.scans]
        self.scans = [str(s) for s in self.scans]
        if not self.scans:
            raise TrainingError("no scans given: pass scan files or a sim:<preset> spec")
        for name in ("steps", "steps_per_epoch", "batch_size", "max_frames", "assign_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.assign_with_labels and self.labels is None:
            raise ValueError("assign_with_labels needs labels")
        if self.crop is not None:
            crop = tuple(int(c) for c in self.crop)
            if len(crop) != 2 or min(crop) < 8:
                raise ValueError(f"crop must be (rows, cols), each >= 8, or None; got {self.crop}")
            self.crop = crop

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return to_jsonable(asdict(self))

    def resume_command(self) -> str:
        """The shell command that resumes this run."""
        scans = " ".join(shlex.quote(s) for s in self.scans)
        labels = f" --labels {shlex.quote(str(self.labels))}" if self.labels is not None else ""
        return f"dipid train sslm --scans {scans} --out {shlex.quote(str(self.out))}{labels} --resume"


@dataclass
class TrainingFrames:
    """Unlabelled training frames held in memory.

    Attributes:
        frames: (N, 1, H, W) float32 normalised counts.
        sources: N "<scan or spec>#<frame>" strings, where each frame came from.
    """

    frames: torch.Tensor
    sources: list[str]

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class _Validation:
    """Labelled frames for the validation IoU: (N, 1, H, W) normalised, (N, H, W) bool union masks."""

    frames: torch.Tensor
    masks: np.ndarray


# ================================================================================ pure helpers
def epoch_lengths(total_steps: int, steps_per_epoch: int) -> list[int]:
    """Steps in each epoch: full epochs of ``steps_per_epoch`` and a shorter last one."""
    full, rest = divmod(int(total_steps), int(steps_per_epoch))
    return [int(steps_per_epoch)] * full + ([rest] if rest else [])


def epoch_batches(n_frames: int, batch_size: int, n_steps: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
    """Frame indices of each step of one epoch: shuffled passes over all frames, no repeats within a batch.

    Depends only on its arguments (its own generator seeded from (seed, epoch)).
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, "sslm-batches", epoch))
    batch_size = min(batch_size, n_frames)
    order = torch.empty(0, dtype=torch.int64)
    batches = []
    for _ in range(n_steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n_frames, generator=generator)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def _spaced(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` evenly spaced indices into range(n)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


# ================================================================================ data
def load_unlabelled_frames(
    scans: Sequence[str | Path], *, max_frames: int = 1024, seed: int = 0
) -> TrainingFrames:
    """Read and normalise frames from scan files and/or ``sim:`` specs.

    Args:
        scans: NeXus/HDF5 scan paths (read with :func:`dipid.io.open_scan`, bad pixels filled)
            or ``"sim:<preset>[:<scans>]"`` specs (simulated with ``seed``).
        max_frames: at most this many frames in total, evenly spaced over every source.
        seed: seed of the simulated sources.
    Returns:
        :class:`TrainingFrames` with (N, 1, H, W) float32 normalised frames.
    Raises:
        TrainingError: no frames, or sources with different frame sizes.
        ScanError (and subclasses): a scan file that cannot be read.
    """
    counted: list[tuple[str, Any, int]] = []  # (name, opened source, frames available)
    for i, spec in enumerate(scans):
        text = str(spec)
        if text.strip().startswith("sim:"):
            data = load_training_data(text, seed=derive_seed(seed, "sim", i))
            if hasattr(data, "set_epoch"):
                data.set_epoch(0)
            counted.append((text, data, len(data)))  # type: ignore[arg-type]
        else:
            scan = open_scan(text)
            counted.append((text, scan, len(scan)))
    total = sum(n for _, _, n in counted)
    if total == 0:
        raise TrainingError(f"the scans {', '.join(map(str, scans))} hold no frames")
    frames: list[torch.Tensor] = []
    sources: list[str] = []
    for name, source, n in counted:
        # Each source keeps its share of max_frames, so a long scan does not crowd out short ones.
        keep = _spaced(n, max(1, round(max_frames * n / total)))
        if name.strip().startswith("sim:"):
            wanted = set(keep.tolist())
            for k, (image, _) in enumerate(source):
                if k in wanted:
                    frames.append(image.float()[None])
                    sources.append(f"{name}#{k}")
                if k >= keep[-1]:
                    break
        else:
            if len(keep) == n:
                counts = np.asarray(source[0:n], dtype=np.float32)  # one read of the whole scan
            else:
                counts = np.stack([np.asarray(source[int(k)], dtype=np.float32) for k in keep])
            counts = torch.from_numpy(counts)
            frames.append(normalize_counts(counts)[:, None])
            sources += [f"{name}#{k}" for k in keep.tolist()]
            close = getattr(source, "close", None)
            if close is not None:
                close()
    shapes = sorted({tuple(f.shape[-2:]) for f in frames})
    if len(shapes) != 1:
        raise TrainingError(
            f"the scans have frames of different sizes {shapes}; train one SSLM per detector (pass scans of one size)"
        )
    stacked = torch.cat(frames)[: max_frames]
    return TrainingFrames(frames=stacked.contiguous(), sources=sources[: len(stacked)])


def _load_validation(labels: str | Path) -> _Validation:
    label_set = read_coco(labels)
    if len(label_set) == 0:
        raise TrainingError(f"{labels}: the label file holds no frames; pass a COCO file with labelled frames")
    frames, masks = [], []
    for scan_name, group in label_set.by_scan().items():
        path = label_set.scan_path(scan_name)
        if not path.exists():
            raise TrainingError(f"{labels}: names scan {scan_name!r}, which is not at {path}; put the scan there")
        scan = open_scan(path)
        try:
            for fl in group:
                counts = np.asarray(scan[fl.frame], dtype=np.float32)
                if counts.shape != (fl.height, fl.width):
                    raise TrainingError(
                        f"{labels}: frame {fl.frame} of {path} is {counts.shape} but labelled as "
                        f"{(fl.height, fl.width)}; the labels belong to another scan or detector"
                    )
                frames.append(torch.from_numpy(counts))
                masks.append(fl.union_mask())
        finally:
            scan.close()
    return _Validation(frames=normalize_counts(torch.stack(frames))[:, None], masks=np.stack(masks))


# ================================================================================ public API
def train_sslm(
    *,
    scans: Sequence[str | Path] | str | Path,
    out: str | Path,
    steps: int = 100,
    batch_size: int = 4,
    lr: float = 0.1,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    labels: str | Path | None = None,
    progress: bool = True,
    callback: Callable[[TrainEvent], None] | None = None,
    **options: Any,
) -> RunSummary:
    """Train an SSLM on unlabelled frames into the run folder ``out``.

    (To train on frames already in memory, without a run folder, see
    :func:`dipid.train.sslm.train_sslm_on_frames`.)

    Args:
        scans: scan files and/or ``sim:`` specs (see :class:`SSLMTrainOptions`).
        callback: called with a :class:`TrainEvent` after every step and every saved epoch; an
            exception it raises stops training (KeyboardInterrupt is handled like Ctrl-C).
        **options: further :class:`SSLMTrainOptions` fields (steps_per_epoch, model_options, ...).
    Returns:
        :class:`RunSummary`; ``out/best.safetensors`` and ``out/last.safetensors`` hold SSLMs with
        their channel roles assigned.
    Raises:
        TrainingError: NaN/inf loss, out of memory or Ctrl-C; the message names the run folder
            and the command that resumes it.
    """
    check_option_names(SSLMTrainOptions, options, caller="train_sslm")
    opts = SSLMTrainOptions(scans=scans, out=out, steps=steps, batch_size=batch_size, lr=lr, device=device,
                            seed=seed, resume=resume, labels=labels, progress=progress, **options)
    return run_training(SSLMTask(opts), callback=callback)


class SSLMTask:
    """The SSLM's part of a run (a :class:`dipid.train.run.TrainingTask`); the life cycle is
    :func:`dipid.train.run.run_training`.
    """

    kind = "sslm"
    history = HistoryLayout(
        columns=SSLM_HISTORY_COLUMNS,
        x="step",
        loss_columns=("loss", *SSLM_LOSS_PARTS),
        metric_columns=("val_iou", "clusters"),
        log_columns=("loss", "clusters", "peak_channels", "val_iou"),
    )
    fixed_on_resume = _FIXED_ON_RESUME

    def __init__(self, opts: SSLMTrainOptions):
        self.opts = opts
        self.device = resolve_device(opts.device)
        self.lengths = epoch_lengths(opts.steps, opts.steps_per_epoch)

    @property
    def epochs(self) -> int:
        return len(self.lengths)

    # ------------------------------------------------------------------ setup
    def load_data(self) -> None:
        opts = self.opts
        # The labels first: a bad label file fails before the frames are read.
        self.validation = _load_validation(opts.labels) if opts.labels is not None else None
        self.data = load_unlabelled_frames(opts.scans, max_frames=opts.max_frames, seed=opts.seed)
        if self.validation is not None and self.validation.frames.shape[-2:] != self.data.frames.shape[-2:]:
            raise TrainingError(
                f"{opts.labels}: labelled frames are {tuple(self.validation.frames.shape[-2:])} but the training "
                f"frames are {tuple(self.data.frames.shape[-2:])}; use labels of the same detector"
            )
        self.assign_picks = torch.from_numpy(_spaced(len(self.data), opts.assign_frames))

    def build(self, run: RunContext, existing: Mapping[str, Any] | None, *, resumed: bool) -> None:
        opts = self.opts
        self.model = build_sslm(**{**DEFAULT_MODEL_OPTIONS, **opts.model_options}).to(self.device)
        # Ties of the validation IoU keep the earlier epoch: later ones have merged more clusters.
        self.best_rule = (BestRule("val_iou", higher_is_better=True) if self.validation is not None
                          else BestRule("loss", higher_is_better=False))
        logger.info("SSLM run %s: %d frames %s, %d steps in %d epochs", run.folder.path, len(self.data),
                    tuple(self.data.frames.shape[-2:]), opts.steps, self.epochs)

    def config_sections(self) -> dict[str, Any]:
        opts = self.opts
        return {
            "data": {"scans": list(opts.scans), "frames_used": len(self.data),
                     "frame_shape": list(self.data.frames.shape[-2:]),
                     "labels": None if opts.labels is None else str(opts.labels)},
            "model": to_jsonable(asdict(self.model.config)),
            "optimizer": {"name": "SGD (fit_sslm)", "lr": opts.lr, "momentum": opts.momentum,
                          "momentum_restarts": "every epoch"},
            "device": str(self.device),
        }

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        # No optimiser state: fit_sslm restarts its momentum every epoch (see "Choices, and why").
        return {"model": self.model.state_dict(), "channel_roles": self.model.config.channel_roles}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        roles = state.get("channel_roles")
        self.model.config.channel_roles = None if roles is None else [int(r) for r in roles]

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, run: RunContext, epoch: int) -> dict[str, Any]:
        opts = self.opts
        n_steps = self.lengths[epoch - 1]
        batches = [self.data.frames[idx] for idx in epoch_batches(len(self.data), opts.batch_size, n_steps,
                                                                   seed=opts.seed, epoch=epoch)]
        if opts.crop is not None:
            # Windows drawn from a generator of (seed, epoch), like the batches: a resumed run repeats them.
            windows = torch.Generator().manual_seed(derive_seed(opts.seed, "sslm-crops", epoch))
            batches = [random_crops(batch, opts.crop, windows) for batch in batches]
        try:
            records = fit_sslm(self.model, batches, steps=n_steps, lr=opts.lr, momentum=opts.momentum,
                               device=self.device, progress=opts.progress,
                               callback=lambda step, record: run.after_step(epoch, step + 1, record))
        except TrainingError as exc:
            raise TrainingError(f"{exc} In epoch {epoch}, {run.stopped()} and a lower --lr") from exc
        return {
            "step": run.global_step,
            "loss": float(np.mean([r["total"] for r in records])),
            **{k: float(np.mean([r[k] for r in records])) for k in SSLM_LOSS_PARTS},
            "clusters": float(np.mean([r["clusters"] for r in records])),
            "lr": opts.lr,
        }

    def validate(self, run: RunContext, epoch: int) -> dict[str, Any]:
        """Assign the channel roles (every checkpoint is usable by the JointPredictor), then the validation IoU."""
        if self.opts.assign_with_labels and self.validation is not None:
            roles = assign_channels(self.model, self.validation.frames, labels=torch.from_numpy(self.validation.masks))
        else:
            roles = assign_channels(self.model, self.data.frames[self.assign_picks])
        val_iou = self._validation_iou() if self.validation is not None else math.nan
        return {"peak_channels": sum(1 for r in roles if r != 0), "val_iou": val_iou}

    @torch.no_grad()
    def _validation_iou(self) -> float:
        assert self.validation is not None
        self.model.eval()
        pairs = []
        for start in range(0, len(self.validation.frames), self.opts.batch_size):
            x = self.validation.frames[start : start + self.opts.batch_size].to(self.device)
            predicted = (self.model.peak_probability(x) >= self.opts.val_threshold).cpu().numpy()
            for k, mask in enumerate(predicted):
                pairs.append((mask, self.validation.masks[start + k]))
        return mean_union_iou(pairs)

    # ------------------------------------------------------------------ saving
    def checkpoint(self, row: Mapping[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
        opts = self.opts
        return self.model, {
            "step": row["step"], "seed": opts.seed, "train_data": list(opts.scans), "frames_used": len(self.data),
            "labels": None if opts.labels is None else str(opts.labels),
            "metrics": {k: row[k] for k in ("loss", *SSLM_LOSS_PARTS, "clusters", "val_iou")},
            "channel_roles_from": "labels" if opts.assign_with_labels else "statistics",
        }
