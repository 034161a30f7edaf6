"""Scan simulator: I16 rocking scans on a Pilatus 100K (and many-spot Eiger 4M frames) with exact
ground truth, deterministic by seed.

No public I16 images exist, so this is what the models are trained and judged on::

    from dipid.synth import simulate_scan, simulate_dataset
    scan = simulate_scan(preset="realistic", seed=3)       # 61 frames, 195 x 487
    scan.frames, scan.labels, scan.truth_volume()
    scan.write("out", "sim_003")                           # sim_003.nxs + sim_003_labels.json
    simulate_dataset("train", n_scans=100, seed=0)         # scan k uses scan_seed(0, k)

See :mod:`dipid.synth.scan` for the ground-truth definition and :mod:`dipid.synth.presets`
for the distributions behind ``easy`` / ``realistic`` / ``hard`` (a new preset is a
``dataclasses.replace`` of one of them added to ``PRESETS`` under a new name).
"""

from dipid.synth.background import BeamGeometry, Defects, PowderRing
from dipid.synth.presets import (
    DETECTORS,
    PRESETS,
    Choice,
    DetectorSpec,
    EigerScene,
    IntRange,
    LogUniform,
    Mixture,
    ScanPreset,
    Uniform,
    get_detector,
    get_preset,
)
from dipid.synth.profiles import ring_radius_px
from dipid.synth.scan import (
    MIN_INSTANCE_PIXELS,
    VISIBILITY_SIGMAS,
    PeakComponent,
    Reflection,
    SimulatedFiles,
    SimulatedScan,
    scan_seed,
    simulate_dataset,
    simulate_scan,
    visibility_threshold,
)

__all__ = [
    "simulate_scan",
    "simulate_dataset",
    "scan_seed",
    "SimulatedScan",
    "SimulatedFiles",
    "Reflection",
    "PeakComponent",
    "PRESETS",
    "DETECTORS",
    "ScanPreset",
    "DetectorSpec",
    "EigerScene",
    "get_preset",
    "get_detector",
    "Uniform",
    "LogUniform",
    "IntRange",
    "Choice",
    "Mixture",
    "BeamGeometry",
    "PowderRing",
    "Defects",
    "ring_radius_px",
    "visibility_threshold",
    "MIN_INSTANCE_PIXELS",
    "VISIBILITY_SIGMAS",
]
