"""dipid: find and segment diffraction peaks in X-ray area-detector scans.

Public API (imported lazily: ``import dipid`` loads only the exception types, so ``dipid --help``
answers at once; torch and torchvision are imported, and checked to work together, the first
time a model module is used, in :mod:`dipid.models`)::

    import dipid
    scan = dipid.open_scan("1040323.nxs")
    predictor = dipid.JointPredictor.from_pretrained()
    result = predictor.predict_scan(scan)
"""

from __future__ import annotations

import logging

from dipid._lazy import lazy_exports
from dipid.errors import *  # noqa: F403
from dipid.errors import __all__ as _error_names

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "open_scan": "dipid.io",
    "Scan": "dipid.io",
    "simulate_scan": "dipid.synth",
    "JointPredictor": "dipid.predict",
    "ImageResult": "dipid.results",
    "ScanResult": "dipid.results",
    "Instances": "dipid.results",
    "build_tlm": "dipid.models",
    "build_sslm": "dipid.models",
    "generate_3d_plot": "dipid.viz",
    "show_image_predictions": "dipid.viz",
}

__all__ = ["__version__", *_error_names, *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, extra_dir=["__version__", *_error_names])
