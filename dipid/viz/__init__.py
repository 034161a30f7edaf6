"""Plotly figures of dipid results, and the standalone HTML scan viewer.

Three kinds of output:

* :func:`generate_3d_plot`: the stacked per-frame masks of a scan as a 3D cloud of voxels
  (detector column, scan-axis value, detector row), coloured by frame.
* :func:`show_image_predictions`: one frame in linear and log scale with every instance's outline.
* :func:`build_viewer` / :func:`write_viewer` / :func:`view_scan_result` /
  :func:`view_results_file`: one self-contained HTML file (plotly.js embedded, works offline)
  with the 3D peaks, a frame slider over the log-scaled frames with each model's outlines, and
  the 3D-peak table.

The package has four parts: :mod:`dipid.viz.geometry` (pure numpy: outlines, binning, colours
per peak; no plotly), :mod:`dipid.viz.figures` (the two plotly figures), :mod:`dipid.viz.viewer`
(the scan viewer) and :mod:`dipid.viz.page` (writing a figure as one standalone HTML page). The
names below are imported from them on first use, so ``import dipid.viz.geometry`` does not load
plotly.
"""

from __future__ import annotations

from dipid._lazy import lazy_exports

_EXPORTS = {
    "PALETTE": "geometry",
    "AXIS_UNITS": "geometry",
    "axis_title": "geometry",
    "mask_outline": "geometry",
    "label_outlines": "geometry",
    "Outline": "geometry",
    "block_max": "geometry",
    "choose_downsample": "geometry",
    "robust_maximum": "geometry",
    "surface_voxels": "geometry",
    "IMAGE_COLORSCALE": "figures",
    "LogColorScale": "figures",
    "log_count_colorscale": "figures",
    "generate_3d_plot": "figures",
    "show_image_predictions": "figures",
    "save_html": "page",
    "COMPRESS_ABOVE_BYTES": "page",
    "build_viewer": "viewer",
    "write_viewer": "viewer",
    "view_scan_result": "viewer",
    "view_results_file": "viewer",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, {name: f"{__name__}.{part}" for name, part in _EXPORTS.items()},
                                    extra_dir=["geometry", "figures", "viewer", "page"])
