"""TLM training runs: run-folder files, checkpoints, resume equivalence, NaN and Ctrl-C handling.

The TLM is the real ResNet-50 Mask R-CNN, so every run here is kept tiny: 32x32 frames, one frame
per batch, one step per epoch, one validation frame and few proposals. The run-folder machinery
itself (state flattening, RNG, history, the shared life cycle run_training) is tested without a
network in test_train_sslm_run.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dipid.errors import TrainingError
from dipid.io.coco import FrameLabels, write_coco
from dipid.train import run as runmod
from dipid.train.run import is_improvement
from dipid.train.tlm import (
    HISTORY_COLUMNS,
    LOSS_PARTS,
    TLMTrainOptions,
    cosine_factor,
    ema_update,
    train_tlm,
    warmup_factor,
)

FRAME_SHAPE = (32, 32)
#: Small settings that keep a CPU step to a few seconds. The 32 x 32 test frames shrink to 1 x 1
#: in the ResNet's last stage, where trainable BatchNorm cannot work on a batch of one, so the
#: body's BatchNorm is frozen here (as with a pretrained start).
FAST = dict(
    # The fine-tuning recipe (SGD, plateau schedule, whole frames, no EMA): its lr stays put, which
    # the run-folder tests below read back; the from-scratch recipe has tests of its own at the end.
    optimizer="sgd",
    schedule="plateau",
    ema_decay=None,
    crop_size=None,
    batch_size=1,
    steps_per_epoch=1,
    val_frames=1,
    lr=1e-5,
    warmup_steps=0,
    rois_per_image=16,
    progress=False,
    model_options={"detections_per_img": 3, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
                   "batchnorm": "frozen"},
)


def make_labelled_scan(folder: Path, name: str, *, n_frames: int, seed: int) -> Path:
    """A tiny HDF5 scan of Gaussian peaks on Poisson background and its COCO labels; returns the JSON."""
    rng = np.random.default_rng(seed)
    h, w = FRAME_SHAPE
    rows, cols = np.mgrid[0:h, 0:w]
    frames, labels = [], []
    for k in range(n_frames):
        counts = rng.poisson(2.0, FRAME_SHAPE).astype(np.float64)
        masks = []
        for _ in range(int(rng.integers(1, 3))):
            r, c, sigma = rng.uniform(6, h - 6), rng.uniform(6, w - 6), rng.uniform(1.2, 2.5)
            peak = rng.uniform(300, 3000) * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
            counts += rng.poisson(peak)
            masks.append(peak > 5)
        frames.append(counts.astype(np.int32))
        labels.append(FrameLabels.from_masks(f"{name}.nxs", k, np.array(masks)))
    with h5py.File(folder / f"{name}.nxs", "w") as f:
        f.create_dataset("entry/instrument/detector/data", data=np.array(frames))
    return write_coco(labels, folder / f"{name}_labels.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tlm-data")
    return {
        "train": make_labelled_scan(folder, "train", n_frames=4, seed=1),
        "val": make_labelled_scan(folder, "val", n_frames=2, seed=2),
    }


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """Two epochs without interruption: the reference the resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    summary = train_tlm(train=data["train"], val=data["val"], out=out, epochs=2, seed=3, **FAST)
    return out, summary


def _file_identity(path: Path) -> tuple[int, int, int]:
    """(inode, mtime ns, size): changes whenever the file is rewritten (atomic writes make a new inode)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for column in ("train_loss", *LOSS_PARTS, "val_loss", "lr"):
            assert ra[column] == pytest.approx(rb[column], rel=1e-4, abs=1e-6), column


# ------------------------------------------------------------------------------ pure functions
def test_warmup_factor_ramps_linearly_to_one():
    assert warmup_factor(0, 10) == pytest.approx(1e-3)
    assert warmup_factor(5, 10) == pytest.approx(0.5 * 1e-3 + 0.5)
    assert warmup_factor(10, 10) == 1.0
    assert warmup_factor(3, 0) == 1.0


def test_is_improvement_prefers_metric_then_lower_loss():
    assert is_improvement(0.1, 5.0, None, None, higher_is_better=True)
    assert is_improvement(0.3, 9.0, 0.2, 1.0, higher_is_better=True)
    assert not is_improvement(0.1, 0.5, 0.2, 1.0, higher_is_better=True)
    assert is_improvement(0.2, 0.5, 0.2, 1.0, higher_is_better=True)  # tie broken by the loss
    assert not is_improvement(0.2, 1.5, 0.2, 1.0, higher_is_better=True)
    assert not is_improvement(math.nan, 0.1, 0.2, 1.0, higher_is_better=True)
    assert is_improvement(0.8, 0.8, 1.0, 1.0, higher_is_better=False)  # loss as the metric


# ------------------------------------------------------------------------------ a full run
def test_run_folder_has_history_checkpoints_and_config(straight_run, data):
    from dipid.models import load_checkpoint, read_checkpoint_metadata

    out, summary = straight_run
    assert summary.epochs_completed == 2 and summary.resumed_from_epoch is None
    assert summary.best_metric_name == "val_iou"  # the validation frames hold peaks
    rows = runmod.read_history_csv(out / "history.csv")
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert header == list(HISTORY_COLUMNS)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        parts = sum(row[p] for p in LOSS_PARTS)
        assert row["train_loss"] == pytest.approx(parts, rel=1e-5)
        assert math.isfinite(row["val_loss"]) and row["val_loss"] > 0
        assert 0.0 <= row["val_iou"] <= 1.0 and 0.0 <= row["val_ap"] <= 1.0
        assert row["lr"] == pytest.approx(1e-5) and row["seconds"] > 0
    html = (out / "history.html").read_text()
    assert "Plotly.newPlot" in html and 'src="https://cdn.plot.ly' not in html and len(html) > 1_000_000  # offline

    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "tlm" and config["options"]["epochs"] == 2 and config["options"]["seed"] == 3
    assert config["data"]["train"] == str(data["train"]) and config["versions"]["dipid"]

    assert load_checkpoint(out / "last.safetensors").name == "tlm"  # best: loaded by the JointPredictor test
    for name in ("best.safetensors", "last.safetensors"):
        meta = read_checkpoint_metadata(out / name)["metadata"]
        assert meta["train_data"] == str(data["train"]) and meta["seed"] == 3
        assert set(meta["val_metrics"]) >= {"val_loss", "val_mean_iou", "val_AP"}
    assert read_checkpoint_metadata(out / "last.safetensors")["metadata"]["epoch"] == 2
    assert read_checkpoint_metadata(out / "best.safetensors")["metadata"]["epoch"] == summary.best_epoch

    state, info = runmod.load_state(out / "state.safetensors")
    assert info["epoch"] == 2 and state["epoch"] == 2
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "best"}
    assert json.loads((out / "state.json").read_text())["summary"]["epoch"] == 2


def test_joint_predictor_loads_the_run_folder(straight_run):
    from dipid.predict import JointPredictor

    out, _ = straight_run
    predictor = JointPredictor.from_pretrained(out, device="cpu")
    assert predictor.tlm is not None and predictor.sslm is None
    counts = np.random.default_rng(0).poisson(3.0, (1, *FRAME_SHAPE)).astype(np.float32)
    [result] = predictor.predict_frames(counts, models="tlm")
    assert result.shape == FRAME_SHAPE


def test_a_finished_run_is_not_overwritten_without_resume(straight_run, data):
    out, _ = straight_run
    before = _file_identity(out / "best.safetensors")
    with pytest.raises(TrainingError, match="--resume"):
        train_tlm(train=data["train"], val=data["val"], out=out, epochs=2, seed=3, **FAST)
    assert _file_identity(out / "best.safetensors") == before


# ------------------------------------------------------------------------------ resume, interrupt, NaN
@pytest.fixture(scope="module")
def broken_run(data, tmp_path_factory):
    """One run taken through Ctrl-C in epoch 2, then a resume that hits a NaN loss, then a clean resume.

    Chained to keep the file fast (every epoch of the real Mask R-CNN costs seconds on a CPU);
    the observations after each stage are returned for the tests below.
    """
    from dipid.models.tlm import TLM

    out = tmp_path_factory.mktemp("runs") / "broken"
    seen: dict[str, object] = {}

    def interrupt(event):
        if event.kind == "epoch":
            seen["best_id_epoch1"] = _file_identity(out / "best.safetensors")
        if event.kind == "step" and event.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingError) as ctrl_c:
        train_tlm(train=data["train"], val=data["val"], out=out, epochs=2, seed=3, callback=interrupt, **FAST)
    seen["ctrl_c"] = ctrl_c.value
    seen["history_after_ctrl_c"] = runmod.read_history_csv(out / "history.csv")
    seen["state_epoch_after_ctrl_c"] = runmod.load_state(out / "state.safetensors")[1]["epoch"]

    real_forward = TLM.forward

    def poisoned_forward(self, images, targets=None):
        result = real_forward(self, images, targets)
        if self.training and isinstance(result, dict):
            result = {**result, "loss_mask": result["loss_mask"] * float("nan")}
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TLM, "forward", poisoned_forward)
        with pytest.raises(TrainingError) as nan:
            train_tlm(train=data["train"], val=data["val"], out=out, epochs=2, seed=3, resume=True, **FAST)
    seen["nan"] = nan.value
    seen["best_id_after_nan"] = _file_identity(out / "best.safetensors")
    seen["state_after_nan"] = runmod.load_state(out / "state.safetensors")
    seen["history_after_nan"] = runmod.read_history_csv(out / "history.csv")

    seen["resumed"] = train_tlm(train=data["train"], val=data["val"], out=out, epochs=2, seed=3, resume=True, **FAST)
    seen["out"] = out
    return seen


def test_ctrl_c_mid_epoch_leaves_a_resumable_folder(broken_run):
    error, out = broken_run["ctrl_c"], broken_run["out"]
    message = str(error)
    assert str(out) in message and "--resume" in message and "epoch 1 is the last one saved" in message
    assert isinstance(error.__cause__, KeyboardInterrupt)
    assert [r["epoch"] for r in broken_run["history_after_ctrl_c"]] == [1]
    assert broken_run["state_epoch_after_ctrl_c"] == 1


def test_nan_loss_stops_with_state_on_disk_and_best_untouched(broken_run):
    error, out = broken_run["nan"], broken_run["out"]
    message = str(error)
    assert "nan" in message.lower() and "epoch 2" in message and str(out) in message and "--resume" in message
    state, info = broken_run["state_after_nan"]
    assert info["epoch"] == 1 and state["epoch"] == 1
    assert broken_run["best_id_after_nan"] == broken_run["best_id_epoch1"]
    assert [r["epoch"] for r in broken_run["history_after_nan"]] == [1]
    sums = torch.stack([t.sum() for t in state["model"].values() if t.is_floating_point()])
    assert bool(torch.isfinite(sums).all())


def test_resumed_run_reproduces_the_straight_run(broken_run, straight_run):
    """1 epoch, then (after the failures above) a resume for epoch 2 == 2 epochs in one go."""
    _, straight = straight_run
    resumed, out = broken_run["resumed"], broken_run["out"]
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_completed == 2
    _assert_same_history(resumed.history, straight.history)
    _assert_same_history(runmod.read_history_csv(out / "history.csv"), straight.history)
    config = json.loads((out / "config.json").read_text())
    assert [r["from_epoch"] for r in config["resumes"]] == [1, 1]


# ------------------------------------------------------------------------------ the from-scratch recipe
def test_cosine_factor_falls_from_one_to_final():
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100, final=0.0) == pytest.approx(0.5)
    assert cosine_factor(100, 100, final=0.01) == pytest.approx(0.01)
    assert cosine_factor(500, 100, final=0.01) == pytest.approx(0.01)  # past the end: stays at the floor
    values = [cosine_factor(k, 40) for k in range(41)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_ema_update_follows_the_live_weights_and_copies_buffers():
    live = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average.load_state_dict(live.state_dict())
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].running_mean.fill_(3.0)
    before = average[0].weight.clone()
    ema_update(average, live, decay=0.9, step=1000)  # decay 0.9: 10 % of the way
    assert torch.allclose(average[0].weight, before + 0.1, atol=1e-6)
    assert torch.equal(average[1].running_mean, live[1].running_mean)
    ema_update(average, live, decay=0.999, step=0)  # first steps: d = 1/10, mostly the live weights
    assert torch.allclose(average[0].weight, live[0].weight - 0.1 * 0.9, atol=1e-6)


def test_options_default_to_the_from_scratch_recipe_and_reject_unknown_names():
    from dipid.errors import UnknownNameError

    opts = TLMTrainOptions(train="a", val="b", out="c")
    assert (opts.optimizer, opts.schedule, opts.crop_size, opts.ema_decay, opts.lr) == ("adamw", "cosine", 128, 0.999, 3e-4)
    assert TLMTrainOptions(train="a", val="b", out="c", optimizer="sgd").lr == 0.005
    with pytest.raises(UnknownNameError, match="adamw"):
        TLMTrainOptions(train="a", val="b", out="c", optimizer="adam")
    with pytest.raises(UnknownNameError, match="cosine"):
        TLMTrainOptions(train="a", val="b", out="c", schedule="step")
    with pytest.raises(ValueError, match="crop_size"):
        TLMTrainOptions(train="a", val="b", out="c", crop_size=8)


#: The default recipe on the tiny frames: crops (clipped to the 32 x 32 frames), AdamW, cosine, EMA.
SCRATCH = {**FAST, "optimizer": "adamw", "schedule": "cosine", "ema_decay": 0.99, "crop_size": 128,
           "crops_per_frame": 2, "batch_size": 2, "steps_per_epoch": 2}


def _stop_in_epoch_2(data, out, *, seed: int, **options) -> None:
    """A 2-epoch run stopped by Ctrl-C in epoch 2 (not a 1-epoch run: the cosine schedule spans
    all the epochs asked for), leaving epoch 1 in ``out``."""

    def interrupt(event):
        if event.kind == "step" and event.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingError):
        train_tlm(train=data["train"], val=data["val"], out=out, epochs=2, seed=seed, callback=interrupt, **options)


@pytest.fixture(scope="module")
def scratch_runs(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scratch")
    straight = train_tlm(train=data["train"], val=data["val"], out=folder / "straight", epochs=2, seed=5, **SCRATCH)
    _stop_in_epoch_2(data, folder / "resumed", seed=5, **SCRATCH)
    resumed = train_tlm(train=data["train"], val=data["val"], out=folder / "resumed", epochs=2, seed=5, resume=True,
                        **SCRATCH)
    return folder, straight, resumed


def test_scratch_recipe_saves_the_ema_and_decays_the_lr(scratch_runs):
    from safetensors.torch import load_file

    folder, straight, _ = scratch_runs
    rows = straight.history
    assert rows[0]["lr"] > rows[1]["lr"] > 0  # cosine over 4 steps, recorded at each epoch's last step
    assert rows[1]["lr"] == pytest.approx(1e-5 * cosine_factor(3, 4), rel=1e-6)
    state, _ = runmod.load_state(folder / "straight" / "state.safetensors")
    assert "ema" in state
    saved = load_file(folder / "straight" / "last.safetensors")
    key = next(k for k in state["ema"] if k.endswith("cls_score.weight"))
    saved_key = next(k for k in saved if k.endswith("cls_score.weight"))
    assert torch.equal(saved[saved_key], state["ema"][key])  # the checkpoint holds the average
    assert not torch.equal(state["ema"][key], state["model"][key])
    config = json.loads((folder / "straight" / "config.json").read_text())
    assert config["optimizer"]["name"] == "AdamW" and config["optimizer"]["ema_decay"] == 0.99


def test_scratch_recipe_resumes_to_the_same_history(scratch_runs):
    _, straight, resumed = scratch_runs
    assert resumed.resumed_from_epoch == 1
    _assert_same_history(resumed.history, straight.history)


def test_fine_tuning_from_a_checkpoint_resumes_with_its_frozen_batchnorm(straight_run, data, tmp_path, caplog):
    """A run started from base weights has frozen BatchNorm; its resume rebuilds that architecture
    (not the trainable BatchNorm of a from-scratch build), restores the optimiser and reproduces
    the uninterrupted run."""
    base = straight_run[0] / "best.safetensors"
    # BatchNorm left to its default, which the base weights decide (frozen), as `dipid train tlm` does.
    default_norm = {k: v for k, v in SCRATCH["model_options"].items() if k != "batchnorm"}
    options = {**SCRATCH, "base_weights": base, "freeze": "none", "model_options": default_norm}
    straight = train_tlm(train=data["train"], val=data["val"], out=tmp_path / "straight", epochs=2, seed=7, **options)
    _stop_in_epoch_2(data, tmp_path / "resumed", seed=7, **options)
    with caplog.at_level(logging.WARNING, logger="dipid"):
        resumed = train_tlm(train=data["train"], val=data["val"], out=tmp_path / "resumed", epochs=2, seed=7,
                            resume=True, **options)
    assert "optimiser state not restored" not in caplog.text
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert config["model"]["batchnorm"] == "frozen" and config["resumes"][0]["from_epoch"] == 1
    _assert_same_history(resumed.history, straight.history)
