"""Bad-pixel maths for detector frames (pure functions, numpy + scipy only).

A pixel is *bad* when it holds no trustworthy count: it is in the static mask (dead, gap or
user-masked), it is negative (Pilatus writes -1 for gaps and -2 for dead pixels), it is not finite
(float data), or it is at or above the detector's saturation value.

Filling replaces each pixel of a mask by the value of its nearest good pixel (Euclidean distance,
``scipy.ndimage.distance_transform_edt``). The (bad pixel -> source pixel) map depends only on
the mask, so it is memoised: the common case (the same static mask on every frame) costs one
copy and one fancy index for a whole batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from scipy import ndimage

__all__ = ["bad_pixels", "fill_bad_pixels", "nearest_good_pixel_map", "clear_fill_cache", "frame_health",
           "bad_pixel_causes"]

# Maps are small (two int arrays as long as the number of bad pixels) but a mask can be huge;
# bound the memo by both the number of masks and the bytes held.
_CACHE_MAX_ENTRIES = 32
_CACHE_MAX_BYTES = 64 * 1024 * 1024
_cache: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, int]] = OrderedDict()
_cache_bytes = 0
_cache_lock = threading.Lock()


def bad_pixels(
    raw: np.ndarray,
    *,
    static_mask: np.ndarray | None = None,
    saturation_value: float | None = None,
) -> np.ndarray:
    """Bad pixels of raw frames.

    Args:
        raw: (..., H, W) counts as stored (any numeric dtype).
        static_mask: (H, W) bool (or broadcastable), True = always bad; None = no static mask.
        saturation_value: counts at or above this are bad; None = no saturation limit.

    Returns:
        bool array of ``raw.shape``: static mask | negative | not finite | >= saturation.
    """
    raw = np.asarray(raw)
    bad = raw < 0
    if raw.dtype.kind == "f":
        bad |= ~np.isfinite(raw)
    if saturation_value is not None:
        bad |= raw >= saturation_value
    if static_mask is not None:
        bad |= np.asarray(static_mask, dtype=bool)
    return bad


def frame_health(raw: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame facts a scan's warnings are made of (a few cheap passes over the batch).

    Args:
        raw: (b, H, W) counts as stored.
        bad: (b, H, W) bool bad pixels of ``raw`` (see :func:`bad_pixels`).

    Returns:
        ``(non_finite, all_zero, no_good)``: (b,) int64 NaN/inf pixels per frame (0 for integer
        data), (b,) bool frames whose every pixel is 0, (b,) bool frames with no good pixel.
    """
    raw = np.asarray(raw)
    b = raw.shape[0]
    flat = raw.reshape(b, -1)
    if raw.dtype.kind == "f":
        non_finite = np.count_nonzero(~np.isfinite(flat), axis=1).astype(np.int64)
    else:
        non_finite = np.zeros(b, np.int64)
    all_zero = ~flat.any(axis=1)  # NaN counts as nonzero, so an all-NaN frame is not "all zero"
    no_good = np.asarray(bad).reshape(b, -1).all(axis=1)
    return non_finite, all_zero, no_good


def bad_pixel_causes(raw: np.ndarray, saturation_value: float | None) -> dict[str, int]:
    """Why the pixels of a frame with no good pixel are bad: counts of ``non_finite``, ``negative`` and
    ``saturated`` pixels (each pixel counted once, in that order of precedence) and ``other`` (the
    rest, which can only be bad through a mask)."""
    raw = np.asarray(raw)
    non_finite = ~np.isfinite(raw) if raw.dtype.kind == "f" else np.zeros(raw.shape, bool)
    with np.errstate(invalid="ignore"):
        negative = (raw < 0) & ~non_finite
        saturated = ((raw >= saturation_value) & ~non_finite & ~negative if saturation_value is not None
                     else np.zeros(raw.shape, bool))
    counts = {"non_finite": int(non_finite.sum()), "negative": int(negative.sum()), "saturated": int(saturated.sum())}
    counts["other"] = int(raw.size) - sum(counts.values())
    return counts


def _mask_key(bad: np.ndarray) -> tuple:
    return (bad.shape, np.packbits(bad, axis=None).tobytes())


def nearest_good_pixel_map(bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each bad pixel takes its value from.

    Args:
        bad: (H, W) bool, True = bad.

    Returns:
        ``(targets, sources)``: two (k,) intp arrays of flat indices into an (H*W) frame, k = number
        of bad pixels; pixel ``targets[j]`` takes the value of the good pixel ``sources[j]`` nearest
        to it. Both are empty when no pixel is bad. If every pixel is bad, ``sources`` is -1.
        The arrays are memoised and read-only; do not modify them.
    """
    global _cache_bytes
    bad = np.ascontiguousarray(bad, dtype=bool)
    if bad.ndim != 2:
        raise ValueError(f"bad must be (H, W), got shape {bad.shape}")
    key = _mask_key(bad)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit[0], hit[1]
    targets = np.flatnonzero(bad)
    if targets.size == 0:
        sources = targets
    elif targets.size == bad.size:
        sources = np.full_like(targets, -1)
    else:
        # distance_transform_edt measures from each nonzero pixel to the nearest zero one, so with
        # bad as the input its indices give, for every bad pixel, the nearest good pixel.
        rows, cols = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
        sources = (rows.ravel()[targets].astype(np.intp) * bad.shape[1] + cols.ravel()[targets]).astype(np.intp)
    targets.setflags(write=False)
    sources.setflags(write=False)
    size = targets.nbytes + sources.nbytes + len(key[1])
    with _cache_lock:
        if key not in _cache:
            _cache[key] = (targets, sources, size)
            _cache_bytes += size
        while len(_cache) > 1 and (len(_cache) > _CACHE_MAX_ENTRIES or _cache_bytes > _CACHE_MAX_BYTES):
            _, (_, _, old_size) = _cache.popitem(last=False)
            _cache_bytes -= old_size
    return targets, sources


def clear_fill_cache() -> None:
    """Forget the memoised fill maps (tests, or to free memory after huge masks)."""
    global _cache_bytes
    with _cache_lock:
        _cache.clear()
        _cache_bytes = 0


def fill_bad_pixels(frames: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Replace bad pixels by their nearest good pixel of the same frame.

    Args:
        frames: (..., H, W) counts (any numeric dtype); not modified.
        bad: bool mask broadcastable to ``frames.shape``, True = replace. A 2D mask applies to every
            frame with a single fancy index.

    Returns:
        float32 array of ``frames.shape`` with bad pixels filled; a frame with no good pixel is 0.
    """
    frames = np.asarray(frames)
    if frames.ndim < 2:
        raise ValueError(f"frames must be (..., H, W), got shape {frames.shape}")
    bad = np.asarray(bad, dtype=bool)
    h, w = frames.shape[-2:]
    out = np.array(frames, dtype=np.float32, copy=True)
    flat = out.reshape(-1, h * w)
    if bad.ndim <= 2 or all(d == 1 for d in bad.shape[:-2]):
        mask2d = np.broadcast_to(bad.reshape(bad.shape[-2:]) if bad.ndim >= 2 else bad, (h, w))
        _fill_flat(flat, *nearest_good_pixel_map(mask2d))
        return out
    per_frame = np.broadcast_to(bad, frames.shape).reshape(-1, h, w)
    # Group frames sharing a mask so each distinct mask costs one map lookup and one fancy index.
    groups: dict[tuple, list[int]] = {}
    maps: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for k, mask in enumerate(per_frame):
        if not mask.any():
            continue
        key = _mask_key(np.ascontiguousarray(mask))
        if key not in maps:
            maps[key] = nearest_good_pixel_map(mask)
        groups.setdefault(key, []).append(k)
    for key, idx in groups.items():
        rows = np.asarray(idx)
        sub = flat[rows]
        _fill_flat(sub, *maps[key])
        flat[rows] = sub
    return out


def _fill_flat(flat: np.ndarray, targets: np.ndarray, sources: np.ndarray) -> None:
    """In place on (b, H*W) float32."""
    if targets.size == 0:
        return
    if sources[0] < 0:  # no good pixel at all
        flat[:, targets] = 0.0
        return
    flat[:, targets] = flat[:, sources]
