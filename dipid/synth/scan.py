"""Simulated rocking scans with exact ground truth.

A scan is built in four steps, each from its own random stream (so changing one part of the
model does not reshuffle the others):

1. *Layout*: reflections (3D intensity objects over frame, row, col) are drawn from the preset
   and placed in the scan so that the first and last few frames stay empty and no frame shows
   more than ``preset.max_per_frame`` reflections. The first reflection is the one the scan is
   "about": near the detector centre and the middle of the scan.
2. *Beamline*: per-frame attenuator transmission (auto attenuation keeps the brightest pixel
   under a limit, as GDA does on I16) and a small beam-level jitter.
3. *Background and defects*: a noiseless background image, module gaps, dead and hot pixels.
4. *Frames*: expected counts = background + every reflection rendered inside its own window;
   Poisson noise; hot pixels; clipping at the saturation value; bad pixels set to -1/-2.

Ground truth (one instance per reflection per frame):

- The mask is the set of pixels where the reflection's noiseless contribution (after
  attenuation) is at least ``2 * sqrt(max(background, 1))``, ``background`` being the noiseless
  expected background of that pixel in that frame (after attenuation): the region where the peak
  stands out of the Poisson noise. The floor of 1 count keeps a near-zero background from
  labelling sub-count tails as visible.
- The 1-2 % frame-to-frame beam-level jitter is applied to the image but not to the threshold:
  like the counting noise it is not part of what a peak *is*, and leaving it out keeps each
  reflection's frames one contiguous run (a reflection can only vanish mid-run in a frame where
  the attenuator cut the beam).
- When the region falls apart into several connected pieces (a split peak, an irregular one, a
  rod crossing the frame edge) the pieces stay **one** instance, because they are one reflection.
- Instances under 4 pixels are dropped where they begin or end a reflection's run of frames;
  inside the run they are kept, so that a tiny peak drifting across the pixel grid does not
  blink in and out of the labels.
- Masks are the true region: they are not cut at dead, gap, hot or saturated pixels.
- Instances of different reflections may overlap.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dipid.io.coco import FrameLabels
from dipid.synth.background import (
    BeamGeometry,
    Defects,
    PowderRing,
    flat_and_gradient,
    hump,
    ring_image,
    sample_defects,
    sample_powder_ring,
    solvent_background,
    water_ring_geometry,
)
from dipid.synth.presets import DetectorSpec, ScanPreset, get_detector, get_preset
from dipid.synth.profiles import (
    component_image,
    ellipse_half_extent,
    pearson7_reach,
    rectangle_half_extent,
    rocking_curve,
    rocking_reach,
)
from dipid.synth.rle import window_rle
from dipid.synth.writer import SimulatedFiles, write_scan

logger = logging.getLogger(__name__)

__all__ = [
    "PeakComponent",
    "Reflection",
    "SimulatedFiles",
    "SimulatedScan",
    "simulate_scan",
    "simulate_dataset",
    "scan_seed",
    "MIN_INSTANCE_PIXELS",
    "VISIBILITY_SIGMAS",
    "visibility_threshold",
]

#: Instances smaller than this (pixels) are not labelled.
MIN_INSTANCE_PIXELS = 4
#: A pixel belongs to a peak where the peak adds at least this many noise sigmas to the background.
VISIBILITY_SIGMAS = 2.0
#: Background floor (counts) of the visibility threshold; the threshold is never below 2 counts.
_BACKGROUND_FLOOR = 1.0
#: Peak tails below this many counts are not rendered (far below any background noise).
_RENDER_CUTOFF = 0.1
#: Where the real I16 peaks cluster, as a fraction of (rows, cols): row median 101/195, col 269/487.
_I16_CENTRE_FRACTION = (101.0 / 195.0, 269.0 / 487.0)
#: Smallest rocking half-range (frames) a reflection is squeezed to in very short scans.
_MIN_REACH_FRAMES = 0.3
#: Least distance (px) between reflection centres in presets that ask for isolated peaks.
_ISOLATION_PX = 70.0
#: Attenuator transmissions the auto attenuator chooses from (half-decade steps of Al filters).
_ATTENUATOR_LADDER = tuple(10.0 ** (-0.5 * k) for k in range(13))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class PeakComponent:
    """One blob of a reflection (a mosaic block, a part of an irregular peak, a rod).

    Attributes:
        d_row, d_col: offset from the reflection centre, px.
        amplitude: height relative to the reflection's ``peak_counts`` (the brightest has 1).
        hwhm_major, hwhm_minor: half widths at half maximum along / across ``angle_deg``, px.
        angle_deg: direction of the major axis, degrees from +col toward +row.
        exponent: Pearson VII exponent (radial; along the rod when ``minor_exponent`` is set).
        minor_exponent: None for an elliptical peak; the across-rod exponent of a separable rod.
        bend: curvature, px⁻¹ (banana-shaped peaks and curved rods).
        frame_offset: shift of this block's rocking maximum from the reflection's, frames.
    """

    d_row: float
    d_col: float
    amplitude: float
    hwhm_major: float
    hwhm_minor: float
    angle_deg: float
    exponent: float
    minor_exponent: float | None = None
    bend: float = 0.0
    frame_offset: float = 0.0


@dataclass(frozen=True)
class Reflection:
    """Parameters of one simulated reflection (a 3D intensity object over frame, row, col).

    Expected counts at frame f, pixel (r, c), before attenuation::

        peak_counts * sum_k amplitude_k * rocking(f - centre_frame - frame_offset_k)
                    * profile_k(r - row_f - d_row_k, c - col_f - d_col_k)

    with row_f = centre_row + drift_row * (f - centre_frame) (same for cols).

    Attributes:
        id: reflection id (index in ``SimulatedScan.reflections``), as in the labels.
        kind: "round", "elliptical", "streak" (a rod, often through a Bragg core), "split"
            (2-3 mosaic blocks), "irregular" (a few blobs, some bent) or "spot" (Eiger scene).
        centre_frame: frame (fractional) of the rocking maximum.
        rocking_fwhm: rocking-curve full width at half maximum, frames.
        rocking_exponent: Pearson VII exponent of the rocking curve.
        centre_row, centre_col: position at ``centre_frame``, px (pixel centres are integers).
        drift_row, drift_col: movement across frames, px/frame.
        peak_counts: counts of the brightest component's centre at the rocking maximum, before
            attenuation.
        components: the blobs that make up the shape.
    """

    id: int
    kind: str
    centre_frame: float
    rocking_fwhm: float
    rocking_exponent: float
    centre_row: float
    centre_col: float
    drift_row: float
    drift_col: float
    peak_counts: float
    components: tuple[PeakComponent, ...]

    def centre_at(self, frame: float) -> tuple[float, float]:
        """(row, col) of the reflection centre at a frame, px."""
        df = frame - self.centre_frame
        return self.centre_row + self.drift_row * df, self.centre_col + self.drift_col * df

    def component_peaks(self, frame: float) -> np.ndarray:
        """(K,) counts at each component's centre at a frame, before attenuation."""
        return np.array([
            self.peak_counts * c.amplitude
            * rocking_curve(frame - self.centre_frame - c.frame_offset, self.rocking_fwhm, self.rocking_exponent)
            for c in self.components
        ])

    def reach_frames(self, level: float) -> float:
        """Frames from ``centre_frame`` beyond which no component exceeds ``level`` counts."""
        total = self.peak_counts * sum(c.amplitude for c in self.components)
        return max(abs(c.frame_offset) for c in self.components) + rocking_reach(
            total / level, self.rocking_fwhm, self.rocking_exponent
        )


@dataclass
class _Window:
    """Noiseless counts of one reflection in one frame, inside [row0:row0+h, col0:col0+w]."""

    row0: int
    col0: int
    counts: np.ndarray  # (h, w) float32, after attenuation

    @property
    def slices(self) -> tuple[slice, slice]:
        h, w = self.counts.shape
        return slice(self.row0, self.row0 + h), slice(self.col0, self.col0 + w)


@dataclass
class SimulatedScan:
    """A simulated scan and its exact ground truth.

    Attributes:
        frames: (n, H, W) int32 raw detector values; -1 = module gap, -2 = dead pixel, values at
            ``saturation_value`` are saturated; hot pixels carry huge counts.
        axis_name: scanned motor ("eta" for the Pilatus scene).
        axis_values: (n,) float64 motor positions, degrees.
        saturation_value: counts at and above which a pixel is saturated.
        attenuator_transmission: (n,) float64 transmission of each frame (1 = no attenuation).
        count_time: (n,) float64 exposure per frame, s.
        labels: one :class:`FrameLabels` per frame (empty frames too), ``reflection_ids`` set;
            ``scan`` is the NeXus file name (``sim_000.nxs`` until :meth:`write` names it).
        reflections: parameters of every reflection placed (some may never be visible).
        background_image: (H, W) float32 expected background at transmission 1, counts.
        beam_level: (n,) float64 relative incident intensity per frame (monitor jitter, ~1).
        frame_scale: (n,) float64 factor on background and peaks in the image per frame
            (transmission x beam level).
        preset, detector, seed: how the scan was made.
        energy_kev: photon energy written to the file.
        detector_spec: the detector description.
        defects: bad-pixel layout (gaps, dead pixels and lines, hot pixels).
        rings: powder rings in the background (Pilatus scene).
        geometry: beam centre and water-ring radius (large-detector scene), else None.
    """

    frames: np.ndarray
    axis_name: str
    axis_values: np.ndarray
    saturation_value: float
    attenuator_transmission: np.ndarray
    count_time: np.ndarray
    labels: list[FrameLabels]
    reflections: list[Reflection]
    background_image: np.ndarray
    beam_level: np.ndarray
    frame_scale: np.ndarray
    preset: str
    detector: str
    seed: int
    energy_kev: float
    detector_spec: DetectorSpec
    defects: Defects = field(repr=False)
    rings: tuple[PowderRing, ...] = ()
    geometry: BeamGeometry | None = None

    def __repr__(self) -> str:
        n, h, w = self.frames.shape
        return (f"SimulatedScan(preset={self.preset!r}, detector={self.detector!r}, seed={self.seed}, "
                f"frames={n}x{h}x{w}, reflections={len(self.reflections)}, "
                f"instances={sum(len(fl) for fl in self.labels)})")

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def background(self) -> np.ndarray:
        """(n, H, W) float32 noiseless expected background of each frame (computed on each call)."""
        return self.background_image[None] * self.frame_scale.astype(np.float32)[:, None, None]

    @property
    def bad_pixels(self) -> np.ndarray:
        """(n, H, W) bool: gap, dead, hot or saturated pixels of each frame."""
        bad = (self.frames < 0) | (self.frames >= self.saturation_value)
        bad[:, self.defects.hot_rows, self.defects.hot_cols] = True
        return bad

    def truth_masks(self, frame: int) -> np.ndarray:
        """(N, H, W) bool instance masks of one frame, in the order of ``labels[frame].reflection_ids``.

        Decoded from the labels' RLE on each call: N x H x W bytes, which on an Eiger 4M frame with
        hundreds of spots is gigabytes; decode single RLEs (``labels[frame].rles``) there instead.
        """
        return self.labels[frame].masks()

    def truth_volume(self) -> np.ndarray:
        """(n, H, W) int32: reflection id + 1 of the instance brightest at each pixel, 0 = none.

        "Brightest" is the largest noiseless contribution at that pixel, so where two instances
        overlap each pixel goes to the reflection that dominates it.
        """
        n, h, w = self.frames.shape
        volume = np.zeros((n, h, w), np.int32)
        for f, fl in enumerate(self.labels):
            if not len(fl):
                continue
            best = np.zeros((h, w), np.float32)
            transmission = float(self.attenuator_transmission[f])
            for rid in fl.reflection_ids:
                window = _render(self.reflections[int(rid)], f, transmission, self.detector_spec)
                if window is None:  # pragma: no cover - labelled reflections always render
                    continue
                rows, cols = window.slices
                mask = _visible(window, self.background_image[rows, cols], transmission)
                brighter = mask & (window.counts > best[rows, cols])
                volume[f, rows, cols][brighter] = int(rid) + 1
                best[rows, cols][brighter] = window.counts[brighter]
        return volume

    def write(self, out_dir: str | Path, name: str = "sim_000") -> SimulatedFiles:
        """Write ``<name>.nxs`` (I16 NeXus layout) and ``<name>_labels.json`` (COCO) into ``out_dir``.

        Both are written atomically; the labels' ``scan`` becomes ``<name>.nxs``, relative to the
        JSON's folder. Same scan, same name -> identical bytes.
        """
        return write_scan(self, Path(out_dir), name)


# --------------------------------------------------------------------------- rendering


def _component_box(
    centre: tuple[float, float], comp: PeakComponent, amplitude: float, shape: tuple[int, int], max_window: int | None
) -> tuple[int, int, int, int] | None:
    """Pixel box (r0, r1, c0, c1), end exclusive, where a component exceeds the render cutoff."""
    ratio = amplitude / _RENDER_CUTOFF
    q_major = pearson7_reach(ratio, comp.exponent)
    if q_major <= 0:
        return None
    a = q_major * comp.hwhm_major
    angle = math.radians(comp.angle_deg)
    if comp.minor_exponent is None:
        b = q_major * comp.hwhm_minor
        half_r, half_c = ellipse_half_extent(a, b, angle)
    else:
        b = pearson7_reach(ratio, comp.minor_exponent) * comp.hwhm_minor
        half_r, half_c = rectangle_half_extent(a, b, angle)
    if comp.bend:
        bow = abs(comp.bend) * min(a, 4096.0) ** 2
        half_r, half_c = half_r + bow, half_c + bow
    if max_window is not None:
        half_r, half_c = min(half_r, max_window), min(half_c, max_window)
    h, w = shape
    r0 = max(0, math.floor(centre[0] - half_r))
    r1 = min(h, math.ceil(centre[0] + half_r) + 1)
    c0 = max(0, math.floor(centre[1] - half_c))
    c1 = min(w, math.ceil(centre[1] + half_c) + 1)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def _render(refl: Reflection, frame: int, scale: float, detector: DetectorSpec) -> _Window | None:
    """Noiseless counts of one reflection in one frame times ``scale`` (the transmission), or None
    where nothing reaches the render cutoff."""
    max_window = detector.eiger_scene.max_window if detector.eiger_scene is not None else None
    row_f, col_f = refl.centre_at(frame)
    peaks = refl.component_peaks(frame) * scale
    parts = []
    for comp, amplitude in zip(refl.components, peaks):
        if amplitude < _RENDER_CUTOFF:
            continue
        centre = (row_f + comp.d_row, col_f + comp.d_col)
        box = _component_box(centre, comp, float(amplitude), detector.shape, max_window)
        if box is not None:
            parts.append((comp, float(amplitude), centre, box))
    if not parts:
        return None
    r0 = min(p[3][0] for p in parts)
    r1 = max(p[3][1] for p in parts)
    c0 = min(p[3][2] for p in parts)
    c1 = max(p[3][3] for p in parts)
    counts = np.zeros((r1 - r0, c1 - c0), np.float32)
    for comp, amplitude, centre, (br0, br1, bc0, bc1) in parts:
        rows = (np.arange(br0, br1, dtype=np.float32) - np.float32(centre[0]))[:, None]
        cols = (np.arange(bc0, bc1, dtype=np.float32) - np.float32(centre[1]))[None, :]
        counts[br0 - r0:br1 - r0, bc0 - c0:bc1 - c0] += component_image(
            rows, cols, amplitude=amplitude, hwhm_major=comp.hwhm_major, hwhm_minor=comp.hwhm_minor,
            angle_rad=math.radians(comp.angle_deg), exponent=comp.exponent, minor_exponent=comp.minor_exponent,
            bend=comp.bend,
        )
    return _Window(row0=r0, col0=c0, counts=counts)


def visibility_threshold(background: np.ndarray) -> np.ndarray:
    """Counts a peak must add to a pixel of expected ``background`` to be visible:
    ``VISIBILITY_SIGMAS * sqrt(max(background, 1))`` (float32, same shape)."""
    return np.float32(VISIBILITY_SIGMAS) * np.sqrt(np.maximum(background, np.float32(_BACKGROUND_FLOOR)))


def _visible(window: _Window, background_window: np.ndarray, transmission: float) -> np.ndarray:
    """Ground-truth mask of one reflection's window rendered at ``transmission`` (module docstring)."""
    return window.counts >= visibility_threshold(background_window * np.float32(transmission))


# --------------------------------------------------------------------------- layout


def _random_angle_deg(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.0, 180.0))


def _blob(rng: np.random.Generator, preset: ScanPreset, hwhm: float, *, aspect: float, amplitude: float = 1.0,
          d_row: float = 0.0, d_col: float = 0.0, bend: float = 0.0, frame_offset: float = 0.0) -> PeakComponent:
    return PeakComponent(d_row=d_row, d_col=d_col, amplitude=amplitude, hwhm_major=hwhm, hwhm_minor=hwhm * aspect,
                         angle_deg=_random_angle_deg(rng), exponent=float(preset.profile_exponent.sample(rng)),
                         bend=bend,
                         frame_offset=frame_offset)


def _sample_components(rng: np.random.Generator, preset: ScanPreset, kind: str, rocking_fwhm: float, *,
                       main: bool) -> tuple[PeakComponent, ...]:
    """The blobs of one reflection of the given kind (I16 scene); ``main``: the scan's own reflection."""
    hwhm = float((preset.main_hwhm if main else preset.hwhm).sample(rng))
    if kind == "round":
        return (_blob(rng, preset, hwhm, aspect=float(rng.uniform(0.85, 1.0))),)
    if kind == "elliptical":
        aspect = float(preset.aspect.sample(rng))
        bend = float(rng.choice([-1, 1]) * rng.uniform(0.03, 0.12) / hwhm) if rng.random() < 0.3 else 0.0
        return (_blob(rng, preset, hwhm, aspect=aspect, bend=bend),)
    if kind == "streak":
        # A crystal truncation rod: slow (Lorentzian-like) decay along, narrow across; often through
        # a Bragg peak (the core), sometimes alone (scanning between Bragg peaks).
        with_core = rng.random() < 0.6
        rod = PeakComponent(
            d_row=0.0, d_col=0.0,
            amplitude=float(rng.uniform(0.03, 0.5)) if with_core else 1.0,
            hwhm_major=float(np.exp(rng.uniform(math.log(4.0), math.log(40.0)))),
            hwhm_minor=float(np.exp(rng.uniform(math.log(0.6), math.log(2.5)))),
            angle_deg=_random_angle_deg(rng),
            exponent=float(np.exp(rng.uniform(math.log(0.8), math.log(3.0)))),
            minor_exponent=float(np.exp(rng.uniform(math.log(3.0), math.log(30.0)))),
            bend=float(rng.uniform(-5e-4, 5e-4)) if rng.random() < 0.3 else 0.0,
        )
        if not with_core:
            return (rod,)
        return (_blob(rng, preset, hwhm, aspect=float(rng.uniform(0.6, 1.0))), rod)
    if kind == "split":
        # 2-3 mosaic blocks along one direction, each rocking at a slightly different angle.
        n_blocks = int(rng.integers(2, 4))
        direction = rng.uniform(0.0, 2 * math.pi)
        blocks = []
        position = 0.0
        for k in range(n_blocks):
            if k:
                position += float(rng.uniform(1.2, 3.0)) * hwhm
            spread = direction + float(rng.normal(0.0, 0.3))
            blocks.append(_blob(
                rng, preset, hwhm * float(rng.uniform(0.6, 1.1)), aspect=float(rng.uniform(0.5, 1.0)),
                amplitude=1.0 if k == 0 else float(rng.uniform(0.3, 1.0)),
                d_row=position * math.sin(spread), d_col=position * math.cos(spread),
                frame_offset=0.0 if k == 0 else float(rng.uniform(-0.25, 0.25)) * rocking_fwhm,
            ))
        return tuple(blocks)
    if kind == "irregular":
        n_blobs = int(rng.integers(3, 7))
        blobs = []
        for k in range(n_blobs):
            d_row, d_col = (0.0, 0.0) if k == 0 else (float(v) for v in rng.normal(0.0, 0.9 * hwhm, 2))
            blobs.append(_blob(
                rng, preset, hwhm * float(np.exp(rng.uniform(math.log(0.4), 0.0))), aspect=float(rng.uniform(0.4, 1.0)),
                amplitude=1.0 if k == 0 else float(rng.uniform(0.2, 1.0)), d_row=d_row, d_col=d_col,
                bend=float(rng.uniform(-0.1, 0.1)) / hwhm if rng.random() < 0.3 else 0.0,
            ))
        return tuple(blobs)
    raise ValueError(f"unknown reflection kind {kind!r}")  # pragma: no cover - presets hold valid kinds


def _sample_position(
    rng: np.random.Generator, preset: ScanPreset, shape: tuple[int, int], *, central: bool
) -> tuple[float, float]:
    """(row, col) of a reflection centre: near where real I16 peaks cluster, or anywhere."""
    h, w = shape
    if central:
        row = rng.normal(_I16_CENTRE_FRACTION[0] * h, preset.centre_sd_rows)
        col = rng.normal(_I16_CENTRE_FRACTION[1] * w, preset.centre_sd_cols)
        return float(np.clip(row, -0.05 * h, 1.05 * h)), float(np.clip(col, -0.05 * w, 1.05 * w))
    # Peaks may sit partly off the frame (as 5 % of the real labelled polygons do).
    return float(rng.uniform(-0.05 * h, 1.05 * h)), float(rng.uniform(-0.05 * w, 1.05 * w))


def _stretch_rocking(refl: Reflection, factor: float) -> Reflection:
    """The reflection with its rocking curve (and its blocks' rocking offsets) ``factor`` times wider."""
    return dataclasses.replace(
        refl, rocking_fwhm=refl.rocking_fwhm * factor,
        components=tuple(dataclasses.replace(c, frame_offset=c.frame_offset * factor) for c in refl.components),
    )


def _with_reach(refl: Reflection, level: float, reach: float) -> Reflection:
    """The reflection with its rocking curve stretched so that it stays above ``level`` counts
    for ``reach`` frames either side of its maximum (reach is linear in the width)."""
    return _stretch_rocking(refl, reach / max(refl.reach_frames(level), 1e-6))


def _invisible_below(background_min: float) -> float:
    """Counts (before attenuation) under which a reflection cannot be visible anywhere.

    A pixel is visible where ``c * t >= 2 * sqrt(max(b * t, 1))``; the ratio of the two sides
    grows with the transmission t (at most 1), so t = 1 and the smallest background bound it.
    """
    return float(visibility_threshold(np.float32(background_min)))


def _sample_i16_reflections(rng: np.random.Generator, preset: ScanPreset, detector: DetectorSpec, n_frames: int,
                            *, typical_threshold: float, guard_level: float) -> list[Reflection]:
    """Reflections of an I16 rocking scan placed so that the scan ends stay empty and no frame
    has more than ``preset.max_per_frame`` of them.

    Args:
        typical_threshold: visibility threshold (counts) at the median background of the scan.
        guard_level: counts under which no reflection can be visible (see :func:`_invisible_below`).
    """
    n_wanted = max(1, int(round(preset.n_reflections.sample(rng) * n_frames / 61.0)))
    lead = min(int(preset.empty_end_frames.sample(rng)), max(0, (n_frames - 1) // 4))
    trail = min(int(preset.empty_end_frames.sample(rng)), max(0, (n_frames - 1) // 4))
    first, last = float(lead), float(n_frames - 1 - trail)
    per_frame = np.zeros(n_frames, np.int64)
    placed: list[Reflection] = []
    for k in range(n_wanted):
        kind = preset.kind.sample(rng)
        fwhm = float(preset.rocking_fwhm.sample(rng))
        components = _sample_components(rng, preset, kind, fwhm, main=(k == 0))
        drift = np.clip(rng.normal(0.0, preset.drift, 2), -3 * preset.drift, 3 * preset.drift)
        refl = Reflection(
            id=len(placed), kind=kind, centre_frame=0.0, rocking_fwhm=fwhm,
            rocking_exponent=float(preset.rocking_exponent.sample(rng)), centre_row=0.0, centre_col=0.0,
            drift_row=float(drift[0]), drift_col=float(drift[1]), peak_counts=float(preset.peak_counts.sample(rng)),
            components=components,
        )
        room = 0.5 * (last - first)
        if k == 0:
            # The reflection the scan was set up for: visible (at this scan's typical threshold)
            # over 50-95 % of the frames between the empty ends.
            refl = dataclasses.replace(refl, peak_counts=max(refl.peak_counts, 4.0 * typical_threshold))
            refl = _with_reach(refl, typical_threshold, max(room * float(rng.uniform(0.5, 0.95)), _MIN_REACH_FRAMES))
            if refl.rocking_fwhm > preset.rocking_fwhm.hi:  # a weak peak stays a narrow one
                refl = _stretch_rocking(refl, preset.rocking_fwhm.hi / refl.rocking_fwhm)
        # Frames beyond `reach` cannot show the reflection: its contribution is under the lowest
        # possible visibility threshold there. Narrow the rocking curve if it does not fit.
        reach = refl.reach_frames(guard_level)
        if reach > room:
            # (a floor keeps the width finite in scans of one or two frames)
            refl = _with_reach(refl, guard_level, max(room * 0.999, _MIN_REACH_FRAMES))
            reach = refl.reach_frames(guard_level)
        lowest, highest = first + reach, last - reach
        if lowest > highest:  # only in scans of a frame or two
            lowest = highest = 0.5 * (first + last)
        for _attempt in range(20):
            if k == 0:
                centre_frame = min(max(float(rng.uniform(0.4, 0.6) * (n_frames - 1)), lowest), highest)
            else:
                centre_frame = float(rng.uniform(lowest, highest))
            f0 = max(0, math.ceil(centre_frame - reach))
            f1 = min(n_frames - 1, math.floor(centre_frame + reach))
            if f0 > f1 or per_frame[f0:f1 + 1].max() < preset.max_per_frame:
                break
        else:
            continue  # no room in this scan for another reflection
        central = k == 0 or rng.random() < preset.centre_fraction
        row, col = _sample_position(rng, preset, detector.shape, central=central)
        if preset.isolated:
            for _attempt in range(50):
                if all(math.hypot(row - p.centre_row, col - p.centre_col) > _ISOLATION_PX for p in placed):
                    break
                row, col = _sample_position(rng, preset, detector.shape, central=False)
            else:
                continue  # no free spot left
        if f0 <= f1:
            per_frame[f0:f1 + 1] += 1
        placed.append(dataclasses.replace(refl, centre_frame=centre_frame, centre_row=row, centre_col=col))
    return placed


def _sample_spot_reflections(rng: np.random.Generator, preset: ScanPreset, detector: DetectorSpec, n_frames: int,
                             geometry: BeamGeometry, *, guard_level: float) -> list[Reflection]:
    """Many small Bragg spots (large-detector scene), uniform on the detector around the beam,
    at most ``scene.max_spots_per_frame`` able to show in any frame."""
    scene = detector.eiger_scene
    assert scene is not None
    h, w = detector.shape
    per_frame = float(scene.spots_per_frame.sample(rng))
    # A spot is visible on ~1.6 frames on average (rocking FWHM 0.4-1.5 frames).
    n_spots = int(rng.poisson(per_frame * n_frames / 1.6))
    visible = np.zeros(n_frames, np.int64)
    spots: list[Reflection] = []
    for _ in range(n_spots):
        hwhm = float(scene.spot_hwhm.sample(rng))
        row, col = float(rng.uniform(0, h)), float(rng.uniform(0, w))
        # Fewer strong spots at high resolution (Wilson fall-off with distance from the beam).
        radius = math.hypot(row - geometry.beam_row, col - geometry.beam_col) / (0.5 * math.hypot(h, w))
        counts = float(scene.spot_peak_counts.sample(rng)) * math.exp(-1.5 * radius**2) * preset.spot_intensity_scale
        comp = PeakComponent(d_row=0.0, d_col=0.0, amplitude=1.0, hwhm_major=hwhm,
                             hwhm_minor=hwhm * float(rng.uniform(0.7, 1.0)),
                             angle_deg=_random_angle_deg(rng), exponent=float(scene.spot_exponent.sample(rng)))
        spot = Reflection(
            id=len(spots), kind="spot", centre_frame=float(rng.uniform(-0.5, n_frames - 0.5)),
            rocking_fwhm=float(scene.rocking_fwhm.sample(rng)), rocking_exponent=4.0, centre_row=row, centre_col=col,
            drift_row=0.0, drift_col=0.0, peak_counts=max(counts, 1.0), components=(comp,),
        )
        reach = spot.reach_frames(guard_level)
        f0 = max(0, math.ceil(spot.centre_frame - reach))
        f1 = min(n_frames - 1, math.floor(spot.centre_frame + reach))
        if f0 <= f1:
            if visible[f0:f1 + 1].max() >= scene.max_spots_per_frame:
                continue
            visible[f0:f1 + 1] += 1
        spots.append(spot)
    return spots


# --------------------------------------------------------------------------- beamline


def _transmission(rng: np.random.Generator, preset: ScanPreset, reflections: Sequence[Reflection], n_frames: int,
                  background_max: float) -> np.ndarray:
    """(n,) attenuator transmission per frame, each at most 1: fixed for the scan, or (auto
    attenuation) the largest ladder step that keeps the brightest expected pixel under a limit."""
    if rng.random() >= preset.auto_attenuation_probability:
        return np.full(n_frames, float(preset.fixed_transmission.sample(rng)))
    limit = float(preset.attenuator_limit.sample(rng))
    brightest = np.full(n_frames, background_max)
    for refl in reflections:
        for f in range(n_frames):
            brightest[f] = max(brightest[f], float(refl.component_peaks(f).max()) + background_max)
    out = np.ones(n_frames)
    for f in range(n_frames):
        for t in _ATTENUATOR_LADDER:
            out[f] = t
            if brightest[f] * t <= limit:
                break
    return out


def _i16_background(
    rng: np.random.Generator, preset: ScanPreset, shape: tuple[int, int]
) -> tuple[np.ndarray, tuple[PowderRing, ...]]:
    """(H, W) float32 background (flat + gradient + air-scatter hump + powder arcs) and its rings."""
    h, w = shape
    level = float(preset.background.sample(rng))
    image = flat_and_gradient(shape, level, float(preset.gradient.sample(rng)), float(rng.uniform(0, 2 * math.pi)))
    air = float(preset.air_scatter.sample(rng))
    if air > 0:
        image += hump(shape, level * air, float(rng.uniform(-0.3, 1.3) * h), float(rng.uniform(-0.3, 1.3) * w),
                      float(np.exp(rng.uniform(math.log(80.0), math.log(400.0)))))
    rings: list[PowderRing] = []
    if rng.random() < preset.ring_probability:
        for _ in range(int(preset.n_rings.sample(rng))):
            ring = sample_powder_ring(rng, shape, level * float(preset.ring_amplitude.sample(rng)))
            image += ring_image(shape, ring)
            rings.append(ring)
    return image, tuple(rings)


def _label_frames(
    candidates: list[list[tuple[int, int, dict]]], height: int, width: int, *, scan: str
) -> list[FrameLabels]:
    """Per-frame labels from every frame's visible regions: a reflection's run spans its first to
    last frame with at least MIN_INSTANCE_PIXELS; smaller regions inside the run are kept."""
    run: dict[int, tuple[int, int]] = {}
    for f, found in enumerate(candidates):
        for rid, pixels, _rle in found:
            if pixels >= MIN_INSTANCE_PIXELS:
                first, _last = run.get(rid, (f, f))
                run[rid] = (first, f)
    labels = []
    for f, found in enumerate(candidates):
        kept = [(rid, rle) for rid, _pixels, rle in found if rid in run and run[rid][0] <= f <= run[rid][1]]
        labels.append(FrameLabels(scan=scan, frame=f, height=height, width=width, rles=[rle for _, rle in kept],
                                  reflection_ids=np.asarray([rid for rid, _ in kept], np.int64)))
    return labels


# --------------------------------------------------------------------------- public API


def scan_seed(seed: int, index: int) -> int:
    """The seed of scan ``index`` of a dataset made with ``seed`` (independent streams per scan)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def simulate_scan(
    *,
    n_frames: int | None = None,
    preset: str = "realistic",
    detector: str = "pilatus100k",
    seed: int = 0,
    energy_kev: float | None = None,
    camera_length_mm: float | None = None,
) -> SimulatedScan:
    """Simulate one rocking scan with its ground truth.

    Args:
        n_frames: frames in the scan; None = the detector's default (61 for ``pilatus100k``,
            4 for ``eiger4m``, whose frames are 18 MB each).
        preset: "easy", "realistic" or "hard" (see :data:`dipid.synth.PRESETS`).
        detector: "pilatus100k" (I16 rocking scans) or "eiger4m" (many small spots on a water ring).
        seed: same seed, same arrays (and same file bytes on :meth:`SimulatedScan.write`).
        energy_kev: photon energy, keV (default: the detector's, 9 keV Pilatus / 12.4 keV Eiger).
        camera_length_mm: sample-detector distance, mm (default 565 / 200 mm). On the Eiger these
            two set the water-ring radius ``camera_length * tan(2θ) / pixel``; on the Pilatus the
            energy is only recorded in the file.
    Returns:
        a :class:`SimulatedScan`. On the Pilatus, at least one frame at each end is empty (when
        n_frames >= 5) and no frame has more than eight peaks.
    Raises:
        UnknownNameError: unknown preset or detector (the message lists the valid ones).
        ValueError: n_frames < 1, or an energy/camera length that puts the water ring past 2θ = 90°.
    """
    spec = get_preset(preset)
    det = get_detector(detector)
    n = det.default_frames if n_frames is None else int(n_frames)
    if n < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    energy = float(det.energy_kev if energy_kev is None else energy_kev)
    camera_length = float(det.camera_length_mm if camera_length_mm is None else camera_length_mm)
    if energy <= 0 or camera_length <= 0:
        raise ValueError(f"energy_kev and camera_length_mm must be positive, got {energy} and {camera_length}")
    layout_rng, beam_rng, background_rng, noise_rng = (
        np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(int(seed)).spawn(4)
    )
    h, w = det.shape
    geometry = None
    rings: tuple[PowderRing, ...] = ()
    if det.eiger_scene is None:
        background_image, rings = _i16_background(background_rng, spec, det.shape)
    else:
        scene = det.eiger_scene
        geometry = water_ring_geometry(background_rng, det, energy_kev=energy, camera_length_mm=camera_length,
                                       ring_q=scene.water_ring_q)
        background_image = solvent_background(
            det.shape, geometry, level=float(spec.background.sample(background_rng)), ring_q=scene.water_ring_q,
            ring_fwhm_q=scene.water_ring_fwhm_q,
            ring_amplitude=float(scene.water_ring_amplitude.sample(background_rng)),
            air_amplitude=float(spec.air_scatter.sample(background_rng)),
        )
    defects = sample_defects(background_rng, det, spec)

    if det.eiger_scene is None:
        reflections = _sample_i16_reflections(
            layout_rng, spec, det, n, typical_threshold=float(visibility_threshold(np.median(background_image))),
            guard_level=_invisible_below(float(background_image.min())),
        )
    else:
        assert geometry is not None
        reflections = _sample_spot_reflections(layout_rng, spec, det, n, geometry,
                                               guard_level=_invisible_below(float(background_image.min())))

    background_max = float(background_image.max())
    transmission = _transmission(beam_rng, spec, reflections if det.eiger_scene is None else (), n, background_max)
    beam_level = 1.0 + spec.frame_level_jitter * np.clip(beam_rng.standard_normal(n), -3.0, 3.0)
    frame_scale = transmission * beam_level
    count_time = np.full(n, float(beam_rng.choice([0.1, 0.5, 1.0, 2.0, 5.0])))
    step = float(beam_rng.choice([0.01, 0.02, 0.025, 0.05, 0.1]))
    start = round(float(beam_rng.uniform(5.0, 80.0)), 3)
    axis_values = np.round(start + step * np.arange(n), 6)

    # Frames whose rocking contributions can reach the render cutoff, per reflection.
    active: list[list[int]] = [[] for _ in range(n)]
    for refl in reflections:
        reach = refl.reach_frames(_RENDER_CUTOFF)
        first_f = max(0, math.ceil(refl.centre_frame - reach))
        last_f = min(n - 1, math.floor(refl.centre_frame + reach))
        for f in range(first_f, last_f + 1):
            active[f].append(refl.id)

    frames = np.empty((n, h, w), np.int32)
    candidates: list[list[tuple[int, int, dict]]] = []  # per frame: (reflection id, pixels, RLE)
    sat = det.saturation_value
    for f in range(n):
        transmission_f, beam_f = float(transmission[f]), np.float32(beam_level[f])
        expected = background_image * np.float32(frame_scale[f])
        found: list[tuple[int, int, dict]] = []
        for rid in active[f]:
            window = _render(reflections[rid], f, transmission_f, det)
            if window is None:
                continue
            rows, cols = window.slices
            expected[rows, cols] += window.counts * beam_f
            mask = _visible(window, background_image[rows, cols], transmission_f)
            pixels = int(np.count_nonzero(mask))
            if pixels:
                found.append((rid, pixels, window_rle(mask, window.row0, window.col0, h, w)))
        counts = noise_rng.poisson(expected)
        if len(defects.hot_rows):
            counts[defects.hot_rows, defects.hot_cols] = noise_rng.poisson(defects.hot_counts)
        np.minimum(counts, int(sat), out=counts)
        frame = counts.astype(np.int32)
        frame[defects.dead] = -2
        frame[defects.gap] = -1
        frames[f] = frame
        candidates.append(found)
    labels = _label_frames(candidates, h, w, scan="sim_000.nxs")

    logger.debug("simulated %s/%s seed %d: %d reflections, %d instances", preset, detector, seed, len(reflections),
                 sum(len(fl) for fl in labels))
    return SimulatedScan(
        frames=frames, axis_name=det.axis_name, axis_values=axis_values.astype(np.float64), saturation_value=float(sat),
        attenuator_transmission=transmission.astype(np.float64), count_time=count_time, labels=labels,
        reflections=reflections, background_image=background_image, beam_level=beam_level.astype(np.float64),
        frame_scale=frame_scale.astype(np.float64),
        preset=preset, detector=detector, seed=int(seed), energy_kev=energy, detector_spec=det, rings=rings,
        geometry=geometry, defects=defects,
    )


def simulate_dataset(
    out_dir: str | Path,
    *,
    n_scans: int,
    n_frames: int | None = None,
    seed: int = 0,
    preset: str = "realistic",
    detector: str = "pilatus100k",
    progress: bool = True,
) -> list[SimulatedFiles]:
    """Simulate and write ``n_scans`` scans as ``sim_00000.nxs`` + ``sim_00000_labels.json``, ...

    Scan k uses the seed :func:`scan_seed(seed, k) <scan_seed>`, so any scan can be regenerated alone
    and datasets with different ``seed`` do not share scans. Shows a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    get_preset(preset)
    get_detector(detector)
    out = Path(out_dir)
    files = []
    for k in tqdm(range(int(n_scans)), desc=f"simulating {preset} {detector}", unit="scan", disable=not progress):
        scan = simulate_scan(n_frames=n_frames, preset=preset, detector=detector, seed=scan_seed(seed, k))
        files.append(scan.write(out, f"sim_{k:05d}"))
    return files
