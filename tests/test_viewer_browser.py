"""The scan viewer in a real browser: headless Chromium opens the standalone HTML, plots it with no
JavaScript error, moves the frame slider, hovers a pixel, switches model, and takes a screenshot.

Needs Debian's ``chromium`` package (CI installs it; see .ci/run). Without it the test skips
locally and fails when the CI environment variable is set.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dipid import viz
from dipid.results import SOURCE_FLAGS, ImageResult, Instances, ScanResult, SSLOutput

H, W = 60, 150
N_FRAMES = 5
CHROMIUM_TIMEOUT_S = 150

#: Records every error the page raises (or logs) so the test can read them back from the DOM.
ERROR_HOOK = """<script>
window.__dipidErrors = [];
window.addEventListener("error", function (e) { window.__dipidErrors.push("error: " + e.message); });
window.addEventListener("unhandledrejection", function (e) {
  window.__dipidErrors.push("unhandled rejection: " + e.reason);
});
(function () {
  var original = console.error;
  console.error = function () {
    window.__dipidErrors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
})();
</script>"""

#: Waits for the plot and its frames, then drives it like a user and writes a JSON report into
#: a hidden <pre>, which --dump-dom prints. P holds the trace indices and the pixel to probe.
PROBE = """<script>
(function () {
  var P = __PARAMS__;
  var report = {};
  var state = "loading";
  var spins = 0;
  var gd = null;
  var animated = false;
  function stage(name) { state = name; document.body.setAttribute("data-probe-stage", name); }
  function done() {
    stage("done");
    report.errors = window.__dipidErrors;
    var pre = document.createElement("pre");
    pre.id = "dipid-test-report";
    pre.style.display = "none";
    pre.textContent = JSON.stringify(report);
    document.body.appendChild(pre);
  }
  function fail(where, err) { report.failure = where + ": " + err; done(); }
  function fullTrace(index) {
    return gd._fullData.filter(function (t) { return t.index === index; })[0];
  }
  function plotted() {
    report.mainSvg = document.querySelectorAll(".main-svg").length;
    report.frames = gd._transitionData._frames.length;
    report.webgl = !!document.querySelector(".gl-container canvas");
    report.heatmapImage = !!document.querySelector(".heatmaplayer image");
    report.errorBox = !!document.getElementById("dipid-error");
    // What the frame slider does when moved to the last frame.
    Plotly.animate(gd, [P.last], {mode: "immediate", frame: {duration: 0, redraw: true}, transition: {duration: 0}})
      .then(function () { animated = true; }, function (err) { fail("animate", err); });
    stage("animating");
  }
  function moved() {
    var heat = fullTrace(P.heat);
    report.z = Number(heat.z[P.row][P.col]);
    report.peak = Number(heat.customdata[P.row][P.col]);
    Plotly.Fx.hover(gd, {xval: P.col, yval: P.row}, "xy");
    report.hoverLines = Array.prototype.map.call(
      document.querySelectorAll(".hoverlayer .hovertext tspan.line"), function (t) { return t.textContent; });
    var button = Array.prototype.filter.call(document.querySelectorAll(".updatemenu-button"),
      function (b) { return b.textContent.trim() === "TLM"; })[0];
    if (!button) { return fail("buttons", "no TLM button"); }
    button.dispatchEvent(new MouseEvent("click", {bubbles: true}));
    stage("clicked");
  }
  function visibleOutlines() {
    return P.outlines.filter(function (i) { return gd.data[i].visible === true; })
      .map(function (i) { return gd.data[i].name; });
  }
  // Every step waits on zero-delay messages, never on timers: under --virtual-time-budget an idle
  // page or a timer lets virtual time run out while the browser is still decompressing the figure
  // or waiting for an animation frame. Messages keep the page busy, so virtual time stands still
  // until the report is written.
  var channel = new MessageChannel();
  channel.port1.onmessage = function () {
    spins += 1;
    try {
      if (state === "loading") {
        gd = document.querySelector(".js-plotly-plot");
        var frames = gd && gd._transitionData && gd._transitionData._frames;
        var box = document.getElementById("dipid-error");
        if (box) { return fail("loading", box.textContent); }
        if (gd && gd._fullLayout && frames && frames.length >= P.frames) { plotted(); }
      } else if (state === "animating" && animated) {
        moved();
      } else if (state === "clicked" && visibleOutlines().indexOf("joint outlines") < 0) {
        report.visibleOutlines = visibleOutlines();
        return done();
      }
      if (state === "done") { return; }
      if (spins > 50000000) { return fail(state, "timed out"); }
      channel.port2.postMessage(null);
    } catch (err) {
      fail(state, err);
    }
  };
  stage("loading");
  channel.port2.postMessage(null);
})();
</script>"""


def chromium_or_skip() -> str:
    """Path of the Chromium binary; skips without one, and fails instead when CI is set."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = ("headless Chromium is not on PATH; the viewer's browser test needs Debian's `chromium` "
                   "package (apt-get install -y chromium)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _scan() -> tuple[np.ndarray, ScanResult, np.ndarray]:
    """(counts (F, H, W) int32, ScanResult with tlm/ssl/joint, 3D peak labels (F, H, W))."""
    rng = np.random.default_rng(11)
    rr, cc = np.mgrid[0:H, 0:W]
    counts = rng.poisson(2.0, size=(N_FRAMES, H, W)).astype(np.int32)
    counts[:, :, 70:73] = -1  # a module gap, as on the Pilatus
    peak_labels = np.zeros((N_FRAMES, H, W), np.int32)
    frames = {}
    for k in range(N_FRAMES):
        masks = []
        for peak_id, (row, col, radius, first) in enumerate(((20, 30 + 3 * k, 7, 0), (40, 110, 5, 2)), start=1):
            if k < first:
                continue
            mask = (rr - row) ** 2 + (cc - col) ** 2 <= radius**2
            profile = np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / (2 * (radius / 2) ** 2))
            counts[k][mask] += np.rint(3000 * peak_id * profile[mask]).astype(np.int32)
            peak_labels[k][mask] = peak_id
            masks.append(mask)
        stack = np.array(masks)
        joint = Instances.from_masks(stack, np.linspace(0.95, 0.7, len(masks)),
                                     SOURCE_FLAGS["tlm"] | SOURCE_FLAGS["ssl"])
        tlm = Instances.from_masks(stack[:1], [0.9], SOURCE_FLAGS["tlm"])
        ssl = Instances.from_masks(stack, np.ones(len(masks)), SOURCE_FLAGS["ssl"])
        frames[k] = ImageResult(frame=k, shape=(H, W), joint=joint, tlm=tlm,
                                ssl=SSLOutput(probability=None, mask=ssl.union_mask(), instances=ssl))
    result = ScanResult(frames=frames, axis_name="eta", axis_values=np.linspace(20.0, 20.4, N_FRAMES),
                        frame_shape=(H, W), scan_path="/data/browser_test.nxs")
    return counts, result, peak_labels


def _run_chromium(binary: str, page: Path, screenshot: Path, work: Path) -> str:
    """Load ``page`` headless; returns the DOM after the page settled, writes the screenshot."""
    for attempt in range(2):
        profile = work / f"profile{attempt}"
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--enable-unsafe-swiftshader",  # software WebGL for the 3D scene
                f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--window-size=1400,900",
                f"--screenshot={screenshot}", "--dump-dom", page.as_uri()]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # Chromium and its helpers share the session started above; end them all.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            continue
        if proc.returncode != 0:
            pytest.fail(f"chromium exited with {proc.returncode}:\n{err[-3000:]}")
        return out
    pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s, twice")


def _dom_tail(dom: str) -> str:
    """The end of the dumped DOM, with long base64 runs (plotly.js, the figure) cut out."""
    body = re.search(r"<body[^>]*>", dom)
    tail = re.sub(r"[A-Za-z0-9+/=]{200,}", "<data>", dom[-3000:])
    return f"{body.group(0) if body else '(no <body>)'}\n...\n{tail}"


def probed_viewer(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write the viewer of the test scan plus the probe; returns (page, counts, peak labels)."""
    counts, result, peak_labels = _scan()
    volumes = {m: result.label_volume(m) for m in ("tlm", "ssl", "joint")}
    fig = viz.build_viewer(counts, volumes, peak_label_volume=peak_labels, axis_name="eta",
                           axis_values=result.axis_values, title="browser test")
    viewer = viz.save_html(fig, tmp_path / "viewer.html", compress=True)
    heat = next(i for i, t in enumerate(fig.data) if t.type == "heatmap")
    outlines = [i for i, t in enumerate(fig.data) if (t.name or "").endswith(" outlines")]
    params = {"frames": N_FRAMES, "last": str(N_FRAMES - 1), "heat": heat, "row": 40, "col": 110,
              "outlines": outlines}
    page = viewer.read_text(encoding="utf-8")
    page = page.replace("<head>", "<head>" + ERROR_HOOK, 1)
    page = page[: page.rindex("</body>")] + PROBE.replace("__PARAMS__", json.dumps(params)) + "</body></html>\n"
    probed = tmp_path / "probed.html"
    probed.write_text(page, encoding="utf-8")
    return probed, counts, peak_labels


def test_viewer_renders_and_responds_in_chromium(tmp_path: Path):
    chromium = chromium_or_skip()
    page, counts, peak_labels = probed_viewer(tmp_path)
    screenshot = tmp_path / "viewer.png"
    dom = _run_chromium(chromium, page, screenshot, tmp_path)
    found = re.search(r'<pre id="dipid-test-report"[^>]*>(.*?)</pre>', dom, re.S)
    assert found, "the probe never reported (the page did not finish loading); DOM tail:\n" + _dom_tail(dom)
    report = json.loads(html.unescape(found.group(1)))

    assert report.get("failure") is None, report
    assert report["errors"] == [], report["errors"]
    assert not report["errorBox"]
    assert report["mainSvg"] >= 1 and report["heatmapImage"], "plotly drew the 2D panel"
    assert report["webgl"], "plotly drew the 3D scene"
    assert report["frames"] == N_FRAMES
    # After the slider moved to the last frame, the image holds that frame's counts and peak ids.
    last, row, col = N_FRAMES - 1, 40, 110
    assert report["z"] == counts[last, row, col]
    assert report["peak"] == peak_labels[last, row, col] == 2
    # Hovering that pixel shows its counts and its 3D peak.
    assert f"counts {counts[last, row, col]}" in report["hoverLines"], report["hoverLines"]
    assert any(line.startswith("3D peak 2") for line in report["hoverLines"]), report["hoverLines"]
    # The TLM button left only the TLM outlines visible.
    assert set(report["visibleOutlines"]) == {"TLM outlines"}

    assert screenshot.exists(), "chromium wrote no screenshot"
    image = np.asarray(Image.open(screenshot).convert("RGB"))
    assert image.shape == (900, 1400, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100, "the screenshot is (nearly) blank"
    left = image[:, : int(0.42 * 1400)].reshape(-1, 3)
    assert (left.std(axis=0) > 5).any(), "the 3D panel is blank"
    first_peak = tuple(int(viz.PALETTE[0][i:i + 2], 16) for i in (1, 3, 5))
    assert (image.reshape(-1, 3) == first_peak).all(axis=1).sum() > 50, "peak 1's colour (table cell) is missing"
