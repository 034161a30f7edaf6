"""The NeXus results file: written atomically, readable by nexusformat and read_results_nexus."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dipid.errors import NotHDF5Error, ScanError, ScanFileNotFoundError
from dipid.io import results_nexus
from dipid.io.results_nexus import read_results_nexus, write_results_nexus
from dipid.results import SOURCE_FLAGS, ImageResult, Instances, ScanResult, SSLOutput
from dipid.volume import scan_peaks

H, W = 20, 32
AXIS = np.linspace(0.10, 0.50, 9)  # the whole scan: 9 frames


def _result() -> tuple[ScanResult, np.ndarray]:
    """Frames 2..6 of a 9-frame hkl_l scan: one peak seen by TLM and SSL, one by SSL only."""
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, (5, H, W)).astype(np.float32)
    frames = {}
    for k, frame in enumerate(range(2, 7)):
        big = np.zeros((1, H, W), bool)
        big[0, 4:9, 5:11] = True
        small = np.zeros((1, H, W), bool)
        small[0, 14:17, 24:27] = True
        counts[k][big[0]] += 50.0
        counts[k][small[0]] += 20.0
        tlm = Instances.from_masks(big, [0.8 + 0.02 * k], SOURCE_FLAGS["tlm"])
        ssl_inst = Instances.from_masks(np.concatenate([big, small]), [0.7, 0.6], SOURCE_FLAGS["ssl"])
        joint = Instances.from_masks(
            np.concatenate([big, small]), [0.8 + 0.02 * k, 0.6],
            [SOURCE_FLAGS["tlm"] | SOURCE_FLAGS["ssl"], SOURCE_FLAGS["ssl"]],
        )
        frames[frame] = ImageResult(
            frame=frame, shape=(H, W), joint=joint, tlm=tlm,
            ssl=SSLOutput(probability=None, mask=ssl_inst.union_mask(), instances=ssl_inst),
        )
    result = ScanResult(
        frames=frames, axis_name="hkl_l", axis_values=AXIS, frame_shape=(H, W), scan_path="/data/1040323.nxs",
        metadata={
            "scan": {"title": "scan hkl [0 0 0.1] [0 0 0.5] [0 0 0.05]", "n_frames": 9},
            "models": ["tlm", "ssl"],
            "parameters": {"threshold": 0.4, "min_area": 4, "use_nms": False, "device": "cpu",
                           "weights": {"tlm": {"path": "weights/tlm.safetensors", "sha256": "ab" * 32}}},
        },
    )
    return result, counts


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    result, counts = _result()
    peaks = scan_peaks(result, counts)
    path = tmp_path_factory.mktemp("nx") / "out" / "1040323_dipid.nxs"
    returned = write_results_nexus(
        path, result, peaks=peaks, software_version="9.9.9", weights_sha256={"tlm": "ab" * 32, "sslm": "cd" * 32},
        parameters={**result.metadata["parameters"], "max_gap": 1, "out": path.parent},
    )
    return returned, result, peaks


def test_written_file_opens_in_nexusformat_with_classes_signal_and_axes(written):
    from nexusformat.nexus import nxload

    path, result, peaks = written
    assert path.is_file()
    root = nxload(str(path))
    try:
        entry = root["entry"]
        assert entry.nxclass == "NXentry" and entry.attrs["default"] == "results"
        assert entry["process"].nxclass == "NXprocess"
        assert str(entry["process/program"].nxvalue) == "dipid"
        assert str(entry["process/version"].nxvalue) == "9.9.9"
        data = entry["results"]
        assert data.nxclass == "NXdata"
        assert data.nxsignal.nxname == "peak_labels"
        assert data.nxsignal.shape == (5, H, W) and data.nxsignal.dtype == np.int32
        assert [str(a) for a in data.attrs["axes"]] == ["hkl_l", ".", "."]
        np.testing.assert_allclose(data["hkl_l"].nxvalue, AXIS[2:7])
        np.testing.assert_array_equal(data["frame"].nxvalue, np.arange(2, 7))
        np.testing.assert_array_equal(data.nxsignal.nxvalue, peaks.labels)
        # one NXdata of per-frame instance labels per model present
        for model in ("tlm", "ssl", "joint"):
            masks = entry[f"{model}_masks"]
            assert masks.nxclass == "NXdata" and masks.nxsignal.nxname == "instance_labels"
            np.testing.assert_array_equal(masks.nxsignal.nxvalue, result.label_volume(model))
        assert "classical_masks" not in entry
        table = entry["peaks"]
        assert table.nxsignal.nxname == "intensity"
        np.testing.assert_allclose(table["intensity"].nxvalue, peaks.table["intensity"])
        assert [str(m) for m in table["models"].nxvalue] == peaks.table["models"]
        assert entry["instances"].nxclass == "NXcollection"
    finally:
        root.nxfile.close()


def test_volumes_are_compressed_per_frame_and_strings_are_utf8(written):
    path, _, _ = written
    with h5py.File(path, "r") as h5:
        labels = h5["entry/results/peak_labels"]
        assert labels.compression == "gzip" and labels.chunks == (1, H, W)
        assert h5["entry/joint_masks/instance_labels"].chunks == (1, H, W)
        models = h5["entry/peaks/models"]
        assert h5py.check_string_dtype(models.dtype).encoding == "utf-8"
        assert h5["entry/process/weights/tlm"].asstr()[()] == "ab" * 32
        assert h5["entry/process/parameters/threshold"][()] == pytest.approx(0.4)
        assert h5["entry/process/parameters/device"].asstr()[()] == "cpu"


def test_read_results_nexus_round_trip(written):
    path, result, peaks = written
    back = read_results_nexus(path)
    assert back.axis_name == "hkl_l"
    np.testing.assert_allclose(back.axis_values, AXIS[2:7])
    np.testing.assert_array_equal(back.frame_numbers, np.arange(2, 7))
    np.testing.assert_array_equal(back.peak_labels, peaks.labels)
    assert back.frame_shape == (H, W)
    assert list(back.peaks) == list(peaks.table)
    for name, values in peaks.table.items():
        if isinstance(values, list):
            assert back.peaks[name] == values
        else:
            np.testing.assert_allclose(back.peaks[name], values)
    assert set(back.model_labels) == {"tlm", "ssl", "joint"}
    np.testing.assert_array_equal(back.model_labels["ssl"], result.label_volume("ssl"))
    # every parameter comes back exactly, nested values included
    assert back.parameters["threshold"] == 0.4 and back.parameters["use_nms"] is False
    assert back.parameters["weights"]["tlm"]["sha256"] == "ab" * 32
    assert back.parameters["out"] == str(path.parent)
    assert back.models == ["tlm", "ssl"]
    assert back.weights_sha256 == {"tlm": "ab" * 32, "sslm": "cd" * 32}
    assert back.software_version == "9.9.9" and back.source_scan == "/data/1040323.nxs"
    assert back.scan_metadata["n_frames"] == 9
    # the instance table: 1 tlm + 2 ssl + 2 joint instances in each of 5 frames
    inst = back.instances
    assert len(inst["frame"]) == 25
    assert inst["model"].count("joint") == 10 and inst["model"].count("tlm") == 5
    joint_rows = [i for i, m in enumerate(inst["model"]) if m == "joint"]
    assert {inst["source"][i] for i in joint_rows} == {"tlm+ssl", "ssl"}
    # joint instances name the 3D peak they belong to, as in the label volume
    for i in joint_rows:
        k = int(inst["frame"][i]) - 2
        instance_pixels = result.label_volume("joint")[k] == inst["instance"][i]
        assert set(np.unique(peaks.labels[k][instance_pixels])) == {inst["peak"][i]}
    assert {inst["peak"][i] for i in joint_rows} == {1, 2}


def test_defaults_link_peaks_without_a_table(tmp_path):
    result, _ = _result()
    path = write_results_nexus(tmp_path / "bare.nxs", result)
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's private 0600
    back = read_results_nexus(path)
    assert back.peaks == {}
    assert len(np.unique(back.peak_labels[back.peak_labels > 0])) == 2
    assert back.weights_sha256 == {"tlm": "ab" * 32}  # taken from the result's parameters
    assert back.parameters["min_area"] == 4 and back.models == ["tlm", "ssl"]
    with pytest.raises(ValueError, match="peak_labels"):
        write_results_nexus(tmp_path / "wrong.nxs", result, peak_labels=np.zeros((2, H, W), np.int32))
    assert not (tmp_path / "wrong.nxs").exists()


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    result, counts = _result()
    peaks = scan_peaks(result, counts)
    destination = tmp_path / "result.nxs"

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(results_nexus, "_write_instances", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_results_nexus(destination, result, peaks=peaks)
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed rewrite untouched
    monkeypatch.undo()
    write_results_nexus(destination, result, peaks=peaks, software_version="1.0")
    before = destination.read_bytes()
    monkeypatch.setattr(results_nexus, "_write_instances", fail)
    with pytest.raises(RuntimeError):
        write_results_nexus(destination, result, peaks=peaks, software_version="2.0")
    assert destination.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.nxs"]
    assert read_results_nexus(destination).software_version == "1.0"


def test_read_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(ScanFileNotFoundError, match="missing.nxs"):
        read_results_nexus(tmp_path / "missing.nxs")
    text = tmp_path / "notes.nxs"
    text.write_text("not hdf5")
    with pytest.raises(NotHDF5Error, match="notes.nxs"):
        read_results_nexus(text)
    other = tmp_path / "scan.nxs"
    with h5py.File(other, "w") as h5:
        h5.create_group("entry")
    with pytest.raises(ScanError, match=r"scan.nxs \[/entry/results/peak_labels\].*dipid predict"):
        read_results_nexus(other)


def test_peak_of_instances_matches_the_whole_frame_maximum():
    """The box-local lookup gives what scipy's labelled maximum over the whole frame gives, overlaps included."""
    from scipy import ndimage

    from dipid.io.results_nexus import _peak_of_instances
    from dipid.results import Instances

    rng = np.random.default_rng(4)
    shape = (40, 60)
    peak_labels = np.zeros(shape, np.int32)
    peak_labels[5:20, 10:30] = 3
    peak_labels[22:35, 35:55] = 7
    masks = np.zeros((5, *shape), bool)
    masks[0, 8:18, 12:25] = True    # inside peak 3
    masks[1, 25:30, 40:50] = True   # inside peak 7
    masks[2, 10:12, 14:16] = True   # entirely under instance 0: loses every pixel -> 0
    masks[3, 1:4, 1:4] = True       # outside every peak -> 0
    masks[4, 15:25, 25:40] = True   # spans both peaks: the larger id
    inst = Instances.from_masks(masks, rng.random(5).astype(np.float32), 1)
    labels = inst.label_image()
    expected = np.nan_to_num(np.asarray(ndimage.maximum(peak_labels, labels, np.arange(1, len(inst) + 1)), float))
    assert _peak_of_instances(peak_labels, labels, inst.boxes) == [int(v) for v in expected]
    assert [int(v) for v in expected][2:4] == [0, 0] and int(expected[4]) == 7


# ------------------------------------------------------------------------------ ScanResult round trip


def _overlapping_result() -> tuple[ScanResult, np.ndarray]:
    """Frames 1, 2, 4 of a 6-frame eta scan with every model: TLM instances overlap (a label image
    loses the shared pixels), the SSLM mask holds a component too small to be an instance, and the
    classical finder ran on the held frames only partly."""
    rng = np.random.default_rng(8)
    counts = rng.poisson(2.0, (3, H, W)).astype(np.float32)
    frames = {}
    for k, frame in enumerate((1, 2, 4)):
        masks = np.zeros((3, H, W), bool)
        masks[0, 3:9, 4:12] = True
        masks[1, 6:12, 9:15] = True  # overlaps instance 0
        masks[2, 14:18, 20 + k:26 + k] = True
        masks[2, 15, 19 + k] = True  # a ragged edge: masks are not boxes
        counts[k][masks.any(axis=0)] += 40.0
        tlm = Instances.from_masks(masks, [0.9, 0.7 - 0.1 * k, 0.55], SOURCE_FLAGS["tlm"])
        ssl_inst = Instances.from_masks(masks[2:], [0.61], SOURCE_FLAGS["ssl"])
        ssl_mask = ssl_inst.union_mask()
        ssl_mask[0, 0] = True  # below min_area: in the segmentation, not an instance
        tlm_flag, ssl_flag = SOURCE_FLAGS["tlm"], SOURCE_FLAGS["ssl"]
        joint = Instances.from_masks(masks, [0.95, 0.72, 0.8], [tlm_flag, tlm_flag, tlm_flag | ssl_flag])
        classical = Instances.from_masks(masks[:1], [0.5], SOURCE_FLAGS["classical"])
        frames[frame] = ImageResult(
            frame=frame, shape=(H, W), joint=joint, tlm=tlm, classical=classical,
            ssl=SSLOutput(probability=None, mask=ssl_mask, instances=ssl_inst),
        )
    result = ScanResult(
        frames=frames, axis_name="eta", axis_values=np.array([10.0, 10.1, 10.2, 10.3, 10.4, 10.5]),
        frame_shape=(H, W), scan_path="/data/9000.nxs",
        metadata={"scan": {"title": "scan eta 10 10.5 0.1", "n_frames": 6}, "models": ["tlm", "ssl", "classical"],
                  "parameters": {"threshold": 0.5, "tile": None, "weights": {"tlm": {"sha256": "ef" * 32}}},
                  "note": "kept"},
    )
    return result, counts


def _assert_same_instances(a: Instances, b: Instances) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert len(a.crops) == len(b.crops)
    for x, y in zip(a.crops, b.crops):
        assert x.dtype == y.dtype == bool
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.scores.dtype == b.scores.dtype == np.float32
    np.testing.assert_array_equal(a.sources, b.sources)


def test_scan_result_round_trips_through_its_nexus_file(tmp_path):
    result, counts = _overlapping_result()
    tlm = result[1].tlm
    assert np.count_nonzero(result.label_volume("tlm")[0] == 2) < tlm.areas[1], "the label image loses pixels"
    path = result.to_nexus(tmp_path / "9000_dipid.nxs", peaks=result.peaks(counts))
    back = ScanResult.from_nexus(path)
    assert isinstance(back, ScanResult)
    np.testing.assert_array_equal(back.frame_numbers, [1, 2, 4])
    assert back.frame_shape == (H, W) and back.axis_name == "eta" and back.scan_path == "/data/9000.nxs"
    np.testing.assert_array_equal(back.axis_values, result.axis_values)  # the whole scan's, not only the held
    assert back.metadata == result.metadata
    assert back.models_present() == result.models_present() == ["tlm", "ssl", "joint", "classical"]
    for f in result.frame_numbers:
        assert back[f].frame == f and back[f].shape == (H, W)
        for model in result.models_present():
            _assert_same_instances(back[f].instances(model), result[f].instances(model))
        np.testing.assert_array_equal(back[f].ssl.mask, result[f].ssl.mask)
        assert back[f].ssl.probability is None
    # the same file again from the read-back result: the round trip is stable
    again = ScanResult.from_nexus(back.to_nexus(tmp_path / "again.nxs", peaks=back.peaks(counts)))
    for f in result.frame_numbers:
        _assert_same_instances(again[f].joint, result[f].joint)


def test_results_files_written_before_exact_masks_still_load(tmp_path):
    """Older files lack instance_masks, process/scan_axis, process/result_metadata and the SSLM
    segmentation (the rest of the layout is unchanged): removing them gives such a file."""
    result, counts = _overlapping_result()
    path = write_results_nexus(tmp_path / "old.nxs", result, peaks=scan_peaks(result, counts),
                               parameters={"threshold": 0.5, "min_frames": 1})
    with h5py.File(path, "r+") as h5:
        for name in ("entry/instance_masks", "entry/process/scan_axis", "entry/process/result_metadata",
                     "entry/ssl_masks/segmentation"):
            del h5[name]
    old = read_results_nexus(path)
    assert old.instance_crops is None and old.scan_axis_values is None and old.result_metadata is None
    back = ScanResult.from_nexus(path)
    np.testing.assert_array_equal(back.frame_numbers, [1, 2, 4])
    # only the held frames' axis values are known
    np.testing.assert_array_equal(back.axis_values[[1, 2, 4]], result.axis_values[[1, 2, 4]])
    assert np.isnan(back.axis_values[[0, 3]]).all() and len(back.axis_values) == 5
    assert back.metadata == {"scan": result.metadata["scan"], "models": ["tlm", "ssl", "classical"],
                             "parameters": {"threshold": 0.5, "min_frames": 1}}
    for f in result.frame_numbers:
        for model in ("ssl", "classical"):  # no overlaps: exact from the label images
            _assert_same_instances(back[f].instances(model), result[f].instances(model))
        for model in ("tlm", "joint"):  # instance 1 lost the pixels it shares with instance 0
            got, want = back[f].instances(model), result[f].instances(model)
            np.testing.assert_array_equal(got.boxes, want.boxes)
            np.testing.assert_array_equal(got.scores, want.scores)
            np.testing.assert_array_equal(got.sources, want.sources)
            kept = want.label_image() == np.arange(1, 4)[:, None, None]
            np.testing.assert_array_equal(got.masks, want.masks & kept)
            assert got.areas[1] < want.areas[1]
        np.testing.assert_array_equal(back[f].ssl.mask, result[f].ssl.instances.union_mask())


def test_lazy_and_whole_peak_labels_write_the_same_volumes(tmp_path):
    """Volumes are written a frame at a time from the instances; the file is that of the whole arrays."""
    import dataclasses

    from dipid.results import FrameStack

    result, counts = _result()
    peaks = scan_peaks(result, counts)
    assert isinstance(peaks.label_frames, FrameStack)
    lazy = write_results_nexus(tmp_path / "lazy.nxs", result, peaks=peaks)
    dense = dataclasses.replace(peaks, label_frames=peaks.labels)  # the same peaks, as one array
    assert isinstance(dense.label_frames, np.ndarray)
    whole = write_results_nexus(tmp_path / "whole.nxs", result, peaks=dense)
    with h5py.File(lazy) as a, h5py.File(whole) as b:
        for name in ("results/peak_labels", "joint_masks/instance_labels", "ssl_masks/segmentation",
                     "instances/peak", "instances/frame"):
            np.testing.assert_array_equal(a[f"entry/{name}"][()], b[f"entry/{name}"][()], err_msg=name)
            assert a[f"entry/{name}"].chunks == b[f"entry/{name}"].chunks
        np.testing.assert_array_equal(a["entry/joint_masks/instance_labels"][()], result.label_volume("joint"))
