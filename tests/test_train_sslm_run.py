"""SSLM training runs, and the run-folder machinery shared with the TLM (dipid.train.run).

Frames are tiny (32x32) synthetic scans written as HDF5; the SSLM has 8 channels.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dipid.errors import CheckpointError, TrainingError
from dipid.io.coco import FrameLabels, write_coco
from dipid.train import run as runmod
from dipid.train.sslm_run import (
    SSLM_HISTORY_COLUMNS,
    epoch_batches,
    epoch_lengths,
    load_unlabelled_frames,
    train_sslm,
)

FRAME_SHAPE = (32, 32)
FAST = dict(steps=4, steps_per_epoch=2, batch_size=2, progress=False, model_options={"channels": 8})


def make_scan(folder: Path, name: str, *, n_frames: int, seed: int, shape=FRAME_SHAPE) -> Path:
    """HDF5 scan of Gaussian peaks on Poisson background plus COCO labels; returns the scan path."""
    rng = np.random.default_rng(seed)
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w]
    frames, labels = [], []
    for k in range(n_frames):
        counts = rng.poisson(2.0, shape).astype(np.float64)
        r, c, sigma = rng.uniform(6, h - 6), rng.uniform(6, w - 6), rng.uniform(1.5, 2.5)
        peak = rng.uniform(500, 3000) * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
        counts += rng.poisson(peak)
        counts[0, 0] = -1  # a dead pixel: must be filled before normalisation
        frames.append(counts.astype(np.int32))
        labels.append(FrameLabels.from_masks(f"{name}.nxs", k, (peak > 5)[None]))
    path = folder / f"{name}.nxs"
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/instrument/detector/data", data=np.array(frames))
    write_coco(labels, folder / f"{name}_labels.json")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sslm-data")
    train = make_scan(folder, "train", n_frames=6, seed=1)
    make_scan(folder, "val", n_frames=3, seed=2)
    return {"scan": train, "labels": folder / "val_labels.json", "folder": folder}


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sslm-runs") / "straight"
    return out, train_sslm(scans=[data["scan"]], out=out, seed=5, **FAST)


# ================================================================================ run machinery
def test_flatten_state_round_trips_an_optimizer_state_without_pickle(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step(1.5)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "pair": (1, "a"),
             "neg_inf": -math.inf, "array": np.arange(5, dtype=np.uint32), "none": None}
    path = runmod.save_state(tmp_path / "state.safetensors", state, summary={"epoch": 3})
    loaded, summary = runmod.load_state(path)
    assert summary == {"epoch": 3}
    assert set(loaded["optimizer"]["state"]) == {0, 1, 2, 3}  # int keys survive
    for key, entry in optimizer.state_dict()["state"].items():
        assert torch.equal(loaded["optimizer"]["state"][key]["momentum_buffer"], entry["momentum_buffer"])
    assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert loaded["scheduler"]["mode_worse"] == math.inf and loaded["neg_inf"] == -math.inf
    assert loaded["pair"] == (1, "a") and loaded["none"] is None
    assert loaded["array"].dtype == np.uint32 and loaded["array"].tolist() == [0, 1, 2, 3, 4]
    # The structure is in the safetensors header too, readable as JSON; no pickle anywhere.
    doc = json.loads(path.with_suffix(".json").read_text())
    assert doc["summary"]["epoch"] == 3 and "structure" in doc
    restored = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["lr"] == 0.1


def test_flatten_state_refuses_objects_that_would_need_pickle():
    with pytest.raises(TypeError, match="pickle"):
        runmod.flatten_state({"bad": object()})


def test_load_state_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no training state"):
        runmod.load_state(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        runmod.load_state(garbage)
    foreign = runmod.atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not a dipid training state"):
        runmod.load_state(foreign)


def test_rng_capture_and_restore_replays_every_generator():
    runmod.seed_everything(11)
    saved = runmod.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    runmod.seed_everything(99)  # something else draws in between
    flat = runmod.flatten_state(saved)  # and the state goes through storage
    runmod.restore_rng_state(runmod.unflatten_state(flat.structure, flat.tensors))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_derive_seed_is_stable_and_distinguishes_labels():
    assert runmod.derive_seed(0, "loader", 1) == runmod.derive_seed(0, "loader", 1)
    assert runmod.derive_seed(0, "loader", 1) != runmod.derive_seed(0, "loader", 2)
    assert runmod.derive_seed(0, "loader", 1) != runmod.derive_seed(1, "loader", 1)
    assert 0 <= runmod.derive_seed(123, "x") < 2**31


def test_history_csv_round_trips_exact_floats(tmp_path):
    rows = [{"epoch": 1, "loss": 0.1 + 0.2, "val": math.nan}, {"epoch": 2, "loss": 1 / 3, "val": 0.5}]
    path = runmod.write_history_csv(tmp_path / "history.csv", rows, ("epoch", "loss", "val"))
    back = runmod.read_history_csv(path)
    assert [r["epoch"] for r in back] == [1, 2] and isinstance(back[0]["epoch"], int)
    assert back[0]["loss"] == 0.1 + 0.2 and back[1]["loss"] == 1 / 3
    assert math.isnan(back[0]["val"]) and back[1]["val"] == 0.5


def test_amp_only_on_cuda_and_only_when_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not runmod.amp_settings(cpu, True).enabled
    assert not runmod.amp_settings(cuda, False).enabled
    bf16 = runmod.amp_settings(cuda, True, bf16_supported=True)
    assert bf16.enabled and bf16.dtype == torch.bfloat16 and not bf16.use_scaler
    fp16 = runmod.amp_settings(cuda, True, bf16_supported=False)
    assert fp16.dtype == torch.float16 and fp16.use_scaler


def test_training_guard_explains_out_of_memory_and_ctrl_c(tmp_path):
    progress = runmod.RunProgress(unit="epoch", saved=3, current=4)
    with pytest.raises(TrainingError) as info:
        with runmod.training_guard(tmp_path, progress=progress, resume_command="dipid train tlm --resume"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(info.value)
    assert str(tmp_path) in message and "--batch-size" in message and "epoch 3" in message
    with pytest.raises(TrainingError, match="interrupted") as info:
        with runmod.training_guard(tmp_path, progress=progress, resume_command="x --resume"):
            raise KeyboardInterrupt
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are bugs: not hidden
        with runmod.training_guard(tmp_path, progress=progress, resume_command="x"):
            raise RuntimeError("shape mismatch")


def test_loss_mode_trains_without_touching_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Dropout(0.5))
    model.eval()
    before = model[1].running_mean.clone()
    with torch.no_grad(), runmod.loss_mode(model):
        assert model.training and not model[1].training and not model[2].training
        model(torch.randn(2, 1, 8, 8) + 5)
    assert torch.equal(model[1].running_mean, before)
    assert not model.training and not model[0].training  # modes restored


def test_compare_configs_refuses_fixed_changes_and_reports_others():
    changed = runmod.compare_configs({"seed": 1, "epochs": 2}, {"seed": 1, "epochs": 4}, fixed=("seed",))
    assert changed == {"epochs": (2, 4)}
    with pytest.raises(TrainingError, match="seed"):
        runmod.compare_configs({"seed": 1}, {"seed": 2}, fixed=("seed",))


def test_epoch_batches_depend_only_on_seed_and_epoch():
    a = epoch_batches(5, 2, 4, seed=0, epoch=2)
    assert [b.tolist() for b in a] == [b.tolist() for b in epoch_batches(5, 2, 4, seed=0, epoch=2)]
    assert [b.tolist() for b in a] != [b.tolist() for b in epoch_batches(5, 2, 4, seed=0, epoch=3)]
    assert all(len(set(b.tolist())) == 2 for b in a)  # no frame twice in a batch
    assert sorted(torch.cat(a[:2]).tolist() + a[2][:1].tolist()) == [0, 1, 2, 3, 4]  # a full pass first
    assert epoch_lengths(7, 3) == [3, 3, 1] and epoch_lengths(6, 3) == [3, 3]


def test_unlabelled_frames_are_filled_normalised_and_capped(data):
    frames = load_unlabelled_frames([data["scan"]], max_frames=4)
    assert frames.frames.shape == (4, 1, *FRAME_SHAPE) and frames.frames.dtype == torch.float32
    assert torch.isfinite(frames.frames).all()
    assert frames.sources[0].endswith("#0") and frames.sources[-1].endswith("#5")  # spread over the scan
    # The dead pixel was filled from its neighbours: not the background-subtracted zero-count value.
    zero_count_level = float(frames.frames[0, 0].min())
    assert float(frames.frames[0, 0, 0, 0]) > zero_count_level


def test_frames_of_different_sizes_are_refused(data, tmp_path):
    other = make_scan(tmp_path, "wide", n_frames=2, seed=3, shape=(32, 48))
    with pytest.raises(TrainingError, match="different sizes"):
        load_unlabelled_frames([data["scan"], other])


# ================================================================================ the life cycle
@dataclass
class ToyOptions:
    out: Path
    epochs: int
    seed: int = 0
    resume: bool = False
    lr: float = 0.1

    def to_dict(self) -> dict:
        return {"out": str(self.out), "epochs": self.epochs, "seed": self.seed, "resume": self.resume, "lr": self.lr}

    def resume_command(self) -> str:
        return f"toy --out {self.out} --resume"


class ToyTask:
    """The smallest TrainingTask: a tiny SSLM nudged by a draw from torch's global RNG (so a resume
    must restore the RNG to repeat a straight run), with scripted losses and validation IoUs."""

    kind = "toy"
    history = runmod.HistoryLayout(columns=("epoch", "loss", "val_iou", "draw", "lr", "seconds"), x="epoch",
                                   loss_columns=("loss",), metric_columns=("val_iou",), log_columns=("loss", "val_iou"))
    fixed_on_resume = ("seed",)

    def __init__(self, out, *, epochs, ious, losses, resume=False, tie_loss="loss", nan_in=None, bad_data=False):
        self.opts = ToyOptions(out=out, epochs=epochs, resume=resume)
        self.ious, self.losses, self.tie_loss, self.nan_in, self.bad_data = ious, losses, tie_loss, nan_in, bad_data

    @property
    def epochs(self) -> int:
        return self.opts.epochs

    def load_data(self) -> None:
        if self.bad_data:
            raise TrainingError("toy data: unreadable")

    def build(self, run, existing, *, resumed):
        from dipid.models import build_sslm

        self.model = build_sslm(channels=2, num_conv=2)
        self.best_rule = runmod.BestRule("val_iou", higher_is_better=True, tie_loss=self.tie_loss)

    def restore(self, state):
        self.model.load_state_dict(state["model"])

    def config_sections(self):
        return {"data": {"toy": True}}

    def train_epoch(self, run, epoch):
        draw = float(torch.rand(()))
        with torch.no_grad():
            next(self.model.parameters()).add_(math.nan if epoch == self.nan_in else draw)
        run.after_step(epoch, 1, {"loss": self.losses[epoch - 1]})
        return {"loss": self.losses[epoch - 1], "draw": draw, "lr": self.opts.lr}

    def validate(self, run, epoch):
        return {"val_iou": self.ious[epoch - 1]}

    def checkpoint(self, row):
        return self.model, {"toy": row["draw"]}

    def state(self):
        return {"model": self.model.state_dict()}


TOY = dict(ious=[0.5, 0.5, 0.7, 0.7], losses=[3.0, 2.0, 4.0, 1.0])


def test_run_training_writes_the_folder_and_picks_the_best_epoch(tmp_path):
    from dipid.models import read_checkpoint_metadata

    events = []
    summary = runmod.run_training(ToyTask(tmp_path / "a", epochs=4, **TOY), callback=events.append)
    # Ties of the IoU go to the lower loss: epoch 2 beats 1, epoch 4 beats 3.
    assert summary.best_epoch == 4 and summary.best_metric == 0.7 and summary.epochs_completed == 4
    assert read_checkpoint_metadata(tmp_path / "a" / "best.safetensors")["metadata"]["epoch"] == 4
    assert [(e.kind, e.epoch, e.global_step) for e in events if e.kind == "epoch"] == [("epoch", k, k) for k in (1, 2, 3, 4)]
    rows = runmod.read_history_csv(tmp_path / "a" / "history.csv")
    assert [r["loss"] for r in rows] == TOY["losses"] and [r["val_iou"] for r in rows] == TOY["ious"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert list(config) == ["kind", "created", "versions", "resumes", "options", "data", "best_metric"]
    state, info = runmod.load_state(tmp_path / "a" / "state.safetensors")
    assert state["best"] == {"epoch": 4, "metric": 0.7, "loss": 1.0} and state["global_step"] == 4
    assert info["epoch"] == 4 and info["best_epoch"] == 4
    # Without a tie-break loss the earlier epoch keeps its place.
    assert runmod.run_training(ToyTask(tmp_path / "b", epochs=4, tie_loss=None, **TOY)).best_epoch == 3


def test_run_training_resumes_a_folder_saved_without_the_tie_break_loss(tmp_path):
    """Resume after epoch 2 repeats the straight run (RNG restored), also from a state whose "best"
    has no "loss" (as SSLM runs saved before the life cycle was shared wrote it)."""
    straight = runmod.run_training(ToyTask(tmp_path / "straight", epochs=4, **TOY))
    out = tmp_path / "resumed"
    runmod.run_training(ToyTask(out, epochs=2, **TOY))
    state, summary = runmod.load_state(out / "state.safetensors")
    state["best"] = {"epoch": state["best"]["epoch"], "metric": state["best"]["metric"]}
    runmod.save_state(out / "state.safetensors", state, summary=summary)
    resumed = runmod.run_training(ToyTask(out, epochs=4, resume=True, **TOY))
    assert resumed.resumed_from_epoch == 2 and [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["draw"] for r in resumed.history] == [r["draw"] for r in straight.history]
    assert resumed.best_epoch == straight.best_epoch == 4
    config = json.loads((out / "config.json").read_text())
    assert [(r["from_epoch"], r["changed"]) for r in config["resumes"]] == [(2, {"epochs": [2, 4]})]
    with pytest.raises(TrainingError, match="seed"):
        task = ToyTask(out, epochs=5, resume=True, **TOY)
        task.opts.seed = 1
        runmod.run_training(task)


def test_run_training_stops_on_nan_weights_and_reads_the_data_before_the_folder(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError) as info:
        runmod.run_training(ToyTask(out, epochs=3, nan_in=2, **TOY))
    message = str(info.value)
    assert "NaN/inf" in message and "epoch 2" in message and str(out) in message and "toy --out" in message
    assert runmod.load_state(out / "state.safetensors")[1]["epoch"] == 1
    assert [r["epoch"] for r in runmod.read_history_csv(out / "history.csv")] == [1]
    with pytest.raises(TrainingError, match="unreadable"):
        runmod.run_training(ToyTask(tmp_path / "bad", epochs=1, bad_data=True, **TOY))
    assert not (tmp_path / "bad").exists()


# ================================================================================ SSLM runs
def test_sslm_run_folder_history_and_checkpoints(straight_run, data):
    from dipid.models import load_checkpoint, read_checkpoint_metadata

    out, summary = straight_run
    assert summary.kind == "sslm" and summary.epochs_completed == 2 and summary.best_metric_name == "loss"
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert header == list(SSLM_HISTORY_COLUMNS)
    rows = runmod.read_history_csv(out / "history.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2), (2, 4)]
    weights = load_checkpoint(out / "last.safetensors").config.loss_weights()
    for row in rows:
        expected = (weights.similarity * row["similarity"] + weights.continuity * row["continuity"]
                    + weights.context * row["context"])
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert math.isnan(row["val_iou"]) and row["lr"] == 0.1 and row["seconds"] > 0
    best_epoch = min(rows, key=lambda r: r["loss"])["epoch"]
    assert summary.best_epoch == best_epoch
    for name in ("best.safetensors", "last.safetensors"):
        model = load_checkpoint(out / name)
        assert model.name == "sslm" and model.config.channels == 8
        assert model.config.channel_roles is not None and len(model.config.channel_roles) == 8
    meta = read_checkpoint_metadata(out / "best.safetensors")["metadata"]
    assert meta["epoch"] == best_epoch and meta["seed"] == 5 and meta["train_data"] == [str(data["scan"])]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "sslm" and config["data"]["frames_used"] == 6
    assert "Plotly.newPlot" in (out / "history.html").read_text()


def test_joint_predictor_loads_an_sslm_run(straight_run):
    from dipid.predict import JointPredictor

    out, _ = straight_run
    predictor = JointPredictor.from_pretrained(out, device="cpu")
    assert predictor.sslm is not None and predictor.tlm is None
    assert predictor.sslm.config.channel_roles is not None  # no on-the-fly assignment needed
    counts = np.random.default_rng(0).poisson(3.0, (1, *FRAME_SHAPE)).astype(np.float32)
    [result] = predictor.predict_frames(counts, models="ssl")
    assert result.ssl is not None and result.ssl.mask.shape == FRAME_SHAPE


def test_resume_reproduces_the_straight_run(straight_run, data, tmp_path):
    _, straight = straight_run
    out = tmp_path / "resumed"
    first = train_sslm(scans=[data["scan"]], out=out, seed=5, **{**FAST, "steps": 2})
    assert first.epochs_completed == 1
    second = train_sslm(scans=[data["scan"]], out=out, seed=5, resume=True, **FAST)
    assert second.resumed_from_epoch == 1 and second.epochs_completed == 2
    for a, b in zip(second.history, straight.history, strict=True):
        for column in ("step", "loss", "similarity", "continuity", "context", "clusters", "peak_channels"):
            assert a[column] == pytest.approx(b[column], rel=1e-5), column


def test_ctrl_c_leaves_a_resumable_folder(data, tmp_path):
    out = tmp_path / "interrupted"

    def interrupt(event):
        if event.kind == "step" and event.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingError) as info:
        train_sslm(scans=[data["scan"]], out=out, seed=5, callback=interrupt, **FAST)
    assert str(out) in str(info.value) and "--resume" in str(info.value)
    assert runmod.load_state(out / "state.safetensors")[1]["epoch"] == 1
    resumed = train_sslm(scans=[data["scan"]], out=out, seed=5, resume=True, **FAST)
    assert [r["epoch"] for r in resumed.history] == [1, 2] and resumed.resumed_from_epoch == 1


def test_nan_loss_stops_and_keeps_the_last_good_epoch(data, tmp_path, monkeypatch):
    import dipid.train.sslm as core

    out = tmp_path / "nan"
    real_loss = core.sslm_loss
    calls = {"n": 0}

    def poisoned(response, *, weights):
        calls["n"] += 1
        parts = real_loss(response, weights=weights)
        if calls["n"] > 2:  # epoch 2 (2 steps per epoch)
            parts = {**parts, "total": parts["total"] * float("nan")}
        return parts

    monkeypatch.setattr(core, "sslm_loss", poisoned)
    with pytest.raises(TrainingError) as info:
        train_sslm(scans=[data["scan"]], out=out, seed=5, **FAST)
    message = str(info.value)
    assert "nan" in message.lower() and str(out) in message and "--resume" in message and "epoch 2" in message
    state, summary = runmod.load_state(out / "state.safetensors")
    assert summary["epoch"] == 1
    assert [r["epoch"] for r in runmod.read_history_csv(out / "history.csv")] == [1]
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_labelled_validation_picks_best_by_iou(data, tmp_path):
    out = tmp_path / "labelled"
    summary = train_sslm(scans=[data["scan"]], out=out, seed=5, labels=data["labels"], **FAST)
    assert summary.best_metric_name == "val_iou"
    rows = runmod.read_history_csv(out / "history.csv")
    assert all(0.0 <= r["val_iou"] <= 1.0 for r in rows)
    best = max(rows, key=lambda r: r["val_iou"])  # first of equals: later ties do not replace it
    assert summary.best_epoch == best["epoch"] and summary.best_metric == pytest.approx(best["val_iou"])


def test_fresh_run_refuses_a_used_folder_and_resume_refuses_another_kind(straight_run, data, tmp_path):
    out, _ = straight_run
    with pytest.raises(TrainingError, match="--resume"):
        train_sslm(scans=[data["scan"]], out=out, seed=5, **FAST)
    (tmp_path / "tlmrun").mkdir()
    (tmp_path / "tlmrun" / "config.json").write_text(json.dumps({"kind": "tlm", "options": {}}))
    with pytest.raises(TrainingError, match="'tlm' run"):
        train_sslm(scans=[data["scan"]], out=tmp_path / "tlmrun", resume=True, **FAST)
    with pytest.raises(TrainingError, match="seed"):
        train_sslm(scans=[data["scan"]], out=out, seed=6, resume=True, **FAST)
