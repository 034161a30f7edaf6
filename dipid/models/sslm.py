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
* :meth:`SSLM.peak_probability`: (B, H, W) float32 in [0, 1], the softmax mass of the channels
  whose role is halo or peak core.
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
* **Context consistency uses a mass-weighted mean** of the per-channel variances with
  coordinates in units of the frame's longer side, so the loss does not depend on frame size and
  channels that win almost no pixels (whose centroid is ill-defined) barely count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

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
    "local_significance",
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
    """

    in_channels: int = 1
    channels: int = 100
    num_conv: int = 3
    similarity_weight: float = 1.0
    continuity_weight: float = 0.5
    context_weight: float = 0.1
    min_area: int = 4
    channel_roles: list[int] | None = None

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

    def peak_probability(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) normalised counts -> (B, H, W) float32 in [0, 1], P(halo or core)."""
        peak = self.peak_channels().to(x.device)
        response = self(x)
        # sum of the peak channels' softmax = exp(logsumexp(peak) - logsumexp(all)), without the
        # (B, C, H, W) softmax tensor (a third of the SSLM's CPU time on channels-last responses)
        log_mass = torch.logsumexp(response[:, peak], dim=1) - torch.logsumexp(response, dim=1)
        return log_mass.exp().clamp(0.0, 1.0)

    @torch.no_grad()
    def peak_mask(self, x: Tensor, threshold: float = 0.5) -> Tensor:
        """(B, 1, H, W) normalised counts -> (B, H, W) bool, peak probability >= ``threshold``."""
        return self.peak_probability(x) >= threshold


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


def local_significance(frames: Tensor, *, window: int = 3) -> Tensor:
    """(B, 1, H, W) normalised frames -> (B, H, W): how many noise sigmas each pixel's
    ``window`` x ``window`` neighbourhood mean stands above the frame's typical neighbourhood.

    Averaging a neighbourhood separates a faint halo (whose neighbours are raised too) from the
    upper tail of the noise (whose neighbours are not). The centre and sigma are the median and
    1.4826 x MAD of the neighbourhood means of the same frame, so the discreteness and skew of
    log-scaled low counts are measured rather than modelled; sigma is at least
    NOISE_FLOOR / window.
    """
    means = F.avg_pool2d(frames, window, stride=1, padding=window // 2, count_include_pad=False)[:, 0]
    flat = means.flatten(1)
    centre = flat.median(dim=1, keepdim=True).values
    mad = (flat - centre).abs().median(dim=1).values
    sigma = (_MAD_TO_SIGMA * mad).clamp_min(NOISE_FLOOR / window)
    return (means - centre[..., None]) / sigma[:, None, None]


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
    channels stayed below 0.3, and 99 % of pixels of empty frames below 2.2.

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
    significance_map = local_significance(frames, window=window).flatten()
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
