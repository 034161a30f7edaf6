"""Tiles of large frames: instances cut to a tile's window, the classical gate on tiles, and the
windows around classical peaks that the networks see with ``peak_windows``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dipid.errors import DipidError
from dipid.predict import JointPredictor, PredictorSettings
from dipid.results import Instances
from dipid.tiling import peak_windows, shift_instances, tile_grid, window_instances


def _random_instances(shape=(300, 700), n=30, seed=0) -> Instances:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        labels[y : y + rng.integers(2, 45), x : x + rng.integers(2, 45)] = k
    return Instances.from_labels(labels, rng.uniform(0.1, 0.9, n), 4)


def test_window_instances_are_the_frame_masks_cut_to_each_tile():
    inst = _random_instances()
    for tile in tile_grid(inst.shape, tile=256, overlap=64):
        cut = window_instances(inst, tile)
        assert cut.shape == tile.shape
        inside = inst.masks[(slice(None), *tile.slices)]
        kept = np.flatnonzero(inside.reshape(len(inst), -1).any(axis=1))
        np.testing.assert_array_equal(cut.masks, inside[kept])
        np.testing.assert_array_equal(cut.scores, inst.scores[kept])
        np.testing.assert_array_equal(cut.sources, inst.sources[kept])
        # boxes are tight, as every instance's; shifting back lands each part where it was
        back = shift_instances(cut, tile, inst.shape).masks
        np.testing.assert_array_equal(back[(slice(None), *tile.slices)], inside[kept])
    assert len(window_instances(Instances.empty(inst.shape), tile_grid(inst.shape, tile=256)[0])) == 0


def test_classical_gate_on_tiles_runs_the_networks_only_where_peaks_are():
    from dipid.models import build_sslm, build_tlm

    rng = np.random.default_rng(1)
    frame = rng.poisson(2.0, (600, 700)).astype(np.float32)
    yy, xx = np.mgrid[0:600, 0:700]
    for r, c in ((100, 120), (130, 600)):  # two peaks in the top rows; the rest is background
        frame += 3000 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 3.0**2))
    torch.manual_seed(0)
    settings = PredictorSettings(tile_size=256, tile_overlap=32, fusion_anchor="classical", fusion_classical=True,
                                 fusion_classical_min_score=0.0, fusion_tlm_min_score=1.01,
                                 fusion_add_unmatched_ssl=False)
    models = dict(tlm=build_tlm(), sslm=build_sslm(channels=8), device="cpu")
    plain = JointPredictor(**models, settings=settings)
    gated = JointPredictor(**models, settings=replace(settings, classical_gate=True))
    tiles_seen = []
    original = gated._predict

    def spy(counts_t, *args, **kwargs):
        if counts_t.shape[-1] <= settings.tile_size:  # a tile batch, not the whole frame
            tiles_seen.append(counts_t.shape[0])
        return original(counts_t, *args, **kwargs)

    gated._predict = spy
    full, cut = plain.predict_one_image(frame), gated.predict_one_image(frame)
    n_tiles = len(tile_grid(frame.shape, tile=256, overlap=32))
    assert 0 < sum(tiles_seen) < n_tiles  # only tiles holding a peak reach the networks
    assert len(full.joint) == 2  # both peaks, kept by the fusion (keep score 0)
    np.testing.assert_array_equal(cut.joint.label_image(), full.joint.label_image())
    np.testing.assert_array_equal(cut.joint.scores, full.joint.scores)


def test_peak_windows_hold_each_peak_with_its_margin_on_the_grid_and_never_overlap():
    shape = (195, 487)
    rng = np.random.default_rng(4)
    for margin in (0, 8, 32):
        x0, y0 = rng.integers(0, shape[1] - 30, 12), rng.integers(0, shape[0] - 30, 12)
        boxes = np.stack([x0, y0, x0 + rng.integers(1, 30, 12), y0 + rng.integers(1, 30, 12)], axis=1)
        windows = peak_windows(boxes, shape, margin=margin)
        for w in windows:
            assert w.x0 % 32 == 0 and w.y0 % 32 == 0  # on the stride grid of the whole frame
            assert w.x1 % 32 == 0 or w.x1 == shape[1]
            assert w.y1 % 32 == 0 or w.y1 == shape[0]
            assert (w.core_y0, w.core_y1, w.core_x0, w.core_x1) == (w.y0, w.y1, w.x0, w.x1)
        for bx0, by0, bx1, by1 in boxes:  # each box and its margin lie inside one window
            need = (max(bx0 - margin, 0), max(by0 - margin, 0), min(bx1 + margin, shape[1]), min(by1 + margin, shape[0]))
            assert any(w.x0 <= need[0] and w.y0 <= need[1] and need[2] <= w.x1 and need[3] <= w.y1 for w in windows)
        cover = np.zeros(shape, np.int32)
        for w in windows:
            cover[w.slices] += 1
        assert cover.max() == 1  # disjoint
        assert cover.sum() < cover.size or margin == 32  # small margins leave most of the frame unseen
    # merging two windows can make the merged one overlap a third: merged to a fixed point
    chain = np.array([[5, 5, 20, 90], [70, 5, 90, 20], [5, 70, 90, 90]])  # the third overlaps only the first
    assert len(peak_windows(chain[:2], shape, margin=0)) == 2
    assert peak_windows(chain, shape, margin=0) == peak_windows(np.array([[0, 0, 96, 96]]), shape, margin=0)
    assert peak_windows(np.zeros((0, 4), int), shape, margin=8) == []
    with pytest.raises(ValueError, match="margin"):
        peak_windows(chain, shape, margin=-1)


def _two_peak_frame(shape=(195, 487)) -> np.ndarray:
    rng = np.random.default_rng(2)
    frame = rng.poisson(2.0, shape).astype(np.float32)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for r, c in ((60, 100), (150, 400)):
        frame += 3000 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 3.0**2))
    return frame


def test_peak_windows_show_the_networks_only_windows_around_classical_peaks():
    from dipid.models import build_sslm, build_tlm

    torch.manual_seed(0)
    veto = PredictorSettings(fusion_anchor="classical", fusion_classical=True, fusion_classical_min_score=0.0,
                             fusion_tlm_min_score=1.01, fusion_add_unmatched_ssl=False, classical_gate=True)
    models = dict(tlm=build_tlm(), sslm=build_sslm(channels=8), device="cpu")
    whole = JointPredictor(**models, settings=veto)
    windowed = whole.with_settings(peak_windows=8)
    seen: list[tuple[int, ...]] = []
    for predictor in (whole, windowed):
        network = predictor._tlm_run

        def spy(x, network=network):
            seen.append(tuple(x.shape))
            return network(x)

        predictor._tlm_run = spy
    frame = _two_peak_frame()
    full, cut = whole.predict_one_image(frame), windowed.predict_one_image(frame)
    assert seen[0] == (1, 1, *frame.shape)  # the whole frame, then one window per peak
    assert len(seen) == 3 and all(s[0] == 1 and s[2] * s[3] < frame.size / 4 for s in seen[1:])
    assert len(full.joint) == len(cut.joint) == 2
    # the SSLM looked only in the windows: no probability outside them
    inside = np.zeros(frame.shape, bool)
    for w in peak_windows(full.joint.boxes, frame.shape, margin=8):
        inside[w.slices] = True
    assert not cut.ssl.mask[~inside].any() and cut.ssl.mask[inside].any() == full.ssl.mask[inside].any()
    # a margin that makes the window the whole frame is the whole-frame prediction
    wide = whole.with_settings(peak_windows=1000)
    wide._tlm_run = whole._tlm_run
    same = wide.predict_one_image(frame)
    np.testing.assert_array_equal(same.joint.label_image(), full.joint.label_image())
    np.testing.assert_array_equal(same.joint.scores, full.joint.scores)
    np.testing.assert_array_equal(same.tlm.label_image(), full.tlm.label_image())
    np.testing.assert_array_equal(same.ssl.mask, full.ssl.mask)
    # windows are around the classical peaks `joint` keeps: they need the gate
    with pytest.raises(DipidError, match="peak_windows"):
        replace(veto, classical_gate=False, peak_windows=8)
    with pytest.raises(DipidError, match="peak_windows"):
        replace(veto, peak_windows=-1)
