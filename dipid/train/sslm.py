"""Training the SSLM: a reusable loop (:func:`fit_sslm`) and a frames-in, model-out wrapper
(:func:`train_sslm_on_frames`).

Optimiser: SGD with momentum 0.9 and learning rate 0.1, as Kim, Kanezaki & Tanaka (2020) train
their clustering network. The targets are the network's own argmax, and the large SGD step is
what lets clusters merge quickly: on synthetic blobs (24 frames, 16 channels, 60 steps of 4
frames) SGD ended with 2 clusters and a peak IoU of 0.78, Adam (lr 1e-3 / 1e-2) still had
14 / 6 clusters and reached 0.69 / 0.51.

Run folders, resuming and the CLI (:func:`dipid.train.sslm_run.train_sslm`) are built on top of
:func:`fit_sslm` elsewhere; this module only trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dipid.errors import TrainingError
from dipid.models.normalize import normalize_counts
from dipid.models.sslm import SSLM, SSLMConfig, assign_channels, sslm_loss

__all__ = ["fit_sslm", "train_sslm_on_frames", "frames_to_tensor", "random_crops"]

logger = logging.getLogger(__name__)

#: callback(step, record) after every optimiser step; record is that step's loss history entry.
StepCallback = Callable[[int, dict[str, float]], Any]


def fit_sslm(
    model: SSLM,
    batches: Iterable[Tensor],
    *,
    steps: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: StepCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``steps`` optimiser steps.

    Args:
        model: an SSLM (its config holds the loss weights).
        batches: (B, 1, H, W) float32 normalised frames, iterated again from the start if it runs
            out before ``steps`` (a list or a DataLoader; a one-shot generator ends training early).
        steps: optimiser steps.
        lr, momentum: SGD settings (see the module docstring).
        device: where to train; the model is moved there.
        progress: show a tqdm progress bar.
        callback: called as ``callback(step, record)`` after each step.
    Returns:
        one record per step: ``step``, ``total``, ``similarity``, ``continuity``, ``context``
        (floats) and ``clusters`` (distinct argmax channels in the batch).
    Raises:
        TrainingError: the loss became NaN/inf, or ``batches`` yielded nothing.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    weights = model.config.loss_weights()
    history: list[dict[str, float]] = []
    bar = tqdm(total=steps, desc="SSLM", unit="step", disable=not progress)
    try:
        while len(history) < steps:
            yielded = False
            for batch in batches:
                yielded = True
                response = model(batch.to(device, dtype=torch.float32))
                losses = sslm_loss(response, weights=weights)
                total = losses["total"]
                if not torch.isfinite(total):
                    raise TrainingError(
                        f"SSLM loss became {float(total.detach())} at step {len(history)}; lower lr (now {lr}) "
                        "or check that bad pixels were filled before normalisation."
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                record = {name: float(value.detach()) for name, value in losses.items()}
                record["clusters"] = float(response.detach().argmax(dim=1).unique().numel())
                record["step"] = float(len(history))
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['total']:.3f}", clusters=int(record["clusters"]))
                if callback is not None:
                    callback(len(history) - 1, record)
                if len(history) >= steps:
                    break
            if not yielded:
                if not history:
                    raise TrainingError("fit_sslm got no batches to train on")
                logger.warning("batches ran out after %d of %d steps; stopping early", len(history), steps)
                break
    finally:
        bar.close()
    model.eval()
    return history


def frames_to_tensor(frames: Iterable[np.ndarray] | np.ndarray) -> Tensor:
    """Counts, as (H, W) or (B, H, W) arrays (or one (N, H, W) array) -> (N, 1, H, W) float32 normalised.

    Bad pixels must be filled beforehand (:func:`dipid.io.fill_bad_pixels`); negative values are
    treated as 0 counts.
    """
    if isinstance(frames, np.ndarray):
        frames = [frames]
    stacks = []
    for item in frames:
        array = np.asarray(item)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"frames must be (H, W) or (B, H, W) arrays, got shape {array.shape}")
        stacks.append(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
    if not stacks:
        raise TrainingError("train_sslm_on_frames got no frames")
    sizes = {tuple(s.shape[-2:]) for s in stacks}
    if len(sizes) != 1:
        raise ValueError(f"all frames must have one size to be batched, got {sorted(sizes)}")
    return normalize_counts(torch.cat(stacks))[:, None]


def _random_batches(
    frames: Tensor, batch_size: int, generator: torch.Generator, crop: tuple[int, int] | None
) -> Iterable[Tensor]:
    """Shuffled batches, one pass = one epoch over ``frames``; each frame randomly cropped to
    ``crop`` (rows, cols) when given."""

    class _Epochs:
        def __iter__(self):  # noqa: ANN204 - tiny private iterable
            order = torch.randperm(len(frames), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                batch = frames[order[start : start + batch_size]]
                yield batch if crop is None else random_crops(batch, crop, generator)

    return _Epochs()


def random_crops(batch: Tensor, crop: tuple[int, int], generator: torch.Generator) -> Tensor:
    """(B, 1, H, W) -> (B, 1, rows, cols), an independent random window per frame."""
    height, width = batch.shape[-2:]
    rows, cols = min(crop[0], height), min(crop[1], width)
    tops = torch.randint(0, height - rows + 1, (len(batch),), generator=generator).tolist()
    lefts = torch.randint(0, width - cols + 1, (len(batch),), generator=generator).tolist()
    return torch.stack([frame[:, t : t + rows, l : l + cols] for frame, t, l in zip(batch, tops, lefts)])


def train_sslm_on_frames(
    frames: Iterable[np.ndarray] | np.ndarray,
    *,
    config: SSLMConfig | None = None,
    steps: int = 300,
    batch_size: int = 4,
    lr: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    assign_from_labels: tuple[np.ndarray, np.ndarray] | None = None,
    crop: tuple[int, int] | None = None,
    max_assign_frames: int = 64,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> SSLM:
    """Normalise counts, train an SSLM on them, and assign its channel roles (no run folder).

    (To train from scan files into a resumable run folder, see :func:`dipid.train.sslm_run.train_sslm`.)

    Args:
        frames: counts as (H, W) or (B, H, W) arrays, bad pixels filled.
        config: architecture, loss weights and inference settings (default :class:`SSLMConfig`).
        steps, batch_size, lr: training length, frames per step, SGD learning rate.
        seed: seeds the initial weights and the batch order.
        crop: train on random (rows, cols) windows of the frames (the network is fully
            convolutional; smaller windows make steps cheaper on large detectors). None = whole frames.
        assign_from_labels: (counts (B, H, W), masks (B, H, W) bool) of a few labelled frames:
            roles by majority vote; None: from the training frames' statistics.
        max_assign_frames: at most this many training frames (evenly spaced) for the
            unlabelled assignment.
    Returns:
        the trained SSLM in eval mode, with ``config.channel_roles`` set.
    """
    data = frames_to_tensor(frames)
    batch_size = min(batch_size, len(data))
    torch.manual_seed(seed)
    model = SSLM(SSLMConfig(**(config.to_dict() if config is not None else {})))
    generator = torch.Generator().manual_seed(seed)
    logger.info("training SSLM on %d frames %s for %d steps", len(data), tuple(data.shape[-2:]), steps)
    fit_sslm(
        model,
        _random_batches(data, batch_size, generator, crop),
        steps=steps,
        lr=lr,
        device=device,
        progress=progress,
        callback=callback,
    )
    if assign_from_labels is not None:
        label_counts, label_masks = assign_from_labels
        assign_channels(
            model, frames_to_tensor(np.asarray(label_counts)), labels=torch.from_numpy(np.asarray(label_masks, bool))
        )
    else:
        picks = np.unique(np.linspace(0, len(data) - 1, min(max_assign_frames, len(data))).round().astype(int))
        assign_channels(model, data[torch.from_numpy(picks)])
    return model.eval()
