"""JointPredictor end to end with randomly initialised models on simulated scans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dipid.errors import UnknownNameError, WeightsNotFoundError
from dipid.models import build_sslm, build_tlm, save_checkpoint
from dipid.predict import JointPredictor, PredictorSettings
from dipid.results import Instances
from dipid.synth import simulate_scan


@pytest.fixture(scope="module")
def predictor() -> JointPredictor:
    torch.manual_seed(0)
    return JointPredictor(tlm=build_tlm(), sslm=build_sslm(), device="cpu")


@pytest.fixture(scope="module")
def sim_scan(tmp_path_factory):
    sim = simulate_scan(n_frames=6, preset="realistic", seed=3)
    files = sim.write(tmp_path_factory.mktemp("scan"), "sim_e2e")
    return sim, files


def test_predict_scan_shapes_every_frame(predictor, sim_scan):
    sim, files = sim_scan
    result = predictor.predict_scan(files.nexus, batch_size=4, models=("joint", "classical"))
    n, h, w = sim.frames.shape
    assert len(result) == n
    assert result.frame_numbers.tolist() == list(range(n))
    assert result.axis_name == "eta" and result.axis_values.shape == (n,)
    for frame in result:
        assert frame.shape == (h, w)
        for model in ("tlm", "ssl", "joint", "classical"):
            inst = frame.instances(model)
            assert inst.shape == (h, w)
            assert inst.masks.shape == (len(inst), h, w)
            assert inst.scores.dtype == np.float32 and inst.boxes.shape == (len(inst), 4)
            assert np.all((inst.scores >= 0) & (inst.scores <= 1))
            assert np.all(inst.areas >= predictor.settings.min_area)
        assert frame.ssl.mask.shape == (h, w) and frame.ssl.mask.dtype == bool
        assert frame.bad_pixels.shape == (h, w)
    for model in ("tlm", "ssl", "joint"):
        vol = result.volume(model)
        assert vol.shape == (n, h, w) and vol.dtype == bool
        # the volume stacks exactly the per-frame unions
        for k, f in enumerate(result.frame_numbers):
            np.testing.assert_array_equal(vol[k], result[f].instances(model).union_mask())


def test_predict_scan_range_and_one_image(predictor, sim_scan):
    sim, files = sim_scan
    part = predictor.predict_scan(files.nexus, start_val=2, end_val=5, models="tlm")
    assert part.frame_numbers.tolist() == [2, 3, 4]
    assert all(f.ssl is None for f in part)
    one = predictor.predict_one_image(files.nexus, 3, models="tlm")
    # the batched scan path and the single-image path give the same instances
    np.testing.assert_array_equal(one.tlm.masks, part[3].tlm.masks)
    np.testing.assert_allclose(one.tlm.scores, part[3].tlm.scores, rtol=1e-4, atol=1e-5)
    # a bare 2D array works too
    arr = predictor.predict_one_image(sim.frames[3].astype(np.float32), models="tlm")
    assert arr.frame is None and arr.shape == sim.frames.shape[1:]


def test_threshold_filters_tlm_scores(sim_scan):
    torch.manual_seed(1)
    tlm = build_tlm()
    low = JointPredictor(tlm=tlm, threshold=0.0, device="cpu")
    high = JointPredictor(tlm=tlm, threshold=0.9, device="cpu")
    frame = sim_scan[0].frames[2]
    a, b = low.predict_one_image(frame).tlm, high.predict_one_image(frame).tlm
    assert len(b) <= len(a)
    assert np.all(b.scores >= 0.9)


def test_instances_container():
    masks = np.zeros((3, 20, 30), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 10:15, 10:12] = True
    masks[2, 0:1, 0:1] = True
    inst = Instances.from_masks(masks, [0.9, 0.5, 0.1], 1)
    assert len(inst) == 3
    np.testing.assert_array_equal(inst.masks, masks)
    assert inst.boxes.tolist()[0] == [3, 2, 9, 5]
    assert inst.areas.tolist() == [18, 10, 1]
    sub = inst[1:]
    assert len(sub) == 2 and sub.scores.tolist() == pytest.approx([0.5, 0.1])
    assert len(inst.filter(score_threshold=0.4, min_area=5)) == 2
    labels = inst.label_image()
    assert labels[3, 4] == 1 and labels[12, 11] == 2 and labels[0, 0] == 3
    table = inst.to_dict()
    assert table["source"] == ["tlm"] * 3 and table["row"][0] == pytest.approx(3.0)
    with pytest.raises(UnknownNameError):
        from dipid.results import ImageResult

        ImageResult(frame=0, shape=(20, 30), joint=inst).instances("nope")


def test_from_pretrained_missing_and_roundtrip(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="dipid train tlm"):
        JointPredictor.from_pretrained(tmp_path)
    torch.manual_seed(0)
    sslm = build_sslm(channels=8)
    sslm.config.channel_roles = [0] * 7 + [2]
    save_checkpoint(sslm, tmp_path / "sslm.safetensors")
    loaded = JointPredictor.from_pretrained(tmp_path, device="cpu")
    assert loaded.tlm is None and loaded.sslm is not None
    assert loaded.available_models == ("ssl", "joint", "classical")
    assert len(loaded.weights_info["sslm"]["sha256"]) == 64
    # a damaged shipped file is refused
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  sslm.safetensors\n")
    with pytest.raises(WeightsNotFoundError, match="sha256"):
        JointPredictor.from_pretrained(tmp_path)


def test_from_pretrained_reads_tuned_settings(tmp_path):
    import json

    from dipid.errors import DipidError

    sslm = build_sslm(channels=8)
    sslm.config.channel_roles = [0] * 7 + [2]
    save_checkpoint(sslm, tmp_path / "sslm.safetensors")
    (tmp_path / "settings.json").write_text(json.dumps({"fusion_tlm_min_score": 0.9, "threshold": 0.6}))
    loaded = JointPredictor.from_pretrained(tmp_path, device="cpu")
    assert loaded.settings.fusion_tlm_min_score == 0.9 and loaded.settings.threshold == 0.6
    assert loaded.weights_info["settings"]["path"].endswith("settings.json")
    # an explicit threshold still wins, the rest of the tuned settings stay
    mine = JointPredictor.from_pretrained(tmp_path, device="cpu", threshold=0.3)
    assert mine.settings.threshold == 0.3 and mine.settings.fusion_tlm_min_score == 0.9
    # explicit settings replace the file's
    assert JointPredictor.from_pretrained(tmp_path, settings=PredictorSettings()).settings == PredictorSettings()
    (tmp_path / "settings.json").write_text(json.dumps({"fusion_tlm_min": 0.9}))
    with pytest.raises(DipidError, match=r"settings.json: unknown predictor setting\(s\) fusion_tlm_min; valid: .*fusion_tlm_min_score"):
        JointPredictor.from_pretrained(tmp_path)
    (tmp_path / "settings.json").write_text("[1, 2]")
    with pytest.raises(DipidError, match="JSON object"):
        JointPredictor.from_pretrained(tmp_path)


def test_classical_finder_as_third_source_of_joint(predictor, sim_scan):
    """fusion_classical: joint takes classical peaks (flag 4) as evidence, reported only when asked for."""
    from dataclasses import replace

    from dipid.results import SOURCE_FLAGS

    sim, _ = sim_scan
    counts = sim.frames[:3].astype(np.float32).clip(min=0)
    # Nothing from the untrained networks survives, and every classical peak joins joint.
    settings = replace(predictor.settings, threshold=1.0, fusion_tlm_min_score=1.01, fusion_add_unmatched_ssl=False,
                       fusion_classical=True, fusion_add_unmatched_classical=True, fusion_classical_min_score=0.0)
    fused = JointPredictor(tlm=predictor.tlm, sslm=predictor.sslm, device="cpu", settings=settings)
    results = fused.predict_frames(counts)
    plain = fused.predict_frames(counts, models=("tlm", "ssl", "classical"))
    classical_peaks = sum(len(r.classical) for r in plain)
    assert classical_peaks > 0  # the realistic scan has peaks the finder sees
    for with_joint_only, with_classical in zip(results, plain):
        assert with_joint_only.classical is None  # computed for joint, not reported
        assert "joint_classical" in with_joint_only.timings and "classical" not in with_joint_only.timings
        assert len(with_joint_only.joint) == len(with_classical.classical)
        assert all(int(s) == SOURCE_FLAGS["classical"] for s in with_joint_only.joint.sources)
    # switched off, joint has none of them
    off = JointPredictor(tlm=predictor.tlm, sslm=predictor.sslm, device="cpu",
                         settings=replace(settings, fusion_classical=False))
    assert all(len(r.joint) == 0 for r in off.predict_frames(counts))


def test_models_argument_names_what_runs(predictor, sim_scan):
    from dipid.predict import MODEL_NAMES, select_models

    assert select_models(None) == ("tlm", "ssl")
    assert select_models("joint") == ("tlm", "ssl")
    assert select_models(["classical", "tlm"]) == ("tlm", "classical")  # run order, whatever the order asked
    assert select_models(()) == ()
    with pytest.raises(UnknownNameError, match="nms") as info:
        select_models(("tlm", "nms"))  # NMS is a setting (PredictorSettings.nms), not a model
    for name in MODEL_NAMES:
        assert name in str(info.value)
    frame = sim_scan[0].frames[1].astype(np.float32)
    with pytest.raises(UnknownNameError):
        predictor.predict_one_image(frame, models="tml")
    only_ssl = predictor.predict_one_image(frame, models=["ssl"])
    assert only_ssl.tlm is None and only_ssl.ssl is not None and only_ssl.classical is None
    # a network the predictor does not hold is skipped
    classical_only = JointPredictor(device="cpu").predict_one_image(frame, models=("joint", "classical"))
    assert classical_only.tlm is None and classical_only.ssl is None and classical_only.classical is not None


def test_nms_setting_removes_overlapping_tlm_instances(predictor, sim_scan):
    from dataclasses import replace

    from dipid.metrics import mask_iou_matrix

    frame = sim_scan[0].frames[2, :, :160].astype(np.float32)
    # Mask R-CNN's own box NMS leaves few masks overlapping by much: a low IoU makes mask NMS act
    settings = replace(predictor.settings, threshold=0.0, nms_iou=0.05)
    plain = JointPredictor(tlm=predictor.tlm, device="cpu", settings=settings).predict_one_image(frame)
    nms = JointPredictor(tlm=predictor.tlm, device="cpu", settings=replace(settings, nms=True)).predict_one_image(frame)
    assert len(plain.tlm) > len(nms.tlm) > 0  # untrained: many overlapping boxes
    iou = mask_iou_matrix(nms.tlm.masks, nms.tlm.masks)
    np.fill_diagonal(iou, 0.0)
    assert iou.max() <= settings.nms_iou
    assert len(nms.joint) == len(nms.tlm)  # one model: joint is its (de-duplicated) set


def test_prediction_leaves_the_callers_models_unchanged(sim_scan):
    """The predictor works on its own inference copies: nothing it sets up reaches the models given."""
    import copy

    torch.manual_seed(2)
    tlm, sslm = build_tlm(), build_sslm(channels=8)
    assert sslm.config.channel_roles is None  # untrained: the predictor assigns roles on the fly
    configs = copy.deepcopy((tlm.config, sslm.config))
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (tlm, sslm)]
    modes = [m.training for m in (tlm, sslm)]
    heads = (tlm.net.roi_heads.score_thresh, dict(tlm.net.rpn._post_nms_top_n))
    settings = PredictorSettings(threshold=0.7, proposals=50)
    predictor = JointPredictor(tlm=tlm, sslm=sslm, device="cpu", settings=settings)
    predictor.predict_scan(sim_scan[1].nexus, end_val=2, batch_size=2)
    assert (tlm.config, sslm.config) == configs
    assert sslm.config.channel_roles is None
    assert predictor.sslm is sslm and predictor.tlm is tlm
    for model, state in zip((tlm, sslm), states):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in (tlm, sslm)] == modes
    assert (tlm.net.roi_heads.score_thresh, dict(tlm.net.rpn._post_nms_top_n)) == heads


def _can_open_for_writing(path) -> bool:
    """False while this process still holds the HDF5 file open (HDF5 refuses a second, writable open)."""
    import h5py

    try:
        h5py.File(path, "r+").close()
    except OSError:
        return False
    return True


def _reader_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "dipid-reader" and t.is_alive()]


def test_predict_scan_closes_the_scan_it_opens(sim_scan, monkeypatch):
    import dipid.predict
    from dipid.io import Scan, open_scan

    _, files = sim_scan
    opened: list[Scan] = []
    monkeypatch.setattr(dipid.predict, "open_scan", lambda path: opened.append(open_scan(path)) or opened[-1])
    classical = JointPredictor(device="cpu")

    result = classical.predict_scan(files.nexus, models="classical", batch_size=2)
    assert len(result) == 6 and len(opened) == 1
    assert _can_open_for_writing(files.nexus)  # closed, though `opened` still holds the Scan
    classical.predict_one_image(files.nexus, 2, models="classical")
    assert len(opened) == 2 and _can_open_for_writing(files.nexus)

    # an error mid-scan: the read-ahead thread stops and the file is closed all the same
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("model failed")
        return JointPredictor.predict_frames(classical, *args, **kwargs)

    monkeypatch.setattr(classical, "predict_frames", failing)
    with pytest.raises(RuntimeError, match="model failed"):
        classical.predict_scan(files.nexus, models="classical", batch_size=1)
    assert len(opened) == 3 and _can_open_for_writing(files.nexus)
    assert not _reader_threads()

    # a Scan the caller opened stays open: it is the caller's to close
    with open_scan(files.nexus) as scan:
        monkeypatch.setattr(classical, "predict_frames", JointPredictor.predict_frames.__get__(classical))
        classical.predict_scan(scan, models="classical", end_val=2)
        assert not _can_open_for_writing(files.nexus)
        assert len(scan.read_frames([3])[0]) == 1
    assert _can_open_for_writing(files.nexus)


def test_read_ahead_stops_when_the_consumer_stops_early():
    from contextlib import closing

    from dipid.predict import _prefetch

    state = {"read": 0, "closed": False}

    def endless():
        try:
            while True:
                state["read"] += 1
                yield state["read"]
        finally:
            state["closed"] = True

    with closing(_prefetch(endless(), depth=2)) as items:
        assert next(items) == 1
    assert state["closed"] and not _reader_threads()
    assert state["read"] <= 5  # stopped reading ahead once closed (depth 2, one taken, one in hand)

    # an error in the source reaches the consumer
    def broken():
        yield 1
        raise ValueError("bad frame")

    with pytest.raises(ValueError, match="bad frame"), closing(_prefetch(broken())) as items:
        list(items)
    assert not _reader_threads()


def test_weights_location_rules(tmp_path):
    from dipid.models.weights import (
        RUN_CHECKPOINT,
        WEIGHT_FILES,
        find_checkpoints,
        load_weights,
        read_sha256sums,
    )

    sslm = build_sslm(channels=8)
    sslm.config.channel_roles = [0] * 7 + [2]
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(sslm, run / RUN_CHECKPOINT)
    assert find_checkpoints(run) == [run / RUN_CHECKPOINT]
    assert find_checkpoints(run / RUN_CHECKPOINT) == [run / RUN_CHECKPOINT]
    # named checkpoints win over a run's best
    save_checkpoint(sslm, run / WEIGHT_FILES["sslm"])
    assert find_checkpoints(run) == [run / WEIGHT_FILES["sslm"]]
    with pytest.raises(WeightsNotFoundError, match="tlm.safetensors and/or sslm.safetensors"):
        find_checkpoints(tmp_path / "nothing")
    (run / "SHA256SUMS").write_text("ABC  *sslm.safetensors\nnot a line\n" + "d" * 64 + "  other.bin\n")
    assert read_sha256sums(run / "SHA256SUMS") == {"sslm.safetensors": "abc", "other.bin": "d" * 64}
    with pytest.raises(WeightsNotFoundError, match="does not match abc"):
        load_weights(run)
    (run / "SHA256SUMS").unlink()
    loaded = load_weights(run)
    assert set(loaded.models) == {"sslm"} and loaded.settings_file is None
    # the fusion rule beside the checkpoints is checked like them when SHA256SUMS lists it
    (run / "settings.json").write_text('{"threshold": 0.6}\n')
    (run / "SHA256SUMS").write_text("0" * 64 + "  settings.json\n")
    with pytest.raises(WeightsNotFoundError, match="settings.json: sha256"):
        load_weights(run)
    (run / "SHA256SUMS").unlink()
    assert load_weights(run).settings_file == run / "settings.json"
    assert loaded.info["sslm"]["path"] == str(run / WEIGHT_FILES["sslm"])


def test_classical_gate_skips_the_networks_where_the_finder_finds_nothing_and_joint_is_unchanged(predictor, sim_scan,
                                                                                                 tmp_path):
    from dataclasses import replace

    sim, files = sim_scan
    counts = sim.frames[:4].astype(np.float32).clip(min=0)
    counts[1] = np.random.default_rng(0).poisson(1.0, counts[1].shape)  # flat noise: nothing to find
    # the classical finder anchors joint; every peak kept (so joint is not empty), no network adds its own
    veto = replace(predictor.settings, fusion_anchor="classical", fusion_classical=True, fusion_classical_min_score=0.0,
                   fusion_tlm_min_score=1.01, fusion_add_unmatched_ssl=False)
    plain = JointPredictor(tlm=predictor.tlm, sslm=predictor.sslm, device="cpu", settings=veto)
    gated = JointPredictor(tlm=predictor.tlm, sslm=predictor.sslm, device="cpu",
                           settings=replace(veto, classical_gate=True))
    peaks = [len(r.classical) for r in plain.predict_frames(counts, models="classical")]
    assert peaks[1] == 0 and sum(peaks) > 0
    for n, full, cut in zip(peaks, plain.predict_frames(counts), gated.predict_frames(counts)):
        np.testing.assert_array_equal(cut.joint.label_image(), full.joint.label_image())
        np.testing.assert_array_equal(cut.joint.scores, full.joint.scores)
        if n == 0:
            assert cut.tlm is None and cut.ssl is None and not cut.has("tlm") and len(cut.joint) == 0
        else:
            np.testing.assert_array_equal(cut.tlm.label_image(), full.tlm.label_image())
            np.testing.assert_array_equal(cut.ssl.mask, full.ssl.mask)
    # a scan says which frames the networks did not run on
    result = gated.predict_scan(files.nexus)
    finder = JointPredictor(device="cpu").predict_scan(files.nexus, models="classical")
    empty = [int(f) for f in finder.frame_numbers if len(finder[int(f)].classical) == 0]
    assert 0 < len(empty) < len(finder)  # the realistic scan has frames with and without peaks
    assert result.metadata["networks_not_run"]["frames"] == empty
    assert [int(f) for f in result.frame_numbers if not result[int(f)].has("ssl")] == empty
    assert "networks_not_run" not in plain.predict_scan(files.nexus).metadata
    # the viewer says so (an empty TLM outline on those frames means "not run")
    from dipid.viz import view_scan_result

    note = f"TLM and SSLM not run on {len(empty)} frames without a classical peak"
    assert note in view_scan_result(result, None, tmp_path / "view.html").read_text()
    # and so does the viewer `dipid view` makes from the results file
    from dipid.viz import view_results_file

    result.to_nexus(tmp_path / "result.nxs")
    assert note in view_results_file(tmp_path / "result.nxs", tmp_path / "again.html").read_text()


def test_peak_windows_are_recorded_with_the_scan_and_said_in_the_viewer(predictor, sim_scan, tmp_path):
    from dataclasses import replace

    from dipid.viz import view_results_file, view_scan_result

    sim, files = sim_scan
    windows = replace(predictor.settings, fusion_anchor="classical", fusion_classical=True,
                      fusion_classical_min_score=0.0, fusion_tlm_min_score=1.01, fusion_add_unmatched_ssl=False,
                      classical_gate=True, peak_windows=8)
    windowed = JointPredictor(tlm=predictor.tlm, sslm=predictor.sslm, device="cpu", settings=windows)
    result = windowed.predict_scan(files.nexus)
    assert result.metadata["networks_windows"]["margin"] == 8
    assert result.metadata["parameters"]["peak_windows"] == 8
    gated = len(result.metadata["networks_not_run"]["frames"])
    note = (f"TLM and SSLM not run on {gated} frames without a classical peak, "
            "elsewhere run only within 8 px (and the 32-px grid) of classical peaks")
    assert note in view_scan_result(result, None, tmp_path / "view.html").read_text()
    result.to_nexus(tmp_path / "result.nxs")
    assert note in view_results_file(tmp_path / "result.nxs", tmp_path / "again.html").read_text()
    # classical only: no network ran, so no windows are claimed
    assert "networks_windows" not in windowed.predict_scan(files.nexus, models="classical").metadata


def test_classical_gate_refuses_settings_where_it_would_change_joint():
    from dipid.errors import DipidError

    veto = dict(fusion_anchor="classical", fusion_classical=True, fusion_tlm_min_score=1.01,
                fusion_add_unmatched_ssl=False)
    assert PredictorSettings(**veto, classical_gate=True).classical_gate
    for change in ({"fusion_anchor": "tlm"}, {"fusion_add_unmatched_ssl": True}, {"fusion_tlm_min_score": 0.9},
                   {"fusion_add_agreeing": True}):
        with pytest.raises(DipidError, match="classical_gate"):
            PredictorSettings(**{**veto, **change}, classical_gate=True)


def test_with_settings_shares_the_models_and_checks_names(predictor):
    twin = predictor.with_settings(nms=True)
    assert twin.settings.nms and not predictor.settings.nms
    assert twin._tlm_run is predictor._tlm_run and twin._sslm_run is predictor._sslm_run
    stricter = predictor.with_settings(threshold=0.9)  # the threshold shapes the TLM's inference copy
    assert stricter._tlm_run is not predictor._tlm_run and stricter.settings.threshold == 0.9
    with pytest.raises(UnknownNameError, match="classical_gate"):
        predictor.with_settings(gate=True)
