"""Noiseless backgrounds and detector defects of a simulated scan.

Backgrounds are built once per scan as one (H, W) float32 image of expected counts; each frame
uses it scaled by that frame's transmission and beam level. Nothing here is random except
through the ``rng`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dipid.synth.presets import DetectorSpec, ScanPreset
from dipid.synth.profiles import q_of_radius, ring_radius_px


@dataclass(frozen=True)
class PowderRing:
    """An arc of constant 2θ: a circle whose centre lies off the detector (tilted detector on an arm).

    Attributes: centre_row, centre_col (px, outside the frame), radius (px), width (Gaussian sd, px),
    amplitude (counts at the ring maximum), texture (relative modulation along the arc).
    """

    centre_row: float
    centre_col: float
    radius: float
    width: float
    amplitude: float
    texture: float
    texture_phase: float
    texture_period: float


@dataclass(frozen=True)
class BeamGeometry:
    """Flat-detector geometry of the solvent ring (large-detector scene).

    Attributes: energy_kev, camera_length_mm, pixel_size_mm, beam_row, beam_col (px),
    water_ring_radius_px (radius of the ring maximum, px).
    """

    energy_kev: float
    camera_length_mm: float
    pixel_size_mm: float
    beam_row: float
    beam_col: float
    water_ring_radius_px: float


@dataclass(frozen=True)
class Defects:
    """Bad pixels of one scan (fixed across its frames).

    Attributes:
        gap: (H, W) bool, module gaps, written as -1.
        dead: (H, W) bool, dead pixels and lines, written as -2.
        hot_rows, hot_cols: (K,) int64 positions of hot pixels.
        hot_counts: (K,) float64 mean counts of each hot pixel per frame.
    """

    gap: np.ndarray
    dead: np.ndarray
    hot_rows: np.ndarray
    hot_cols: np.ndarray
    hot_counts: np.ndarray


def _pixel_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def flat_and_gradient(shape: tuple[int, int], level: float, gradient: float, direction_rad: float) -> np.ndarray:
    """Flat level with a linear gradient: ``level * (1 + gradient * t)``, t in [-1/2, 1/2] along ``direction``."""
    rows, cols = _pixel_grid(shape)
    h, w = shape
    c, s = math.cos(direction_rad), math.sin(direction_rad)
    extent = abs(c) * w + abs(s) * h
    t = ((cols - w / 2) * np.float32(c) + (rows - h / 2) * np.float32(s)) / np.float32(max(extent, 1.0))
    return (np.float32(level) * (1 + np.float32(gradient) * t)).astype(np.float32)


def hump(shape: tuple[int, int], amplitude: float, centre_row: float, centre_col: float, sigma: float) -> np.ndarray:
    """Broad Gaussian hump (air scatter): amplitude * exp(-r² / 2σ²)."""
    rows, cols = _pixel_grid(shape)
    r2 = (rows - np.float32(centre_row)) ** 2 + (cols - np.float32(centre_col)) ** 2
    return (np.float32(amplitude) * np.exp(r2 * np.float32(-0.5 / sigma**2))).astype(np.float32)


def ring_image(shape: tuple[int, int], ring: PowderRing) -> np.ndarray:
    """One powder arc: Gaussian in radius, modulated along the arc by texture."""
    rows, cols = _pixel_grid(shape)
    dr = rows - np.float32(ring.centre_row)
    dc = cols - np.float32(ring.centre_col)
    radius = np.sqrt(dr * dr + dc * dc)
    radial = np.exp(((radius - np.float32(ring.radius)) / np.float32(ring.width)) ** 2 * np.float32(-0.5))
    arc_length = np.arctan2(dr, dc) * np.float32(ring.radius)
    phase = arc_length / np.float32(ring.texture_period) + np.float32(ring.texture_phase)
    modulation = 1 + np.float32(ring.texture) * np.sin(phase)
    return (np.float32(ring.amplitude) * radial * modulation).astype(np.float32)


def sample_powder_ring(rng: np.random.Generator, shape: tuple[int, int], amplitude: float) -> PowderRing:
    """A random arc crossing the frame, centred 300-2500 px off the detector centre."""
    h, w = shape
    distance = float(rng.uniform(300.0, 2500.0)) + 0.5 * math.hypot(h, w)
    direction = float(rng.uniform(0.0, 2 * math.pi))
    centre_row = h / 2 + distance * math.sin(direction)
    centre_col = w / 2 + distance * math.cos(direction)
    # A radius within half a frame diagonal of the distance makes the arc cross the frame.
    radius = distance + float(rng.uniform(-0.4, 0.4)) * math.hypot(h, w)
    return PowderRing(
        centre_row=centre_row,
        centre_col=centre_col,
        radius=radius,
        width=float(np.exp(rng.uniform(math.log(0.8), math.log(6.0)))),
        amplitude=amplitude,
        texture=float(rng.uniform(0.0, 0.8)),
        texture_phase=float(rng.uniform(0.0, 2 * math.pi)),
        texture_period=float(rng.uniform(5.0, 60.0)),
    )


def solvent_background(
    shape: tuple[int, int],
    geometry: BeamGeometry,
    *,
    level: float,
    ring_q: float,
    ring_fwhm_q: float,
    ring_amplitude: float,
    air_amplitude: float,
) -> np.ndarray:
    """Flat level + air scatter falling with q + a water ring (Gaussian in q), (H, W) float32."""
    rows, cols = _pixel_grid(shape)
    radius = np.sqrt((rows - np.float32(geometry.beam_row)) ** 2 + (cols - np.float32(geometry.beam_col)) ** 2)
    q = q_of_radius(radius, energy_kev=geometry.energy_kev, camera_length_mm=geometry.camera_length_mm,
                    pixel_size_mm=geometry.pixel_size_mm)
    sigma_q = ring_fwhm_q / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    ring = np.exp(((q - np.float32(ring_q)) / np.float32(sigma_q)) ** 2 * np.float32(-0.5))
    air = np.exp(q * np.float32(-1.0 / 0.6))
    relative = 1 + np.float32(ring_amplitude) * ring + np.float32(air_amplitude) * air
    return (np.float32(level) * relative).astype(np.float32)


def water_ring_geometry(
    rng: np.random.Generator, detector: DetectorSpec, *, energy_kev: float, camera_length_mm: float, ring_q: float
) -> BeamGeometry:
    """Beam centre near the frame centre (±2 %), and the water-ring radius from the geometry."""
    h, w = detector.shape
    return BeamGeometry(
        energy_kev=energy_kev,
        camera_length_mm=camera_length_mm,
        pixel_size_mm=detector.pixel_size_mm,
        beam_row=h / 2 + float(rng.uniform(-0.02, 0.02)) * h,
        beam_col=w / 2 + float(rng.uniform(-0.02, 0.02)) * w,
        water_ring_radius_px=ring_radius_px(ring_q, energy_kev=energy_kev, camera_length_mm=camera_length_mm,
                                            pixel_size_mm=detector.pixel_size_mm),
    )


def module_gap_mask(detector: DetectorSpec) -> np.ndarray:
    """(H, W) bool: True in the insensitive stripes between modules."""
    h, w = detector.shape
    (mh, mw), (gh, gw) = detector.module_shape, detector.module_gap
    gap = np.zeros((h, w), bool)
    if gh:
        for start in range(mh, h, mh + gh):
            gap[start:start + gh, :] = True
    if gw:
        for start in range(mw, w, mw + gw):
            gap[:, start:start + gw] = True
    return gap


def sample_defects(rng: np.random.Generator, detector: DetectorSpec, preset: ScanPreset) -> Defects:
    """Dead pixels (-2), dead row/column segments (-2), hot pixels and module gaps (-1)."""
    h, w = detector.shape
    gap = module_gap_mask(detector)
    dead = np.zeros((h, w), bool)
    area_scale = max(1.0, (h * w) / (195 * 487))  # presets count defects per Pilatus 100K area
    n_dead = int(round(preset.dead_pixels.sample(rng) * area_scale))
    dead[rng.integers(0, h, n_dead), rng.integers(0, w, n_dead)] = True
    for _ in range(int(preset.dead_lines.sample(rng))):
        if rng.random() < 0.5:
            col = int(rng.integers(0, w))
            start = int(rng.integers(0, h // 2)) if rng.random() < 0.5 else 0
            dead[start:start + int(rng.integers(h // 4, h + 1)), col] = True
        else:
            row = int(rng.integers(0, h))
            start = int(rng.integers(0, w // 2)) if rng.random() < 0.5 else 0
            dead[row, start:start + int(rng.integers(w // 4, w + 1))] = True
    dead &= ~gap
    n_hot = int(round(preset.hot_pixels.sample(rng) * area_scale))
    hot_rows = rng.integers(0, h, n_hot)
    hot_cols = rng.integers(0, w, n_hot)
    hot_counts = np.exp(rng.uniform(math.log(1e3), math.log(3e6), n_hot))
    usable = ~(gap[hot_rows, hot_cols] | dead[hot_rows, hot_cols])
    return Defects(gap=gap, dead=dead, hot_rows=hot_rows[usable], hot_cols=hot_cols[usable],
                   hot_counts=hot_counts[usable])
