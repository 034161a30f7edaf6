"""SSLM: spatially guided self-supervised clustering CNN for peak segmentation.

Architecture (as DiPID's SSLM, after Kim, Kanezaki & Tanaka, "Unsupervised learning of image
segmentation based on differentiable feature clustering", IEEE TIP 2020): ``num_conv - 1`` blocks
of conv 3x3 -> ReLU -> BatchNorm with ``channels`` feature maps, then a 1x1 conv -> BatchNorm
whose ``channels`` outputs are the cluster responses; a pixel's cluster is the argmax channel.
The final BatchNorm keeps every channel's response zero-mean across the batch, which is what
stops the self-labelling from collapsing into a single cluster.

Input/output contract (written once, here):

* input: float32 (B, 1, H, W) normalised counts (:func:`dipid.models.normalize.normalize_counts`,
  bad pixels filled beforehand).
* :meth:`SSLM.forward`: response (B, C, H, W) float32 (unnormalised cluster scores).
* :meth:`SSLM.cluster_probability`: (B, H, W) float32 in [0, 1], the softmax mass of the
  channels whose role is halo or peak core.
* :meth:`SSLM.peak_probability`: the same, set to 0 on connected components of
  ``>= config.threshold`` that fail the significance test (:func:`significance_gate`).
* :meth:`SSLM.peak_mask`: (B, H, W) bool. Instances (connected components, ``min_area``) are made
  from this mask by the JointPredictor, not here.

Losses (pure functions below, each with its weight in :class:`SSLMConfig`):

* feature similarity: cross-entropy of the response to its own argmax (Kim et al.);
* spatial continuity: L1 of the vertical and horizontal differences of the response (Kim et al.);
* context consistency: each channel's spatial variance about its centroid, weighted by the
  channel's softmax mass (Ahn, Feng & Kim, "A spatial guided self-supervised clustering network
  for medical image segmentation", MICCAI 2021): pixels of one cluster should lie close together.

Where dipid departs from the papers, and why:

* **Trained across many frames, not per image.** Both papers fit a fresh network to every image
  until it has few clusters. Diffraction scans have hundreds of frames and most hold nothing but
  background, so dipid trains one network on batches of frames from a scan (or many scans) for a
  fixed number of steps and then applies it to any frame; the channels then mean the same thing
  on every frame.
* **Channel roles are assigned automatically.** Clusters are anonymous. The original DiPID
  picked by hand which channel meant "peak" (channel 66 for peak centres, 13 for halos) and scored
  an IoU of 0.12. :func:`assign_channels` gives every channel a role (0 background, 1 halo,
  2 peak core) from the statistics of the pixels it wins, or from a few labelled frames, and the
  roles are stored in the config and so in the checkpoint.
* **Input is one channel of log-scaled, background-subtracted counts** rather than RGB, so the
  clustering sees a physically meaningful brightness (see :mod:`dipid.models.normalize`).
* **Bad pixels** (detector gaps, dead pixels, negative in Pilatus data) must be filled from their
  neighbours before normalisation, otherwise the gaps become a cluster of their own.
* **Half the spatial-continuity weight of Kim et al.** (0.5 instead of 1). Trained across frames,
  a weight of 1 merged the faint halo of peaks into the background. On simulated realistic I16
  scans (``benchmarks/sslm_quick.py``: 32 channels, 150 steps, several seeds and 3 or 5 conv
  layers) the peak IoU was 0.29-0.57 with weight 1 (4 runs), 0.72-0.80 with 0.5 (5 runs),
  0.22-0.82 with 0.25 (5 runs, unstable) and 0.34-0.58 with 0.1 (2 runs).
* **The clustering draws a peak's extent; a significance test decides whether it is a peak.**
  Clusters are brightness bands of the normalised log counts, with no notion of noise. After a
  one-minute run on realistic scans, 67 % of the SSLM's false peaks on the accuracy test set
  were single hot pixels (spread by the 3 x 3 convolutions into 3 x 3 to 5 x 5 blobs), others
  were noise on the bright side of a sloped background (a frame-wide median makes the whole
  bright side look raised), and 455 px per empty frame were marked on an independent
  simulator. :meth:`SSLM.peak_probability` therefore keeps a connected component only if its
  pixels other than the brightest stand above a *local* background estimate (the classical
  finder's cell recipe with a second pass that leaves out peaks, :func:`local_background`, on
  the log counts, with the noise measured per cell) by at least ``min_significance`` sigmas in
  sum and ``min_mean_excess`` sigmas on average (:func:`component_significance`). Leaving out
  the brightest pixel is what removes hot pixels; the mean is what removes large regions of
  background with a small bias. Both are in noise units, not tuned to a preset. On the
  accuracy test set (6 scans x 31 frames) this took an SSLM from 654 to 141 false peaks (F1
  0.38 -> 0.71) and its false area on empty frames from 53 to 31 px, at the same recall; the
  rest are mostly powder-ring arcs, which are real local excess (left to the fusion with the
  TLM). Old checkpoints get the test too (it needs no retraining; ``min_significance=0``
  turns it off). The channel assignment uses the same local background.
* **Context consistency uses a mass-weighted mean** of the per-channel variances with
  coordinates in units of the frame's longer side, so the loss does not depend on frame size and
  channels that win almost no pixels (whose centroid is ill-defined) barely count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dipid.errors import DipidError
from dipid.models.normalize import LOG_SCALE

__all__ = [
    "SSLM",
    "SSLMConfig",
    "SSLMLossWeights",
    "ROLE_BACKGROUND",
    "ROLE_HALO",
    "ROLE_CORE",
    "NOISE_FLOOR",
    "build_sslm",
    "feature_similarity_loss",
    "spatial_continuity_loss",
    "context_consistency_loss",
    "sslm_loss",
    "robust_noise_level",
    "local_background",
    "significance_input",
    "local_significance",
    "component_significance",
    "significance_gate",
    "assign_channels",
]

logger = logging.getLogger(__name__)

ROLE_BACKGROUND = 0
ROLE_HALO = 1
ROLE_CORE = 2
_ROLES = (ROLE_BACKGROUND, ROLE_HALO, ROLE_CORE)

#: Lowest per-pixel noise level (normalised units) used for significance: one count over an empty
#: background (a step of log(2) / LOG_SCALE) is 1.5 sigma, two counts 2.4 sigma. Nearly empty
#: frames have a median absolute deviation of 0; without a floor a single count would look
#: infinitely significant.
NOISE_FLOOR = math.log(2.0) / LOG_SCALE / 1.5
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class SSLMLossWeights:
    """Weights of the three SSLM loss terms."""

    similarity: float = 1.0
    continuity: float = 0.5
    context: float = 0.1


@dataclass
class SSLMConfig:
    """Everything needed to rebuild an :class:`SSLM` (JSON-serialisable with ``dataclasses.asdict``).

    Attributes:
        in_channels: input channels (1: normalised counts).
        channels: feature maps per layer = number of clusters.
        num_conv: convolution layers counting the final 1x1 (``num_conv - 1`` 3x3 blocks).
        similarity_weight, continuity_weight, context_weight: loss weights.
        min_area: smallest instance in pixels kept by the JointPredictor.
        channel_roles: per channel 0 background, 1 halo, 2 peak core; None until assigned.
        threshold: peak probability at which a pixel is peak (:meth:`SSLM.peak_mask`); the
            significance test below runs on the connected components of this mask, so the
            JointPredictor's ``ssl_threshold`` should not be lower.
        min_significance: a component of the peak mask is kept only if the excess of its pixels
            above the local background, leaving out its brightest pixel, is at least this many
            noise sigmas (:func:`component_significance`); 0 switches the test off (keeps every
            component, as before the test existed).
        min_mean_excess: ... and only if those pixels stand, on average, at least this many
            per-pixel noise sigmas above the local background (the second half of the test).
        background_cell, background_smooth: cell size (pixels) and cell median filter (cells,
            odd) of the local background estimate (:func:`local_background`).

    Checkpoints written before the last five fields existed load with these defaults (so they get
    the significance test too; it needs no retraining).
    """

    in_channels: int = 1
    channels: int = 100
    num_conv: int = 3
    similarity_weight: float = 1.0
    continuity_weight: float = 0.5
    context_weight: float = 0.1
    min_area: int = 4
    channel_roles: list[int] | None = None
    threshold: float = 0.5
    min_significance: float = 5.0
    min_mean_excess: float = 1.0
    background_cell: int = 16
    background_smooth: int = 5

    def __post_init__(self) -> None:
        if self.num_conv < 2:
            raise ValueError(f"num_conv counts the final 1x1 conv and must be >= 2, got {self.num_conv}")
        if self.channels < 2 or self.in_channels < 1:
            raise ValueError(f"need channels >= 2 and in_channels >= 1, got {self.channels}, {self.in_channels}")
        if self.channel_roles is not None:
            roles = [int(r) for r in self.channel_roles]
            if len(roles) != self.channels or any(r not in _ROLES for r in roles):
                raise ValueError(
                    f"channel_roles needs {self.channels} values in {_ROLES}, got {len(roles)} "
                    f"(values {sorted(set(roles))})"
                )
            self.channel_roles = roles
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not (self.min_significance >= 0 and math.isfinite(self.min_significance)):
            raise ValueError(f"min_significance must be a number >= 0, got {self.min_significance}")
        if not (self.min_mean_excess >= 0 and math.isfinite(self.min_mean_excess)):
            raise ValueError(f"min_mean_excess must be a number >= 0, got {self.min_mean_excess}")
        if self.background_cell < 2 or self.background_smooth < 1 or self.background_smooth % 2 == 0:
            raise ValueError(
                f"need background_cell >= 2 and an odd background_smooth >= 1, got {self.background_cell}, "
                f"{self.background_smooth}"
            )


    def loss_weights(self) -> SSLMLossWeights:
        """The three loss weights as one object."""
        return SSLMLossWeights(self.similarity_weight, self.continuity_weight, self.context_weight)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


class SSLM(nn.Module):
    """Self-supervised clustering CNN; see the module docstring for the contract.

    Attributes:
        config: the :class:`SSLMConfig` (including ``channel_roles`` once assigned).
        features: the 3x3 conv blocks.
        classifier: the 1x1 conv and BatchNorm producing the cluster responses.
    """

    name: ClassVar[str] = "sslm"

    def __init__(self, config: SSLMConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_channels = config.in_channels
        for _ in range(config.num_conv - 1):
            layers += [
                nn.Conv2d(in_channels, config.channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.BatchNorm2d(config.channels),
            ]
            in_channels = config.channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Conv2d(config.channels, config.channels, kernel_size=1), nn.BatchNorm2d(config.channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) normalised counts -> (B, C, H, W) cluster response."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"SSLM expects (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        return self.classifier(self.features(x))

    def peak_channels(self) -> Tensor:
        """(C,) bool: channels whose role is halo or core. Raises DipidError if not assigned."""
        if self.config.channel_roles is None:
            raise DipidError(
                "this SSLM's channels have no roles yet: call dipid.models.sslm.assign_channels(model, "
                "frames) after training (dipid.train.train_sslm does), or load a checkpoint that has them."
            )
        return torch.tensor(self.config.channel_roles) != ROLE_BACKGROUND

    def cluster_probability(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) normalised counts -> (B, H, W) float32 in [0, 1]: the softmax mass of the
        halo and core channels, before the significance test of :meth:`peak_probability`."""
        peak = self.peak_channels().to(x.device)
        response = self(x)
        # sum of the peak channels' softmax = exp(logsumexp(peak) - logsumexp(all)), without the
        # (B, C, H, W) softmax tensor (a third of the SSLM's CPU time on channels-last responses)
        log_mass = torch.logsumexp(response[:, peak], dim=1) - torch.logsumexp(response, dim=1)
        return log_mass.exp().clamp(0.0, 1.0)

    def peak_probability(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) normalised counts -> (B, H, W) float32 in [0, 1], P(halo or core), set to 0
        on the connected components of ``>= config.threshold`` that fail the significance test
        (:func:`significance_gate`; none with ``config.min_significance = 0``)."""
        probability = self.cluster_probability(x)
        if self.config.min_significance > 0:
            probability = probability * significance_gate(
                x.detach(), probability.detach(), threshold=self.config.threshold,
                min_significance=self.config.min_significance, min_mean_excess=self.config.min_mean_excess,
                cell=self.config.background_cell,
                smooth_cells=self.config.background_smooth)
        return probability

    @torch.no_grad()
    def peak_mask(self, x: Tensor, threshold: float | None = None) -> Tensor:
        """(B, 1, H, W) normalised counts -> (B, H, W) bool, peak probability >= ``threshold``
        (default ``config.threshold``)."""
        return self.peak_probability(x) >= (self.config.threshold if threshold is None else threshold)


def build_sslm(
    *,
    num_conv: int = 3,
    channels: int = 100,
    in_channels: int = 1,
    similarity_weight: float = 1.0,
    continuity_weight: float = 0.5,
    context_weight: float = 0.1,
    min_area: int = 4,
    channel_roles: list[int] | None = None,
    threshold: float = 0.5,
    min_significance: float = 5.0,
    min_mean_excess: float = 1.0,
    background_cell: int = 16,
    background_smooth: int = 5,
) -> SSLM:
    """Build an SSLM (random initialisation; train it with :func:`dipid.train.fit_sslm`)."""
    return SSLM(
        SSLMConfig(
            in_channels=in_channels,
            channels=channels,
            num_conv=num_conv,
            similarity_weight=similarity_weight,
            continuity_weight=continuity_weight,
            context_weight=context_weight,
            min_area=min_area,
            channel_roles=channel_roles,
            threshold=threshold,
            min_significance=min_significance,
            min_mean_excess=min_mean_excess,
            background_cell=background_cell,
            background_smooth=background_smooth,
        )
    )


# ----------------------------------------------------------------------------- losses


def feature_similarity_loss(response: Tensor, pseudo_labels: Tensor | None = None) -> Tensor:
    """Cross-entropy of (B, C, H, W) ``response`` to (B, H, W) int64 ``pseudo_labels``.

    ``pseudo_labels`` default to the response's own (detached) argmax, as in Kim et al.
    """
    if pseudo_labels is None:
        pseudo_labels = response.detach().argmax(dim=1)
    return F.cross_entropy(response, pseudo_labels)


def spatial_continuity_loss(response: Tensor) -> Tensor:
    """Mean |vertical difference| + mean |horizontal difference| of (B, C, H, W) ``response``."""
    vertical = (response[:, :, 1:, :] - response[:, :, :-1, :]).abs().mean()
    horizontal = (response[:, :, :, 1:] - response[:, :, :, :-1]).abs().mean()
    return vertical + horizontal


def context_consistency_loss(response: Tensor, eps: float = 1e-6) -> Tensor:
    """Softmax-weighted spatial variance of each channel about its centroid, mass-weighted mean.

    With p_k(x) the softmax of channel k at pixel x (coordinates in units of the longer side),
    m_k = sum_x p_k(x), c_k = sum_x p_k(x) x / m_k and v_k = sum_x p_k(x) |x - c_k|^2 / m_k,
    the loss is mean over the batch of sum_k (m_k / (H W)) v_k.

    Args:
        response: (B, C, H, W).
    Returns:
        scalar tensor, >= 0.
    """
    _, _, height, width = response.shape
    scale = float(max(height, width))
    p = torch.softmax(response, dim=1)
    rows = torch.arange(height, device=response.device, dtype=p.dtype)[:, None] / scale
    cols = torch.arange(width, device=response.device, dtype=p.dtype)[None, :] / scale
    mass = p.sum(dim=(2, 3))  # (B, C)
    centre_row = (p * rows).sum(dim=(2, 3)) / (mass + eps)
    centre_col = (p * cols).sum(dim=(2, 3)) / (mass + eps)
    squared_distance = (rows - centre_row[..., None, None]) ** 2 + (cols - centre_col[..., None, None]) ** 2
    variance = (p * squared_distance).sum(dim=(2, 3)) / (mass + eps)
    share = mass / (height * width)
    return (share * variance).sum(dim=1).mean()


def sslm_loss(response: Tensor, *, weights: SSLMLossWeights) -> dict[str, Tensor]:
    """All SSLM loss terms of a (B, C, H, W) response: ``similarity``, ``continuity``, ``context``, ``total``."""
    parts = {
        "similarity": feature_similarity_loss(response),
        "continuity": spatial_continuity_loss(response),
        "context": context_consistency_loss(response) if weights.context else response.new_zeros(()),
    }
    parts["total"] = (
        weights.similarity * parts["similarity"]
        + weights.continuity * parts["continuity"]
        + weights.context * parts["context"]
    )
    return parts


# ----------------------------------------------------------------------------- channel roles


def robust_noise_level(frames: Tensor) -> Tensor:
    """(B, ..., H, W) normalised frames -> (B,) noise sigma: 1.4826 x MAD, at least NOISE_FLOOR."""
    flat = frames.reshape(frames.shape[0], -1)
    median = flat.median(dim=1, keepdim=True).values
    mad = (flat - median).abs().median(dim=1).values
    return (_MAD_TO_SIGMA * mad).clamp_min(NOISE_FLOOR)


def _cell_layout(n_pixels: int, cell: int) -> tuple[int, int]:
    """Cells along an axis and the padding before the first: the padding is split between both
    ends, so every edge cell keeps at least half its pixels (as :mod:`dipid.classical` does)."""
    n_cells = -(-n_pixels // cell)
    return n_cells, (n_cells * cell - n_pixels) // 2


def _pad_linear(grid: Tensor, pad: int) -> Tensor:
    """Pad the last two dims of ``grid`` by ``pad`` by point reflection (``2 * edge - mirror``),
    which continues a linear gradient; along an axis too short for that, repeat the edge."""
    for dim in (-2, -1):
        size = grid.shape[dim]
        if size > pad:
            first, last = grid.narrow(dim, 0, 1), grid.narrow(dim, size - 1, 1)
            before = 2 * first - grid.narrow(dim, 1, pad).flip(dim)
            after = 2 * last - grid.narrow(dim, size - 1 - pad, pad).flip(dim)
        else:
            before = grid.narrow(dim, 0, 1).repeat_interleave(pad, dim=dim)
            after = grid.narrow(dim, size - 1, 1).repeat_interleave(pad, dim=dim)
        grid = torch.cat([before, grid, after], dim=dim)
    return grid


def _cell_grids(values: Tensor, excluded: Tensor | None, *, cell: int, floor: float, clip_sigma: float,
                smooth_cells: int, min_valid: int) -> Tensor:
    """(B, H, W) values -> (B, 2, cell rows, cell cols): clipped mean and standard deviation per
    cell, median-filtered across cells; NaN where a cell (after the filter: its whole
    neighbourhood) has fewer than ``min_valid`` pixels that are not ``excluded``."""
    batch, height, width = values.shape
    (n_rows, top), (n_cols, left) = _cell_layout(height, cell), _cell_layout(width, cell)
    padded = values.new_full((batch, n_rows * cell, n_cols * cell), math.nan)
    padded[:, top : top + height, left : left + width] = (
        values if excluded is None else values.masked_fill(excluded, math.nan))
    cells = padded.reshape(batch, n_rows, cell, n_cols, cell).transpose(2, 3).reshape(batch, n_rows, n_cols, -1)
    median = cells.nanmedian(dim=-1, keepdim=True).values
    spread = (_MAD_TO_SIGMA * (cells - median).abs().nanmedian(dim=-1, keepdim=True).values).clamp_min(floor)
    inside = cells <= median + clip_sigma * spread  # False for NaN (padding, excluded pixels)
    n_inside = inside.sum(dim=-1).clamp_min(1)
    offsets = torch.where(inside, cells - median, torch.zeros_like(cells))
    mean_offset = offsets.sum(dim=-1) / n_inside
    variance = (offsets.square().sum(dim=-1) / n_inside - mean_offset.square()).clamp_min(0.0)
    grids = torch.stack([median[..., 0] + mean_offset, variance.sqrt()], dim=1)  # (B, 2, rows, cols)
    too_few = (~torch.isnan(cells)).sum(dim=-1) < min_valid
    grids = grids.masked_fill(too_few[:, None], math.nan)
    if smooth_cells > 1:
        pad = smooth_cells // 2
        windows = _pad_linear(grids, pad).unfold(2, smooth_cells, 1).unfold(3, smooth_cells, 1)
        grids = windows.reshape(*grids.shape, -1).nanmedian(dim=-1).values
    return grids


def _grids_to_pixels(grids: Tensor, height: int, width: int, cell: int) -> Tensor:
    """Bilinear interpolation between cell centres, linear beyond the outer ones: pad one cell by
    point reflection, interpolate to pixel resolution (centres land on (i + 0.5) * cell - 0.5), crop."""
    (_, top), (_, left) = _cell_layout(height, cell), _cell_layout(width, cell)
    grids = _pad_linear(grids, 1)
    pixels = F.interpolate(grids, size=(grids.shape[-2] * cell, grids.shape[-1] * cell), mode="bilinear",
                           align_corners=False)
    return pixels[..., cell + top : cell + top + height, cell + left : cell + left + width]


@torch.no_grad()
def local_background(frames: Tensor, *, window: int = 1, cell: int = 16, smooth_cells: int = 5,
                     clip_sigma: float = 3.0, exclude_sigma: float = 3.0, exclusion_margin: int = 3
                     ) -> tuple[Tensor, Tensor]:
    """Robust local level and noise of the ``window`` x ``window`` means of normalised frames.

    The recipe of :func:`dipid.classical.estimate_background` and its second background pass,
    on the network's input (log counts) instead of counts, in torch on the frames' device:

    1. per ``cell`` x ``cell`` cell, the mean and standard deviation of the window means below
       ``median + clip_sigma * spread`` (spread: 1.4826 x MAD, at least the floor); a
       ``smooth_cells`` median filter across cells (padded by point reflection, so gradients are
       kept up to the edges) and bilinear interpolation between cell centres, extrapolated
       linearly beyond the outer ones;
    2. the same again without the pixels whose 3 x 3 mean stands ``exclude_sigma`` sigmas of a
       3 x 3 mean above the first estimate (dilated by ``exclusion_margin``): peaks several cells
       wide otherwise lift the background under themselves and lose their significance. Cells
       left with fewer than an eighth of their pixels take the median of their neighbours, or the
       first estimate where none of them has enough either.

    The noise is measured, not modelled from Poisson statistics, because the input no longer
    holds the counts (only log counts relative to the frame median); it is at least
    ``NOISE_FLOOR / window``.

    Args:
        frames: (B, 1, H, W) normalised counts.
    Returns:
        ``(level, sigma)``, each (B, H, W) float32: the expected window mean without peaks and
        the standard deviation of a window mean.
    """
    if frames.dim() != 4 or frames.shape[1] != 1:
        raise ValueError(f"frames must be (B, 1, H, W), got {tuple(frames.shape)}")
    frames = frames.float()
    means3 = F.avg_pool2d(frames, 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    values = frames[:, 0] if window == 1 else (
        means3 if window == 3 else F.avg_pool2d(frames, window, stride=1, padding=window // 2,
                                                count_include_pad=False)[:, 0])
    _, height, width = values.shape
    floor = NOISE_FLOOR / window
    options = dict(cell=cell, floor=floor, clip_sigma=clip_sigma, smooth_cells=smooth_cells)
    first = _cell_grids(values, None, min_valid=1, **options)
    if exclude_sigma > 0:
        # The exclusion test on 3 x 3 means whatever ``window`` is: their noise is a third of a pixel's.
        level3 = first if window == 3 else None
        if level3 is None:
            level3 = _cell_grids(means3, None, min_valid=1, **{**options, "floor": NOISE_FLOOR / 3})
        pixels3 = _grids_to_pixels(level3, height, width, cell)
        raised = means3 - pixels3[:, 0] >= exclude_sigma * pixels3[:, 1].clamp_min(NOISE_FLOOR / 3)
        if raised.any():
            if exclusion_margin > 0:
                size = 2 * exclusion_margin + 1
                raised = F.max_pool2d(raised[:, None].float(), size, stride=1, padding=exclusion_margin)[:, 0] > 0
            second = _cell_grids(values, raised, min_valid=max(cell * cell // 8, 2), **options)
            first = torch.where(torch.isnan(second), first, second)
    pixels = _grids_to_pixels(first, height, width, cell)
    return pixels[:, 0].contiguous(), pixels[:, 1].clamp_min(floor).contiguous()


@torch.no_grad()
def significance_input(frames: Tensor, *, cell: int = 16, smooth_cells: int = 5) -> Tensor:
    """(B, 1, H, W) normalised counts -> (B, 1, H, W) float32: each pixel's excess over the
    :func:`local_background` in units of the local per-pixel noise."""
    level, sigma = local_background(frames, window=1, cell=cell, smooth_cells=smooth_cells)
    return ((frames[:, 0].float() - level) / sigma)[:, None]


def local_significance(frames: Tensor, *, window: int = 3, cell: int = 16, smooth_cells: int = 5) -> Tensor:
    """(B, 1, H, W) normalised frames -> (B, H, W): how many noise sigmas each pixel's
    ``window`` x ``window`` neighbourhood mean stands above the local background there.

    Averaging a neighbourhood separates a faint halo (whose neighbours are raised too) from the
    upper tail of the noise (whose neighbours are not). Level and sigma are those of the
    neighbourhood means around each pixel (:func:`local_background`), so a sloped or curved
    background (air scatter, a gradient across the detector) is not mistaken for signal, and the
    discreteness and skew of log-scaled low counts are measured rather than modelled.
    """
    level, sigma = local_background(frames, window=window, cell=cell, smooth_cells=smooth_cells)
    means = F.avg_pool2d(frames.float(), window, stride=1, padding=window // 2, count_include_pad=False)[:, 0]
    return (means - level) / sigma


def component_significance(excess: np.ndarray, labels: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """How far each labelled component stands above the background, without its brightest pixel.

    Args:
        excess: (H, W) per-pixel excess over the local background in units of the per-pixel
            noise sigma.
        labels: (H, W) int component labels, 0 = none, 1..n_labels.
    Returns:
        ``(significance, mean_excess)``, each (n_labels,) float64, over the pixels other than
        the brightest: ``sum / sqrt(count)`` (the sum in sigma of a sum of that many pixels) and
        ``sum / count``; both 0 for one-pixel components. A single hot pixel cannot raise
        either. The mean guards the sum against large components: a region of thousands of
        background pixels (the bright side of a sloped background) has a mean excess near 0, but
        a bias of a few hundredths of a sigma per pixel, times sqrt(thousands), would pass a
        test on the sum alone.
    """
    from scipy import ndimage

    if n_labels == 0:
        return np.zeros(0), np.zeros(0)
    index = np.arange(1, n_labels + 1)
    area = np.bincount(labels.ravel(), minlength=n_labels + 1)[1:]
    total = np.bincount(labels.ravel(), weights=excess.ravel().astype(np.float64), minlength=n_labels + 1)[1:]
    brightest = np.asarray(ndimage.maximum(excess, labels, index), np.float64)
    rest = np.maximum(area - 1, 1)
    several = area > 1
    return (np.where(several, (total - brightest) / np.sqrt(rest), 0.0),
            np.where(several, (total - brightest) / rest, 0.0))


@torch.no_grad()
def significance_gate(
    frames: Tensor,
    probability: Tensor,
    *,
    threshold: float = 0.5,
    min_significance: float = 5.0,
    min_mean_excess: float = 1.0,
    cell: int = 16,
    smooth_cells: int = 5,
) -> Tensor:
    """(B, H, W) float 0/1: 0 on the 8-connected components of ``probability >= threshold`` whose
    :func:`component_significance` above the :func:`local_background` of ``frames`` (per pixel,
    ``window=1``) is below ``min_significance`` or whose mean excess is below
    ``min_mean_excess``; 1 everywhere else.

    The SSLM draws a peak's extent; whether there is a peak at all is a counting question the
    clustering does not ask. Its false peaks are single hot pixels (spread by the 3 x 3
    convolutions into a 3 x 3 to 5 x 5 blob), noise on the high side of a sloped background and
    noise blobs; none of them hold an excess over the local background that does not hinge on
    one pixel. Labelling runs on the CPU (scipy); the gate comes back on ``probability``'s device.
    """
    from scipy import ndimage

    if probability.dim() != 3 or frames.shape[0] != probability.shape[0] or frames.shape[-2:] != probability.shape[-2:]:
        raise ValueError(f"frames (B, 1, H, W) and probability (B, H, W) do not fit: {tuple(frames.shape)}, "
                         f"{tuple(probability.shape)}")
    gate = np.ones(tuple(probability.shape), np.float32)
    region = (probability >= threshold).cpu().numpy()
    if region.any():
        excess = significance_input(frames, cell=cell, smooth_cells=smooth_cells)[:, 0].cpu().numpy()
        structure = np.ones((3, 3), bool)
        for b in range(len(gate)):
            labels, n_labels = ndimage.label(region[b], structure=structure)
            if n_labels:
                significance, mean_excess = component_significance(excess[b], labels, n_labels)
                failed = np.flatnonzero((significance < min_significance) | (mean_excess < min_mean_excess)) + 1
                gate[b][np.isin(labels, failed)] = 0.0
    return torch.from_numpy(gate).to(probability.device)


@torch.no_grad()
def _winning_channels(model: SSLM, frames: Tensor, chunk: int) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        winners = [model(frames[i : i + chunk].to(device)).argmax(dim=1).cpu() for i in range(0, len(frames), chunk)]
    finally:
        model.train(was_training)
    return torch.cat(winners)


def _split_halo_core(peak: list[int], brightness: dict[int, float], core_fraction: float) -> dict[int, int]:
    """Peak channels at least ``core_fraction`` x the brightest one's brightness -> core; the rest -> halo."""
    if not peak:
        return {}
    brightest = max(brightness[c] for c in peak)
    return {c: ROLE_CORE if brightness[c] >= core_fraction * brightest else ROLE_HALO for c in peak}


@torch.no_grad()
def assign_channels(
    model: SSLM,
    frames_normalised: Tensor,
    *,
    labels: Tensor | None = None,
    significance: float = 3.0,
    core_fraction: float = 0.5,
    window: int = 3,
    chunk: int = 4,
) -> list[int]:
    """Give every SSLM channel a role (0 background, 1 halo, 2 peak core) and store it in the config.

    Unlabelled rule: each pixel's significance is that of its ``window`` x ``window``
    neighbourhood mean (:func:`local_significance`). A channel's brightness is the median
    significance of the pixels it wins (in eval mode, over all given frames). Channels with
    brightness >= ``significance`` (their typical pixel sits in a neighbourhood that many noise
    sigmas above the frame's background) are peak channels; the others, including the channel(s)
    owning most low pixels and channels that win no pixel, are background. Peak channels at least
    ``core_fraction`` as bright as the brightest one are core, the others halo.

    Why neighbourhoods: a faint halo's pixels are individually within ~2 sigma of the noise, like
    the noise tail, but their neighbours are raised too. On simulated I16 scans a halo channel's
    pixels had a median single-pixel significance of 1.8 and a 3x3 one of 6.1; the background
    channels stayed below 0.3, and 99 % of pixels of empty frames below 2.2 (measured against a
    frame-wide median; the local background used now keeps the bright side of a sloped
    background from counting as raised).

    Labelled rule (``labels`` given): majority vote, a channel is a peak channel when more than
    half of the pixels it wins are labelled peak; core/halo as above.

    Args:
        model: a trained SSLM.
        frames_normalised: (B, 1, H, W) float32 normalised counts.
        labels: (B, H, W) bool peak masks of the same frames, or None.
    Returns:
        the roles, one int per channel (also set as ``model.config.channel_roles``).
    """
    if frames_normalised.dim() != 4 or frames_normalised.shape[1] != 1:
        raise ValueError(f"frames_normalised must be (B, 1, H, W), got {tuple(frames_normalised.shape)}")
    frames = frames_normalised.detach().float().cpu()
    winners = _winning_channels(model, frames, chunk).flatten()
    significance_map = local_significance(frames, window=window, cell=model.config.background_cell,
                                          smooth_cells=model.config.background_smooth).flatten()
    if labels is not None:
        if labels.shape != frames[:, 0].shape:
            raise ValueError(f"labels must be (B, H, W) = {tuple(frames[:, 0].shape)}, got {tuple(labels.shape)}")
        labelled = labels.detach().bool().cpu().flatten()

    counts = torch.bincount(winners, minlength=model.config.channels)
    brightness: dict[int, float] = {}
    peak: list[int] = []
    for channel in torch.nonzero(counts).flatten().tolist():
        won = winners == channel
        brightness[channel] = float(significance_map[won].median())
        if labels is None:
            is_peak = brightness[channel] >= significance
        else:
            is_peak = float(labelled[won].float().mean()) > 0.5
        if is_peak:
            peak.append(channel)

    roles = [ROLE_BACKGROUND] * model.config.channels
    for channel, role in _split_halo_core(peak, brightness, core_fraction).items():
        roles[channel] = role
    model.config.channel_roles = roles
    if not peak:
        logger.warning("assign_channels: no channel stands out from the background; every pixel is background")
    logger.info(
        "assign_channels (%s): %d of %d channels used; core %s, halo %s",
        "labels" if labels is not None else "statistics",
        len(brightness),
        model.config.channels,
        [c for c in peak if roles[c] == ROLE_CORE],
        [c for c in peak if roles[c] == ROLE_HALO],
    )
    return roles
