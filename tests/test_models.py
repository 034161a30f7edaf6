"""Shared test suite of the two models (TLM, SSLM), their builders and checkpoints.

The TLM is a 44M-parameter Mask R-CNN: it is built with few proposals and detections and the
number of forward passes is kept small so the file runs in well under a minute on a CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dipid.errors import CheckpointError, DipidError, UnknownNameError, WeightsNotFoundError
from dipid.models import (
    MODEL_BUILDERS,
    SSLM,
    TLM,
    SSLMConfig,
    TLMConfig,
    build_model,
    build_sslm,
    build_tlm,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
    sha256_file,
)
from dipid.models import tlm as tlm_module
from dipid.models.tensorfile import (
    SCALE_SUFFIX,
    dequantize_per_channel,
    quantize_per_channel,
    read_checkpoint_tensors,
)
from dipid.models.sslm import (
    ROLE_BACKGROUND,
    ROLE_CORE,
    ROLE_HALO,
    SSLMLossWeights,
    assign_channels,
    component_significance,
    context_consistency_loss,
    feature_similarity_loss,
    local_background,
    local_significance,
    robust_noise_level,
    spatial_continuity_loss,
    sslm_loss,
)
from dipid.models.tlm import DetectorFrameTransform

# Small TLM: fewer proposals and detections keep each eval pass to a few seconds on a CPU.
TLM_SMALL = {
    "detections_per_img": 5,
    "rpn_post_nms_top_n_test": 50,
    "rpn_pre_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
}
SSLM_SMALL = {"channels": 8}
# Not a multiple of 32, so batching pads and the output must still come back at this size.
EVAL_SHAPE = (1, 1, 60, 90)
TRAIN_SHAPE = (1, 1, 64, 64)


def _frames(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Normalised-count-like frames: noise near 0 with one bright square."""
    generator = torch.Generator().manual_seed(seed)
    frames = 0.05 * torch.randn(shape, generator=generator)
    frames[..., 20:30, 25:37] += 1.5
    return frames


def _tlm_targets(height: int, width: int) -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, 20:30, 25:37] = 1
    return [{"boxes": torch.tensor([[25.0, 20.0, 37.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}]


def _train_loss(model: TLM | SSLM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    if isinstance(model, TLM):
        return model(x, _tlm_targets(x.shape[-2], x.shape[-1]))
    return sslm_loss(model(x), weights=model.config.loss_weights())


def _eval_outputs(model: TLM | SSLM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's eval output as one flat dict of tensors (first image for the TLM)."""
    model.eval()
    with torch.no_grad():
        if isinstance(model, TLM):
            return dict(model(x)[0])
        return {"response": model(x), "peak_probability": model.peak_probability(x)}


def _build(name: str, **options) -> TLM | SSLM:
    if name == "tlm":
        return build_tlm(**{**TLM_SMALL, **options})
    model = build_sslm(**{**SSLM_SMALL, **options})
    model.config.channel_roles = [ROLE_BACKGROUND] * 6 + [ROLE_HALO, ROLE_CORE]
    return model


@pytest.fixture(scope="module")
def eval_models() -> dict[str, TLM | SSLM]:
    torch.manual_seed(0)
    return {"tlm": _build("tlm"), "sslm": _build("sslm")}


@pytest.fixture(scope="module")
def eval_outputs(eval_models) -> dict[str, dict[str, torch.Tensor]]:
    x = _frames(EVAL_SHAPE)
    return {name: _eval_outputs(model, x) for name, model in eval_models.items()}


@pytest.fixture(scope="module")
def saved(eval_models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        name: save_checkpoint(model, folder / f"{name}.safetensors", metadata={"note": "test", "epoch": 3})
        for name, model in eval_models.items()
    }


# ----------------------------------------------------------------------------- shared suite


@pytest.mark.parametrize("name", ["tlm", "sslm"])
def test_training_step_gives_finite_losses_and_moves_only_trainable_parameters(name):
    torch.manual_seed(1)
    model = _build(name) if name == "sslm" else _build(name, freeze="backbone")
    losses = _train_loss(model, _frames(TRAIN_SHAPE if name == "tlm" else (2, 1, 32, 48)))
    total = sum(v for k, v in losses.items() if k != "total") if name == "tlm" else losses["total"]
    assert all(torch.isfinite(v) for v in losses.values())
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    total.backward()
    # A per-channel constant right before a training-mode BatchNorm is cancelled by it, so its
    # gradient is 0 up to rounding: in the SSLM (as in Kim et al.) the 1x1 conv's bias and the
    # bias of the BatchNorm just before that conv.
    exempt = {"classifier.0.bias", f"features.{len(model.features) - 1}.bias"} if name == "sslm" else set()
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad and k not in exempt}
    assert trainable
    # Every trainable tensor gets a gradient (the TLM's RPN, box and mask heads included).
    assert all(p.grad is not None and p.grad.abs().sum() > 1e-4 for p in trainable.values()), [
        k for k, p in trainable.items() if p.grad is None or p.grad.abs().sum() <= 1e-4
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    optimizer.step()
    for key, parameter in model.named_parameters():
        changed = not torch.equal(before[key], parameter.detach())
        if not parameter.requires_grad:
            assert not changed and parameter.grad is None, key
        elif key in trainable:
            assert changed, key
    if name == "tlm":
        assert not any(p.requires_grad for p in model.net.backbone.parameters())
        assert all(p.requires_grad for p in model.net.rpn.parameters())
        assert all(p.requires_grad for p in model.net.roi_heads.parameters())


def test_eval_output_contract_tlm(eval_outputs):
    out = eval_outputs["tlm"]
    _, _, height, width = EVAL_SHAPE
    assert set(out) == {"boxes", "labels", "scores", "masks"}
    n = len(out["scores"])
    assert 0 < n <= TLM_SMALL["detections_per_img"]
    assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == torch.float32
    assert out["labels"].shape == (n,) and out["labels"].dtype == torch.int64
    assert out["scores"].dtype == torch.float32
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
    # No resize: masks come back at the input frame's own size, boxes inside it.
    assert out["masks"].shape == (n, 1, height, width) and out["masks"].dtype == torch.float32
    assert ((out["masks"] >= 0) & (out["masks"] <= 1)).all()
    boxes = out["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


def test_eval_output_contract_sslm(eval_outputs, eval_models):
    out = eval_outputs["sslm"]
    batch, _, height, width = EVAL_SHAPE
    assert out["response"].shape == (batch, SSLM_SMALL["channels"], height, width)
    probability = out["peak_probability"]
    assert probability.shape == (batch, height, width) and probability.dtype == torch.float32
    assert ((probability >= 0) & (probability <= 1)).all()
    expected = torch.softmax(out["response"], dim=1)[:, 6:].sum(dim=1)  # roles halo, core
    torch.testing.assert_close(probability, expected)
    model = eval_models["sslm"]
    mask = model.peak_mask(_frames(EVAL_SHAPE), threshold=0.3)
    assert mask.dtype == torch.bool and torch.equal(mask, probability >= 0.3)


@pytest.mark.parametrize("name", ["tlm", "sslm"])
def test_checkpoint_round_trip_gives_same_config_and_outputs(name, eval_models, eval_outputs, saved):
    loaded = load_checkpoint(saved[name])
    assert type(loaded) is type(eval_models[name])
    assert loaded.config == eval_models[name].config
    assert not loaded.training
    again = _eval_outputs(loaded, _frames(EVAL_SHAPE))
    assert set(again) == set(eval_outputs[name])
    for key, value in eval_outputs[name].items():
        torch.testing.assert_close(again[key], value, msg=key)
    header = read_checkpoint_metadata(saved[name])
    assert header["format"] == "dipid" and header["model"] == name
    assert header["metadata"] == {"note": "test", "epoch": 3}
    assert header["config"] == json.loads(json.dumps(asdict(eval_models[name].config)))


def stored_bytes(path: Path) -> int:
    """Tensor bytes = file size minus safetensors' 8-byte length prefix and JSON header."""
    with open(path, "rb") as handle:
        header_bytes = int.from_bytes(handle.read(8), "little")
    return path.stat().st_size - 8 - header_bytes


def test_per_channel_int8_round_trip_error_is_half_a_step():
    weight = torch.randn(8, 3, 3, 3) * torch.logspace(-3, 1, 8).reshape(8, 1, 1, 1)  # channels of every scale
    weight[5] = 0.0
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (8,) and int(q.abs().max()) == 127
    back = dequantize_per_channel(q, scale)
    error = (back - weight).abs().reshape(8, -1).amax(dim=1)
    assert bool((error <= scale / 2 + 1e-12).all())
    assert torch.equal(back[5], torch.zeros_like(back[5])) and scale[5] == 1.0


@pytest.mark.parametrize("name", ["tlm", "sslm"])
def test_int8_checkpoint_is_a_quarter_and_loads_as_float32(name, eval_models, saved, tmp_path, monkeypatch):
    from dipid.models import checkpoint

    monkeypatch.setattr(checkpoint, "INT8_MIN_ELEMENTS", 64)  # the test SSLM is small: quantise it too
    model = eval_models[name]
    small = save_checkpoint(model, tmp_path / "int8.safetensors", dtype=torch.int8)
    assert read_checkpoint_metadata(small)["dtype"] == "int8"
    # a quarter of the weights' bytes, plus scales and float32 biases (a larger share of the tiny test SSLM)
    assert stored_bytes(small) < (0.27 if name == "tlm" else 0.5) * stored_bytes(saved[name])
    stored = read_checkpoint_tensors(small)
    reference = model.state_dict()
    assert set(stored) == set(reference)  # the ::scale companions are consumed, not returned
    for key, value in list(stored.items())[::5]:
        if value.is_floating_point():
            assert value.dtype == torch.float32
            step = reference[key].abs().amax() / 127
            torch.testing.assert_close(value, reference[key], rtol=0, atol=float(step) / 2 + 1e-7, msg=key)
    if name == "sslm":
        assert isinstance(load_checkpoint(small), type(model))
    else:  # the layers that output scores are kept exactly
        from dipid.models.tensorfile import INT8_KEEP_FLOAT

        kept = [k for k in reference if any(f in k for f in INT8_KEEP_FLOAT) and reference[k].is_floating_point()]
        assert kept and all(torch.equal(stored[k], reference[k]) for k in kept)


def test_int8_checkpoint_with_broken_scales_is_rejected(eval_models, tmp_path, monkeypatch):
    from dipid.models import checkpoint

    monkeypatch.setattr(checkpoint, "INT8_MIN_ELEMENTS", 64)
    path = save_checkpoint(eval_models["sslm"], tmp_path / "int8.safetensors", dtype=torch.int8)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        header = handle.metadata()
    key = next(k for k in tensors if k.endswith(SCALE_SUFFIX))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(CheckpointError, match="scales"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["tlm", "sslm"])
def test_float16_checkpoint_is_smaller_and_loads_as_float32(name, eval_models, saved, tmp_path):
    model = eval_models[name]
    half = save_checkpoint(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert stored_bytes(half) < 0.6 * stored_bytes(saved[name])
    assert read_checkpoint_metadata(half)["dtype"] == "float16"
    assert read_checkpoint_tensors(half)[next(k for k, _ in model.named_parameters())].dtype == torch.float16
    reference = model.state_dict()
    # The 44M-parameter TLM is checked on the stored tensors (loading converts them the same way
    # for both models); the SSLM goes through load_checkpoint.
    if name == "tlm":
        stored = read_checkpoint_tensors(half)
        # every floating tensor is stored as float16; BatchNorm's integer counters stay integers
        assert all(t.dtype == torch.float16 for k, t in stored.items() if not k.endswith("num_batches_tracked"))
        sample = list(stored.items())[::7]  # a sample keeps it quick
        loaded_state = {k: v.float() for k, v in sample if not k.endswith("num_batches_tracked")}
    else:
        loaded_state = load_checkpoint(half).state_dict()
    for key, value in loaded_state.items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            # float16 keeps 11 significant bits: relative error <= 2**-11.
            torch.testing.assert_close(value, reference[key], rtol=2**-10, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["tlm", "sslm"])
def test_checkpoint_that_does_not_fit_names_the_tensors(name, eval_models, saved, tmp_path):
    header = read_checkpoint_metadata(saved[name])
    raw_header = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in header.items()}
    tensors = read_checkpoint_tensors(saved[name])
    keys = sorted(k for k in tensors if not k.endswith("num_batches_tracked"))
    dropped, reshaped = keys[0], keys[1]
    if name == "tlm":  # keep the test light: a TLM file with only two real tensors
        tensors = {k: tensors[k] for k in keys[1:3]}
    else:
        del tensors[dropped]
    tensors[reshaped] = torch.zeros(3, 1)
    tensors["extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=raw_header)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert str(bad) in message
    assert dropped in message and "missing" in message
    assert reshaped in message and "[3, 1]" in message
    assert "extra.weight" in message and "unexpected" in message
    if name == "tlm":
        assert f"{len(keys) - 2} missing" in message and "more" in message


@pytest.mark.parametrize("name", ["tlm", "sslm"])
def test_builders_are_registered_and_unknown_names_list_the_valid_ones(name):
    assert MODEL_BUILDERS[name] in (build_tlm, build_sslm)
    with pytest.raises(UnknownNameError) as info:
        build_model("unet")
    assert "tlm" in str(info.value) and "sslm" in str(info.value)
    assert isinstance(build_model("sslm", channels=4), SSLM)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_file_errors(tmp_path, saved):
    with pytest.raises(WeightsNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    pickle_like = tmp_path / "model.pth"
    pickle_like.write_bytes(b"PK\x03\x04 not safetensors")
    with pytest.raises(CheckpointError, match="model.pth.*not a safetensors file.*base_weights"):
        load_checkpoint(pickle_like)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="foreign.safetensors.*not a dipid checkpoint"):
        load_checkpoint(foreign)
    digest = sha256_file(saved["sslm"])
    assert len(digest) == 64 and digest == sha256_file(saved["sslm"])
    assert digest != sha256_file(saved["tlm"])


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    model = build_sslm(channels=4)
    target = tmp_path / "m.safetensors"
    save_checkpoint(model, target)
    save_checkpoint(model, target, metadata={"again": True})  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert read_checkpoint_metadata(target)["metadata"] == {"again": True}
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(model, tmp_path / "no_such_folder" / "m.safetensors")


# ----------------------------------------------------------------------------- TLM specifics


def test_transform_never_upscales_a_pilatus_frame(eval_models):
    transform = eval_models["tlm"].net.transform
    assert isinstance(transform, DetectorFrameTransform)
    transform.eval()
    frame = torch.rand(1, 195, 487)
    images, _ = transform([frame])
    assert images.image_sizes == [(195, 487)]
    assert tuple(images.tensors.shape) == (1, 1, 224, 512)  # padded to multiples of 32 only
    torch.testing.assert_close(images.tensors[0, :, :195, :487], frame)  # values untouched
    assert images.tensors[0, :, 195:, :].abs().sum() == 0


def test_explicit_upscale_scales_frames_and_targets():
    transform = DetectorFrameTransform(upscale=2.0)
    target = {"boxes": torch.tensor([[10.0, 5.0, 20.0, 15.0]]), "masks": torch.zeros(1, 195, 487, dtype=torch.uint8)}
    images, targets = transform([torch.rand(1, 195, 487)], [target])
    assert images.image_sizes == [(390, 974)]
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[20.0, 10.0, 40.0, 30.0]]))
    assert targets[0]["masks"].shape == (1, 390, 974)


def test_integer_freeze_follows_torchvision_stage_semantics():
    torch.manual_seed(2)
    model = build_tlm(freeze=2, **TLM_SMALL)
    body = dict(model.net.backbone.body.named_parameters())
    assert all(p.requires_grad == name.startswith(("layer3", "layer4")) for name, p in body.items())
    assert all(p.requires_grad for p in model.net.backbone.fpn.parameters())
    before = {k: p.detach().clone() for k, p in body.items()}
    losses = _train_loss(model, _frames(TRAIN_SHAPE))
    sum(losses.values()).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name, parameter in body.items():
        assert torch.equal(before[name], parameter.detach()) == (not parameter.requires_grad), name
    assert model.config.freeze == 2
    everything = build_tlm(freeze="none", **TLM_SMALL)
    assert all(p.requires_grad for p in everything.parameters())


def test_batchnorm_frozen_for_pretrained_start_trainable_from_scratch():
    from torchvision.ops.misc import FrozenBatchNorm2d

    def norms(model):
        return [m for m in model.net.backbone.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]

    model = build_tlm(version="v2", batchnorm="frozen", **TLM_SMALL)
    assert norms(model) and all(isinstance(m, FrozenBatchNorm2d) for m in norms(model))
    assert model.net.backbone.body.conv1.in_channels == 1
    assert model.config.batchnorm_eps == 1e-5
    assert build_tlm(batchnorm="frozen", **TLM_SMALL).config.batchnorm_eps == 0.0
    # from random initialisation there are no statistics to freeze: BatchNorm trains
    scratch = build_tlm(**TLM_SMALL)
    assert scratch.config.batchnorm == "batch"
    norm_types = (FrozenBatchNorm2d, torch.nn.BatchNorm2d)
    body_norms = [m for m in scratch.net.backbone.body.modules() if isinstance(m, norm_types)]
    assert body_norms and all(type(m) is torch.nn.BatchNorm2d for m in body_norms)
    # its statistics follow the data in training mode (frozen ones never move)
    before = body_norms[0].running_mean.clone()
    scratch.train()
    with torch.no_grad():
        scratch.net.backbone(torch.randn(2, 1, 64, 96) * 3 + 1)
    assert not torch.equal(before, body_norms[0].running_mean)


def test_torchvision_pth_base_weights_are_folded_to_grey(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(3)
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    path = tmp_path / "torchvision_maskrcnn.pth"
    torch.save(reference, path)
    model = build_tlm(base_weights=path, **TLM_SMALL)
    state = model.net.state_dict()
    rgb = reference["backbone.body.conv1.weight"]
    assert rgb.shape[1] == 3 and state["backbone.body.conv1.weight"].shape[1] == 1
    torch.testing.assert_close(state["backbone.body.conv1.weight"], rgb.sum(dim=1, keepdim=True))
    # Folding is exact: a grey frame through the folded conv == the frame as RGB through the original.
    grey = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(
        torch.nn.functional.conv2d(grey, state["backbone.body.conv1.weight"]),
        torch.nn.functional.conv2d(grey.expand(1, 3, 16, 16), rgb),
    )
    shared = (
        "backbone.body.layer4.2.conv3.weight",
        "backbone.fpn.layer_blocks.0.0.weight",
        "rpn.head.cls_logits.weight",
    )
    for key in shared:
        torch.testing.assert_close(state[key], reference[key], msg=key)
    torch.testing.assert_close(state["backbone.body.bn1.running_var"], reference["backbone.body.bn1.running_var"])
    # Class-specific heads (91 COCO classes) are skipped, the 2-class heads stay.
    assert state["roi_heads.box_predictor.cls_score.weight"].shape == (2, 1024)
    assert model.config.base_weights == str(path)


def test_dipid_checkpoint_as_base_weights(eval_models, saved):
    model = build_tlm(base_weights=saved["tlm"], freeze=3, **TLM_SMALL)
    reference = eval_models["tlm"].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert model.config.freeze == 3
    with pytest.raises(CheckpointError, match="'sslm' checkpoint, not a TLM"):
        build_tlm(base_weights=saved["sslm"])


def test_unknown_tlm_options_and_missing_weights_are_reported(tmp_path):
    with pytest.raises(UnknownNameError, match="v1, v2"):
        build_tlm(version="v3")
    with pytest.raises(UnknownNameError, match="backbone, none"):
        build_tlm(freeze="heads")
    with pytest.raises(UnknownNameError, match="backbone, none"):
        build_tlm(freeze=7)
    with pytest.raises(UnknownNameError, match="coco"):
        build_tlm(base_weights="imagenet")
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        build_tlm(base_weights=tmp_path / "nowhere.pth")


def test_coco_weights_without_network_raise_a_helpful_error(monkeypatch):
    class OfflineWeights:
        url = "https://download.pytorch.org/models/maskrcnn.pth"

        def get_state_dict(self, progress: bool = True):
            raise URLError("Temporary failure in name resolution")

    source = tlm_module.WeightSource(name="coco", description="test", torchvision_weights={"v1": OfflineWeights()})
    monkeypatch.setitem(tlm_module.WEIGHT_SOURCES, "coco", source)
    with pytest.raises(CheckpointError, match="no network.*local path.*None"):
        build_tlm(base_weights="coco")


def test_tlm_config_survives_json():
    config = TLMConfig(freeze=2, anchor_sizes=((4,), (8,), (16,), (32,), (64,)))
    assert TLMConfig(**json.loads(json.dumps(asdict(config)))) == config


def test_tlm_rejects_colour_frames(eval_models):
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        eval_models["tlm"](torch.zeros(1, 3, 32, 32))


# ----------------------------------------------------------------------------- SSLM specifics


def test_sslm_architecture_follows_num_conv():
    model = build_sslm(num_conv=4, channels=6)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 + [(1, 1)]
    assert convs[0].in_channels == 1 and all(c.out_channels == 6 for c in convs)
    assert isinstance(model.classifier[-1], torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="channel_roles"):
        SSLMConfig(channels=3, channel_roles=[0, 1])


def test_peak_probability_needs_channel_roles():
    model = build_sslm(channels=4).eval()
    with pytest.raises(DipidError, match="assign_channels"):
        model.peak_probability(torch.zeros(1, 1, 8, 8))


def test_feature_similarity_loss_by_hand():
    response = torch.tensor([[[[0.0, 2.0]], [[math.log(3.0), 0.0]]]])  # (1, 2, 1, 2)
    # pixel 0: argmax 1, p = 3/4; pixel 1: argmax 0, p = e^2 / (e^2 + 1)
    expected = (math.log(4 / 3) + math.log(1 + math.exp(-2.0))) / 2
    assert feature_similarity_loss(response).item() == pytest.approx(expected, rel=1e-6)
    forced = torch.tensor([[[0, 1]]])  # the other channel at both pixels
    expected_forced = (math.log(4.0) + math.log(1 + math.exp(2.0))) / 2
    assert feature_similarity_loss(response, forced).item() == pytest.approx(expected_forced, rel=1e-6)


def test_spatial_continuity_loss_by_hand():
    response = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])  # (1, 1, 2, 3)
    # vertical |2-0|, |2-1|, |2-3| -> mean 4/3; horizontal 1, 2, 0, 0 -> mean 3/4
    assert spatial_continuity_loss(response).item() == pytest.approx(4 / 3 + 3 / 4, rel=1e-6)
    assert spatial_continuity_loss(torch.full((1, 3, 4, 4), 7.0)).item() == 0.0


def test_context_consistency_loss_by_hand():
    # 2x2 frame, coordinates / 2: rows {0, 0.5}, cols {0, 0.5}.
    # Channel 0 owns the top row, channel 1 the bottom row: each centroid is the middle of its
    # row, every pixel is 0.25 away -> variance 0.0625 each, mass shares 1/2 -> 0.0625.
    split = torch.tensor([[[[30.0, 30.0], [-30.0, -30.0]], [[-30.0, -30.0], [30.0, 30.0]]]])
    assert context_consistency_loss(split).item() == pytest.approx(0.0625, rel=1e-5)
    # Equal softmax everywhere: both centroids at the centre, variance 0.0625 + 0.0625 each.
    assert context_consistency_loss(torch.zeros(1, 2, 2, 2)).item() == pytest.approx(0.125, rel=1e-5)


def test_sslm_loss_weights_its_parts():
    response = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(4))
    weights = SSLMLossWeights(similarity=0.5, continuity=2.0, context=3.0)
    parts = sslm_loss(response, weights=weights)
    assert set(parts) == {"similarity", "continuity", "context", "total"}
    expected = 0.5 * parts["similarity"] + 2.0 * parts["continuity"] + 3.0 * parts["context"]
    torch.testing.assert_close(parts["total"], expected)
    torch.testing.assert_close(parts["continuity"], spatial_continuity_loss(response))


class _FixedResponseSSLM(SSLM):
    """An SSLM whose response is a fixed function of brightness (4 channels)."""

    def __init__(self, response_fn):
        super().__init__(SSLMConfig(channels=4))
        self.response_fn = response_fn

    def forward(self, x):
        return torch.cat(self.response_fn(x), dim=1)


def _three_bands(x):
    """Channel 0 wins below 0.5, channel 1 from 0.5 to 1.5, channel 2 above 1.5; 3 never wins."""
    return [torch.zeros_like(x), 10 * (x - 0.5), 20 * (x - 1.0), torch.full_like(x, -100.0)]


def _upper_half(x):
    """Channel 1 wins every pixel above 0 (half of pure noise), channel 0 the rest."""
    return [torch.zeros_like(x), 10 * x, torch.full_like(x, -100.0), torch.full_like(x, -100.0)]


def test_local_significance_separates_a_faint_patch_from_noise():
    generator = torch.Generator().manual_seed(7)
    frames = 0.2 * torch.randn(1, 1, 60, 60, generator=generator)
    frames[..., 20:30, 20:30] += 0.3  # 1.5 sigma per pixel
    significance = local_significance(frames)
    assert significance[0, 22:28, 22:28].median() > 3.0  # 3x3 mean: 4.5 sigma expected
    noise = significance[0, 40:, 40:]
    assert noise.median().abs() < 0.5 and (noise > 3.0).float().mean() < 0.01
    pixelwise = frames[0, 0] / robust_noise_level(frames)[0]
    assert pixelwise[22:28, 22:28].median() < 2.0  # single pixels alone would not show it


def test_assign_channels_rules_on_a_known_response():
    model = _FixedResponseSSLM(_three_bands)
    frames = 0.1 * torch.randn(2, 1, 40, 40, generator=torch.Generator().manual_seed(5))
    frames[:, :, 10:20, 10:20] = 1.4  # halo plateau
    frames[:, :, 13:17, 13:17] = 2.5  # core
    roles = assign_channels(model, frames, core_fraction=0.9)
    assert roles == [ROLE_BACKGROUND, ROLE_HALO, ROLE_CORE, ROLE_BACKGROUND]
    assert model.config.channel_roles == roles
    # With the default core fraction (0.5) the plateau, ~0.6 as bright as the core, is core too.
    assert assign_channels(model, frames) == [ROLE_BACKGROUND, ROLE_CORE, ROLE_CORE, ROLE_BACKGROUND]
    # Noise alone: nothing reaches channel 1 (0.5 = 5 sigmas), so no channel is a peak channel.
    noise = 0.1 * torch.randn(1, 1, 40, 40, generator=torch.Generator().manual_seed(6))
    assert assign_channels(model, noise) == [ROLE_BACKGROUND] * 4
    # Labels covering only the core: the halo channel's pixels are mostly unlabelled.
    labels = torch.zeros(2, 40, 40, dtype=torch.bool)
    labels[:, 13:17, 13:17] = True
    by_labels = assign_channels(model, frames, labels=labels)
    assert by_labels == [ROLE_BACKGROUND, ROLE_BACKGROUND, ROLE_CORE, ROLE_BACKGROUND]
    # A channel winning the upper half of pure noise is not a peak channel.
    assert assign_channels(_FixedResponseSSLM(_upper_half), noise) == [ROLE_BACKGROUND] * 4


# ----------------------------------------------------------------------------- SSLM significance test


def _normalised(expected: np.ndarray, seed: int) -> torch.Tensor:
    """Poisson counts drawn around ``expected`` (H, W), normalised, as (1, 1, H, W)."""
    from dipid.models.normalize import normalize_counts

    counts = np.random.default_rng(seed).poisson(expected).astype(np.float32)
    return normalize_counts(torch.from_numpy(counts))[None, None]


def _slope_and_peaks(height: int = 96, width: int = 192, *, hot: bool = True) -> np.ndarray:
    """Expected counts: a background rising from 1 to 9 counts across the columns, a faint
    round peak (8 counts over ~2 at its centre) on the dim side and, optionally, a hot pixel."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    expected = 1.0 + 8.0 * cols / (width - 1)
    expected += 8.0 * np.exp(-((rows - 48) ** 2 + (cols - 30) ** 2) / (2 * 3.0**2))
    if hot:
        expected[20, 60] = 2e4
    return expected


def test_local_background_follows_a_slope_and_is_not_lifted_by_a_wide_peak():
    rows, cols = np.mgrid[0:96, 0:192].astype(np.float64)
    slope = 1.0 + 8.0 * cols / 191
    wide = 60.0 * np.exp(-((rows - 48) ** 2 + (cols - 96) ** 2) / (2 * 12.0**2))  # ~4 cells across
    x = _normalised(slope + wide, seed=3)
    significance = local_significance(x)[0]
    away = torch.from_numpy(np.hypot(rows - 48, cols - 96) > 45)
    # The bright end of the slope is as insignificant as the dim end (a frame-wide median would
    # put the bright quarter several sigma up), and noise stays within the usual tails.
    assert significance[away].median().abs() < 0.5
    assert significance[:, 150:][away[:, 150:]].median() < 1.0
    assert (significance[away] > 4.0).float().mean() < 0.01
    # The wide peak does not lift the background under itself: its centre stays very significant
    # and the level there is close to that of its surroundings, not to the peak.
    level, sigma = local_background(x)
    assert significance[48, 96] > 10
    lift = float(level[0, 48, 96] - level[0, 48, 40:50].mean())
    rise = float(x[0, 0, 45:52, 93:100].mean() - level[0, 48, 40:50].mean())
    assert lift < 0.3 * rise
    assert torch.isfinite(sigma).all() and (sigma > 0).all()


def test_local_background_handles_frames_smaller_than_a_cell():
    level, sigma = local_background(torch.zeros(2, 1, 5, 7))
    assert level.shape == sigma.shape == (2, 5, 7)
    assert torch.isfinite(level).all() and torch.isfinite(sigma).all()


def test_component_significance_by_hand():
    excess = np.zeros((4, 8))
    labels = np.zeros((4, 8), np.int32)
    excess[0, 0:4] = [30.0, 0.0, 0.0, 0.0]  # a hot pixel and three noise pixels
    labels[0, 0:4] = 1
    excess[2, 0:5] = 3.0  # five pixels each 3 sigma up
    labels[2, 0:5] = 2
    excess[3, 7] = 50.0  # a single pixel
    labels[3, 7] = 3
    significance, mean_excess = component_significance(excess, labels, 3)
    np.testing.assert_allclose(significance, [0.0, 12.0 / 2.0, 0.0])
    np.testing.assert_allclose(mean_excess, [0.0, 3.0, 0.0])
    assert [a.shape for a in component_significance(excess, np.zeros_like(labels), 0)] == [(0,), (0,)]


def _smoothed_brightness(threshold: float):
    """Channel 1 wins where the 3 x 3 mean of the input exceeds ``threshold``: like a trained
    SSLM, it spreads a hot pixel over its neighbours and follows the raw brightness of a slope."""

    def response(x):
        smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return [torch.zeros_like(x), 40 * (smooth - threshold), torch.full_like(x, -100.0), torch.full_like(x, -100.0)]

    return response


def test_peak_probability_drops_hot_pixels_and_slopes_but_keeps_a_faint_peak():
    model = _FixedResponseSSLM(_smoothed_brightness(0.05))
    model.config.channel_roles = [ROLE_BACKGROUND, ROLE_CORE, ROLE_BACKGROUND, ROLE_BACKGROUND]
    x = _normalised(_slope_and_peaks(), seed=11)
    raw = model.cluster_probability(x)[0] >= 0.5
    # Without the test the clustering marks the hot pixel's neighbourhood, the faint peak and the
    # bright end of the slope.
    assert raw[19:22, 59:62].all() and raw[46:51, 28:33].all() and raw[:, 170:].float().mean() > 0.5
    gated = model.peak_mask(x)[0]
    assert not gated[15:26, 55:66].any()  # hot pixel gone
    assert gated[:, 150:].float().mean() < 0.01  # noise on the bright side of the slope gone
    assert gated[46:51, 28:33].all()  # the faint peak kept, with its whole extent
    assert torch.equal(gated[40:57, 20:41], raw[40:57, 20:41])
    model.config.min_significance = 0.0  # the test switched off: the clustering as it is
    assert torch.equal(model.peak_mask(x)[0], raw)


def test_peak_probability_keeps_gradients_through_kept_components():
    model = _FixedResponseSSLM(_smoothed_brightness(0.12))
    model.config.channel_roles = [ROLE_BACKGROUND, ROLE_CORE, ROLE_BACKGROUND, ROLE_BACKGROUND]
    x = _normalised(_slope_and_peaks(hot=False), seed=12).requires_grad_(True)
    model.peak_probability(x).sum().backward()
    assert x.grad is not None and x.grad[0, 0, 40:57, 20:41].abs().sum() > 0


def test_sslm_inference_settings_round_trip_and_old_checkpoints_get_defaults(tmp_path):
    from safetensors import safe_open

    model = build_sslm(channels=4, channel_roles=[0, 2, 0, 1], threshold=0.4, min_significance=7.5,
                       min_mean_excess=0.5, background_cell=8, background_smooth=3).eval()
    path = save_checkpoint(model, tmp_path / "new.safetensors")
    loaded = load_checkpoint(path)
    assert asdict(loaded.config) == asdict(model.config)

    # A checkpoint written before the settings existed: its config lacks them.
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    config = json.loads(metadata["config"])
    for key in ("threshold", "min_significance", "min_mean_excess", "background_cell", "background_smooth"):
        del config[key]
    metadata["config"] = json.dumps(config)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    defaults = SSLMConfig()
    loaded_old = load_checkpoint(old)
    assert loaded_old.config.channel_roles == [0, 2, 0, 1]
    assert (loaded_old.config.threshold, loaded_old.config.min_significance, loaded_old.config.min_mean_excess) == (
        defaults.threshold, defaults.min_significance, defaults.min_mean_excess)
    assert (loaded_old.config.background_cell, loaded_old.config.background_smooth) == (16, 5)
    x = torch.rand(1, 1, 24, 24)
    torch.testing.assert_close(loaded_old(x), model(x))


@pytest.mark.parametrize("bad", [{"threshold": 0.0}, {"threshold": 1.0}, {"min_significance": -1.0},
                                 {"min_significance": math.inf}, {"min_mean_excess": -0.5}, {"background_cell": 1},
                                 {"background_smooth": 4}])
def test_sslm_config_rejects_bad_inference_settings(bad):
    with pytest.raises(ValueError):
        SSLMConfig(**bad)
