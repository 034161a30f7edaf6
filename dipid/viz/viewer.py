"""The standalone HTML scan viewer: one self-contained file with the 3D peaks of a scan, a frame
slider over the log-scaled frames with each model's outlines, and the 3D-peak table.

* :func:`build_viewer`: the viewer as one plotly Figure, from arrays.
* :func:`write_viewer`: build it and write the page, shrinking the frame images until it fits.
* :func:`view_scan_result`: the viewer of a :class:`dipid.results.ScanResult`.
* :func:`view_results_file`: the viewer of a results NeXus file (``dipid view``).

Size: the frame images are stored as integer counts under a log-spaced colour scale (so the hover
shows exact counts without a second array) and the page is gzipped (:mod:`dipid.viz.page`). Frame
images are shrunk by block maxima only when a scan would not otherwise fit ``max_image_bytes``
before compression or ``max_html_bytes`` after: a 61-frame Pilatus 100K scan fits at full
resolution in about 10-14 MB. Past the largest shrink, fewer frames are shown, so the page stays
under ``max_html_bytes`` on any scan; the page says which frames it shows and how binned they are.
The 3D peaks, the table and the outlines are those of every frame at full resolution.

Memory: the label volumes and the peak labels may be :class:`dipid.results.FrameStack` and the
counts a function reading a frame from the scan, so only the shown frames are ever read, one at a
time; no (F, H, W) array is built. :func:`view_scan_result` passes
:class:`dipid.volume.SparseFrames`, whose outlines and 3D voxels are drawn from their labelled
pixels alone.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from dipid.errors import DipidError
from dipid.files import atomic_write_text
from dipid.io import Scan, open_scan
from dipid.io.results_nexus import read_results_nexus
from dipid.results import MODEL_KINDS, FrameStack, ScanResult, check_model
from dipid.viz.figures import _MODEL_LABELS, IMAGE_COLORSCALE, _scene_layout, log_count_colorscale
from dipid.viz.geometry import (
    _INTENSITY_COLUMNS,
    PALETTE,
    CountsSource,
    Outline,
    _connected_regions,
    _counts_frame,
    _dominant_peak,
    _even_indices,
    _join_outlines,
    _peak_colour,
    _peak_intensities,
    _Peaks,
    _peaks_from_table,
    _peaks_from_volume,
    _scan_axis,
    _smallest_uint,
    _surface_sample,
    axis_title,
    block_max,
    choose_downsample,
    label_outlines,
    robust_maximum,
)
from dipid.viz.page import _html_page, packed_size, page_overhead
from dipid.volume import SparseFrames, _sparse_at, instance_label_frames

__all__ = ["build_viewer", "write_viewer", "view_scan_result", "view_results_file"]

logger = logging.getLogger(__name__)

_ANIMATE_NOW = {"mode": "immediate", "frame": {"duration": 0, "redraw": True}, "transition": {"duration": 0}}


#: write_viewer stops shrinking the frame images here (8x8 blocks: peaks are still visible).
_MAX_IMAGE_SHRINK = 8
#: build_viewer's defaults for the frames shown and the images' budget before compression.
_MAX_FRAMES = 121
_MAX_IMAGE_BYTES = 48_000_000


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
    subtitle: str = "",
    max_frames: int = _MAX_FRAMES,
    max_voxels: int = 60_000,
    max_image_bytes: int = _MAX_IMAGE_BYTES,
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
        subtitle: a smaller second line under the title ("" for none), such as how the models ran.
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
    if not isinstance(peak_label_volume, FrameStack):
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

    # Unvalidated: the traces are built here from checked arrays, and plotly's validation (a
    # read-only copy of every array, a check of every table cell) took seconds on a long scan;
    # the figure's JSON is the same either way (tested). The traces go into the figure at once:
    # Figure.add_trace validates each trace again, whatever the figure's _validate.
    traces = [*_peak_voxel_traces(peak_label_volume, frame_numbers, axis_values, axis_label, max_voxels),
              _peak_centroid_trace(peaks, axis_label)]
    image_index = len(traces)
    image = _FrameImages(counts, volumes[default_model], peak_label_volume, shown, max_image_bytes, image_shrink)
    traces += [image.trace(int(shown[start])), image.colorbar_trace()]
    outline_start = len(traces)
    first_outlines = _frame_outline_traces(volumes, models, peak_label_volume, int(shown[start]))
    traces += first_outlines
    n_outline = len(first_outlines)
    traces.append(_table_trace(peaks, axis_label))
    fig = go.Figure(data=traces, _validate=False)

    frames = []
    for k in shown.tolist():
        frames.append(go.Frame(
            name=str(int(frame_numbers[k])),
            data=[image.trace(k, update_only=True),
                  *_frame_outline_traces(volumes, models, peak_label_volume, k, update_only=True)],
            traces=[image_index, *range(outline_start, outline_start + n_outline)],
            _validate=False,  # see the figure's
        ))
    fig.frames = frames

    fig.update_layout(
        title=dict(text=html.escape(title) + (f"<br><span style='font-size:12px'>{html.escape(subtitle)}</span>"
                                              if subtitle else ""), x=0.01, y=0.985),
        height=900,
        margin=dict(l=10, r=10, t=56 if subtitle else 40, b=10),
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
        meta={"image_shrink": image.factor, "frames_shown": int(shown.size), "frames_total": int(n_frames)},
    )
    note = _reduction_note(shown.size, n_frames, image.factor)
    if note:
        fig.add_annotation(text=html.escape(note), xref="paper", yref="paper", x=0.47, xanchor="left", y=0.945,
                           yanchor="bottom", showarrow=False, font=dict(size=11, color="#555"), name="reduction note")
    _show_model(fig, models, default_model, outline_start, n_outline)
    return fig


#: write_viewer shows no fewer frames than this to fit its page budget.
_MIN_FRAMES_SHOWN = 5
#: write_viewer keeps the shown frames' counts in memory up to this many bytes (read once, not per build).
_FRAME_CACHE_BYTES = 256_000_000


def _reduction_note(shown: int, total: int, factor: int) -> str:
    """The page's note on what it left out ("" when it shows every frame at full resolution)."""
    parts = []
    if shown < total:
        parts.append(f"showing {shown} of {total} frames (about every {max(round((total - 1) / max(shown - 1, 1)), 1)}"
                     "th)")
    if factor > 1:
        parts.append(f"frame images binned {factor} x {factor} (maximum of each block)")
    if not parts:
        return ""
    return "; ".join(parts) + "; 3D peaks, outlines and table: every frame at full resolution"


class _CachedFrames:
    """A counts source read once per frame: frames are kept up to a byte budget, the rest re-read."""

    def __init__(self, counts: Any, budget: int):
        self.counts, self.budget, self.kept = counts, budget, {}
        self.held = 0

    def __call__(self, k: int) -> np.ndarray:
        frame = self.kept.get(k)
        if frame is None:
            frame = _counts_frame(self.counts, k)
            if self.held + frame.nbytes <= self.budget:
                self.kept[k] = frame
                self.held += frame.nbytes
        return frame


#: A reduced page's slider frames are planned this much larger than estimated: the estimate is
#: from below, and a page just over its budget would be built a second time.
_PLAN_MARGIN = 0.05


def _plan_reduction(counts: CountsSource, label_volumes: Mapping[str, np.ndarray], options: Mapping[str, Any],
                    max_html_bytes: int) -> dict[str, int]:
    """``image_shrink`` and ``max_frames`` for a compressed page of at most ``max_html_bytes``.

    The page is plotly.js plus the gzipped figure, and on a large detector the figure is mostly
    one slider frame (image and outlines) per shown frame: the middle shown frame is encoded and
    gzipped as the page would be, at the smallest shrink the image budget allows and then larger
    ones until the estimate fits; past the largest shrink, fewer frames are shown. The 3D view
    and the table are counted at bytes per voxel and per peak below what they take (4 and 50,
    against 7 and 88 on a 200-frame Eiger 4M page), so the estimate errs low: the page is never shrunk more
    than the budget needs, and one that still comes out too large is built again by
    :func:`write_viewer`. Cost: one more frame encoded, next to a build that reads and encodes
    every shown frame.
    """
    volumes, (n_frames, height, width) = _check_volumes(label_volumes, options.get("peak_label_volume"), counts)
    models = list(volumes)
    max_frames = int(options.get("max_frames", _MAX_FRAMES))
    shown = _even_indices(n_frames, max_frames)
    k = int(shown[shown.size // 2])
    default_labels = volumes["joint" if "joint" in volumes else models[0]]
    peak_labels = options.get("peak_label_volume")
    if peak_labels is None:  # build_viewer's stand-in peaks are per-frame regions much like these
        peak_labels = default_labels
    if counts is None:
        frame, dtype, max_count = None, np.uint8, None
    else:
        # The image dtype depends on the largest count of all shown frames, which only the build
        # reads: the first, middle and last one stand in (a dtype too small errs low).
        samples = {int(shown[0]), k, int(shown[-1])}
        max_count = max(max(float(np.nanmax(_counts_frame(counts, i), initial=0)) for i in samples), 1.0)
        frame, dtype = _counts_frame(counts, k), _smallest_uint(max_count)
    id_dtype = _smallest_uint(float(peak_labels.max(initial=0)))
    ids = np.asarray(peak_labels[k])
    mask = None if frame is not None else np.asarray(default_labels[k])
    outlines = _frame_outline_traces(volumes, models, peak_labels, k, update_only=True)

    def page_bytes(factor: int, frames: int) -> int:
        z, binned_ids = _image_pixels(frame, mask, ids, factor, dtype=dtype, id_dtype=id_dtype, max_count=max_count)
        slider_frame = go.Frame(data=[go.Heatmap(z=z, customdata=binned_ids, _validate=False), *outlines])
        # an empty template: the default one would add kilobytes to every frame's share
        per_frame[factor] = packed_size(go.Figure(frames=[slider_frame], layout=dict(template={})))
        return fixed + (frames + 1) * per_frame[factor]  # +1: the figure's first image

    table = options.get("peak_table")
    n_peaks = len(next(iter(table.values()), [])) if table is not None and len(table) else 0
    voxels = int(options.get("max_voxels", 60_000))
    if table is not None and "voxels" in table:  # a peak's surface voxels are at most all of its voxels
        voxels = min(voxels, int(np.sum(np.asarray(table["voxels"]))))
    elif isinstance(peak_labels, np.ndarray):
        voxels = min(voxels, int(np.count_nonzero(peak_labels)))
    fixed, per_frame = page_overhead() + 4 * voxels + 50 * n_peaks, {}
    bytes_per_pixel = np.dtype(dtype).itemsize + np.dtype(id_dtype).itemsize
    factor = min(choose_downsample(shown.size, height, width, bytes_per_pixel,
                                   int(options.get("max_image_bytes", _MAX_IMAGE_BYTES))), _MAX_IMAGE_SHRINK)
    estimate = page_bytes(factor, shown.size)
    if estimate <= max_html_bytes:
        return {}  # build_viewer's own choice fits
    # Reducing: the frames get a little less room than is left, as a page just over its budget
    # would be built a second time.
    room = (max_html_bytes - fixed) / (1 + _PLAN_MARGIN)
    while estimate - fixed > room and factor < _MAX_IMAGE_SHRINK:
        # the images' bytes fall about as the square of the shrink: jump to the one expected to fit
        wanted = math.ceil(factor * math.sqrt((estimate - fixed) / max(room, 1)))
        factor = min(max(wanted, factor + 1), _MAX_IMAGE_SHRINK)
        estimate = page_bytes(factor, shown.size)
    frames = shown.size
    if estimate - fixed > room:
        frames = min(max(int(room // max(per_frame[factor], 1)) - 1, _MIN_FRAMES_SHOWN),
                     shown.size)
    logger.info("viewer: planned %d of %d frames with images shrunk %dx (about %.2f MB a frame)",
                frames, n_frames, factor, per_frame[factor] / 1e6)
    return {"image_shrink": factor, "max_frames": frames}


def write_viewer(path: str | Path, counts: CountsSource, label_volumes: Mapping[str, np.ndarray], *,
                 compress: bool | None = None, max_html_bytes: int = 15_000_000, **kwargs: Any) -> Path:
    """Build the viewer (arguments as :func:`build_viewer`) and write it as one standalone HTML file.

    Args:
        compress: as in :func:`save_html`.
        max_html_bytes: the page's budget. Unless ``image_shrink`` is given, the shrink of the
            frame images (block maxima, up to 8x8) and then the number of frames shown are chosen
            before building, from one shown frame's share of the compressed page
            (:func:`_plan_reduction`), so the page is built once in the common case. When it
            still comes out larger, the frame images are shrunk one step further and the page
            built again; past an 8x8 shrink, fewer frames are shown each time (as many as the
            measured page leaves room for), down to 5.
    Returns:
        the path written.
    """
    if callable(counts):  # each build reads the shown frames: read them from the source once
        counts = _CachedFrames(counts, _FRAME_CACHE_BYTES)
    if kwargs.get("image_shrink") is None and compress is not False:
        kwargs = {**kwargs, **_plan_reduction(counts, label_volumes, kwargs, max_html_bytes)}
    fig = build_viewer(counts, label_volumes, **kwargs)
    page = _html_page(fig, title=_page_title(kwargs), compress=compress)
    # plotly.js holds a few non-ASCII characters: measure the page in bytes, as written.
    while len(page.encode("utf-8")) > max_html_bytes:
        shrink, shown = int(fig.layout.meta["image_shrink"]), int(fig.layout.meta["frames_shown"])
        if shrink < _MAX_IMAGE_SHRINK:
            logger.info("viewer page is %.1f MB, over %.1f MB: shrinking the frame images %dx",
                        len(page) / 1e6, max_html_bytes / 1e6, shrink + 1)
            kwargs = {**kwargs, "image_shrink": shrink + 1}
        elif shown > _MIN_FRAMES_SHOWN:
            # the frames' share of the page shrinks with their number (plotly.js does not): as
            # many as that leaves room for, less a margin, and always fewer than now
            overhead = page_overhead()
            room = (max_html_bytes - overhead) / max(len(page) - overhead, 1) / (1 + _PLAN_MARGIN)
            fewer = max(min(int(shown * room), shown - 1), _MIN_FRAMES_SHOWN)
            logger.info("viewer page is %.1f MB, over %.1f MB: showing %d frames instead of %d",
                        len(page) / 1e6, max_html_bytes / 1e6, fewer, shown)
            kwargs = {**kwargs, "image_shrink": shrink, "max_frames": fewer}
        else:
            logger.warning("viewer page is %.1f MB even with %d frames shrunk %dx", len(page) / 1e6, shown, shrink)
            break
        fig = build_viewer(counts, label_volumes, **kwargs)
        page = _html_page(fig, title=_page_title(kwargs), compress=compress)
    out = atomic_write_text(path, page)
    logger.info("viewer written to %s (%.1f MB)", out, len(page) / 1e6)
    return out


def view_scan_result(
    result: ScanResult,
    counts: np.ndarray | Scan | Any | None,
    path: str | Path,
    *,
    peak_table: Mapping[str, Sequence[Any]] | Any | None = None,
    peak_label_volume: np.ndarray | None = None,
    label_volumes: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Path:
    """Write the viewer of a ScanResult to ``path`` (one standalone HTML file); returns the path.

    Only the shown frames are read, one at a time: the label images are made from the result's
    cropped instances and the peak labels from ``Peaks3D.label_frames``, so a long scan needs no
    (F, H, W) array (give the counts as the open scan).

    Args:
        result: the scan's predictions; every model it holds gets a button.
        counts: the frames' counts: (len(result), H, W) in ``result.frame_numbers`` order, the
            whole scan (n_scan_frames, H, W) indexed by frame number, an open
            :class:`dipid.io.Scan` (the one predicted; frames read as shown), a function from
            held-frame index to (H, W) counts, or None to show masks only.
        path: where to write the HTML.
        peak_table, peak_label_volume: 3D peaks over ``result.frame_numbers`` (see build_viewer).
            A :class:`dipid.volume.Peaks3D` may be passed as ``peak_table``: its ``table`` and
            ``label_frames`` are used.
        label_volumes: model -> its instance label images, when already made (default:
            :func:`dipid.volume.instance_label_frames` of each model the result holds).
        kwargs: further build_viewer / write_viewer options (max_frames, max_voxels, title, ...).
    """
    frames = result.frame_numbers
    if hasattr(peak_table, "table") and (hasattr(peak_table, "label_frames") or hasattr(peak_table, "labels")):
        peaks = peak_table
        if not np.array_equal(np.asarray(peaks.frame_numbers), frames):
            raise DipidError("view_scan_result: the 3D peaks were linked over other frames than the result holds; "
                             "link them from this result")
        peak_table = peaks.table
        peak_label_volume = peaks.label_frames if hasattr(peaks, "label_frames") else peaks.labels
    if frames.size == 0:
        raise DipidError("view_scan_result: the result holds no frames; predict at least one frame first")
    if isinstance(counts, Scan):
        scan = counts
        if tuple(scan.frame_shape) != tuple(result.frame_shape) or len(scan) <= int(frames.max()):
            raise DipidError(f"view_scan_result: the scan {scan.path} ({len(scan)} frames of {tuple(scan.frame_shape)}) "
                             f"is not the one predicted ({tuple(result.frame_shape)}, frame {int(frames.max())} held)")
        counts = lambda k: scan[int(frames[k])]  # noqa: E731 - one frame, read when shown
    elif counts is not None and not callable(counts):
        counts = np.asarray(counts)
        if counts.ndim != 3 or tuple(counts.shape[1:]) != tuple(result.frame_shape):
            raise DipidError(f"view_scan_result: counts of shape {counts.shape} do not match frames of "
                             f"shape {tuple(result.frame_shape)}; pass the scan's (F, H, W) detector data")
        counts = result.held(counts, what="view_scan_result: counts")
    given = dict(label_volumes or {})
    # as their labelled pixels: outlines and 3D voxels are drawn from those alone
    label_volumes = {m: given[m] if given.get(m) is not None else instance_label_frames(result.instances(m),
                                                                                         result.frame_shape)
                     for m in result.models_present()}
    axis_values, axis_name = _scan_axis(result)
    scan_name = Path(result.scan_path).name if result.scan_path else "scan"
    title = kwargs.pop("title", None) or f"{scan_name}: {len(frames)} frames, scan axis {result.axis_name}"
    kwargs.setdefault("subtitle", _gate_note(result.metadata))
    return write_viewer(path, counts, label_volumes, peak_table=peak_table, peak_label_volume=peak_label_volume,
                        axis_name=axis_name, axis_values=axis_values, frame_numbers=frames, title=title, **kwargs)


def view_results_file(result_path: str | Path, out: str | Path | None = None) -> Path:
    """Viewer HTML of a results file written by ``dipid predict`` / ``ScanResult.to_nexus``.

    The frames' counts are re-read from the source scan recorded in the file when it is still
    there (only the shown frames); otherwise the viewer shows the masks alone (and says so in the log).
    """
    results = read_results_nexus(result_path)
    result_path = Path(result_path)
    out = Path(out) if out is not None else result_path.with_name(result_path.name.replace("_dipid.nxs", "") + "_view.html")
    source = Path(results.source_scan) if results.source_scan else None
    options = dict(peak_table=results.peaks or None, peak_label_volume=results.peak_labels,
                   axis_name=results.axis_name, axis_values=results.axis_values, frame_numbers=results.frame_numbers,
                   title=f"dipid: {source.name if source else result_path.name}",
                   subtitle=_gate_note(results.result_metadata))
    if source is not None and source.is_file():
        with open_scan(source) as scan:
            return write_viewer(out, lambda k: scan[int(results.frame_numbers[k])], results.model_labels, **options)
    logger.warning("%s: source scan %s not found; the viewer shows masks without counts", result_path, source)
    return write_viewer(out, None, results.model_labels, **options)


def _page_title(options: Mapping[str, Any]) -> str | None:
    """The HTML page's title: the viewer's title, and its subtitle after a dash."""
    title, subtitle = options.get("title"), options.get("subtitle")
    return f"{title} \u2014 {subtitle}" if title and subtitle else title


def _gate_note(metadata: Mapping[str, Any] | None) -> str:
    """The subtitle when ``classical_gate`` left frames without TLM/SSLM output (an empty outline
    there means "not run", not "nothing found") and when ``peak_windows`` showed the networks
    only windows around classical peaks; "" otherwise."""
    metadata = metadata or {}
    gated = len((metadata.get("networks_not_run") or {}).get("frames", []))
    windows = (metadata.get("networks_windows") or {}).get("margin")
    notes = [f"not run on {gated} frames without a classical peak"] if gated else []
    if windows is not None:
        notes.append(f"{'elsewhere ' if gated else ''}run only within {windows} px (and the 32-px grid) of classical peaks")
    return "TLM and SSLM " + ", ".join(notes) if notes else ""


def _check_volumes(label_volumes: Mapping[str, np.ndarray], peak_label_volume: np.ndarray | None,
                   counts: CountsSource) -> tuple[dict[str, np.ndarray], tuple[int, int, int]]:
    if not label_volumes:
        raise DipidError("build_viewer: no label volumes given; pass at least {'joint': (F, H, W) labels}")
    volumes: dict[str, np.ndarray] = {}
    for model in sorted(label_volumes, key=lambda m: MODEL_KINDS.index(m) if m in MODEL_KINDS else -1):
        check_model(model)
        volume = label_volumes[model]
        volumes[model] = volume if isinstance(volume, FrameStack) else np.asarray(volume)
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


def _peak_voxel_traces(peak_labels: np.ndarray | FrameStack, frame_numbers: np.ndarray, axis_values: np.ndarray,
                       axis_label: str, max_voxels: int) -> list[go.Scatter3d]:
    """One Scatter3d per palette colour, holding the surface voxels of the peaks of that colour."""
    k, rows, cols, ids = _surface_sample(peak_labels, max_voxels)
    colour_index = (ids - 1) % len(PALETTE)
    hover = (f"3D peak %{{customdata[0]}}<br>frame %{{customdata[1]}}<br>{axis_label} %{{y:.5g}}"
             "<br>row %{z}, column %{x}<extra></extra>")
    traces = []
    for c, colour in enumerate(PALETTE):
        sel = colour_index == c
        traces.append(go.Scatter3d(
            x=cols[sel].astype(np.uint16), y=axis_values[k[sel]].astype(np.float32), z=rows[sel].astype(np.uint16),
            customdata=np.stack([ids[sel], frame_numbers[k[sel]]], axis=1).astype(np.int32),
            mode="markers", marker=dict(size=2.5, color=colour, line=dict(width=0)),
            # See-through, so the centroid markers inside each peak stay visible.
            opacity=0.3,
            hovertemplate=hover, name=f"peaks colour {c}",
        ))
    return traces


def _peak_centroid_trace(peaks: _Peaks, axis_label: str) -> go.Scatter3d:
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
    return go.Scatter3d(
        x=peaks.centroid_col, y=peaks.centroid_axis, z=peaks.centroid_row,
        mode="markers+text", text=[str(i) for i in peaks.ids], textposition="top center",
        textfont=dict(size=13, color="black"),
        marker=dict(size=7, symbol="diamond", color=[_peak_colour(i) for i in peaks.ids],
                    line=dict(width=1, color="black")),
        hovertext=texts, hovertemplate="%{hovertext}<extra></extra>", name="3D peak centroids",
    )


def _number_text(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.0f}" if abs(value) < 1e6 else f"{value:.4g}"


def _image_pixels(counts: np.ndarray | None, mask_labels: np.ndarray | None, peak_ids: np.ndarray, factor: int, *,
                  dtype: type, id_dtype: type, max_count: float | None = None,
                  binned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One slider image: (z, ids), each (ceil(H/factor), ceil(W/factor)) block maxima.

    z: the counts rounded to ``dtype`` (NaN and negative codes as 0, clipped at ``max_count``),
    or, without counts, ``mask_labels != 0``; ids: the 3D peak ids as ``id_dtype``. ``binned``:
    the counts' :func:`_binned_counts` at ``factor``, made already (then ``counts`` is unused).
    """
    if binned is not None:
        z = _rounded_counts(binned, dtype=dtype, max_count=max_count)
    elif counts is None:
        z = block_max((np.asarray(mask_labels) != 0).astype(dtype)[None], factor)[0]
    else:
        z = _rounded_counts(_binned_counts(counts, factor), dtype=dtype, max_count=max_count)
    ids = block_max(np.asarray(peak_ids).astype(id_dtype, copy=False)[None], factor)[0]
    return z, ids


def _binned_counts(counts: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) counts -> their float block maxima, NaN as 0 (the first half of a slider image).

    Shrinking first is exact: the block maximum commutes with the (monotone) clip and rounding
    of :func:`_rounded_counts`, which then work on 1/factor^2 of the pixels.
    """
    frame = np.asarray(counts)
    if not np.issubdtype(frame.dtype, np.floating):
        frame = frame.astype(np.float64)
    return block_max(np.nan_to_num(frame, nan=0.0)[None], factor)[0]


def _rounded_counts(binned: np.ndarray, *, dtype: type, max_count: float | None) -> np.ndarray:
    """Binned counts as the slider stores them: integers of ``dtype``, negative codes as 0."""
    return np.rint(np.clip(binned, 0, max_count)).astype(dtype)


def _count_stats(counts: CountsSource, shown: np.ndarray, frame_shape: tuple[int, int], *,
                 seen: Callable[[int, np.ndarray], None] | None = None) -> tuple[float, float]:
    """(top of the colour scale, largest count) of the shown frames, both at least 1: one pass,
    a frame at a time (a long scan's frames are read from the file); ``seen(k, frame)`` is
    called with each frame read."""
    tops = [0.0]

    def frames() -> Any:
        for k in shown.tolist():
            frame = _counts_frame(counts, k)
            tops.append(float(np.nanmax(frame, initial=0)))
            if seen is not None:
                seen(k, frame)
            yield frame

    # A few hot pixels would squeeze everything else into the dark end of the scale.
    display_top = max(robust_maximum(frames(), total=shown.size * frame_shape[0] * frame_shape[1]), 1.0)
    return display_top, max(max(tops), 1.0)


class _FrameImages:
    """The slider's frame images: integer counts (or masks) and 3D peak ids, shrunk to fit a budget."""

    def __init__(self, counts: CountsSource, mask_labels: np.ndarray, peak_labels: np.ndarray, shown: np.ndarray,
                 max_image_bytes: int, shrink: int | None = None):
        self.counts = counts
        self.mask_only = counts is None
        self.mask_labels = mask_labels  # shown as the image when there are no counts
        self.peak_labels = peak_labels
        # With the shrink given (write_viewer plans it), the pass over the frames for the colour
        # scale keeps each binned image (a frame of a long scan is not read a second time), up to
        # a byte budget.
        self._planned = None if shrink is None or int(shrink) <= 1 else int(shrink)
        self._binned: dict[int, np.ndarray] = {}
        self._binned_bytes = 0
        if self.mask_only:
            self.max_count = self.display_top = 1.0
            self.dtype: type = np.uint8
        else:
            self.display_top, self.max_count = _count_stats(counts, shown, mask_labels.shape[1:], seen=self._keep)
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

    def _keep(self, k: int, frame: np.ndarray) -> None:
        if self._planned is None or self._binned_bytes > _FRAME_CACHE_BYTES:
            return
        binned = _binned_counts(frame, self._planned)
        self._binned[k] = binned
        self._binned_bytes += binned.nbytes

    def _pixels(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        binned = self._binned.get(k) if self.factor == self._planned else None
        counts = None if self.mask_only or binned is not None else _counts_frame(self.counts, k)
        return _image_pixels(counts, self.mask_labels[k] if self.mask_only else None, self.peak_labels[k],
                             self.factor, dtype=self.dtype, id_dtype=self.id_dtype, max_count=self.max_count,
                             binned=binned)

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
    frame_peaks = _frame(peak_labels, k)
    done: list[tuple[Any, list[list[tuple[Outline, int]]]]] = []
    for model in models:
        labels = _frame(volumes[model], k)
        # a model whose instances are another's (joint of a classical-only run) reuses its outlines
        per_colour = next((outlines for seen, outlines in done if _same_frame(seen, labels)), None)
        if per_colour is None:
            per_colour = [[] for _ in PALETTE]
            for outline in label_outlines(labels, volumes[model].shape[1:]):
                peak = _dominant_peak(_peaks_under(frame_peaks, labels, outline, volumes[model].shape[2]))
                colour = (peak - 1) % len(PALETTE) if peak else (outline.label - 1) % len(PALETTE)
                per_colour[colour].append((outline, peak))
            done.append((labels, per_colour))
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


def _frame(volume: Any, k: int) -> Any:
    """Frame k of a label volume: its non-zero pixels for :class:`SparseFrames`, else the (H, W) image."""
    return volume.pixels(k) if isinstance(volume, SparseFrames) else volume[k]


def _same_frame(a: Any, b: Any) -> bool:
    """Whether two frames from :func:`_frame` hold the same labels."""
    if isinstance(a, tuple) != isinstance(b, tuple):
        return False
    if isinstance(a, tuple):
        return all(np.array_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


def _peaks_under(frame_peaks: Any, labels: Any, outline: Outline, width: int) -> np.ndarray:
    """The 3D peak ids (frame from :func:`_frame`) under the pixels of ``outline``'s region of ``labels``."""
    if isinstance(labels, tuple):
        flat, values = labels
        where = flat[values == outline.label]
    else:
        rows, cols = np.nonzero(labels[outline.box] == outline.label)
        where = (rows + outline.box[0].start) * width + cols + outline.box[1].start
    if isinstance(frame_peaks, tuple):
        return _sparse_at(frame_peaks, where)
    return np.asarray(frame_peaks).reshape(-1)[where]


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
        # nested dicts, not plotly's "fill_color" shorthand: an unvalidated trace keeps names as given
        header=dict(align="center", font=dict(size=12), values=[f"<b>{html.escape(c)}</b>" for c in columns],
                    fill=dict(color="#d9d9d9")),
        cells=dict(align="center", font=dict(size=11), height=22, values=list(columns.values()), fill=dict(color=fills)),
        columnwidth=[0.6, 1.0, 1.0, 0.8, 0.8, 0.8, 1.1, 0.8, 1.2][: len(columns)],
        name="3D peaks",
        _validate=False,  # plain lists of numbers and strings; see build_viewer
    )


def _start_position(shown: np.ndarray, frame_numbers: np.ndarray, labels: np.ndarray, start_frame: int | None) -> int:
    """Position in ``shown`` of the first frame on screen: start_frame, else the one with most instances."""
    if start_frame is not None:
        matches = np.flatnonzero(frame_numbers[shown] == int(start_frame))
        if matches.size == 0:
            raise DipidError(f"build_viewer: start_frame {start_frame} is not among the frames shown "
                             f"({', '.join(map(str, frame_numbers[shown][:8].tolist()))}, ...)")
        return int(matches[0])
    if isinstance(labels, SparseFrames):
        n_instances = [int(np.unique(labels.pixels(k)[1]).size) for k in shown.tolist()]
    else:
        n_instances = [int(np.count_nonzero(np.bincount(labels[k].ravel())[1:])) for k in shown.tolist()]
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
