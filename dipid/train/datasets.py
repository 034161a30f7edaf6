"""Torch datasets of TLM (Mask R-CNN) training samples.

Every dataset yields ``(image, target)``:

* ``image``: (1, H, W) float32, detector counts passed through
  :func:`dipid.models.normalize.normalize_counts` (augmentation, if any, acts on the counts first);
* ``target``: ``boxes`` (N, 4) float32 XYXY in pixel-edge units (x1, y1 exclusive, see
  :func:`dipid.train.augment.boxes_from_masks`), ``labels`` (N,) int64 all 1 (peak), ``masks``
  (N, H, W) uint8; N may be 0 (torchvision's Mask R-CNN accepts frames with no instances).
  With ``with_bad_pixels=True`` also ``bad_pixels`` (H, W) bool, transformed with the image.

:func:`load_training_data` turns a command-line style description of the training data into one
dataset; :func:`collate_detection` batches samples for a DataLoader.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, IterableDataset, get_worker_info
from torchvision import tv_tensors

from dipid.errors import LabelError
from dipid.io import open_scan
from dipid.io.coco import FrameLabels, LabelSet, read_coco
from dipid.io.pixels import fill_bad_pixels
from dipid.models.normalize import normalize_counts
from dipid.synth import get_detector, get_preset, simulate_scan
from dipid.train.augment import boxes_from_masks, make_sample

__all__ = [
    "Sample",
    "LabelledFrames",
    "SimulatedFrames",
    "MixedFrames",
    "PeakCrops",
    "crop_sample",
    "load_training_data",
    "parse_sim_spec",
    "SimSpec",
    "collate_detection",
    "frame_sample",
]

logger = logging.getLogger(__name__)

#: ``(image (1, H, W) float32, target dict)``; see the module docstring.
Sample = tuple[torch.Tensor, dict[str, torch.Tensor]]
Augment = Callable[[Any, Any], tuple[Any, Any]]


# --- one sample ----------------------------------------------------------------------------------

def frame_sample(counts: np.ndarray, masks: np.ndarray, *, augment: Augment | None = None,
                 bad_pixels: np.ndarray | None = None) -> Sample:
    """Counts and instance masks of one frame -> a normalised training sample.

    Args:
        counts: (H, W) counts with bad pixels filled (any real dtype).
        masks: (N, H, W) bool instance masks; empty ones are dropped.
        augment: a transform taking and returning ``(image, target)`` in counts
            (see :func:`dipid.train.augment.build_augmentation`), or None.
        bad_pixels: (H, W) bool; when given it is put in the target as ``bad_pixels`` and follows
            the geometric transforms.
    """
    image, target = make_sample(counts, masks)
    if bad_pixels is not None:
        target["bad_pixels"] = tv_tensors.Mask(torch.as_tensor(np.asarray(bad_pixels, dtype=bool)))
    if augment is not None:
        image, target = augment(image, target)
    out_target = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
    out_target["boxes"] = out_target["boxes"].float()
    if "bad_pixels" in out_target:
        out_target["bad_pixels"] = out_target["bad_pixels"].bool()
    return normalize_counts(image.as_subclass(torch.Tensor)), out_target


# --- stand-in seams: the real modules are imported on first use -----------------------------------

def _open_scan(path: Path) -> Any:

    return open_scan(path)


def _simulate_scan(*, n_frames: int, preset: str, detector: str, seed: int) -> Any:

    return simulate_scan(n_frames=n_frames, preset=preset, detector=detector, seed=seed)


def _check_simulator_names(presets: Sequence[str], detector: str) -> None:

    for preset in presets:
        get_preset(preset)
    get_detector(detector)


def _fill_bad_pixels(frames: np.ndarray, bad: np.ndarray) -> np.ndarray:

    return fill_bad_pixels(frames, bad)


# --- labelled frames from scan files -------------------------------------------------------------

class LabelledFrames(Dataset):
    """The frames of a :class:`~dipid.io.coco.LabelSet`, read from their scan files.

    Each DataLoader worker opens a scan file once, on its first frame from it, and keeps it open
    (file handles are not shared across processes: a worker that finds handles opened by another
    process drops them).

    Args:
        labels: the labelled frames; scan paths are resolved with ``labels.scan_path``.
        augment: transform applied to ``(image, target)`` in counts before normalisation.
        with_bad_pixels: add the frame's ``bad_pixels`` (H, W) bool to each target.
        check_files: raise at construction when a scan file is missing.
    Raises:
        LabelError: a scan file named in the labels does not exist (``check_files``).
    """

    def __init__(self, labels: LabelSet, *, augment: Augment | None = None, with_bad_pixels: bool = False,
                 check_files: bool = True) -> None:
        self.labels = labels
        self.augment = augment
        self.with_bad_pixels = with_bad_pixels
        if check_files:
            missing = sorted({fl.scan for fl in labels if not labels.scan_path(fl.scan).exists()})
            if missing:
                shown = ", ".join(str(labels.scan_path(s)) for s in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise LabelError(f"{labels.root}: labels name scan files that are not there: {shown}{more}; "
                                 f"put the scans beside the label file (paths in it are relative to its folder)")
        self._scans: dict[str, Any] = {}
        self._owner_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def _scan(self, name: str) -> Any:
        if self._owner_pid != os.getpid():  # forked into a worker: the parent's handles are not ours
            self._scans = {}
            self._owner_pid = os.getpid()
        scan = self._scans.get(name)
        if scan is None:
            scan = self._scans[name] = _open_scan(self.labels.scan_path(name))
        return scan

    def __getitem__(self, index: int) -> Sample:
        fl: FrameLabels = self.labels[index]
        scan = self._scan(fl.scan)
        bad = None
        if self.with_bad_pixels:
            batch = next(iter(scan.iter_frames(fl.frame, fl.frame + 1, 1)))
            counts, bad = np.asarray(batch.frames[0]), np.asarray(batch.bad_pixels[0], dtype=bool)
        else:
            counts = np.asarray(scan[fl.frame])
        if counts.shape != (fl.height, fl.width):
            raise LabelError(f"{self.labels.scan_path(fl.scan)}: frame {fl.frame} is {counts.shape[0]}x"
                             f"{counts.shape[1]} but its labels are {fl.height}x{fl.width}; the label file "
                             f"was made for another detector or scan")
        return frame_sample(counts, fl.masks(), augment=self.augment, bad_pixels=bad)

    def close(self) -> None:
        """Close the scan files this process opened."""
        for scan in self._scans.values():
            close = getattr(scan, "close", None)
            if close is not None:
                close()
        self._scans = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scans"] = {}  # open files do not travel to spawned workers
        return state


# --- simulated frames ----------------------------------------------------------------------------

class SimulatedFrames(IterableDataset):
    """Freshly simulated scans, a new set every epoch.

    Each epoch simulates ``scans_per_epoch`` scans of ``n_frames`` frames with
    :func:`dipid.synth.simulate_scan` and yields their frames (bad pixels filled the way
    :class:`dipid.io.Scan` fills them), shuffled within each scan. Scan k of epoch e is seeded
    from ``(seed, e, k)``, and so is the augmentation of its frames, so the stream depends only on
    ``seed`` and the epoch, not on the number of DataLoader workers (scans are dealt out to
    workers round-robin). Call :meth:`set_epoch` before each epoch (with non-persistent workers,
    the DataLoader default, the new epoch reaches the workers).

    Args:
        preset: simulator preset name, or several to mix (each scan draws one at random).
        n_frames: frames per simulated scan.
        scans_per_epoch: scans simulated per epoch.
        seed: base seed.
        augment: transform applied to ``(image, target)`` in counts before normalisation.
        detector: detector name for the simulator.
        with_bad_pixels: add ``bad_pixels`` (H, W) bool to each target: unmeasured or saturated
            pixels, as :class:`dipid.io.FrameBatch` reports them.
    Raises:
        UnknownNameError: an unknown preset or detector.
    """

    def __init__(self, *, preset: str | Sequence[str] = "realistic", n_frames: int = 61, scans_per_epoch: int = 8,
                 seed: int = 0, augment: Augment | None = None, detector: str = "pilatus100k",
                 with_bad_pixels: bool = False) -> None:
        super().__init__()
        self.presets = (preset,) if isinstance(preset, str) else tuple(preset)
        if not self.presets:
            raise ValueError("give at least one preset")
        _check_simulator_names(self.presets, detector)
        if n_frames < 1 or scans_per_epoch < 1:
            raise ValueError(f"n_frames and scans_per_epoch must be >= 1, got {n_frames} and {scans_per_epoch}")
        self.n_frames = int(n_frames)
        self.scans_per_epoch = int(scans_per_epoch)
        self.seed = int(seed)
        self.augment = augment
        self.detector = detector
        self.with_bad_pixels = with_bad_pixels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose which epoch's scans the next iteration simulates."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_frames * self.scans_per_epoch

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in range(worker, self.scans_per_epoch, n_workers):
            yield from self._scan_samples(k)

    def _scan_samples(self, k: int) -> Iterator[Sample]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, k]))
        preset = self.presets[int(rng.integers(len(self.presets)))]
        sim = _simulate_scan(n_frames=self.n_frames, preset=preset, detector=self.detector,
                             seed=int(rng.integers(2**31 - 1)))
        raw = np.asarray(sim.frames)
        # Fill exactly what dipid.io.Scan fills in a real file (unmeasured = negative pixels; saturated
        # and hot pixels keep their counts), so training frames look like the frames seen at inference.
        counts = _fill_bad_pixels(raw, raw < 0)
        bad = (raw < 0) | (raw >= sim.saturation_value) if self.with_bad_pixels else None
        labels_by_frame = {int(fl.frame): fl for fl in sim.labels}
        h, w = raw.shape[-2:]
        logger.debug("simulated scan %d of epoch %d: preset %s, %d frames", k, self.epoch, preset, len(raw))
        for i in rng.permutation(len(raw)):
            fl = labels_by_frame.get(int(i))
            masks = fl.masks() if fl is not None else np.zeros((0, h, w), bool)
            # The augmentation draws from torch's global generator; seeding a forked copy of it per
            # frame keeps the stream independent of workers without disturbing the caller's RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**63 - 1)))
                sample = frame_sample(counts[i], masks, augment=self.augment,
                                      bad_pixels=None if bad is None else bad[i])
            yield sample


# --- mixing labelled and simulated data ----------------------------------------------------------

class MixedFrames(IterableDataset):
    """Several datasets (map-style and iterable) interleaved at random into one stream.

    Each epoch every part is used once: map-style parts in a shuffled order (split among
    DataLoader workers), iterable parts as they iterate; at each step the next sample comes from a
    part chosen with probability proportional to the samples it has left, so the mix is even over
    the epoch. Seeded from ``(seed, epoch, worker)``; :meth:`set_epoch` reaches the parts.
    """

    def __init__(self, parts: Sequence[Dataset], *, seed: int = 0) -> None:
        super().__init__()
        if not parts:
            raise ValueError("MixedFrames needs at least one dataset")
        self.parts = list(parts)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch here and in every part that has ``set_epoch``."""
        self.epoch = int(epoch)
        for part in self.parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, worker]))
        iterators: list[Iterator[Sample]] = []
        remaining: list[int] = []
        for part in self.parts:
            if isinstance(part, IterableDataset):
                iterators.append(iter(part))
                # Iterable parts split themselves among workers; this share is an estimate for the mix.
                remaining.append(max(1, len(part) // n_workers))  # type: ignore[arg-type]
            else:
                order = rng.permutation(len(part))[worker::n_workers]  # type: ignore[arg-type]
                iterators.append(_in_order(part, order))
                remaining.append(len(order))
        left = np.asarray(remaining, dtype=float)
        while left.sum() > 0:
            j = int(rng.choice(len(iterators), p=left / left.sum()))
            try:
                yield next(iterators[j])
                # An iterable part keeps a little weight until it runs out, whatever its estimate said.
                left[j] = max(left[j] - 1, 1 if isinstance(self.parts[j], IterableDataset) else 0)
            except StopIteration:
                left[j] = 0


def _in_order(dataset: Dataset, order: np.ndarray) -> Iterator[Sample]:
    for i in order:
        yield dataset[int(i)]


# --- crops centred on peaks ----------------------------------------------------------------------

def crop_sample(sample: Sample, top: int, left: int, height: int, width: int, *, min_area: int = 4) -> Sample:
    """The window ``[top:top+height, left:left+width]`` of a sample, with its instances.

    Instances keep the part of their mask inside the window; those left with fewer than
    ``min_area`` pixels are dropped (a sliver at the window's edge is not a peak one can learn).
    Boxes are recomputed from the cropped masks (:func:`dipid.train.augment.boxes_from_masks`).
    """

    image, target = sample
    rows, cols = slice(top, top + height), slice(left, left + width)
    masks = target["masks"][:, rows, cols]
    keep = masks.flatten(1).sum(dim=1) >= min_area if len(masks) else torch.zeros(0, dtype=torch.bool)
    masks = masks[keep]
    out = {"boxes": boxes_from_masks(masks), "labels": target["labels"][keep], "masks": masks}
    if "bad_pixels" in target:
        out["bad_pixels"] = target["bad_pixels"][rows, cols]
    return image[:, rows, cols], out


class PeakCrops(IterableDataset):
    """Crops of another dataset's frames, most of them centred on a peak.

    Whole detector frames are mostly background and hold a few peaks, so a step on whole frames
    spends most of its compute on pixels with nothing to learn. Each frame gives
    ``crops_per_frame`` windows of ``size``: a fraction ``background_fraction`` anywhere in the
    frame (empty frames give only these), the rest centred on a random pixel of a random peak and
    shifted by up to a quarter of the window, so peaks are seen at every position, cut by the
    window's edge too. Crops pass through a shuffle buffer so one batch mixes frames. Seeded from
    ``(seed, epoch, worker)``; :meth:`set_epoch` reaches the frames.

    Args:
        frames: a dataset of whole-frame samples (map-style or iterable).
        size: (height, width) of the crops in pixels (clipped to the frame).
        crops_per_frame: crops cut from each frame.
        background_fraction: share of crops placed anywhere, in [0, 1].
        min_area: instances with fewer pixels inside a crop are dropped.
        buffer: crops held in the shuffle buffer.
    """

    def __init__(self, frames: Dataset, *, size: tuple[int, int] = (128, 128), crops_per_frame: int = 4,
                 background_fraction: float = 0.25, min_area: int = 4, buffer: int = 64, seed: int = 0) -> None:
        super().__init__()
        if crops_per_frame < 1 or min(size) < 32:
            raise ValueError(f"crops_per_frame must be >= 1 and crops at least 32 px, got {crops_per_frame}, {size}")
        if not 0.0 <= background_fraction <= 1.0:
            raise ValueError(f"background_fraction must be in [0, 1], got {background_fraction}")
        self.frames = frames
        self.size = (int(size[0]), int(size[1]))
        self.crops_per_frame = int(crops_per_frame)
        self.background_fraction = float(background_fraction)
        self.min_area = int(min_area)
        self.buffer = max(1, int(buffer))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch here and in the frames."""
        self.epoch = int(epoch)
        if hasattr(self.frames, "set_epoch"):
            self.frames.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.frames) * self.crops_per_frame  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, worker, 7]))
        if isinstance(self.frames, IterableDataset):
            source: Iterator[Sample] = iter(self.frames)
        else:
            source = _in_order(self.frames, rng.permutation(len(self.frames))[worker::n_workers])  # type: ignore[arg-type]
        pending: list[Sample] = []
        for sample in source:
            pending.extend(self._crops(sample, rng))
            while len(pending) > self.buffer:
                yield pending.pop(int(rng.integers(len(pending))))
        rng.shuffle(pending)  # type: ignore[arg-type]
        yield from pending

    def _crops(self, sample: Sample, rng: np.random.Generator) -> list[Sample]:
        image, target = sample
        h, w = image.shape[-2:]
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        masks = target["masks"]
        crops = []
        for _ in range(self.crops_per_frame):
            if len(masks) and rng.random() >= self.background_fraction:
                rows, cols = np.nonzero(masks[int(rng.integers(len(masks)))].numpy())
                j = int(rng.integers(len(rows)))
                centre_row = rows[j] + rng.integers(-(ch // 4), ch // 4 + 1)
                centre_col = cols[j] + rng.integers(-(cw // 4), cw // 4 + 1)
                top = int(np.clip(centre_row - ch // 2, 0, h - ch))
                left = int(np.clip(centre_col - cw // 2, 0, w - cw))
            else:
                top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            crops.append(crop_sample(sample, top, left, ch, cw, min_area=self.min_area))
        return crops


# --- training data from a description -------------------------------------------------------------

_SIM_SPEC = re.compile(r"^sim:(?P<presets>[A-Za-z0-9_\-]+(?:,[A-Za-z0-9_\-]+)*)(?::(?P<n>\d+))?$")


@dataclass(frozen=True)
class SimSpec:
    """A parsed ``sim:`` description: presets to mix and scans per epoch (None = the default)."""

    presets: tuple[str, ...]
    scans_per_epoch: int | None


def parse_sim_spec(spec: str) -> SimSpec:
    """Parse ``"sim:<preset>[,<preset>...][:<scans per epoch>]"``.

    Examples: ``"sim:realistic"``, ``"sim:hard,realistic"``, ``"sim:hard,realistic:16"``.

    Raises:
        LabelError: the text starts with ``sim:`` but does not follow the syntax.
    """
    match = _SIM_SPEC.match(spec.strip())
    n = None if match is None or match["n"] is None else int(match["n"])
    if match is None or n == 0:
        raise LabelError(f"training data {spec!r}: write sim:<preset>[,<preset>...][:<scans per epoch >= 1>], "
                         f"e.g. sim:realistic or sim:hard,realistic:16")
    return SimSpec(tuple(match["presets"].split(",")), n)


def _one_part(spec: str | Path, *, augment: Augment | None, seed: int, scans_per_epoch: int, n_frames: int,
              with_bad_pixels: bool) -> Dataset:
    if isinstance(spec, str) and spec.strip().startswith("sim:"):
        sim = parse_sim_spec(spec)
        return SimulatedFrames(preset=sim.presets, n_frames=n_frames,
                               scans_per_epoch=sim.scans_per_epoch or scans_per_epoch, seed=seed, augment=augment,
                               with_bad_pixels=with_bad_pixels)
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*_labels.json"))
        if not files:
            raise LabelError(f"{path}: no *_labels.json files in this folder; give a COCO JSON file, a folder of "
                             f"*_labels.json files, or sim:<preset>")
        parts = [LabelledFrames(read_coco(f), augment=augment, with_bad_pixels=with_bad_pixels) for f in files]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if path.is_file():
        return LabelledFrames(read_coco(path), augment=augment, with_bad_pixels=with_bad_pixels)
    raise LabelError(f"{path}: no such label file or folder; give a COCO JSON file, a folder of *_labels.json "
                     f"files, or sim:<preset>[,<preset>...][:<scans per epoch>]")


def load_training_data(spec: str | Path | Sequence[str | Path], *, augment: Augment | None = None, seed: int = 0,
                       scans_per_epoch: int = 8, n_frames: int = 61, with_bad_pixels: bool = False) -> Dataset:
    """Build the training dataset a description names.

    ``spec`` is one of, or a list of:

    * a COCO JSON label file (scan paths in it relative to its folder) -> :class:`LabelledFrames`;
    * a folder: every ``*_labels.json`` in it, concatenated (what ``dipid.synth.simulate_dataset``
      writes);
    * ``"sim:<preset>[,<preset>...][:<scans per epoch>]"`` -> :class:`SimulatedFrames` simulating on
      the fly, mixing the presets; e.g. ``"sim:realistic"``, ``"sim:hard,realistic:16"``.

    A list of labelled sources becomes one map-style ``ConcatDataset``; a list that includes a
    ``sim:`` source becomes a :class:`MixedFrames` stream (an IterableDataset: no DataLoader
    ``shuffle``; call ``set_epoch``).

    Args:
        augment: transform on ``(image, target)`` in counts, applied by every part.
        seed: base seed of the simulated parts and of the mixing.
        scans_per_epoch, n_frames: for ``sim:`` parts that do not give a count.
        with_bad_pixels: add ``bad_pixels`` to every target.
    Raises:
        LabelError: a path that is not there, a folder without label files, a malformed ``sim:``.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise LabelError("no training data given; give a COCO JSON file, a folder of *_labels.json files, or sim:<preset>")
    parts = [_one_part(s, augment=augment, seed=seed + 1000 * i, scans_per_epoch=scans_per_epoch, n_frames=n_frames,
                       with_bad_pixels=with_bad_pixels) for i, s in enumerate(specs)]
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, IterableDataset) for p in parts):
        return MixedFrames(parts, seed=seed)
    return ConcatDataset(parts)


def collate_detection(batch: Sequence[Sample]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """DataLoader ``collate_fn``: samples -> (images (B, 1, H, W) float32, list of B target dicts).

    Raises:
        LabelError: the frames differ in size (mixing detectors); use one detector per run.
    """
    images = [image for image, _ in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise LabelError(f"training frames of different sizes in one batch: {sorted(shapes)}; "
                         f"train on one detector at a time")
    return torch.stack(images), [target for _, target in batch]
