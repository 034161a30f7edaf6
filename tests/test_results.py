"""The rules dipid.results owns for every user of a result: source flags, models present, held frames."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dipid.errors import ScanShapeError, UnknownNameError
from dipid.results import (
    MODEL_KINDS,
    SOURCE_FLAGS,
    ImageResult,
    Instances,
    ScanResult,
    SSLOutput,
    check_model,
    source_flags,
    source_names,
)

H, W = 8, 10


def test_source_names_and_flags_are_inverse():
    for n in range(len(SOURCE_FLAGS) + 1):
        for names in itertools.combinations(SOURCE_FLAGS, n):
            flags = sum(SOURCE_FLAGS[name] for name in names)
            assert source_names(flags) == ("+".join(names) if names else "none")
            assert source_flags(source_names(flags)) == flags
    assert source_names(np.uint8(3)) == "tlm+ssl"
    assert source_flags("") == 0
    with pytest.raises(UnknownNameError, match="maskrcnn"):
        source_flags("tlm+maskrcnn")
    # the flags are distinct bits, so any set of models can be told apart
    assert len({*SOURCE_FLAGS.values()}) == len(SOURCE_FLAGS)
    assert all(bit & (bit - 1) == 0 for bit in SOURCE_FLAGS.values())


def test_check_model_and_instances_of_an_absent_model():
    for model in MODEL_KINDS:
        check_model(model)
    with pytest.raises(UnknownNameError, match="scan_type"):
        check_model("best", "scan_type")
    frame = ImageResult(frame=0, shape=(H, W), joint=Instances.empty((H, W)))
    assert frame.has("joint") and not frame.has("tlm") and not frame.has("ssl")
    assert len(frame.instances("classical")) == 0
    with pytest.raises(UnknownNameError):
        frame.has("sslm")


def _result(frames: tuple[int, ...], axis: np.ndarray) -> ScanResult:
    out = {}
    for f in frames:
        mask = np.zeros((1, H, W), bool)
        mask[0, f % H, 2:4] = True
        inst = Instances.from_masks(mask, [0.5], SOURCE_FLAGS["ssl"])
        ssl = SSLOutput(probability=None, mask=inst.union_mask(), instances=inst) if f % 2 else None
        out[f] = ImageResult(frame=f, shape=(H, W), joint=inst, ssl=ssl)
    return ScanResult(frames=out, axis_name="eta", axis_values=axis, frame_shape=(H, W))


def test_models_present_and_per_frame_instances():
    result = _result((4, 2, 3), np.arange(6.0))
    assert result.models_present() == ["ssl", "joint"]  # ssl ran on frame 3 only
    assert _result((2, 4), np.arange(6.0)).models_present() == ["joint"]
    assert _result((), np.arange(6.0)).models_present() == []
    per_frame = result.instances("ssl")
    assert [len(i) for i in per_frame] == [0, 1, 0]  # frames 2, 3, 4 in order
    assert result.counts("joint")["eta"] == [2.0, 3.0, 4.0]


def test_held_frames_of_a_per_frame_or_whole_scan_stack():
    result = _result((1, 3, 4), np.linspace(0.0, 0.5, 6))
    whole = np.arange(6 * H * W).reshape(6, H, W)
    np.testing.assert_array_equal(result.held(whole), whole[[1, 3, 4]])
    held = whole[:3]
    assert result.held(held) is held or np.shares_memory(result.held(held), held)
    with pytest.raises(ScanShapeError, match="counts hold 4 frames.*frame 4 is held"):
        result.held(whole[:4])
    np.testing.assert_allclose(result.held_axis_values(), [0.1, 0.3, 0.4])
    short = _result((1, 3, 4), np.linspace(0.0, 0.3, 4))  # the axis stops before frame 4
    assert short.held_axis_values() is None
    assert short.counts()["eta"] == [None, None, None]


def test_repr_of_a_scan_result_is_a_summary_not_every_frame():
    result = _result(tuple(range(0, 400, 2)), np.linspace(10.0, 20.0, 400))
    text = repr(result)
    assert text.startswith("ScanResult(") and "200 frames 0-398" in text and "'eta'" in text
    assert len(text) < 200 and "ImageResult" not in text
