"""A short SSLM training run on synthetic peaks, then automatic channel assignment.

Frames are Gaussian blobs (a few per frame, 50 to 3000 counts high, sigma 1.5 to 3.5 px) with
Poisson noise on a flat background of 2 counts. A blob's true region is where its expected
counts exceed 2 noise sigmas of the background (2 sqrt(2) counts), the visibility rule of the
simulator's ground truth (dipid.synth.scan).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dipid.errors import TrainingError
from dipid.models import SSLM, build_sslm
from dipid.models.sslm import ROLE_BACKGROUND, SSLMConfig, assign_channels
from dipid.train import fit_sslm, train_sslm_on_frames
from dipid.train.sslm import frames_to_tensor

HEIGHT, WIDTH = 48, 64
BACKGROUND = 2.0
CONFIG = SSLMConfig(channels=16)
STEPS = 40
# Measured on this setup with training seeds 0-4: mean IoU 0.86-0.90 (automatic and labelled
# assignment alike); a random mask of the same size scores about 0.05. The threshold leaves
# room for numerical differences between machines.
MIN_IOU = 0.7


def make_frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W) int32 counts and (n, H, W) bool true peak regions."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = np.empty((n, HEIGHT, WIDTH), np.int32)
    truth = np.zeros((n, HEIGHT, WIDTH), bool)
    for i in range(n):
        expected = np.full((HEIGHT, WIDTH), BACKGROUND)
        for _ in range(rng.integers(1, 4)):
            centre_row, centre_col = rng.uniform(6, HEIGHT - 6), rng.uniform(6, WIDTH - 6)
            sigma, height = rng.uniform(1.5, 3.5), 10 ** rng.uniform(1.7, 3.5)
            blob = height * np.exp(-((rows - centre_row) ** 2 + (cols - centre_col) ** 2) / (2 * sigma**2))
            expected += blob
            truth[i] |= blob >= 2 * np.sqrt(BACKGROUND)
        frames[i] = rng.poisson(expected)
    return frames, truth


def mean_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Per-frame IoU of (n, H, W) bool masks, averaged over frames."""
    scores = [(p & t).sum() / max((p | t).sum(), 1) for p, t in zip(predicted, truth)]
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def trained() -> tuple[SSLM, list[dict[str, float]]]:
    frames, _ = make_frames(16, seed=1)
    history: list[dict[str, float]] = []
    model = train_sslm_on_frames(
        frames,
        config=CONFIG,
        steps=STEPS,
        batch_size=4,
        seed=0,
        progress=False,
        callback=lambda step, record: history.append(record),
    )
    return model, history


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, np.ndarray]:
    frames, truth = make_frames(8, seed=2)
    return frames_to_tensor(frames), truth


def test_training_reduces_the_loss_and_the_number_of_clusters(trained):
    model, history = trained
    assert len(history) == STEPS
    assert [int(r["step"]) for r in history] == list(range(STEPS))
    assert set(history[0]) >= {"total", "similarity", "continuity", "context", "clusters"}
    assert np.mean([r["total"] for r in history[-5:]]) < 0.5 * history[0]["total"]
    assert history[-1]["clusters"] < history[0]["clusters"]
    assert not model.training


def test_automatic_channel_assignment_finds_the_peaks(trained, held_out):
    model, _ = trained
    frames, truth = held_out
    roles = model.config.channel_roles
    assert roles is not None and any(r != ROLE_BACKGROUND for r in roles)
    predicted = model.peak_mask(frames).numpy()
    iou = mean_iou(predicted, truth)
    rng = np.random.default_rng(0)
    chance = mean_iou(rng.random(predicted.shape) < predicted.mean(), truth)
    assert iou > MIN_IOU, f"IoU {iou:.3f} (chance {chance:.3f})"
    assert iou > 5 * chance


def test_assignment_from_labels_finds_the_peaks(trained, held_out):
    model, _ = trained
    labelled_frames, labelled_truth = make_frames(4, seed=3)
    roles = assign_channels(model, frames_to_tensor(labelled_frames), labels=torch.from_numpy(labelled_truth))
    assert model.config.channel_roles == roles
    frames, truth = held_out
    assert mean_iou(model.peak_mask(frames).numpy(), truth) > MIN_IOU


def test_train_sslm_on_frames_is_seeded_and_passes_labels_to_the_assignment():
    frames, truth = make_frames(4, seed=4)
    small = SSLMConfig(channels=4)
    options = {"config": small, "steps": 3, "batch_size": 2, "seed": 7, "progress": False}
    first = train_sslm_on_frames(frames, **options, assign_from_labels=(frames[:2], truth[:2]))
    second = train_sslm_on_frames(frames, **options)
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[key], msg=key)
    expected = assign_channels(first, frames_to_tensor(frames[:2]), labels=torch.from_numpy(truth[:2]))
    assert first.config.channel_roles == expected


def test_fit_sslm_reports_every_step_and_stops_on_nan():
    model = build_sslm(channels=4)
    batches = [torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)]
    seen: list[int] = []
    history = fit_sslm(model, batches, steps=5, progress=False, callback=lambda step, record: seen.append(step))
    assert len(history) == 5 and seen == [0, 1, 2, 3, 4]  # the list is iterated again
    with pytest.raises(TrainingError, match="step 0"):
        fit_sslm(build_sslm(channels=4), [torch.full((2, 1, 8, 8), float("nan"))], steps=2, progress=False)
    with pytest.raises(TrainingError, match="no batches"):
        fit_sslm(build_sslm(channels=4), [], steps=2, progress=False)
    one_shot = (torch.randn(2, 1, 8, 8) for _ in range(2))
    assert len(fit_sslm(build_sslm(channels=4), one_shot, steps=5, progress=False)) == 2


def _write_scan(path, frames: np.ndarray) -> str:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("entry/instrument/detector/data", data=frames)
    return str(path)


def test_sslm_run_trains_on_seeded_crops_with_the_default_architecture(tmp_path, monkeypatch):
    from dipid.train import sslm_run
    from dipid.train.sslm_run import DEFAULT_MODEL_OPTIONS, SSLMTrainOptions, train_sslm

    frames, _ = make_frames(6, seed=8)
    scan = _write_scan(tmp_path / "scan.nxs", frames)
    shapes: list[tuple[int, ...]] = []
    real_fit = sslm_run.fit_sslm

    def recording_fit(model, batches, **kwargs):
        batches = list(batches)
        shapes.extend(tuple(b.shape) for b in batches)
        return real_fit(model, batches, **kwargs)

    monkeypatch.setattr(sslm_run, "fit_sslm", recording_fit)
    common = dict(scans=[scan], steps=2, steps_per_epoch=2, batch_size=2, progress=False, crop=(16, 24), seed=3)
    first = train_sslm(out=tmp_path / "a", **common)
    assert shapes == [(2, 1, 16, 24)] * 2  # random windows, not whole 48 x 64 frames
    from dipid.models import load_checkpoint

    model = load_checkpoint(first.run_dir / "best.safetensors")
    assert model.config.channels == DEFAULT_MODEL_OPTIONS["channels"]  # model_options said nothing
    second = train_sslm(out=tmp_path / "b", **common)  # same seed: same windows, same weights
    again = load_checkpoint(second.run_dir / "best.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, again.state_dict()[key], msg=key)
    assert SSLMTrainOptions(scans=[scan], out=tmp_path / "c", crop=None).crop is None
    with pytest.raises(ValueError, match="crop"):
        SSLMTrainOptions(scans=[scan], out=tmp_path / "d", crop=(4, 64))
