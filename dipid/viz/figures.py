"""Plotly figures of one result: the stacked-mask 3D cloud of a scan and one frame with its outlines.

* :func:`generate_3d_plot`: the stacked per-frame masks of a scan as a 3D cloud of voxels
  (detector column, scan-axis value, detector row), coloured by frame.
* :func:`show_image_predictions`: one frame in linear and log scale with every instance's outline.
* :func:`log_count_colorscale`: the log-looking colour scale of the viewer's frame images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from dipid.errors import DipidError
from dipid.results import ImageResult, Instances, ScanResult, check_model
from dipid.viz.geometry import PALETTE, _instance_outlines, _scan_axis, _subsample_indices, axis_title

__all__ = [
    "IMAGE_COLORSCALE",
    "LogColorScale",
    "log_count_colorscale",
    "generate_3d_plot",
    "show_image_predictions",
]

logger = logging.getLogger(__name__)

#: Colour of the frame images (log-scaled counts), under coloured outlines.
IMAGE_COLORSCALE = "gray"


#: Line styles telling the two networks' instance sets apart from the chosen (solid) set.
_SET_STYLES = {"tlm": ("TLM (Mask R-CNN)", "#ffd400", "dash"), "ssl": ("SSLM", "#00e5ff", "dot")}


#: How each instance set is named on screen.
_MODEL_LABELS = {"tlm": "TLM", "ssl": "SSLM", "joint": "joint", "classical": "classical"}


@dataclass
class LogColorScale:
    """A plotly colour scale, linear in counts, whose stops make colour follow log1p(counts).

    Attributes:
        colorscale: [[fraction of max_count, colour], ...] for a trace with zmin=0, zmax=max_count.
        max_count: the count at the top of the scale.
        tickvals: log1p(count) positions of round counts, for a colour bar drawn in log1p units.
        ticktext: those round counts as text.
    """

    colorscale: list[list[Any]]
    max_count: float
    tickvals: list[float]
    ticktext: list[str]


def log_count_colorscale(max_count: float, base: str | list = IMAGE_COLORSCALE, *,
                         stops_per_decade: int = 8) -> LogColorScale:
    """Colour scale for z = counts that looks like a log scale.

    Plotly maps z to colour linearly, so storing log values would need a second array for the
    hover to show counts. Placing the stops of a linear-in-z scale at log-spaced counts, each with
    the colour ``base`` gives log1p(count) / log1p(max_count), makes the image look log-scaled
    while z stays the exact count (between stops the colour is interpolated linearly).
    """
    max_count = max(float(max_count), 1.0)
    decades = math.log10(max_count + 1.0)
    # Stops evenly spaced in log10(1 + count), from 0 to max_count.
    n_stops = max(2, int(math.ceil(decades * stops_per_decade)) + 1)
    counts = np.unique(np.concatenate([np.logspace(0.0, decades, n_stops) - 1.0, [0.0, max_count]]))
    counts = counts[(counts >= 0) & (counts <= max_count)]
    log_top = math.log1p(max_count)
    colours = sample_colorscale(base, (np.log1p(counts) / log_top).tolist())
    scale = [[float(c / max_count), colour] for c, colour in zip(counts, colours)]
    scale[0][0], scale[-1][0] = 0.0, 1.0
    round_counts = [0.0] + [10.0**k for k in range(0, int(math.floor(math.log10(max_count))) + 1)]
    return LogColorScale(
        colorscale=scale,
        max_count=max_count,
        tickvals=[math.log1p(v) for v in round_counts],
        ticktext=[_count_text(v) for v in round_counts],
    )


def _count_text(value: float) -> str:
    return f"{value:.0f}" if value < 1e4 else f"1e{int(round(math.log10(value)))}"


def generate_3d_plot(result: ScanResult, scan_type: str = "joint", *, max_points: int = 200_000) -> go.Figure:
    """3D scatter of every masked voxel of a scan: x = column, y = scan-axis value, z = row.

    Args:
        result: the scan's predictions.
        scan_type: whose masks: "tlm", "ssl", "joint" or "classical".
        max_points: above this many voxels a fixed random subset is drawn.
    Returns:
        a Figure with one Scatter3d trace, coloured by the scan-axis value.
    Raises:
        UnknownNameError: for any other scan_type.
    """
    check_model(scan_type, "scan_type")
    axis_values, axis_name = _scan_axis(result)
    axis_label = axis_title(axis_name)
    volume = result.volume(scan_type)
    k, rows, cols = np.nonzero(volume)
    total = k.size
    keep = _subsample_indices(total, max_points)
    if keep.size < total:
        logger.info("3D plot: drawing %d of %d voxels", keep.size, total)
    k, rows, cols = k[keep], rows[keep], cols[keep]
    frame_numbers = result.frame_numbers
    voxel_axis = axis_values[k].astype(np.float32) if k.size else np.zeros(0, np.float32)
    trace = go.Scatter3d(
        x=cols.astype(np.uint16), y=voxel_axis, z=rows.astype(np.uint16),
        mode="markers",
        marker=dict(size=2, color=voxel_axis, colorscale="Viridis",
                    colorbar=dict(title=dict(text=axis_label)), showscale=bool(k.size)),
        customdata=frame_numbers[k].astype(np.int32) if k.size else None,
        hovertemplate=(f"frame %{{customdata}}<br>{axis_label} %{{y:.5g}}<br>"
                       "row %{z}, column %{x}<extra></extra>"),
        name=f"{scan_type} voxels",
    )
    name = Path(result.scan_path).name if result.scan_path else "scan"
    shown = f"{keep.size} of {total}" if keep.size < total else f"{total}"
    fig = go.Figure(trace)
    fig.update_layout(
        title=dict(text=f"{name}: {scan_type} masks, {len(frame_numbers)} frames, {shown} voxels"),
        scene=_scene_layout(axis_label, result.frame_shape),
        margin=dict(l=0, r=0, t=50, b=0),
        height=700,
    )
    if total == 0:
        fig.add_annotation(text="no masked pixels in any frame", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    return fig


def _scene_layout(axis_label: str, frame_shape: tuple[int, int]) -> dict[str, Any]:
    height, width = frame_shape
    return dict(
        xaxis=dict(title=dict(text="column (pixel)"), range=[-0.5, width - 0.5]),
        yaxis=dict(title=dict(text=axis_label)),
        zaxis=dict(title=dict(text="row (pixel)"), range=[height - 0.5, -0.5]),
        aspectmode="manual",
        aspectratio=dict(x=1.4, y=1.1, z=0.8),
        # Looking at the detector face from its low-column side, slightly above: all three axes
        # and their titles stay in view.
        camera=dict(eye=dict(x=1.85, y=-1.3, z=1.0), center=dict(x=0, y=0, z=-0.25)),
    )


def show_image_predictions(counts: np.ndarray, result: ImageResult, *, model: str = "joint") -> go.Figure:
    """One frame in linear and log1p scale with the outline of each instance of ``model``.

    Args:
        counts: (H, W) detector counts (any numeric dtype; negative bad-pixel codes show as 0 in
            the log panel).
        result: that frame's predictions.
        model: whose instances to outline, one colour each: "tlm", "ssl", "joint" or "classical".
            With "joint" (or when both networks ran) the TLM and SSLM sets are overlaid as well,
            dashed and dotted, so the three can be told apart.
    Returns:
        a Figure with two stacked panels (linear on top, log1p below).
    """
    check_model(model)
    counts = np.asarray(counts)
    if counts.ndim != 2 or tuple(counts.shape) != tuple(result.shape):
        raise DipidError(f"show_image_predictions: counts of shape {counts.shape} do not match the "
                         f"result's frame shape {tuple(result.shape)}; pass the frame the result was predicted from")
    linear = counts.astype(np.float32)
    log_counts = np.log1p(np.clip(linear, 0, None)).astype(np.float32)
    instances = result.instances(model)

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.09,
                        subplot_titles=("counts (linear)", "log1p(counts)"))
    fig.add_trace(go.Heatmap(z=linear, colorscale="Viridis", name="counts",
                             colorbar=dict(title=dict(text="counts"), y=0.7725, len=0.455),
                             hovertemplate="row %{y}, column %{x}<br>counts %{z}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=log_counts, customdata=linear, colorscale="Viridis", name="log1p(counts)",
                             colorbar=dict(title=dict(text="log1p"), y=0.2275, len=0.455),
                             hovertemplate=("row %{y}, column %{x}<br>counts %{customdata}"
                                            "<br>log1p %{z:.2f}<extra></extra>")), row=2, col=1)

    # The networks' own sets first, underneath: where they agree with the chosen set its solid
    # outline shows; where they differ their dashes and dots do.
    if model == "joint" or (result.has("tlm") and result.has("ssl")):
        for kind in ("tlm", "ssl"):
            if kind == model or not result.has(kind):
                continue
            _add_instance_set(fig, result.instances(kind), kind)

    label = _MODEL_LABELS[model]
    for outline, score in zip(_instance_outlines(instances), instances.scores):
        i = outline.label - 1
        colour = PALETTE[i % len(PALETTE)]
        hover = f"{label} #{i}<br>score {float(score):.3f}<br>area {outline.area} px<extra></extra>"
        for row in (1, 2):
            fig.add_trace(go.Scatter(x=outline.x, y=outline.y, mode="lines", line=dict(color=colour, width=2),
                                     name=f"{label} #{i} ({float(score):.2f})", legendgroup=f"inst{i}",
                                     showlegend=row == 1, hovertemplate=hover), row=row, col=1)

    frame = "image" if result.frame is None else f"frame {result.frame}"
    set_counts = [f"{_MODEL_LABELS[k]} {len(result.instances(k))}" for k in ("tlm", "ssl", "classical")
                  if result.has(k)]
    extra = f" ({', '.join(set_counts)})" if set_counts else ""
    finite = linear[np.isfinite(linear)]
    stats = f"counts max {finite.max():.0f}, total {finite.clip(0).sum():.4g}" if finite.size else "no counts"
    height, width = result.shape
    # Size the page so each panel's domain matches the frame's aspect ratio (no empty bands).
    fig_width, margin = 1100, dict(l=70, r=130, t=90, b=120)
    panel_height = (fig_width - margin["l"] - margin["r"]) * height / width
    fig.update_layout(
        title=dict(text=f"{frame}: {len(instances)} {label} peaks{extra} | {stats}"),
        width=fig_width, height=int(2 * panel_height / (1 - 0.09) + margin["t"] + margin["b"]),
        legend=dict(orientation="h", x=0.0, y=-0.08, yanchor="top"), margin=margin,
    )
    for row in (1, 2):
        fig.update_xaxes(range=[-0.5, width - 0.5], constrain="domain", row=row, col=1)
        fig.update_yaxes(range=[height - 0.5, -0.5], scaleanchor="x" if row == 1 else "x2", constrain="domain",
                         row=row, col=1)
    fig.update_xaxes(title_text="column (pixel)", row=2, col=1)
    fig.update_yaxes(title_text="row (pixel)")
    return fig


def _add_instance_set(fig: go.Figure, instances: Instances, kind: str) -> None:
    """One dashed/dotted trace per panel outlining every instance of one network."""
    name, colour, dash = _SET_STYLES[kind]
    xs, ys, data = [], [], []
    for outline, score in zip(_instance_outlines(instances), instances.scores):
        if xs:
            xs.append(np.array([np.nan], np.float32))
            ys.append(np.array([np.nan], np.float32))
            data.append(np.full((1, 3), np.nan, np.float32))
        xs.append(outline.x)
        ys.append(outline.y)
        data.append(np.tile(np.array([[outline.label - 1, score, outline.area]], np.float32), (outline.x.size, 1)))
    x = np.concatenate(xs) if xs else np.zeros(0, np.float32)
    y = np.concatenate(ys) if ys else np.zeros(0, np.float32)
    custom = np.concatenate(data) if data else np.zeros((0, 3), np.float32)
    hover = f"{name} #%{{customdata[0]}}<br>score %{{customdata[1]:.3f}}<br>area %{{customdata[2]}} px<extra></extra>"
    for row in (1, 2):
        fig.add_trace(go.Scatter(x=x, y=y, customdata=custom, mode="lines",
                                 line=dict(color=colour, width=1.5, dash=dash),
                                 name=f"{name}: {len(instances)}", legendgroup=kind, showlegend=row == 1,
                                 hovertemplate=hover), row=row, col=1)
