"""Training augmentations and test-time-augmentation views for detector frames.

A training sample is ``(image, target)``:

* ``image``: ``tv_tensors.Image`` (1, H, W) float32 detector COUNTS (bad pixels filled, >= 0);
  augmentation happens before :func:`dipid.models.normalize.normalize_counts`, so the intensity
  transforms act on physical counts.
* ``target``: dict with ``boxes`` ``tv_tensors.BoundingBoxes`` (N, 4) float32 XYXY in pixel-edge
  units (a mask spanning columns 3..7 has x0 = 3, x1 = 8: see :func:`boxes_from_masks`),
  ``masks`` ``tv_tensors.Mask`` (N, H, W) uint8 and ``labels`` (N,) int64.

Geometric transforms (flips, rot180) go through torchvision.transforms.v2 so that masks and boxes
follow the image exactly; the intensity transforms touch the image only. Everything random draws
from torch's global generator, so ``torch.manual_seed`` makes a pipeline repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "RandomRot180",
    "RandomIntensityScale",
    "RandomBackground",
    "PoissonNoise",
    "build_augmentation",
    "boxes_from_masks",
    "make_sample",
    "TTAView",
    "tta_views",
    "scale_counts",
    "background_ramp",
]

ArrayLike = TypeVar("ArrayLike", torch.Tensor, np.ndarray)


# --- maths -------------------------------------------------------------------------------------

def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) float32 boxes (x0, y0, x1, y1), pixel-edge units, x1/y1 exclusive.

    This is the convention torchvision's flips assume (x -> W - x), so boxes stay exact under
    them, and a one-pixel peak gets a box of positive size (Mask R-CNN rejects zero-size boxes).
    Empty masks give (0, 0, 0, 0).
    """
    masks = torch.as_tensor(masks).bool()
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    if masks.shape[0] == 0:
        return boxes
    any_col = masks.any(dim=-2)  # (N, W)
    any_row = masks.any(dim=-1)  # (N, H)
    cols = torch.arange(masks.shape[-1])
    rows = torch.arange(masks.shape[-2])
    nonempty = any_col.any(dim=-1)
    big = max(masks.shape[-1], masks.shape[-2])
    boxes[:, 0] = torch.where(any_col, cols, big).amin(dim=-1).float()
    boxes[:, 1] = torch.where(any_row, rows, big).amin(dim=-1).float()
    boxes[:, 2] = torch.where(any_col, cols, -1).amax(dim=-1).float() + 1
    boxes[:, 3] = torch.where(any_row, rows, -1).amax(dim=-1).float() + 1
    boxes[~nonempty] = 0
    return boxes


def scale_counts(counts: torch.Tensor, factor: float) -> torch.Tensor:
    """Counts times ``factor``: an attenuator or count-time change (background scales too)."""
    return counts * factor


def background_ramp(height: int, width: int, *, level: float, slope: float, angle: float) -> torch.Tensor:
    """(H, W) float32 added background in counts: ``level`` everywhere plus a linear ramp.

    The ramp rises by ``slope`` counts across the frame along direction ``angle`` (radians,
    0 = increasing with column) and is 0 at its low corner, so the result is >= ``level``.
    """
    rows = torch.linspace(0.0, 1.0, height).unsqueeze(1)
    cols = torch.linspace(0.0, 1.0, width).unsqueeze(0)
    ramp = math.cos(angle) * cols + math.sin(angle) * rows
    ramp = ramp - ramp.min()
    span = float(ramp.max())
    if span > 0:
        ramp = ramp / span
    return (level + slope * ramp).float()


# --- transforms --------------------------------------------------------------------------------

class _RandomTransform(v2.Transform):
    """Applies with probability ``p``; subclasses add parameters in ``_draw`` and act in ``_apply``.

    Parameters are drawn whether or not the transform applies, so the random stream (and so every
    later transform) does not depend on the coin flip.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        super().__init__()
        self.p = p

    def _draw(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {}

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        apply = bool(torch.rand(()) < self.p)
        return {"apply": apply, **self._draw(flat_inputs)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._apply(inpt, params) if params["apply"] else inpt

    def _apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    # torchvision < 0.21 calls these private names.
    _get_params = make_params
    _transform = transform


class RandomRot180(_RandomTransform):
    """Rotate image, masks and boxes by 180 degrees with probability ``p`` (exact: both flips)."""

    def _apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.vertical_flip(F.horizontal_flip(inpt))


class _CountsTransform(_RandomTransform):
    """Acts on ``tv_tensors.Image`` counts only; masks, boxes and labels pass through."""

    _transformed_types = (tv_tensors.Image,)

    def _apply(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = self._counts(inpt.as_subclass(torch.Tensor), params)
        return tv_tensors.wrap(out.to(inpt.dtype), like=inpt)

    def _counts(self, counts: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


class RandomIntensityScale(_CountsTransform):
    """Multiply counts by a log-uniform factor in ``factor_range`` (attenuator / count time)."""

    def __init__(self, factor_range: tuple[float, float] = (0.25, 4.0), p: float = 0.5) -> None:
        super().__init__(p)
        lo, hi = factor_range
        if not 0 < lo <= hi:
            raise ValueError(f"factor_range must satisfy 0 < low <= high, got {factor_range}")
        self.factor_range = (float(lo), float(hi))

    def _draw(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = (math.log(v) for v in self.factor_range)
        return {"factor": math.exp(lo + (hi - lo) * float(torch.rand(())))}

    def _counts(self, counts: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return scale_counts(counts, params["factor"])


class RandomBackground(_CountsTransform):
    """Add a background of ``level`` counts plus a ramp of up to ``slope`` counts across the frame.

    ``level`` and ``slope`` are uniform in their ranges, the ramp direction uniform in angle (a
    different scattering background, fluorescence, or air scatter).
    """

    def __init__(self, level_range: tuple[float, float] = (0.0, 10.0),
                 slope_range: tuple[float, float] = (0.0, 10.0), p: float = 0.5) -> None:
        super().__init__(p)
        for name, (lo, hi) in (("level_range", level_range), ("slope_range", slope_range)):
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 0 <= low <= high, got {(lo, hi)}")
        self.level_range = (float(level_range[0]), float(level_range[1]))
        self.slope_range = (float(slope_range[0]), float(slope_range[1]))

    def _draw(self, flat_inputs: list[Any]) -> dict[str, Any]:
        u = torch.rand(3).tolist()
        (l0, l1), (s0, s1) = self.level_range, self.slope_range
        return {"level": l0 + (l1 - l0) * u[0], "slope": s0 + (s1 - s0) * u[1], "angle": 2 * math.pi * u[2]}

    def _counts(self, counts: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        h, w = counts.shape[-2:]
        ramp = background_ramp(h, w, level=params["level"], slope=params["slope"], angle=params["angle"])
        return counts + ramp.to(counts.device)


class PoissonNoise(_CountsTransform):
    """Replace counts x by a Poisson draw with mean x: shot noise of a fresh measurement.

    The counts already carry shot noise, so this doubles its variance; it also turns scaled or
    background-shifted (non-integer) counts back into integers, as a detector gives.
    """

    def _counts(self, counts: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return torch.poisson(counts.float().clamp_min(0))


def build_augmentation(*, flips: bool = True, rot180: bool = True, intensity: bool = True,
                       background: bool = True, noise: bool = True, p: float = 0.5) -> v2.Compose:
    """The training augmentation: each enabled transform applies independently with probability ``p``.

    Order: horizontal flip, vertical flip, rot180, intensity scale, background, Poisson noise (so
    the added background is noisy too). Takes and returns ``(image, target)`` as described in this
    module's docstring; with everything disabled it is the identity.
    """
    steps: list[v2.Transform] = []
    if flips:
        steps += [v2.RandomHorizontalFlip(p=p), v2.RandomVerticalFlip(p=p)]
    if rot180:
        steps.append(RandomRot180(p=p))
    if intensity:
        steps.append(RandomIntensityScale(p=p))
    if background:
        steps.append(RandomBackground(p=p))
    if noise:
        steps.append(PoissonNoise(p=p))
    return v2.Compose(steps or [v2.Identity()])


def make_sample(counts: np.ndarray | torch.Tensor,
                masks: np.ndarray | torch.Tensor) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
    """(H, W) counts and (N, H, W) bool masks -> ``(image, target)`` ready for augmentation.

    Empty masks are dropped (they have no box). ``labels`` are all 1 (peak).
    """
    counts_t = torch.as_tensor(np.asarray(counts, dtype=np.float32) if isinstance(counts, np.ndarray) else counts)
    counts_t = counts_t.float()
    h, w = counts_t.shape[-2:]
    masks_t = torch.as_tensor(masks).reshape(-1, h, w).bool()
    masks_t = masks_t[masks_t.flatten(1).any(dim=1)]
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes_from_masks(masks_t), format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(masks_t.to(torch.uint8)),
        "labels": torch.ones(len(masks_t), dtype=torch.int64),
    }
    return tv_tensors.Image(counts_t.reshape(1, h, w)), target


# --- test-time augmentation ----------------------------------------------------------------------

def _flip(x: ArrayLike, dims: tuple[int, ...]) -> ArrayLike:
    if not dims:
        return x
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=dims)
    return np.ascontiguousarray(np.flip(x, axis=dims))


@dataclass(frozen=True)
class TTAView:
    """One test-time view of a frame: a flip of the last two axes.

    ``forward`` maps a (..., H, W) tensor or array into the view; ``inverse`` maps a prediction made
    in the view (masks, score maps) back onto the original frame. Iterating gives
    ``(forward, inverse)``, so ``for fwd, inv in tta_views()`` works.
    """

    name: str
    flip_x: bool
    flip_y: bool

    @property
    def _dims(self) -> tuple[int, ...]:
        return tuple(d for d, on in ((-1, self.flip_x), (-2, self.flip_y)) if on)

    def forward(self, x: ArrayLike) -> ArrayLike:
        """(..., H, W) -> the same array seen in this view."""
        return _flip(x, self._dims)

    def inverse(self, x: ArrayLike) -> ArrayLike:
        """(..., H, W) prediction in this view -> original frame orientation."""
        return _flip(x, self._dims)  # flips are their own inverse

    def inverse_boxes(self, boxes: ArrayLike, canvas_size: tuple[int, int]) -> ArrayLike:
        """(N, 4) XYXY pixel-edge boxes predicted in this view -> original frame (H, W = canvas_size)."""
        h, w = canvas_size
        out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, copy=True)
        if self.flip_x:
            out[..., 0], out[..., 2] = w - boxes[..., 2], w - boxes[..., 0]
        if self.flip_y:
            out[..., 1], out[..., 3] = h - boxes[..., 3], h - boxes[..., 1]
        return out

    def __iter__(self) -> Iterator[Callable[[Any], Any]]:
        return iter((self.forward, self.inverse))


def tta_views() -> list[TTAView]:
    """The four test-time views: identity, hflip, vflip, rot180 (the training symmetries)."""
    return [TTAView("identity", False, False), TTAView("hflip", True, False),
            TTAView("vflip", False, True), TTAView("rot180", True, True)]
