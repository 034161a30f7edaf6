"""Simulator presets and detector descriptions, kept as plain data.

A preset (``easy``, ``realistic``, ``hard``, ``broad``) is a frozen dataclass of parameter distributions:
how many reflections a scan has, how bright and how big they are, which shapes occur, how
strong the background is and which defects appear. A detector (``pilatus100k``, ``eiger4m``)
fixes the frame geometry, the bad-pixel layout and the kind of scene it sees.

The ``realistic`` distributions were tuned (``benchmarks/simulate.py`` and a calibration loop over
150 scans) so that the *ground-truth instances* (not the parameters) match the 1251 real I16
polygons in ``tests/data/dipid_zooniverse_labels.csv``:

=========================  ======================  ==========================
statistic                  real labels             ``realistic`` (150 scans)
=========================  ======================  ==========================
area p5 / p25 / p50 / p75  19 / 170 / 770 / 2430   18 / 189 / 837 / 2232 px²
area p95                   5900                    ~7000 px²
instances under 50 px²     13 %                    12 %
box side p5 / p50 / p95    5 / 35 / 101            5 / 36 / 128 px
centroid row, col median   101, 269                98, 266
peaks per non-empty frame  1.9 (1 to 8)            2.0 (1 to 8)
=========================  ======================  ==========================

Statistics over a couple of dozen scans scatter by about ±20 % around these, as the real ones
(8 scans) must too. ``realistic`` has more empty frames (27 %) than the real scans (12 %),
because every scan keeps a few empty frames at each end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from dipid.errors import UnknownNameError

__all__ = [
    "Uniform",
    "LogUniform",
    "IntRange",
    "Choice",
    "Mixture",
    "ScanPreset",
    "EigerScene",
    "DetectorSpec",
    "PRESETS",
    "DETECTORS",
    "get_preset",
    "get_detector",
]


# --------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Uniform:
    """Uniform on [lo, hi)."""

    lo: float
    hi: float

    def sample(self, rng: np.random.Generator, size: int | None = None):
        return rng.uniform(self.lo, self.hi, size)


@dataclass(frozen=True)
class LogUniform:
    """Log-uniform on [lo, hi) (both > 0): every decade equally likely."""

    lo: float
    hi: float

    def sample(self, rng: np.random.Generator, size: int | None = None):
        return np.exp(rng.uniform(np.log(self.lo), np.log(self.hi), size))


@dataclass(frozen=True)
class IntRange:
    """Uniform integer in [lo, hi] (both inclusive)."""

    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, size: int | None = None):
        return rng.integers(self.lo, self.hi, size, endpoint=True)


@dataclass(frozen=True)
class Choice:
    """One of ``values`` with relative ``weights``."""

    values: tuple
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) != len(self.weights):
            raise ValueError("Choice values and weights differ in length")

    def sample(self, rng: np.random.Generator):
        p = np.asarray(self.weights, dtype=np.float64)
        return self.values[int(rng.choice(len(self.values), p=p / p.sum()))]


@dataclass(frozen=True)
class Mixture:
    """A draw from one of ``parts`` (distributions), picked with relative ``weights``."""

    parts: tuple
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.weights):
            raise ValueError("Mixture parts and weights differ in length")

    def sample(self, rng: np.random.Generator, size: int | None = None):
        p = np.asarray(self.weights, dtype=np.float64)
        if size is None:
            return self.parts[int(rng.choice(len(self.parts), p=p / p.sum()))].sample(rng)
        picks = rng.choice(len(self.parts), size=size, p=p / p.sum())
        draws = np.stack([part.sample(rng, size) for part in self.parts])
        return draws[picks, np.arange(size)]


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class ScanPreset:
    """Distributions of one difficulty level (all counts are per pixel per frame, before noise).

    Reflections:
        n_reflections: reflections placed in a 61-frame scan (scaled with the scan length).
        max_per_frame: cap on reflections that can be visible in one frame.
        empty_end_frames: frames at each scan end kept free of any visible reflection.
        peak_counts: brightest pixel of a reflection at its rocking maximum, before attenuation.
        kind: shape kind ("round", "elliptical", "streak", "split", "irregular").
        hwhm: half width at half maximum of a peak's main axis, px.
        main_hwhm: the same for the reflection the scan is centred on (a proper Bragg peak, never
            one of the sharp specks; drawing it apart also steadies the per-scan statistics).
        aspect: minor/major width ratio of elliptical components.
        profile_exponent: Pearson VII exponent of the detector profile (small = heavy tails).
        rocking_fwhm: rocking-curve full width at half maximum, frames.
        rocking_exponent: Pearson VII exponent of the rocking curve.
        drift: per-frame centre drift, px/frame (normal sd; clipped at 3 sd).
        centre_fraction: share of reflections drawn near the detector centre (the rest uniform).
        centre_sd_rows, centre_sd_cols: spread of the central cluster, px.
        isolated: keep reflection centres apart (easy preset).
        spot_intensity_scale: factor on the Bragg-spot brightness of the large-detector scene.
    Background:
        background: flat level, counts.
        gradient: relative change of the flat level across the detector.
        air_scatter: broad hump amplitude relative to the flat level.
        ring_probability / n_rings / ring_amplitude: powder rings (amplitude relative to flat level).
        frame_level_jitter: relative frame-to-frame change of the background (beam/monitor).
    Defects and beamline:
        dead_pixels, dead_lines, hot_pixels: counts of each defect.
        auto_attenuation_probability: share of scans where the attenuator follows the brightest peak.
        attenuator_limit: brightest-pixel level the auto attenuator keeps frames under.
        fixed_transmission: transmission of scans without auto attenuation.
    """

    n_reflections: IntRange | Choice
    max_per_frame: int
    empty_end_frames: IntRange
    peak_counts: LogUniform
    kind: Choice
    hwhm: LogUniform | Mixture
    main_hwhm: LogUniform
    aspect: Uniform
    profile_exponent: LogUniform
    rocking_fwhm: LogUniform
    rocking_exponent: LogUniform
    drift: float
    centre_fraction: float
    centre_sd_rows: float
    centre_sd_cols: float
    isolated: bool
    spot_intensity_scale: float
    background: LogUniform
    gradient: Uniform
    air_scatter: Uniform
    ring_probability: float
    n_rings: IntRange
    ring_amplitude: LogUniform
    frame_level_jitter: float
    dead_pixels: IntRange
    dead_lines: IntRange
    hot_pixels: IntRange
    auto_attenuation_probability: float
    attenuator_limit: LogUniform
    fixed_transmission: Choice


_SHAPES_ALL = ("round", "elliptical", "streak", "split", "irregular")

PRESETS: dict[str, ScanPreset] = {
    "easy": ScanPreset(
        n_reflections=IntRange(1, 4),
        max_per_frame=4,
        empty_end_frames=IntRange(3, 10),
        peak_counts=LogUniform(2e3, 2e5),
        kind=Choice(("round", "elliptical"), (0.6, 0.4)),
        hwhm=LogUniform(3.0, 10.0),
        main_hwhm=LogUniform(3.0, 10.0),
        aspect=Uniform(0.7, 1.0),
        profile_exponent=LogUniform(4.0, 30.0),
        rocking_fwhm=LogUniform(2.0, 8.0),
        rocking_exponent=LogUniform(3.0, 20.0),
        drift=0.15,
        centre_fraction=0.5,
        centre_sd_rows=35.0,
        centre_sd_cols=70.0,
        isolated=True,
        spot_intensity_scale=3.0,
        background=LogUniform(0.05, 1.0),
        gradient=Uniform(0.0, 0.2),
        air_scatter=Uniform(0.0, 0.5),
        ring_probability=0.0,
        n_rings=IntRange(0, 0),
        ring_amplitude=LogUniform(1.0, 2.0),
        frame_level_jitter=0.01,
        dead_pixels=IntRange(0, 3),
        dead_lines=IntRange(0, 0),
        hot_pixels=IntRange(0, 1),
        auto_attenuation_probability=0.0,
        attenuator_limit=LogUniform(3e5, 8e5),
        fixed_transmission=Choice((1.0,), (1.0,)),
    ),
    "realistic": ScanPreset(
        n_reflections=Choice(tuple(range(1, 9)), (0.25, 0.22, 0.2, 0.14, 0.09, 0.05, 0.03, 0.02)),
        max_per_frame=8,
        empty_end_frames=IntRange(1, 3),
        peak_counts=LogUniform(20.0, 3e6),
        kind=Choice(_SHAPES_ALL, (0.26, 0.3, 0.12, 0.16, 0.16)),
        hwhm=Mixture((LogUniform(1.0, 2.5), LogUniform(5.25, 15.5)), (0.31, 0.69)),
        main_hwhm=LogUniform(5.0, 15.0),
        aspect=Uniform(0.35, 1.0),
        profile_exponent=LogUniform(4.0, 30.0),
        rocking_fwhm=LogUniform(2.0, 15.0),
        rocking_exponent=LogUniform(2.0, 30.0),
        drift=0.3,
        centre_fraction=0.45,
        centre_sd_rows=35.0,
        centre_sd_cols=40.0,
        isolated=False,
        spot_intensity_scale=1.0,
        background=LogUniform(0.1, 20.0),
        gradient=Uniform(0.0, 0.6),
        air_scatter=Uniform(0.0, 2.0),
        ring_probability=0.25,
        n_rings=IntRange(1, 3),
        ring_amplitude=LogUniform(0.3, 5.0),
        frame_level_jitter=0.02,
        dead_pixels=IntRange(0, 30),
        dead_lines=IntRange(0, 2),
        hot_pixels=IntRange(0, 5),
        auto_attenuation_probability=0.4,
        attenuator_limit=LogUniform(1e5, 8e5),
        fixed_transmission=Choice((1.0, 0.3, 0.1), (0.8, 0.1, 0.1)),
    ),
    "hard": ScanPreset(
        n_reflections=IntRange(2, 8),
        max_per_frame=8,
        empty_end_frames=IntRange(1, 4),
        peak_counts=LogUniform(15.0, 5e3),
        kind=Choice(_SHAPES_ALL, (0.1, 0.2, 0.25, 0.25, 0.2)),
        hwhm=Mixture((LogUniform(1.0, 2.5), LogUniform(4.0, 15.0)), (0.3, 0.7)),
        main_hwhm=LogUniform(3.0, 15.0),
        aspect=Uniform(0.25, 1.0),
        profile_exponent=LogUniform(3.0, 30.0),
        rocking_fwhm=LogUniform(1.5, 15.0),
        rocking_exponent=LogUniform(2.0, 30.0),
        drift=0.5,
        centre_fraction=0.4,
        centre_sd_rows=40.0,
        centre_sd_cols=80.0,
        isolated=False,
        spot_intensity_scale=0.3,
        background=LogUniform(0.5, 30.0),
        gradient=Uniform(0.2, 1.0),
        air_scatter=Uniform(0.5, 3.0),
        ring_probability=0.7,
        n_rings=IntRange(1, 4),
        ring_amplitude=LogUniform(0.5, 8.0),
        frame_level_jitter=0.05,
        dead_pixels=IntRange(10, 80),
        dead_lines=IntRange(1, 4),
        hot_pixels=IntRange(2, 20),
        auto_attenuation_probability=0.3,
        attenuator_limit=LogUniform(1e4, 1e5),
        fixed_transmission=Choice((1.0, 0.3), (0.7, 0.3)),
    ),
}


# ``broad`` is the training domain of the shipped TLM (issue 11: "train on a wide domain"): the
# ``hard`` scene with each distribution widened at both ends, so that faint peaks close to the
# noise, bright ones, steep backgrounds and crowded frames are all seen in training. The streak
# aspect ratios keep ``hard``'s range (>= 0.25) on purpose: ``benchmarks/shifted.py``'s
# thin-streaks family (0.1 to 0.25) stays a family no training preset reaches, the held-out
# measure of generalisation.
PRESETS["broad"] = replace(
    PRESETS["hard"],
    n_reflections=IntRange(1, 12),
    max_per_frame=12,
    empty_end_frames=IntRange(1, 4),
    peak_counts=LogUniform(6.0, 3e5),
    background=LogUniform(0.05, 100.0),
    gradient=Uniform(0.0, 2.0),
    ring_probability=0.5,
    dead_pixels=IntRange(0, 80),
    dead_lines=IntRange(0, 4),
    hot_pixels=IntRange(0, 20),
)


# --------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class EigerScene:
    """The serial/rotation-crystallography scene of a large detector: many small Bragg spots on a
    solvent (water) ring.

    Attributes:
        spots_per_frame: Bragg spots visible per frame (tens to hundreds).
        spot_hwhm: spot half width at half maximum, px.
        spot_exponent: Pearson VII exponent of the spot profile.
        rocking_fwhm: frames (spots last one to three frames).
        water_ring_q: solvent ring position, Å⁻¹ (water: ~2.0 Å⁻¹, d ≈ 3.1 Å).
        water_ring_fwhm_q: ring width, Å⁻¹.
        water_ring_amplitude: ring height relative to the flat background.
        max_window: largest half size of a spot's rendering window, px (keeps memory flat).
        max_spots_per_frame: cap on spots that can show in one frame. 250 because pycocotools'
            ``area()`` fails with NumPy 2 on more than 255 masks at once, which
            :meth:`dipid.io.coco.FrameLabels.areas` (and so ``write_coco``) calls per frame.
        spot_peak_counts: brightest pixel of a spot, counts.
    """

    spots_per_frame: LogUniform = LogUniform(20.0, 300.0)
    spot_hwhm: LogUniform = LogUniform(0.6, 2.0)
    spot_exponent: LogUniform = LogUniform(2.5, 12.0)
    rocking_fwhm: LogUniform = LogUniform(0.4, 1.5)
    water_ring_q: float = 2.0
    water_ring_fwhm_q: float = 0.6
    water_ring_amplitude: LogUniform = LogUniform(2.0, 10.0)
    max_window: int = 48
    max_spots_per_frame: int = 250
    spot_peak_counts: LogUniform = LogUniform(15.0, 3e4)


@dataclass(frozen=True)
class DetectorSpec:
    """A detector: frame size, pixel size, module layout and defaults of its scene.

    Attributes:
        name: detector group name written to NeXus (e.g. ``pil3_100k``).
        shape: (rows, cols) of a frame.
        pixel_size_mm: square pixel pitch, mm.
        module_shape: (rows, cols) of one sensor module.
        module_gap: (rows, cols) of the insensitive gap between modules (written as -1).
        saturation_value: counts at and above which a pixel is saturated.
        default_frames: n_frames when the caller gives none.
        energy_kev, camera_length_mm: default photon energy and sample-detector distance.
        axis_name: scanned motor recorded in the file.
        eiger_scene: the many-spot/water-ring scene, or None for the I16 rocking-scan scene.
    """

    name: str
    shape: tuple[int, int]
    pixel_size_mm: float
    module_shape: tuple[int, int]
    module_gap: tuple[int, int]
    saturation_value: float
    default_frames: int
    energy_kev: float
    camera_length_mm: float
    axis_name: str
    eiger_scene: EigerScene | None = field(default=None)

    @property
    def module_grid(self) -> tuple[int, int]:
        """(rows, cols) of modules."""
        (h, w), (mh, mw), (gh, gw) = self.shape, self.module_shape, self.module_gap
        return (h + gh) // (mh + gh), (w + gw) // (mw + gw)


DETECTORS: dict[str, DetectorSpec] = {
    # Pilatus3 100K: one module of 195 x 487 pixels (no inter-module gaps), 172 um pixels.
    "pilatus100k": DetectorSpec(
        name="pil3_100k",
        shape=(195, 487),
        pixel_size_mm=0.172,
        module_shape=(195, 487),
        module_gap=(0, 0),
        saturation_value=1e6,
        default_frames=61,
        energy_kev=9.0,
        camera_length_mm=565.0,
        axis_name="eta",
    ),
    # Eiger2 X 4M: 4 x 2 modules of 512 rows x 1028 cols with 38-row and 12-col gaps, 75 um
    # pixels: 2162 rows x 2068 cols, the Eiger2 4M frame. (The first-generation Eiger 4M has
    # 514 x 1030 modules with 37/10 px gaps, giving 2167 x 2070; the gap stripes look the same.)
    # Gaps between the chips inside a module are not modelled.
    "eiger4m": DetectorSpec(
        name="eiger4m",
        shape=(2162, 2068),
        pixel_size_mm=0.075,
        module_shape=(512, 1028),
        module_gap=(38, 12),
        saturation_value=1e6,
        default_frames=4,
        energy_kev=12.4,
        camera_length_mm=200.0,
        axis_name="omega",
        eiger_scene=EigerScene(),
    ),
}


def _lookup(table: dict, kind: str, name: str):
    try:
        return table[name]
    except (KeyError, TypeError):
        raise UnknownNameError(kind, name, sorted(table)) from None


def get_preset(name: str) -> ScanPreset:
    """The preset called ``name``; raises :class:`dipid.errors.UnknownNameError` listing valid names."""
    return _lookup(PRESETS, "preset", name)


def get_detector(name: str) -> DetectorSpec:
    """The detector called ``name``; raises :class:`dipid.errors.UnknownNameError` listing valid names."""
    return _lookup(DETECTORS, "detector", name)
