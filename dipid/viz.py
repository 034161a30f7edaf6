"""Plotly figures of dipid results, and the standalone HTML scan viewer.

Three kinds of output:

* :func:`generate_3d_plot`: the stacked per-frame masks of a scan as a 3D cloud of voxels
  (detector column, scan-axis value, detector row), coloured by frame.
* :func:`show_image_predictions`: one frame in linear and log scale with every instance's outline.
* :func:`build_viewer` / :func:`write_viewer` / :func:`view_scan_result`: one self-contained HTML
  file (plotly.js embedded, works offline) with the 3D peaks, a frame slider over the log-scaled
  frames with each model's outlines, and the 3D-peak table.

Coordinates: pixel (row r, column c) is centred on x = c, y = r, so pixel edges lie on half
integers; the row axis points down, as on the detector images users know.

Size: the viewer stores every numeric array as a base64 typed array (plotly >= 6 does this for
numpy arrays), the frame images as integer counts under a log-spaced colour scale (so the hover
shows exact counts without a second array), and gzips the figure inside the page (the browser
unpacks it). Frame images are shrunk by block maxima only when a scan would not otherwise fit
``max_image_bytes`` before compression or ``max_html_bytes`` after: a 61-frame Pilatus 100K scan
fits at full resolution in about 10-14 MB.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from dipid.errors import DipidError, UnknownNameError
from dipid.results import MODEL_KINDS, ImageResult, Instances, ScanResult

__all__ = [
    "PALETTE",
    "AXIS_UNITS",
    "generate_3d_plot",
    "show_image_predictions",
    "save_html",
    "build_viewer",
    "write_viewer",
    "view_scan_result",
    "axis_title",
    "mask_outline",
    "label_outlines",
    "Outline",
    "LogColorScale",
    "log_count_colorscale",
    "block_max",
    "choose_downsample",
    "robust_maximum",
    "surface_voxels",
]

logger = logging.getLogger(__name__)

#: Outline / peak colours, bright enough to read on the grey log-scaled frames.
PALETTE: tuple[str, ...] = (
    "#ff4d4d", "#3ddc84", "#4da6ff", "#ffc233", "#d77bff",
    "#00e0e0", "#ff8fd0", "#b8f02a", "#ff9244", "#a0a0ff",
)
#: Units of the motors I16 scans move (the NeXus files carry no unit on most positioners).
AXIS_UNITS: dict[str, str] = {
    **{name: "deg" for name in ("eta", "chi", "phi", "mu", "delta", "gam", "th", "tth", "kth", "kmu",
                                 "kphi", "kdelta", "kgam", "kap", "psi", "azimuth")},
    **{name: "r.l.u." for name in ("h", "k", "l", "hkl_h", "hkl_k", "hkl_l")},
    "energy": "keV",
    "frame": "index",
}
#: Peak-table columns taken as the peak's intensity, in order of preference.
_INTENSITY_COLUMNS = ("intensity", "integrated_intensity", "sum_counts")
#: Colour of the frame images (log-scaled counts), under coloured outlines.
IMAGE_COLORSCALE = "gray"
#: Line styles telling the two networks' instance sets apart from the chosen (solid) set.
_SET_STYLES = {"tlm": ("TLM (Mask R-CNN)", "#ffd400", "dash"), "ssl": ("SSLM", "#00e5ff", "dot")}
#: How each instance set is named on screen.
_MODEL_LABELS = {"tlm": "TLM", "ssl": "SSLM", "joint": "joint", "classical": "classical"}
_ANIMATE_NOW = {"mode": "immediate", "frame": {"duration": 0, "redraw": True}, "transition": {"duration": 0}}


# ------------------------------------------------------------------------------------------------
# small pure helpers
# ------------------------------------------------------------------------------------------------
def axis_title(axis_name: str, units: str | None = None) -> str:
    """Axis label with its unit, e.g. ``"eta (deg)"``; unknown motors get no unit."""
    unit = units if units is not None else AXIS_UNITS.get(axis_name.lower())
    return f"{axis_name} ({unit})" if unit else axis_name


def _peak_colour(peak_id: int) -> str:
    return PALETTE[(int(peak_id) - 1) % len(PALETTE)]


def mask_outline(mask: np.ndarray, *, row_offset: int = 0, col_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outline of a (h, w) bool mask along pixel edges, as closed polylines.

    Every edge between a mask pixel and a non-mask pixel (or the border) is drawn once, so holes
    get their own loop. Straight runs are merged into one segment.

    Returns:
        (x, y): float32 arrays of column and row coordinates in pixels (pixel centres on integers,
        edges on half integers, shifted by the offsets); each loop repeats its first point and
        loops are separated by NaN. Empty arrays for an empty mask.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = m[1:-1, 1:-1]
    # Sides of mask pixels that face outside, walked clockwise on screen (rows grow downward);
    # corner (i, j) is the top-left corner of pixel (i, j).
    sides = (
        (inner & ~m[:-2, 1:-1], (0, 0), (0, 1)),   # top: TL -> TR
        (inner & ~m[1:-1, 2:], (0, 1), (1, 1)),    # right: TR -> BR
        (inner & ~m[2:, 1:-1], (1, 1), (1, 0)),    # bottom: BR -> BL
        (inner & ~m[1:-1, :-2], (1, 0), (0, 0)),   # left: BL -> TL
    )
    out_edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for exposed, (dr0, dc0), (dr1, dc1) in sides:
        rr, cc = np.nonzero(exposed)
        for r, c in zip(rr.tolist(), cc.tolist()):
            out_edges.setdefault((r + dr0, c + dc0), []).append((r + dr1, c + dc1))
    if not out_edges:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)

    xs: list[float] = []
    ys: list[float] = []
    for start in sorted(out_edges):
        while out_edges.get(start):
            loop = [start]
            vertex = out_edges[start].pop()
            while vertex != start:
                loop.append(vertex)
                # Every vertex has as many sides leaving as arriving, so the walk can only end
                # where it began.
                vertex = out_edges[vertex].pop()
            loop = _drop_collinear(loop)
            if xs:
                xs.append(math.nan)
                ys.append(math.nan)
            for r, c in (*loop, loop[0]):
                xs.append(c - 0.5 + col_offset)
                ys.append(r - 0.5 + row_offset)
    return np.asarray(xs, np.float32), np.asarray(ys, np.float32)


def _drop_collinear(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Keep only the corners of a closed axis-aligned polygon (first point not repeated)."""
    n = len(loop)
    kept = []
    for i in range(n):
        prev, here, nxt = loop[i - 1], loop[i], loop[(i + 1) % n]
        if (here[0] - prev[0], here[1] - prev[1]) != (nxt[0] - here[0], nxt[1] - here[1]):
            kept.append(here)
    return kept or loop[:1]


@dataclass
class Outline:
    """The outline of one labelled region of a frame.

    Attributes:
        label: the region's value in the label image (1, 2, ...).
        x, y: float32 column / row coordinates of its closed loops, NaN-separated (see mask_outline).
        area: pixels in the region.
        box: (row slice, column slice) of the region's bounding box in the frame.
    """

    label: int
    x: np.ndarray
    y: np.ndarray
    area: int
    box: tuple[slice, slice]


def label_outlines(labels: np.ndarray) -> list[Outline]:
    """Outlines of every non-zero label of an (H, W) integer label image, in label order."""
    from scipy import ndimage

    labels = np.asarray(labels)
    out = []
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int64, copy=False)), start=1):
        if box is None:
            continue
        region = labels[box] == index
        x, y = mask_outline(region, row_offset=box[0].start, col_offset=box[1].start)
        out.append(Outline(label=index, x=x, y=y, area=int(region.sum()), box=box))
    return out


def _instance_outlines(instances: Instances) -> list[Outline]:
    """Outline of each instance from its cropped mask (label = instance index + 1)."""
    out = []
    for i, ((x0, y0, _, _), crop) in enumerate(zip(instances.boxes, instances.crops)):
        x, y = mask_outline(crop, row_offset=int(y0), col_offset=int(x0))
        box = (slice(int(y0), int(y0) + crop.shape[0]), slice(int(x0), int(x0) + crop.shape[1]))
        out.append(Outline(label=i + 1, x=x, y=y, area=int(np.count_nonzero(crop)), box=box))
    return out


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


def block_max(volume: np.ndarray, factor: int) -> np.ndarray:
    """(F, H, W) -> (F, ceil(H/factor), ceil(W/factor)): the maximum of each factor x factor block.

    Maxima (not means) so a one-pixel peak or a peak label survives the shrinking. Edge blocks
    are padded with the array's minimum.
    """
    volume = np.asarray(volume)
    if factor <= 1:
        return volume
    f, h, w = volume.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    fill = volume.min() if volume.size else 0
    padded = np.full((f, hp, wp), fill, dtype=volume.dtype)
    padded[:, :h, :w] = volume
    return padded.reshape(f, hp // factor, factor, wp // factor, factor).max(axis=(2, 4))


def robust_maximum(frames: Sequence[np.ndarray] | np.ndarray, *, fraction: float = 1e-4) -> float:
    """The value exceeded by only ``fraction`` of all pixels of the frames (NaN ignored).

    Used as the top of the colour scale so isolated hot pixels do not set it; computed exactly
    from each frame's largest values, without concatenating the frames.
    """
    total = sum(int(np.size(frame)) for frame in frames)
    if total == 0:
        return 0.0
    rank = max(1, int(total * fraction))
    tops = []
    for frame in frames:
        flat = np.asarray(frame, dtype=np.float64).ravel()
        flat = flat[np.isfinite(flat)]
        keep = min(rank, flat.size)
        if keep:
            tops.append(np.partition(flat, flat.size - keep)[flat.size - keep:])
    if not tops:
        return 0.0
    pooled = np.concatenate(tops)
    position = pooled.size - min(rank, pooled.size)
    return float(np.partition(pooled, position)[position])


def choose_downsample(n_frames: int, height: int, width: int, bytes_per_pixel: int, budget_bytes: int) -> int:
    """Smallest integer shrink factor for which n_frames images fit ``budget_bytes`` (at least 1)."""
    factor = 1
    while n_frames * (-(-height // factor)) * (-(-width // factor)) * bytes_per_pixel > budget_bytes:
        if factor >= max(height, width):
            break
        factor += 1
    return factor


def surface_voxels(labels: np.ndarray) -> np.ndarray:
    """(F, H, W) bool: labelled voxels with a 6-neighbour of a different label (or off the volume).

    Drawing only these shows each 3D peak's shape with far fewer points than every voxel.
    """
    labels = np.asarray(labels)
    padded = np.pad(labels, 1, constant_values=0)
    centre = padded[1:-1, 1:-1, 1:-1]
    surface = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        for shift in (-1, 1):
            neighbour = np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
            surface |= neighbour != centre
    return surface & (labels != 0)


def _subsample_indices(n: int, max_n: int, *, seed: int = 0) -> np.ndarray:
    """Sorted random subset of range(n) of size min(n, max_n), the same on every call."""
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


def _even_indices(n: int, max_n: int) -> np.ndarray:
    """At most max_n evenly spread indices of range(n), always including the first and last."""
    if n <= max_n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_n)).astype(np.int64))


def _smallest_uint(max_value: float) -> type:
    """The narrowest unsigned integer dtype holding 0..max_value (typed arrays plotly.js reads)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise DipidError(f"value {max_value:.4g} is too large for the viewer's 32-bit images")


def _check_model(model: str, kind: str = "model") -> None:
    if model not in MODEL_KINDS:
        raise UnknownNameError(kind, model, MODEL_KINDS)


def _scan_axis(result: ScanResult) -> tuple[np.ndarray, str]:
    """(F,) float64 scan-axis value of each held frame, and the axis name ("frame" when unknown)."""
    frames = result.frame_numbers
    values = np.asarray(result.axis_values, dtype=np.float64).reshape(-1)
    if frames.size and values.size > frames.max():
        return values[frames], result.axis_name
    if frames.size:
        logger.warning("scan axis %r has %d values but frame %d is held; plotting frame numbers instead",
                       result.axis_name, values.size, int(frames.max()))
    return frames.astype(np.float64), "frame"


# ------------------------------------------------------------------------------------------------
# the stacked-mask 3D plot
# ------------------------------------------------------------------------------------------------
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
    _check_model(scan_type, "scan_type")
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


# ------------------------------------------------------------------------------------------------
# one frame with its instances
# ------------------------------------------------------------------------------------------------
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
    _check_model(model)
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
    both_nets = result.tlm is not None and result.ssl is not None
    if model == "joint" or both_nets:
        for kind in ("tlm", "ssl"):
            present = (result.ssl is not None) if kind == "ssl" else (result.tlm is not None)
            if kind == model or not present:
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
                  if ((result.ssl is not None) if k == "ssl" else getattr(result, k) is not None)]
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


# ------------------------------------------------------------------------------------------------
# writing HTML
# ------------------------------------------------------------------------------------------------
def save_html(fig: go.Figure, path: str | Path, *, title: str | None = None, compress: bool | None = None) -> Path:
    """Write ``fig`` as one standalone HTML page (plotly.js embedded, no network needed).

    Args:
        fig: the figure; animations in it do not start on their own.
        path: the .html file to write, through a temporary file in the same folder and a rename,
            so a reader never sees a half-written page.
        title: the browser tab's title (default: the figure's title).
        compress: gzip the figure's data inside the page, for the browser to unpack with its
            built-in DecompressionStream (Chrome 80+, Firefox 113+, Safari 16.4+). Detector frames
            shrink about tenfold this way. None (default): only when the figure's JSON is over
            COMPRESS_ABOVE_BYTES.
    Returns:
        the path written.
    """
    from dipid.files import atomic_write_text

    return atomic_write_text(path, _html_page(fig, title=title, compress=compress))


def _html_page(fig: go.Figure, *, title: str | None, compress: bool | None) -> str:
    """The standalone page of :func:`save_html`, as text."""
    page_title = html.escape(title or _figure_title(fig) or "dipid")
    fig_json = fig.to_json()
    if compress is None:
        compress = len(fig_json) > COMPRESS_ABOVE_BYTES
    if compress:
        return _compressed_page(fig_json, page_title)
    page = fig.to_html(include_plotlyjs=True, full_html=True, auto_play=False, config=_PLOT_CONFIG)
    return page.replace("<head>", f"<head><title>{page_title}</title>", 1)


#: write_viewer stops shrinking the frame images here (8x8 blocks: peaks are still visible).
_MAX_IMAGE_SHRINK = 8
#: Figures whose JSON is larger than this are gzipped inside the page by default.
COMPRESS_ABOVE_BYTES = 2_000_000
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
#: Unpacks the gzipped figure (base64 text in a script element) and plots it; errors are shown on
#: the page rather than leaving it blank.
_LOADER_JS = """
(async function () {
  var target = document.getElementById("dipid-figure");
  try {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this page needs a newer browser (one with DecompressionStream: " +
                      "Chrome 80+, Firefox 113+, Safari 16.4+)");
    }
    var binary = atob(document.getElementById("dipid-figure-data").textContent.trim());
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) { bytes[i] = binary.charCodeAt(i); }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    var fig = JSON.parse(await new Response(stream).text());
    await Plotly.newPlot(target, fig.data, fig.layout, __CONFIG__);
    if (fig.frames && fig.frames.length) { await Plotly.addFrames(target, fig.frames); }
    target.setAttribute("data-dipid-ready", "1");
  } catch (err) {
    var box = document.createElement("pre");
    box.id = "dipid-error";
    box.style.color = "#b00000";
    box.textContent = "dipid viewer could not draw the figure: " + err;
    document.body.insertBefore(box, document.body.firstChild);
    throw err;
  }
})();
"""


def _compressed_page(fig_json: str, page_title: str) -> str:
    """A standalone page holding plotly.js and the gzipped, base64-encoded figure JSON."""
    import base64
    import json
    import zlib

    from plotly.offline import get_plotlyjs

    # wbits=31: a gzip stream, what DecompressionStream("gzip") reads. Level 6: level 9 is
    # several times slower for a few percent.
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    packed = packer.compress(fig_json.encode("utf-8")) + packer.flush()
    data = base64.b64encode(packed).decode("ascii")
    loader = _LOADER_JS.replace("__CONFIG__", json.dumps(_PLOT_CONFIG))
    return "".join([
        '<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8" /><title>', page_title, "</title>\n",
        "<style>html, body { margin: 0; padding: 0; }</style></head>\n<body>\n",
        "<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n",
        '<script type="text/javascript">', get_plotlyjs(), "</script>\n",
        '<div id="dipid-figure" class="plotly-graph-div" style="width:100%;"></div>\n',
        '<script type="application/octet-stream" id="dipid-figure-data">', data, "</script>\n",
        '<script type="text/javascript">', loader, "</script>\n</body>\n</html>\n",
    ])


def _figure_title(fig: go.Figure) -> str | None:
    text = fig.layout.title.text if fig.layout.title is not None else None
    return text or None


# ------------------------------------------------------------------------------------------------
# the scan viewer
# ------------------------------------------------------------------------------------------------
CountsSource = np.ndarray | Callable[[int], np.ndarray] | None


@dataclass
class _Peaks:
    """The 3D peaks shown: one entry per peak, in table order."""

    ids: np.ndarray            # (P,) int64
    first_frame: np.ndarray    # (P,) int64 frame numbers
    last_frame: np.ndarray
    centroid_row: np.ndarray   # (P,) float64 pixels
    centroid_col: np.ndarray
    centroid_axis: np.ndarray  # (P,) float64 scan-axis value
    voxels: np.ndarray         # (P,) int64
    intensity: np.ndarray      # (P,) float64 counts, NaN when unknown
    intensity_name: str        # "intensity" (the table's, background subtracted) or "summed counts"
    score: np.ndarray | None
    models: list[str] | None


def build_viewer(
    counts: CountsSource,
    label_volumes: Mapping[str, np.ndarray],
    *,
    peak_table: Mapping[str, Sequence[Any]] | None = None,
    peak_label_volume: np.ndarray | None = None,
    axis_name: str = "frame",
    axis_values: np.ndarray | Sequence[float] | None = None,
    frame_numbers: np.ndarray | Sequence[int] | None = None,
    title: str = "dipid scan viewer",
    max_frames: int = 121,
    max_voxels: int = 60_000,
    max_image_bytes: int = 48_000_000,
    image_shrink: int | None = None,
    start_frame: int | None = None,
) -> go.Figure:
    """The interactive scan viewer as one Figure (write it with :func:`write_viewer`).

    Left: the 3D peaks as their surface voxels (x = column, y = scan axis, z = row), one colour
    per 3D peak, with a marker at each peak centroid. Right: a frame slider over the log-scaled
    frames with the outlines of one model's instances (buttons switch model), and the peak table.

    Args:
        counts: (F, H, W) counts of the F frames shown, or a function from slice index 0..F-1 to
            that frame's (H, W) counts, or None to show the masks instead of counts. Counts are
            rounded to integers; negative bad-pixel codes show as 0.
        label_volumes: model name ("tlm", "ssl", "joint", "classical") -> (F, H, W) int32 per-frame
            instance label images (0 = none, i + 1 = instance i).
        peak_table: columns of the 3D-peak table (:func:`dipid.volume.peaks_table`): id,
            first_frame, last_frame, centroid_frame, centroid_row, centroid_col, voxels, the axis
            centroid (column "centroid_axis", ``axis_name`` or "<axis_name>_axis"; else
            interpolated from centroid_frame), and optionally score, models, intensity.
        peak_label_volume: (F, H, W) int32, 0 = none, k = 3D peak id k. When None, the 3D
            connected regions of the "joint" masks (else the first model's) stand in for peaks.
        axis_name: the scanned motor.
        axis_values: (F,) scan-axis value of each slice (default: the frame numbers).
        frame_numbers: (F,) scan frame number of each slice (default 0..F-1).
        title: page title.
        max_frames: the slider shows at most this many evenly spread frames.
        max_voxels: the 3D view draws at most this many voxels.
        max_image_bytes: budget for the slider's images before compression (the page gzips them,
            about tenfold for detector frames); frames are shrunk by block maxima to fit.
        image_shrink: shrink the frame images by this factor (block maxima) whatever the budget.
        start_frame: the frame number on screen when the page opens (default: the shown frame
            with the most instances of the default model, "joint" when given).
    Raises:
        UnknownNameError: for a model name outside tlm/ssl/joint/classical.
        DipidError: when the arrays disagree in shape or there is nothing to show.
    """
    volumes, shape = _check_volumes(label_volumes, peak_label_volume, counts)
    n_frames, height, width = shape
    frame_numbers = (np.arange(n_frames, dtype=np.int64) if frame_numbers is None
                     else np.asarray(frame_numbers, dtype=np.int64).reshape(-1))
    if axis_values is None:
        axis_values, axis_name = frame_numbers.astype(np.float64), "frame"
    axis_values = np.asarray(axis_values, dtype=np.float64).reshape(-1)
    for name, arr in (("frame_numbers", frame_numbers), ("axis_values", axis_values)):
        if arr.shape != (n_frames,):
            raise DipidError(f"build_viewer: {name} has {arr.size} entries but the volumes have {n_frames} frames")
    axis_label = axis_title(axis_name)
    models = list(volumes)

    if peak_label_volume is None:
        stand_in = "joint" if "joint" in volumes else models[0]
        peak_label_volume = _connected_regions(volumes[stand_in])
        logger.info("viewer: no 3D peaks given; showing the connected regions of the %s masks as peaks", stand_in)
    peak_label_volume = np.asarray(peak_label_volume)
    has_intensity = peak_table is not None and any(c in peak_table for c in _INTENSITY_COLUMNS)
    intensity_by_id = (_peak_intensities(counts, peak_label_volume) if counts is not None and not has_intensity
                       else {})
    peaks = (_peaks_from_table(peak_table, frame_numbers, axis_values, axis_name, intensity_by_id)
             if peak_table is not None
             else _peaks_from_volume(peak_label_volume, frame_numbers, axis_values, intensity_by_id))

    shown = _even_indices(n_frames, max_frames)
    if shown.size < n_frames:
        logger.info("viewer: slider shows %d of %d frames", shown.size, n_frames)
    default_model = "joint" if "joint" in models else models[0]
    start = _start_position(shown, frame_numbers, volumes[default_model], start_frame)

    fig = go.Figure()
    _add_peak_voxels(fig, peak_label_volume, frame_numbers, axis_values, axis_label, max_voxels)
    _add_peak_centroids(fig, peaks, axis_label)
    image_index = len(fig.data)
    image = _FrameImages(counts, volumes[default_model], peak_label_volume, shown, max_image_bytes, image_shrink)
    fig.add_trace(image.trace(int(shown[start])))
    fig.add_trace(image.colorbar_trace())
    outline_start = len(fig.data)
    first_outlines = _frame_outline_traces(volumes, models, peak_label_volume, int(shown[start]))
    for trace in first_outlines:
        fig.add_trace(trace)
    n_outline = len(first_outlines)
    fig.add_trace(_table_trace(peaks, axis_label))

    frames = []
    for k in shown.tolist():
        frames.append(go.Frame(
            name=str(int(frame_numbers[k])),
            data=[image.trace(k, update_only=True),
                  *_frame_outline_traces(volumes, models, peak_label_volume, k, update_only=True)],
            traces=[image_index, *range(outline_start, outline_start + n_outline)],
        ))
    fig.frames = frames

    fig.update_layout(
        title=dict(text=html.escape(title), x=0.01, y=0.985),
        height=900,
        margin=dict(l=10, r=10, t=40, b=10),
        paper_bgcolor="white",
        showlegend=False,
        hovermode="closest",
        scene=dict(domain=dict(x=[0.0, 0.42], y=[0.0, 0.95]), **_scene_layout(axis_label, (height, width))),
        xaxis=dict(domain=[0.47, 0.93], range=[-0.5, width - 0.5], constrain="domain",
                   title=dict(text="column (pixel)")),
        yaxis=dict(domain=[0.6, 0.93], range=[height - 0.5, -0.5], scaleanchor="x", constrain="domain",
                   constraintoward="top", title=dict(text="row (pixel)")),
        sliders=[_slider(frame_numbers, axis_values, shown, axis_name, start)],
        updatemenus=[_model_buttons(models, default_model, outline_start, n_outline),
                     _play_buttons()],
        # Read back by write_viewer; plotly.js ignores layout.meta unless a template asks for it.
        meta={"image_shrink": image.factor, "frames_shown": int(shown.size)},
    )
    _show_model(fig, models, default_model, outline_start, n_outline)
    return fig


def write_viewer(path: str | Path, counts: CountsSource, label_volumes: Mapping[str, np.ndarray], *,
                 compress: bool | None = None, max_html_bytes: int = 15_000_000, **kwargs: Any) -> Path:
    """Build the viewer (arguments as :func:`build_viewer`) and write it as one standalone HTML file.

    Args:
        compress: as in :func:`save_html`.
        max_html_bytes: when the page comes out larger (noisy frames compress less), the frame
            images are shrunk one step further (block maxima) and the page built again.
    Returns:
        the path written.
    """
    from dipid.files import atomic_write_text

    fig = build_viewer(counts, label_volumes, **kwargs)
    page = _html_page(fig, title=kwargs.get("title"), compress=compress)
    # plotly.js holds a few non-ASCII characters: measure the page in bytes, as written.
    while len(page.encode("utf-8")) > max_html_bytes:
        shrink = int(fig.layout.meta["image_shrink"])
        if shrink >= _MAX_IMAGE_SHRINK:
            logger.warning("viewer page is %.1f MB even with frame images shrunk %dx", len(page) / 1e6, shrink)
            break
        logger.info("viewer page is %.1f MB, over %.1f MB: shrinking the frame images %dx",
                    len(page) / 1e6, max_html_bytes / 1e6, shrink + 1)
        fig = build_viewer(counts, label_volumes, **{**kwargs, "image_shrink": shrink + 1})
        page = _html_page(fig, title=kwargs.get("title"), compress=compress)
    out = atomic_write_text(path, page)
    logger.info("viewer written to %s (%.1f MB)", out, len(page) / 1e6)
    return out


def view_scan_result(
    result: ScanResult,
    counts: np.ndarray | None,
    path: str | Path,
    *,
    peak_table: Mapping[str, Sequence[Any]] | Any | None = None,
    peak_label_volume: np.ndarray | None = None,
    **kwargs: Any,
) -> Path:
    """Write the viewer of a ScanResult to ``path`` (one standalone HTML file); returns the path.

    Args:
        result: the scan's predictions; every model it holds gets a button.
        counts: the frames' counts, either (len(result), H, W) in ``result.frame_numbers`` order or
            the whole scan (n_scan_frames, H, W) indexed by frame number; None shows masks only.
        path: where to write the HTML.
        peak_table, peak_label_volume: 3D peaks over ``result.frame_numbers`` (see build_viewer).
            A :class:`dipid.volume.Peaks3D` may be passed as ``peak_table``: its ``table`` and
            ``labels`` are used.
        kwargs: further build_viewer / write_viewer options (max_frames, max_voxels, title, ...).
    """
    frames = result.frame_numbers
    if hasattr(peak_table, "table") and hasattr(peak_table, "labels"):
        peaks = peak_table
        if not np.array_equal(np.asarray(peaks.frame_numbers), frames):
            raise DipidError("view_scan_result: the 3D peaks were linked over other frames than the result holds; "
                             "link them from this result")
        peak_table, peak_label_volume = peaks.table, peaks.labels
    if frames.size == 0:
        raise DipidError("view_scan_result: the result holds no frames; predict at least one frame first")
    if counts is not None:
        counts = np.asarray(counts)
        if counts.ndim != 3 or tuple(counts.shape[1:]) != tuple(result.frame_shape):
            raise DipidError(f"view_scan_result: counts of shape {counts.shape} do not match frames of "
                             f"shape {tuple(result.frame_shape)}; pass the scan's (F, H, W) detector data")
        if counts.shape[0] != frames.size:
            if counts.shape[0] <= frames.max():
                raise DipidError(f"view_scan_result: counts hold {counts.shape[0]} frames but the result has "
                                 f"frame {int(frames.max())}; pass all the scan's frames or those of the result")
            counts = counts[frames]
    models = [m for m in MODEL_KINDS if _result_has(result, m)]
    label_volumes = {m: result.label_volume(m) for m in models}
    axis_values, axis_name = _scan_axis(result)
    scan_name = Path(result.scan_path).name if result.scan_path else "scan"
    kwargs.setdefault("title", f"{scan_name}: {len(frames)} frames, scan axis {result.axis_name}")
    return write_viewer(path, counts, label_volumes, peak_table=peak_table, peak_label_volume=peak_label_volume,
                        axis_name=axis_name, axis_values=axis_values, frame_numbers=frames, **kwargs)


def _result_has(result: ScanResult, model: str) -> bool:
    if model == "joint":
        return True
    if model == "ssl":
        return any(r.ssl is not None for r in result)
    return any(getattr(r, model) is not None for r in result)


# -- viewer pieces --------------------------------------------------------------------------------
def _check_volumes(label_volumes: Mapping[str, np.ndarray], peak_label_volume: np.ndarray | None,
                   counts: CountsSource) -> tuple[dict[str, np.ndarray], tuple[int, int, int]]:
    if not label_volumes:
        raise DipidError("build_viewer: no label volumes given; pass at least {'joint': (F, H, W) labels}")
    volumes: dict[str, np.ndarray] = {}
    for model in sorted(label_volumes, key=lambda m: MODEL_KINDS.index(m) if m in MODEL_KINDS else -1):
        _check_model(model)
        volumes[model] = np.asarray(label_volumes[model])
    shape = next(iter(volumes.values())).shape
    if len(shape) != 3 or shape[0] == 0:
        raise DipidError(f"build_viewer: label volumes must be (F, H, W) with F >= 1, got {shape}")
    named = {**{f"label_volumes[{m!r}]": v for m, v in volumes.items()}, "peak_label_volume": peak_label_volume}
    if isinstance(counts, np.ndarray):
        named["counts"] = counts
    for name, arr in named.items():
        if arr is not None and np.shape(arr) != shape:
            raise DipidError(f"build_viewer: {name} has shape {np.shape(arr)} but the label volumes are {shape}; "
                             "pass arrays of the same frames")
    return volumes, shape


def _connected_regions(labels: np.ndarray) -> np.ndarray:
    """(F, H, W) int32 ids of the 6-connected regions of ``labels != 0`` (a stand-in for 3D peaks)."""
    from scipy import ndimage

    regions, _ = ndimage.label(np.asarray(labels) != 0)
    return regions.astype(np.int32)


def _counts_frame(counts: CountsSource, k: int) -> np.ndarray:
    frame = counts(k) if callable(counts) else counts[k]
    return np.asarray(frame)


def _peak_intensities(counts: CountsSource, peak_labels: np.ndarray) -> dict[int, float]:
    """3D peak id -> summed counts over its voxels (negative bad-pixel codes count as 0)."""
    n_ids = int(peak_labels.max(initial=0)) + 1
    totals = np.zeros(n_ids)
    for k in range(peak_labels.shape[0]):
        labels = peak_labels[k]
        if not labels.any():
            continue
        frame = np.clip(_counts_frame(counts, k).astype(np.float64), 0, None)
        totals += np.bincount(labels.ravel(), weights=frame.ravel(), minlength=n_ids)[:n_ids]
    return {i: float(totals[i]) for i in range(1, n_ids)}


def _peaks_from_table(table: Mapping[str, Sequence[Any]], frame_numbers: np.ndarray, axis_values: np.ndarray,
                      axis_name: str, intensity_by_id: dict[int, float]) -> _Peaks:
    missing = [c for c in ("id", "first_frame", "last_frame", "centroid_row", "centroid_col") if c not in table]
    if missing:
        raise DipidError(f"build_viewer: the peak table lacks column(s) {', '.join(missing)}; pass the dict "
                         "returned by dipid.volume.peaks_table")
    ids = np.asarray(table["id"], dtype=np.int64)
    n = ids.size

    def column(name: str, default: float = math.nan) -> np.ndarray:
        return np.asarray(table[name], dtype=np.float64) if name in table else np.full(n, default)

    # dipid.volume.peaks_table names the axis centroid after the axis ("eta", or "<name>_axis"
    # when that would clash with another column).
    axis_column = next((c for c in ("centroid_axis", f"{axis_name}_axis", axis_name) if c in table
                        and c not in ("id", "first_frame", "last_frame", "centroid_frame", "centroid_row",
                                      "centroid_col", "voxels", "score", "models", "intensity")), None)
    if axis_column is not None:
        axis = column(axis_column)
    else:
        centre_frame = column("centroid_frame")
        axis = (np.interp(centre_frame, frame_numbers, axis_values) if frame_numbers.size > 1
                else np.full(n, axis_values[0]))
    intensity_name = "summed counts"
    for name in _INTENSITY_COLUMNS:
        if name in table:
            intensity, intensity_name = column(name), "intensity"
            break
    else:
        intensity = np.asarray([intensity_by_id.get(int(i), math.nan) for i in ids], dtype=np.float64)
    models = [str(m) if not isinstance(m, (list, tuple)) else "+".join(map(str, m)) for m in table["models"]] \
        if "models" in table else None
    return _Peaks(
        ids=ids,
        first_frame=np.asarray(table["first_frame"], dtype=np.int64),
        last_frame=np.asarray(table["last_frame"], dtype=np.int64),
        centroid_row=column("centroid_row"), centroid_col=column("centroid_col"), centroid_axis=axis,
        voxels=column("voxels", 0).astype(np.int64), intensity=intensity, intensity_name=intensity_name,
        score=column("score") if "score" in table else None, models=models,
    )


def _peaks_from_volume(peak_labels: np.ndarray, frame_numbers: np.ndarray, axis_values: np.ndarray,
                       intensity_by_id: dict[int, float]) -> _Peaks:
    from scipy import ndimage

    boxes = ndimage.find_objects(peak_labels.astype(np.int64, copy=False))
    ids = np.asarray([i for i, box in enumerate(boxes, start=1) if box is not None], dtype=np.int64)
    if ids.size:
        centres = np.asarray(ndimage.center_of_mass(np.ones(peak_labels.shape), peak_labels, ids)).reshape(-1, 3)
        voxels = np.asarray(ndimage.sum_labels(np.ones(peak_labels.shape), peak_labels, ids), dtype=np.int64)
    else:
        centres, voxels = np.zeros((0, 3)), np.zeros(0, np.int64)
    slices = np.arange(frame_numbers.size)
    return _Peaks(
        ids=ids,
        first_frame=np.asarray([frame_numbers[boxes[i - 1][0].start] for i in ids], dtype=np.int64),
        last_frame=np.asarray([frame_numbers[boxes[i - 1][0].stop - 1] for i in ids], dtype=np.int64),
        centroid_row=centres[:, 1], centroid_col=centres[:, 2],
        centroid_axis=np.interp(centres[:, 0], slices, axis_values),
        voxels=voxels,
        intensity=np.asarray([intensity_by_id.get(int(i), math.nan) for i in ids], dtype=np.float64),
        intensity_name="summed counts", score=None, models=None,
    )


def _add_peak_voxels(fig: go.Figure, peak_labels: np.ndarray, frame_numbers: np.ndarray, axis_values: np.ndarray,
                     axis_label: str, max_voxels: int) -> None:
    """One Scatter3d per palette colour, holding the surface voxels of the peaks of that colour."""
    k, rows, cols = np.nonzero(surface_voxels(peak_labels))
    keep = _subsample_indices(k.size, max_voxels)
    if keep.size < k.size:
        logger.info("viewer: drawing %d of %d surface voxels", keep.size, k.size)
    k, rows, cols = k[keep], rows[keep], cols[keep]
    ids = peak_labels[k, rows, cols].astype(np.int64)
    colour_index = (ids - 1) % len(PALETTE)
    hover = (f"3D peak %{{customdata[0]}}<br>frame %{{customdata[1]}}<br>{axis_label} %{{y:.5g}}"
             "<br>row %{z}, column %{x}<extra></extra>")
    for c, colour in enumerate(PALETTE):
        sel = colour_index == c
        fig.add_trace(go.Scatter3d(
            x=cols[sel].astype(np.uint16), y=axis_values[k[sel]].astype(np.float32), z=rows[sel].astype(np.uint16),
            customdata=np.stack([ids[sel], frame_numbers[k[sel]]], axis=1).astype(np.int32),
            mode="markers", marker=dict(size=2.5, color=colour, line=dict(width=0)),
            # See-through, so the centroid markers inside each peak stay visible.
            opacity=0.3,
            hovertemplate=hover, name=f"peaks colour {c}",
        ))


def _add_peak_centroids(fig: go.Figure, peaks: _Peaks, axis_label: str) -> None:
    texts = []
    for i in range(peaks.ids.size):
        parts = [f"<b>3D peak {peaks.ids[i]}</b>", f"frames {peaks.first_frame[i]}–{peaks.last_frame[i]}",
                 f"{axis_label} {peaks.centroid_axis[i]:.5g}",
                 f"row {peaks.centroid_row[i]:.1f}, column {peaks.centroid_col[i]:.1f}",
                 f"{peaks.intensity_name} {_number_text(peaks.intensity[i])}", f"voxels {peaks.voxels[i]}"]
        if peaks.score is not None and np.isfinite(peaks.score[i]):
            parts.append(f"score {peaks.score[i]:.3f}")
        if peaks.models is not None and peaks.models[i] not in ("unknown", "none", ""):
            parts.append(f"models {peaks.models[i]}")
        texts.append("<br>".join(parts))
    fig.add_trace(go.Scatter3d(
        x=peaks.centroid_col, y=peaks.centroid_axis, z=peaks.centroid_row,
        mode="markers+text", text=[str(i) for i in peaks.ids], textposition="top center",
        textfont=dict(size=13, color="black"),
        marker=dict(size=7, symbol="diamond", color=[_peak_colour(i) for i in peaks.ids],
                    line=dict(width=1, color="black")),
        hovertext=texts, hovertemplate="%{hovertext}<extra></extra>", name="3D peak centroids",
    ))


def _number_text(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.0f}" if abs(value) < 1e6 else f"{value:.4g}"


class _FrameImages:
    """The slider's frame images: integer counts (or masks) and 3D peak ids, shrunk to fit a budget."""

    def __init__(self, counts: CountsSource, mask_labels: np.ndarray, peak_labels: np.ndarray, shown: np.ndarray,
                 max_image_bytes: int, shrink: int | None = None):
        self.counts = counts
        self.mask_only = counts is None
        self.mask_labels = mask_labels  # shown as the image when there are no counts
        self.peak_labels = peak_labels
        if self.mask_only:
            self.max_count = self.display_top = 1.0
            self.dtype: type = np.uint8
        else:
            frames = [_counts_frame(counts, k) for k in shown.tolist()] if callable(counts) else counts[shown]
            self.max_count = max(max(float(np.nanmax(frame, initial=0)) for frame in frames), 1.0)
            # A few hot pixels would squeeze everything else into the dark end of the scale.
            self.display_top = max(robust_maximum(frames), 1.0)
            self.dtype = _smallest_uint(self.max_count)
        self.id_dtype = _smallest_uint(float(peak_labels.max(initial=0)))
        bytes_per_pixel = np.dtype(self.dtype).itemsize + np.dtype(self.id_dtype).itemsize
        _, height, width = mask_labels.shape
        self.factor = (choose_downsample(shown.size, height, width, bytes_per_pixel, max_image_bytes)
                       if shrink is None else max(int(shrink), 1))
        if self.factor > 1 and shrink is None:
            logger.info("viewer: frame images shrunk %dx (block maxima) to stay under %d bytes",
                        self.factor, max_image_bytes)
        self.scale = None if self.mask_only else log_count_colorscale(self.display_top)

    def _pixels(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.mask_only:
            z = (self.mask_labels[k] != 0).astype(self.dtype)
        else:
            frame = np.nan_to_num(_counts_frame(self.counts, k).astype(np.float64), nan=0.0)
            z = np.rint(np.clip(frame, 0, self.max_count)).astype(self.dtype)
        ids = self.peak_labels[k].astype(self.id_dtype)
        return block_max(z[None], self.factor)[0], block_max(ids[None], self.factor)[0]

    def trace(self, k: int, *, update_only: bool = False) -> go.Heatmap:
        z, ids = self._pixels(k)
        if update_only:
            return go.Heatmap(z=z, customdata=ids, _validate=False)
        f = self.factor
        what = "mask" if self.mask_only else "counts"
        block = f" (max of {f}x{f} pixels)" if f > 1 else ""
        common = dict(x0=(f - 1) / 2, dx=f, y0=(f - 1) / 2, dy=f, showscale=False, name="frame",
                      hovertemplate=(f"row %{{y}}, column %{{x}}<br>{what} %{{z}}{block}"
                                     "<br>3D peak %{customdata} (0 = none)<extra></extra>"))
        if self.mask_only:
            return go.Heatmap(z=z, customdata=ids, colorscale=[[0, "black"], [1, "#808080"]], zmin=0, zmax=1, **common)
        return go.Heatmap(z=z, customdata=ids, colorscale=self.scale.colorscale, zmin=0, zmax=self.display_top,
                          zsmooth=False, **common)

    def colorbar_trace(self) -> go.Scatter:
        """An invisible point whose colour bar shows the frame images' log scale in counts."""
        if self.mask_only:
            return go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip")
        top = math.log1p(self.display_top)
        return go.Scatter(
            x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
            marker=dict(color=[0.0], cmin=0.0, cmax=top, colorscale=IMAGE_COLORSCALE, showscale=True,
                        colorbar=dict(title=dict(text="counts"), tickvals=self.scale.tickvals,
                                      ticktext=self.scale.ticktext, x=0.94, xanchor="left", y=0.93,
                                      yanchor="top", len=0.33, thickness=14)),
        )


def _frame_outline_traces(volumes: Mapping[str, np.ndarray], models: Sequence[str], peak_labels: np.ndarray,
                          k: int, *, update_only: bool = False) -> list[go.Scatter]:
    """For each model, one line trace per palette colour with the outlines of frame slice k.

    An instance takes the colour of the 3D peak it overlaps most, so outlines match the 3D view.
    """
    traces = []
    frame_peaks = peak_labels[k]
    for model in models:
        labels = volumes[model][k]
        per_colour: list[list[tuple[Outline, int]]] = [[] for _ in PALETTE]
        for outline in label_outlines(labels):
            peak = _dominant_peak(frame_peaks[outline.box][labels[outline.box] == outline.label])
            colour = (peak - 1) % len(PALETTE) if peak else (outline.label - 1) % len(PALETTE)
            per_colour[colour].append((outline, peak))
        for c, colour in enumerate(PALETTE):
            x, y, custom = _join_outlines(per_colour[c])
            if update_only:
                # Frames only replace the coordinates; plotly validates them when they join the figure.
                traces.append(go.Scatter(x=x, y=y, customdata=custom, _validate=False))
                continue
            label = _MODEL_LABELS[model]
            # No hover on outlines: near a peak they would win over the pixel hover, which already
            # names the 3D peak and shows the counts. customdata (instance, area, 3D peak) stays
            # in the file for anyone reading it.
            traces.append(go.Scatter(
                x=x, y=y, customdata=custom, mode="lines", line=dict(color=colour, width=1.6),
                name=f"{label} outlines", legendgroup=model, showlegend=False, hoverinfo="skip",
            ))
    return traces


def _dominant_peak(peak_ids: np.ndarray) -> int:
    """The most frequent non-zero id among an instance's pixels (0 when none)."""
    ids = peak_ids[peak_ids != 0]
    return int(np.bincount(ids).argmax()) if ids.size else 0


def _join_outlines(items: list[tuple[Outline, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NaN-separated coordinates and per-point (instance, area, peak) of several outlines."""
    xs, ys, custom = [], [], []
    for outline, peak in items:
        if xs:
            xs.append(np.array([np.nan], np.float32))
            ys.append(np.array([np.nan], np.float32))
            custom.append(np.zeros((1, 3), np.int32))
        xs.append(outline.x)
        ys.append(outline.y)
        custom.append(np.tile(np.array([[outline.label - 1, outline.area, peak]], np.int32), (outline.x.size, 1)))
    if not xs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, 3), np.int32)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(custom)


def _table_trace(peaks: _Peaks, axis_label: str) -> go.Table:
    columns: dict[str, list[Any]] = {
        "peak": peaks.ids.tolist(),
        "frames": [f"{a}–{b}" for a, b in zip(peaks.first_frame, peaks.last_frame)],
        axis_label: [f"{v:.5g}" for v in peaks.centroid_axis],
        "row": [f"{v:.1f}" for v in peaks.centroid_row],
        "column": [f"{v:.1f}" for v in peaks.centroid_col],
        "voxels": peaks.voxels.tolist(),
        peaks.intensity_name: [_number_text(v) for v in peaks.intensity],
    }
    if peaks.score is not None and np.isfinite(peaks.score).any():
        columns["score"] = [f"{v:.3f}" if np.isfinite(v) else "–" for v in peaks.score]
    if peaks.models is not None and any(m not in ("unknown", "none", "") for m in peaks.models):
        columns["models"] = peaks.models
    id_fill = [_peak_colour(i) for i in peaks.ids]
    fills = [id_fill] + [["#f7f7f7"] * peaks.ids.size] * (len(columns) - 1)
    return go.Table(
        domain=dict(x=[0.47, 1.0], y=[0.0, 0.4]),
        header=dict(values=[f"<b>{html.escape(c)}</b>" for c in columns], fill_color="#d9d9d9", align="center",
                    font=dict(size=12)),
        cells=dict(values=list(columns.values()), fill_color=fills, align="center", font=dict(size=11), height=22),
        columnwidth=[0.6, 1.0, 1.0, 0.8, 0.8, 0.8, 1.1, 0.8, 1.2][: len(columns)],
        name="3D peaks",
    )


def _start_position(shown: np.ndarray, frame_numbers: np.ndarray, labels: np.ndarray, start_frame: int | None) -> int:
    """Position in ``shown`` of the first frame on screen: start_frame, else the one with most instances."""
    if start_frame is not None:
        matches = np.flatnonzero(frame_numbers[shown] == int(start_frame))
        if matches.size == 0:
            raise DipidError(f"build_viewer: start_frame {start_frame} is not among the frames shown "
                             f"({', '.join(map(str, frame_numbers[shown][:8].tolist()))}, ...)")
        return int(matches[0])
    n_instances = [int(np.unique(labels[k]).size - (labels[k].min() == 0)) for k in shown.tolist()]
    return int(np.argmax(n_instances))


def _slider(frame_numbers: np.ndarray, axis_values: np.ndarray, shown: np.ndarray, axis_name: str,
            active: int) -> dict[str, Any]:
    steps = []
    for k in shown.tolist():
        name = str(int(frame_numbers[k]))
        label = name if axis_name == "frame" else f"{name}  ({axis_name} = {axis_values[k]:.5g})"
        steps.append(dict(method="animate", label=label, args=[[name], _ANIMATE_NOW]))
    # Step labels carry the axis value and would overlap under the ticks; hide them there and
    # show the current one above the slider.
    tick_font = dict(size=10, color="rgba(0,0,0,0)")
    return dict(
        active=active, steps=steps, x=0.47, len=0.53, y=0.55, yanchor="top", pad=dict(t=10, b=0),
        currentvalue=dict(prefix="frame ", visible=True, xanchor="left", font=dict(size=13, color="#222")),
        font=tick_font, ticklen=3, minorticklen=0,
    )


def _model_buttons(models: Sequence[str], default: str, outline_start: int, n_outline: int) -> dict[str, Any]:
    per_model = n_outline // len(models)
    indices = list(range(outline_start, outline_start + n_outline))
    buttons = []
    for model in [*models, None]:
        visible = [model is not None and models.index(model) == i // per_model for i in range(n_outline)]
        buttons.append(dict(method="restyle", label=_MODEL_LABELS[model] if model else "no outlines",
                            args=[{"visible": visible}, indices]))
    return dict(type="buttons", direction="right", buttons=buttons, active=models.index(default),
                x=0.47, xanchor="left", y=0.995, yanchor="top", showactive=True, pad=dict(t=0, r=4),
                font=dict(size=12))


def _play_buttons() -> dict[str, Any]:
    play = dict(method="animate", label="▶ play",
                args=[None, {"mode": "immediate", "fromcurrent": True, "frame": {"duration": 250, "redraw": True},
                             "transition": {"duration": 0}}])
    pause = dict(method="animate", label="❚❚ pause", args=[[None], _ANIMATE_NOW])
    return dict(type="buttons", direction="right", buttons=[play, pause], showactive=False,
                x=1.0, xanchor="right", y=0.995, yanchor="top", pad=dict(t=0), font=dict(size=12))


def _show_model(fig: go.Figure, models: Sequence[str], model: str, outline_start: int, n_outline: int) -> None:
    per_model = n_outline // len(models)
    for i in range(n_outline):
        fig.data[outline_start + i].visible = models.index(model) == i // per_model


def view_results_file(result_path: str | Path, out: str | Path | None = None) -> Path:
    """Viewer HTML of a results file written by ``dipid predict`` / ``ScanResult.to_nexus``.

    The frames' counts are re-read from the source scan recorded in the file when it is still
    there; otherwise the viewer shows the masks alone (and says so in the log).
    """
    from dipid.io import open_scan
    from dipid.io.results_nexus import read_results_nexus

    results = read_results_nexus(result_path)
    result_path = Path(result_path)
    out = Path(out) if out is not None else result_path.with_name(result_path.name.replace("_dipid.nxs", "") + "_view.html")
    counts = None
    source = Path(results.source_scan) if results.source_scan else None
    if source is not None and source.is_file():
        with open_scan(source) as scan:
            counts = np.stack([scan[int(f)] for f in results.frame_numbers])
    else:
        logger.warning("%s: source scan %s not found; the viewer shows masks without counts", result_path, source)
    return write_viewer(
        out, counts, results.model_labels, peak_table=results.peaks or None, peak_label_volume=results.peak_labels,
        axis_name=results.axis_name, axis_values=results.axis_values, frame_numbers=results.frame_numbers,
        title=f"dipid: {source.name if source else result_path.name}",
    )
