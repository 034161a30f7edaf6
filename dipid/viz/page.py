"""Writing a figure as one standalone HTML page: plotly.js embedded, the figure gzipped inside.

Size: the page stores every numeric array as a base64 typed array (plotly >= 6 does this for
numpy arrays) and, above :data:`COMPRESS_ABOVE_BYTES`, gzips the figure's JSON inside the page
(the browser unpacks it), so it works offline and stays small. plotly is used through the figure
passed in; ``plotly.offline`` is imported only when a compressed page is written.
"""

from __future__ import annotations

import base64
import html
import json
import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from dipid.files import atomic_write_text

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["save_html", "COMPRESS_ABOVE_BYTES"]

#: Figures whose JSON is larger than this are gzipped inside the page by default.
COMPRESS_ABOVE_BYTES = 2_000_000

#: zlib level of the gzipped figure. Measured on a 20-frame Eiger 4M viewer (33 MB of JSON):
#: level 6 took 1.5 s for 5.30 MB, level 5 0.5 s for 5.65 MB (+7 %), level 4 0.3 s for 5.83 MB
#: (+10 %), level 1 0.2 s for 6.84 MB (+29 %), level 9 18 s for 4.76 MB.
_GZIP_LEVEL = 5


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


def _compressed_page(fig_json: str, page_title: str) -> str:
    """A standalone page holding plotly.js and the gzipped, base64-encoded figure JSON."""
    # plotly is heavy; get_plotlyjs (3+ MB of text) is needed only for a compressed page
    from plotly.offline import get_plotlyjs

    data = base64.b64encode(_gzip(fig_json)).decode("ascii")
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


def _gzip(text: str) -> bytes:
    """``text`` as the page's gzip stream (wbits=31: what DecompressionStream("gzip") reads)."""
    packer = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
    return packer.compress(text.encode("utf-8")) + packer.flush()


def packed_size(fig: go.Figure) -> int:
    """Bytes ``fig``'s JSON takes in a compressed page (gzipped, then base64).

    A figure, not a trace or frame: only the figure's JSON stores numpy arrays as base64 typed
    arrays, as the page does (a frame's own JSON writes them as lists of numbers).
    """
    return 4 * math.ceil(len(_gzip(fig.to_json())) / 3)


def page_overhead(title: str = "dipid") -> int:
    """Bytes of a compressed page besides its figure data (mostly plotly.js)."""
    return len(_compressed_page("", html.escape(title)).encode("utf-8"))


def _figure_title(fig: go.Figure) -> str | None:
    text = fig.layout.title.text if fig.layout.title is not None else None
    return text or None
