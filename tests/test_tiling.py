"""Tiles of large frames: instances cut to a tile's window, and the classical gate on tiles."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from dipid.predict import JointPredictor, PredictorSettings
from dipid.results import Instances
from dipid.tiling import shift_instances, tile_grid, window_instances


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
