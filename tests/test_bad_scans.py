"""Degenerate scans get an answer, not silence: nothing measurable or nothing written is an error
(one line from the CLI, exit 2, no output left behind); NaN pixels, empty frames, a scan axis of
the wrong length and a partly written scan are processed, with a warning that gives the counts."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_io import H, SATURATION, W, make_frames

from dipid import cli
from dipid.cli import main
from dipid.errors import (
    BadPixelWarning,
    DetectorDataNotFoundError,
    DipidError,
    EmptyScanError,
    NoValidPixelsError,
    NotHDF5Error,
    PartialScanWarning,
    ScanAxisWarning,
    ScanFileNotFoundError,
    ScanWarning,
)
from dipid.io import open_scan
from dipid.io import scan as scan_module
from dipid.io.results_nexus import read_results_nexus
from dipid.pipeline import PredictOptions, output_paths, process_scan

DATA = "/entry/instrument/pil3_100k/data"  # a Pilatus: saturated at 1e6 counts unless the file says otherwise


# --------------------------------------------------------------------------- helpers


def write_scan(path: Path, frames: np.ndarray | None = None, *, declared: tuple[int, ...] | None = None,
               dtype=np.int32, chunks: tuple[int, ...] | None = (1, H, W), compression: str | None = None,
               written: dict[int, np.ndarray] | None = None) -> Path:
    """An HDF5 file with detector data at DATA: ``frames`` written whole, or a dataset declared with
    shape ``declared`` of which only the frames in ``written`` (frame -> (H, W)) are stored."""
    with h5py.File(path, "w") as f:
        if frames is not None:
            f.create_dataset(DATA, data=frames, chunks=chunks, compression=compression)
        else:
            ds = f.create_dataset(DATA, shape=declared, dtype=dtype, chunks=chunks, compression=compression)
            for i, frame in (written or {}).items():
                ds[i] = frame
    return path


def stream(scan) -> list:
    """Read every frame as predict_scan does, then ask the scan what it saw."""
    batches = list(scan.iter_frames(batch=4))
    scan.check_frames()
    return batches


def predict(scan_path: Path, out: Path, capsys) -> tuple[int, list[str], str]:
    """`dipid predict --model classical` in-process: (exit code, stderr lines from dipid, all of stderr)."""
    rc = main(["predict", str(scan_path), "--out", str(out), "--model", "classical", "--no-viewer"])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("dipid:")]
    return rc, lines, err


def assert_one_error_line(rc: int, lines: list[str], err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("dipid: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# --------------------------------------------------------------------------- nothing measurable: errors

ALL_BAD = {
    "nan": (np.full((3, H, W), np.nan, np.float32), "every pixel is NaN or infinite"),
    "dead": (np.full((3, H, W), -2, np.int32), "every pixel is negative (dead or gap pixels)"),
    "saturated": (np.full((3, H, W), SATURATION + 5, np.int32), f"every pixel is at or above the saturation value {SATURATION}"),
}


@pytest.mark.parametrize("kind", sorted(ALL_BAD))
def test_no_measurable_pixel_is_an_error(kind: str, tmp_path: Path, capsys):
    frames, why = ALL_BAD[kind]
    path = write_scan(tmp_path / f"all_{kind}.h5", frames)
    with open_scan(path) as scan:  # opening is fine: the verdict needs the frames
        with pytest.raises(NoValidPixelsError) as info:
            stream(scan)
    message = str(info.value)
    assert f"all_{kind}.h5" in message and DATA in message and why in message and "3 frames" in message
    assert info.value.path_in_file == DATA and info.value.file.name == f"all_{kind}.h5"

    out = tmp_path / "out"
    rc, lines, err = predict(path, out, capsys)
    assert_one_error_line(rc, lines, err, f"all_{kind}.h5", DATA, why)
    assert_nothing_written(out)


def test_mixed_bad_pixels_name_each_cause(tmp_path: Path):
    frames = np.full((2, H, W), SATURATION, np.float32)
    frames[:, :10] = np.nan
    frames[:, 10:12] = -1
    with open_scan(write_scan(tmp_path / "mixed.h5", frames)) as scan:
        with pytest.raises(NoValidPixelsError) as info:
            stream(scan)
    message = str(info.value)
    assert f"{2 * 10 * W} NaN or infinite" in message
    assert f"{2 * 2 * W} negative" in message
    assert f"{2 * (H - 12) * W} at or above the saturation value" in message


# --------------------------------------------------------------------------- bad pixels: warnings


def test_nan_and_inf_pixels_are_bad_pixels_with_a_warning(tmp_path: Path, capsys):
    frames = make_frames(6).astype(np.float32)
    frames[1, 50:55, 100:104] = np.nan  # 20
    frames[3, 7, 8] = np.inf
    frames[4, 9, 9] = -np.inf
    path = write_scan(tmp_path / "some_nan.h5", frames)
    with open_scan(path) as scan:
        with pytest.warns(BadPixelWarning) as record:
            batches = stream(scan)
    filled = np.concatenate([b.frames for b in batches])
    bad = np.concatenate([b.bad_pixels for b in batches])
    assert np.isfinite(filled).all()
    assert bad[1, 50:55, 100:104].all() and bad[3, 7, 8] and bad[4, 9, 9]
    assert not bad[2, 50:55, 100:104].any()  # a NaN in one frame is not a bad pixel of the others
    text = " ".join(str(w.message) for w in record)
    assert "22 pixel(s) are NaN or infinite, in 3 of 6 frames (frames 1, 3, 4)" in text
    assert "some_nan.h5" in text and DATA in text
    assert scan.warnings and all(isinstance(w, BadPixelWarning) for w in scan.warnings)

    out = tmp_path / "out"
    rc, lines, err = predict(path, out, capsys)
    assert rc == 0, err
    assert lines == [f"dipid: warning: {scan.warnings[0]}"]
    assert output_paths(path, out)["nexus"].is_file()


def test_all_zero_frames_warn(tmp_path: Path, capsys):
    frames = make_frames(6)
    frames[[2, 4]] = 0
    path = write_scan(tmp_path / "zeros.h5", frames)
    with open_scan(path) as scan, pytest.warns(BadPixelWarning, match=r"2 of 6 frames are all zero \(frames 2, 4\)"):
        stream(scan)
    rc, lines, err = predict(path, tmp_path / "out", capsys)
    assert rc == 0, err
    assert len(lines) == 1 and lines[0].startswith("dipid: warning:") and "zeros.h5" in lines[0] and "2 of 6" in lines[0]


def test_a_first_frame_with_no_good_pixel_does_not_blank_the_scan(tmp_path: Path):
    """The static mask comes from the first frame; an all-NaN first frame must not mask every frame."""
    frames = make_frames(4).astype(np.float32)
    frames[0] = np.nan
    with open_scan(write_scan(tmp_path / "first_nan.h5", frames)) as scan:
        assert not scan.bad_pixel_mask.all()
        with pytest.warns(BadPixelWarning) as record:
            batches = stream(scan)
        filled = np.concatenate([b.frames for b in batches])
    assert (filled[0] == 0).all()  # nothing to fill it from
    good = frames[1] >= 0
    np.testing.assert_array_equal(filled[1][good], frames[1][good])  # the other frames are untouched
    assert any("1 of 4 frames have no good pixel (frame 0): every pixel is NaN or infinite" in str(w.message)
               for w in record)


# --------------------------------------------------------------------------- scan axis


def write_nxdata_scan(path: Path, frames: np.ndarray, axis_values: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs.update({"NX_class": "NXentry", "default": "plot"})
        plot = entry.create_group("plot")
        plot.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": ["eta", ".", "."]})
        plot.create_dataset("data", data=frames, chunks=(1, H, W))
        plot["eta"] = axis_values
    return path


def test_axis_of_wrong_length_falls_back_to_frame_numbers(tmp_path: Path, capsys):
    path = write_nxdata_scan(tmp_path / "axis.nxs", make_frames(6), np.linspace(10, 11, 4))
    with open_scan(path) as scan:
        with pytest.warns(ScanAxisWarning) as record:
            axis = scan.axis
    assert axis.name == "frame"
    np.testing.assert_array_equal(axis.values, np.arange(6.0))
    message = str(record[0].message)
    assert "axis.nxs" in message and "/entry/plot/eta" in message and "4 values" in message and "6 frames" in message

    out = tmp_path / "out"
    rc, lines, err = predict(path, out, capsys)
    assert rc == 0, err
    assert lines == [f"dipid: warning: {message}"]
    assert read_results_nexus(output_paths(path, out)["nexus"]).axis_name == "frame"


def test_axis_of_right_length_gives_no_warning(tmp_path: Path):
    path = write_nxdata_scan(tmp_path / "fine.nxs", make_frames(6), np.linspace(10, 11, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScanWarning)  # any scan warning fails the test
        with open_scan(path) as scan:
            assert scan.axis.name == "eta"
            stream(scan)
            assert scan.warnings == []


# --------------------------------------------------------------------------- frames never written


def test_dataset_never_written_is_an_error_without_reading_it(tmp_path: Path, capsys, monkeypatch):
    plain = write_scan(tmp_path / "aborted.h5", declared=(10_000, H, W))
    gzip = write_scan(tmp_path / "aborted_gzip.h5", declared=(10_000, H, W), compression="gzip")
    contiguous = write_scan(tmp_path / "aborted_contiguous.h5", declared=(500, H, W), chunks=None)
    assert plain.stat().st_size < 100_000  # the premise: unwritten chunks take no space

    def never(self, start, stop):
        raise AssertionError("frames were read")

    with monkeypatch.context() as m:
        m.setattr(scan_module._HDF5Frames, "read", never)
        for path, declared in ((plain, 10_000), (gzip, 10_000), (contiguous, 500)):
            with pytest.raises(EmptyScanError) as info:
                open_scan(path)
            message = str(info.value)
            assert path.name in message and DATA in message
            assert f"declared as {declared} frames of {H}x{W} int32 but no frame was ever written" in message

    out = tmp_path / "out"
    rc, lines, err = predict(plain, out, capsys)
    assert_one_error_line(rc, lines, err, "aborted.h5", DATA, "no frame was ever written")
    assert_nothing_written(out)


def test_partly_written_scan_processes_the_written_frames(tmp_path: Path, capsys):
    frames = make_frames(5)
    path = write_scan(tmp_path / "partial.h5", declared=(10_000, H, W), compression="gzip",
                      written={i: frames[i] for i in range(5)})
    with pytest.warns(PartialScanWarning) as record:
        scan = open_scan(path)
    with scan:
        assert len(scan) == 5 and scan.shape == (5, H, W)
        np.testing.assert_array_equal(scan.read_raw(), frames)
        np.testing.assert_array_equal(scan.axis.values, np.arange(5.0))
    message = str(record[0].message)
    assert "partial.h5" in message and DATA in message
    assert "only 5 of the 10000 declared frames were written" in message and "9995" in message

    out = tmp_path / "out"
    rc, lines, err = predict(path, out, capsys)
    assert rc == 0, err
    assert lines == [f"dipid: warning: {message}"]
    assert read_results_nexus(output_paths(path, out)["nexus"]).peak_labels.shape == (5, H, W)


def test_partly_written_scan_with_holes_and_a_full_length_axis(tmp_path: Path):
    frames = make_frames(12)
    path = tmp_path / "holes.nxs"
    write_nxdata_scan(path, frames, np.linspace(10, 11, 12))
    with h5py.File(path, "a") as f:  # the same layout, but the frames' dataset only partly written
        del f["entry/plot/data"]
        ds = f["entry/plot"].create_dataset("data", shape=(12, H, W), dtype=np.int32, chunks=(1, H, W), fillvalue=-7)
        for i in (0, 1, 2, 3, 4, 8):
            ds[i] = frames[i]
    with pytest.warns(PartialScanWarning) as record:
        scan = open_scan(path)
    with scan:
        assert len(scan) == 9
        np.testing.assert_allclose(scan.axis.values, np.linspace(10, 11, 12)[:9])  # cut, no axis warning
        assert scan.read_raw(5, 6).min() == -7
    assert not [w for w in scan.warnings if isinstance(w, ScanAxisWarning)]
    message = str(record[0].message)
    assert "only 6 of the 12 declared frames were written" in message
    assert "3 frame(s) among 0..8 were never written (frames 5, 6, 7)" in message and "fill value -7" in message


def test_compressed_complete_scan_is_not_mistaken_for_unwritten(tmp_path: Path):
    """Compressed storage is far smaller than the declared size; every chunk is there, so no warning."""
    path = write_scan(tmp_path / "zeros_gzip.h5", np.zeros((200, H, W), np.int32), compression="gzip")
    with h5py.File(path) as f:
        ds = f[DATA]
        assert ds.id.get_storage_size() < ds.size * ds.dtype.itemsize / 100
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialScanWarning)
        with open_scan(path) as scan:
            assert len(scan) == 200 and scan.warnings == []


# --------------------------------------------------------------------------- already handled, same answer


def test_unreadable_scans_are_one_error_line_and_exit_2(tmp_path: Path, capsys):
    not_hdf5 = tmp_path / "notes.nxs"
    not_hdf5.write_text("hello")
    no_detector = tmp_path / "nothing.h5"
    with h5py.File(no_detector, "w") as f:
        f["entry/rc"] = np.arange(5.0)
    cases = [(tmp_path / "missing.nxs", ScanFileNotFoundError, "not found"),
             (not_hdf5, NotHDF5Error, "notes.nxs"),
             (no_detector, DetectorDataNotFoundError, "no 3D numeric dataset")]
    for path, error, words in cases:
        with pytest.raises(error, match=words):
            open_scan(path)
        out = tmp_path / f"out_{path.stem}"
        rc, lines, err = predict(path, out, capsys)
        assert_one_error_line(rc, lines, err, path.name, words)
        assert_nothing_written(out)


def test_failed_scan_leaves_no_outputs(tmp_path: Path, monkeypatch):
    """A failure after the peak table and viewer were written removes them: no half set of results."""
    import dipid.pipeline as pipeline

    path = write_scan(tmp_path / "fine.h5", make_frames(4))

    def fail(*args, **kwargs):
        raise DipidError("disk full, say")

    monkeypatch.setattr(pipeline, "write_results_nexus", fail)  # the name process_scan calls
    out = tmp_path / "out"
    summary = process_scan(path, out, PredictOptions(model="classical"))
    assert summary.status == "failed" and summary.bad_input and "disk full" in summary.error
    assert_nothing_written(out)


def test_cli_prints_warnings_on_one_line(tmp_path: Path, capsys, monkeypatch):
    """Any command: a dipid warning is one `dipid: warning:` line, not Python's two-line format."""
    def simulate(args):
        warnings.warn(PartialScanWarning("only 3 of the 9 declared frames were written", file=tmp_path / "x.nxs",
                                         path_in_file=DATA))
        return 0

    monkeypatch.setattr(cli, "cmd_simulate", simulate)
    assert main(["simulate", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"dipid: warning: {tmp_path / 'x.nxs'} [{DATA}]: only 3 of the 9 declared frames were written"]
