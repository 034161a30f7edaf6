"""The one transform from detector counts to network input, shared by every model.

Counts span six decades (a weak peak of tens of counts next to a 1e5-count Bragg peak), so the
networks see a log scale. Each frame's background level is removed (its median in log space) so
that scans with different backgrounds, count times and attenuators look alike, and the result is
divided by a fixed constant rather than by a per-frame maximum, so an empty frame stays near zero
instead of having its noise stretched to full range:

    x = (log1p(max(counts, 0)) - median_frame(log1p(max(counts, 0)))) / LOG_SCALE

A peak 50x above a background of 2 counts maps to about 0.7; a saturated Pilatus pixel (1e6
counts) over the same background to about 3. Bad pixels must already be filled (see
:func:`dipid.io.fill_bad_pixels`), which is what :class:`dipid.io.Scan` hands out.
"""

from __future__ import annotations

import torch

__all__ = ["LOG_SCALE", "normalize_counts"]

#: Divisor of the background-subtracted log counts; 4 natural-log units = a factor of ~55.
LOG_SCALE = 4.0


def normalize_counts(counts: torch.Tensor) -> torch.Tensor:
    """Detector counts -> network input.

    Args:
        counts: float tensor (..., H, W) of counts with bad pixels already filled; any device.
    Returns:
        float32 tensor of the same shape and device, background near 0, peaks positive.
    """
    logc = torch.log1p(counts.float().clamp_min(0))
    flat = logc.flatten(-2)
    # torch.median on the last dim is batched, so one call serves a whole batch of frames.
    background = flat.median(dim=-1).values[..., None, None]
    return (logc - background) / LOG_SCALE

