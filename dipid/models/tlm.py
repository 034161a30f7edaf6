"""TLM: transfer-learned Mask R-CNN (ResNet-50-FPN) for diffraction peaks.

The network is torchvision's ``maskrcnn_resnet50_fpn`` (``version="v1"``) or
``maskrcnn_resnet50_fpn_v2`` (``version="v2"``), always constructed without weights, with new
two-class heads (background, peak) as in the original DiPID, and with three changes for detector
frames, which are not photographs:

* **No resize.** torchvision scales every image so its short side is 800 px; a 195x487 Pilatus
  frame would silently become 800x1998. :class:`DetectorFrameTransform` keeps frames at their own
  size (batching pads them to a multiple of ``size_divisible``); an explicit ``upscale`` factor is
  available but never applied unless asked for.
* **No ImageNet mean/std.** Inputs are already normalised counts
  (:func:`dipid.models.normalize.normalize_counts`), so the transform's mean is 0 and std 1.
* **One input channel.** The first convolution is folded to grey by summing its RGB kernel over
  the input channels, which is exactly what replicating a grey frame into three channels computes,
  without the copy on every call. 3-channel base weights are folded as they are loaded.

Input/output contract of :class:`TLM` (written once, here):

* input ``images``: float32 tensor (B, 1, H, W) of normalised counts (or a list of (1, H, W)).
* training (``model.train()``, ``targets`` given): dict of torchvision's losses
  (``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``),
  each a scalar tensor. Each target is a dict with ``boxes`` (N, 4) float32 xyxy pixels,
  ``labels`` (N,) int64 (1 = peak) and ``masks`` (N, H, W) uint8.
* eval: one dict per image with ``boxes`` (N, 4) float32 xyxy in input pixels, ``labels`` (N,)
  int64, ``scores`` (N,) float32 in [0, 1] and ``masks`` (N, 1, H, W) float32 probabilities in
  [0, 1] at the input frame's size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection import (
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops.misc import FrozenBatchNorm2d

from dipid.errors import CheckpointError, UnknownNameError, WeightsNotFoundError
from dipid.models.tensorfile import (
    compare_state_dicts,
    format_state_dict_diff,
    read_checkpoint_metadata,
    read_checkpoint_tensors,
)

__all__ = [
    "TLM",
    "TLMConfig",
    "WeightSource",
    "WEIGHT_SOURCES",
    "TLM_VERSIONS",
    "FREEZE_MODES",
    "DetectorFrameTransform",
    "build_tlm",
    "fold_rgb_kernel_to_grey",
    "load_base_state_dict",
]

logger = logging.getLogger(__name__)

#: Versions of the torchvision architecture; the value is the torchvision builder.
TLM_VERSIONS = {"v1": maskrcnn_resnet50_fpn, "v2": maskrcnn_resnet50_fpn_v2}

#: Named freeze modes; an int 0..5 (trainable ResNet stages from the top) is also accepted.
FREEZE_MODES = ("backbone", "none")

_RESNET_STAGES_TOP_DOWN = ("layer4", "layer3", "layer2", "layer1", "conv1")
_FIRST_CONV_KEY = "backbone.body.conv1.weight"
# Class-specific tensors: their shapes depend on num_classes, so they are skipped (not an error)
# when a base checkpoint was trained for other classes (COCO has 91).
_PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


@dataclass(frozen=True)
class WeightSource:
    """A named place base weights come from.

    Attributes:
        name: what users pass as ``base_weights``.
        description: one line for docs and errors.
        torchvision_weights: per TLM version, the torchvision weights enum entry to download.
    """

    name: str
    description: str
    torchvision_weights: Mapping[str, Any] = field(default_factory=dict)


#: Known named weight sources. Anything else passed as ``base_weights`` is a local file path.
WEIGHT_SOURCES: dict[str, WeightSource] = {
    "coco": WeightSource(
        name="coco",
        description="torchvision's Mask R-CNN COCO weights (downloaded once into the torch hub cache)",
        torchvision_weights={
            "v1": MaskRCNN_ResNet50_FPN_Weights.DEFAULT,
            "v2": MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT,
        },
    ),
}


@dataclass
class TLMConfig:
    """Everything needed to rebuild a :class:`TLM` (JSON-serialisable with ``dataclasses.asdict``).

    Attributes:
        version: "v1" (maskrcnn_resnet50_fpn) or "v2" (maskrcnn_resnet50_fpn_v2).
        num_classes: classes including background (2: background, peak).
        freeze: "backbone" (ResNet body and FPN frozen), "none", or an int 0..5 = number of
            trainable ResNet stages counted from the top (torchvision's trainable_backbone_layers;
            the FPN then trains).
        anchor_sizes: one tuple of anchor sizes in pixels per FPN level (5 levels).
        aspect_ratios: anchor aspect ratios (height/width) used at every level.
        upscale: explicit resize factor applied to frames inside the network (1.0 = none).
        size_divisible: batched frames are zero-padded to a multiple of this.
        score_thresh: detections scoring below this are dropped (eval).
        nms_thresh: IoU of the per-class non-maximum suppression of detections (eval).
        detections_per_img: at most this many detections per frame (eval).
        rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test: RPN proposals kept per level before NMS
            and in total after it (eval).
        rpn_batch_size_per_image, box_batch_size_per_image: anchors and proposals sampled per
            frame for the RPN and box-head losses (training).
        batchnorm_eps: eps of the frozen BatchNorm layers. With ``batchnorm="frozen"`` the ResNet
            body's BatchNorm is FrozenBatchNorm2d (statistics and affine fixed: detection batches
            of a few frames give useless batch statistics); the FPN's (v2) is frozen whenever
            ``freeze="backbone"``.
        batchnorm: "frozen" (FrozenBatchNorm2d in the ResNet body: for a pretrained start) or
            "batch" (ordinary, trainable BatchNorm2d: training from random initialisation).
        base_weights: where the initial weights came from (provenance only; rebuilding a model
            from this config never loads them).
    """

    version: str = "v1"
    num_classes: int = 2
    freeze: str | int = "backbone"
    anchor_sizes: tuple[tuple[int, ...], ...] = ((8,), (16,), (32,), (64,), (128,))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    upscale: float = 1.0
    size_divisible: int = 32
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    batchnorm_eps: float = 0.0
    batchnorm: str = "frozen"
    base_weights: str | None = None

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; normalise so a round trip compares equal.
        self.anchor_sizes = tuple(tuple(int(s) for s in level) for level in self.anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        if self.version not in TLM_VERSIONS:
            raise UnknownNameError("TLM version", self.version, list(TLM_VERSIONS))
        _validate_freeze(self.freeze)
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one tuple per FPN level (5), got {len(self.anchor_sizes)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {self.num_classes}")
        if not self.upscale > 0:
            raise ValueError(f"upscale must be > 0, got {self.upscale}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def _validate_freeze(freeze: str | int) -> None:
    valid = [*FREEZE_MODES, *map(str, range(6))]
    if isinstance(freeze, bool) or not isinstance(freeze, (str, int)):
        raise UnknownNameError("freeze mode", freeze, valid)
    if isinstance(freeze, str) and freeze not in FREEZE_MODES:
        raise UnknownNameError("freeze mode", freeze, valid)
    if isinstance(freeze, int) and not 0 <= freeze <= 5:
        raise UnknownNameError("freeze mode", freeze, valid)


class DetectorFrameTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without the photograph assumptions.

    Frames keep their size (``upscale=1``) and values: inputs are normalised counts already, so
    the mean/std step (mean 0, std 1) is skipped rather than computed. Batching still zero-pads
    frames to a common size that is a multiple of ``size_divisible``; outputs are mapped back to
    each frame's own size by :meth:`postprocess`.
    """

    def __init__(self, *, upscale: float = 1.0, size_divisible: int = 32):
        super().__init__(
            min_size=0, max_size=0, image_mean=[0.0], image_std=[1.0], size_divisible=size_divisible
        )
        self.upscale = float(upscale)

    def normalize(self, image: Tensor) -> Tensor:
        """Identity (inputs are normalised counts); checks the dtype as torchvision does."""
        if not image.is_floating_point():
            raise TypeError(f"TLM expects float normalised counts, got {image.dtype}; use normalize_counts")
        return image

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Identity unless an explicit ``upscale`` was configured."""
        if self.upscale == 1.0:
            return image, target
        height, width = image.shape[-2:]
        new_size = (round(height * self.upscale), round(width * self.upscale))
        image = nn.functional.interpolate(image[None], size=new_size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target = dict(target)
            target["boxes"] = resize_boxes(target["boxes"], [height, width], list(new_size))
            if "masks" in target:
                masks = target["masks"][:, None].float()
                target["masks"] = nn.functional.interpolate(masks, size=new_size, mode="nearest")[:, 0].byte()
        return image, target

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(no normalisation (inputs are normalised counts), "
            f"upscale={self.upscale}, size_divisible={self.size_divisible})"
        )


def fold_rgb_kernel_to_grey(weight: Tensor) -> Tensor:
    """(out, 3, kh, kw) RGB kernel -> (out, 1, kh, kw): conv(grey, folded) == conv(grey x3, rgb)."""
    return weight.sum(dim=1, keepdim=True)


def _grey_first_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-input-channel copy of ``conv`` whose kernel is the RGB kernel summed over channels."""
    grey = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():
        grey.weight.copy_(fold_rgb_kernel_to_grey(conv.weight))
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)
    return grey


def _init_new_heads(net: MaskRCNN) -> None:
    """Start the new predictor layers with small outputs (Detectron's recipe: std 0.01 for class
    scores, 0.001 for box deltas and mask logits), so the first losses are near their
    uninformed values (log 2 for the masks) whatever the feature scale; torchvision's default
    kaiming init gives mask losses ~10x larger on unnormalised FPN features of a random backbone.
    """
    predictor = net.roi_heads.box_predictor
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    logits = net.roi_heads.mask_predictor.mask_fcn_logits
    nn.init.normal_(logits.weight, std=0.001)
    nn.init.zeros_(logits.bias)


def _freeze_batchnorm(module: nn.Module, eps: float) -> None:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child, eps)


def _apply_freeze(net: MaskRCNN, freeze: str | int) -> None:
    """Set requires_grad following ``freeze`` (see :class:`TLMConfig`)."""
    for parameter in net.parameters():
        parameter.requires_grad_(True)
    if freeze == "none":
        return
    if freeze == "backbone":
        for parameter in net.backbone.parameters():
            parameter.requires_grad_(False)
        return
    trainable = _RESNET_STAGES_TOP_DOWN[: int(freeze)]
    for name, parameter in net.backbone.body.named_parameters():
        if not name.startswith(trainable):
            parameter.requires_grad_(False)


def _build_net(config: TLMConfig) -> MaskRCNN:
    """The torchvision Mask R-CNN for ``config``, randomly initialised, 1 input channel."""
    builder = TLM_VERSIONS[config.version]
    net = builder(
        weights=None,
        weights_backbone=None,
        box_score_thresh=config.score_thresh,
        box_nms_thresh=config.nms_thresh,
        box_detections_per_img=config.detections_per_img,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_batch_size_per_image=config.box_batch_size_per_image,
    )
    in_features = net.roi_heads.box_predictor.cls_score.in_features
    net.roi_heads.box_predictor = FastRCNNPredictor(in_features, config.num_classes)
    net.roi_heads.mask_predictor = MaskRCNNPredictor(256, 256, config.num_classes)
    _init_new_heads(net)

    anchor_generator = AnchorGenerator(
        sizes=config.anchor_sizes, aspect_ratios=(config.aspect_ratios,) * len(config.anchor_sizes)
    )
    net.rpn.anchor_generator = anchor_generator
    num_anchors = anchor_generator.num_anchors_per_location()[0]
    if net.rpn.head.cls_logits.out_channels != num_anchors:
        conv_depth = 2 if config.version == "v2" else 1
        net.rpn.head = RPNHead(net.backbone.out_channels, num_anchors, conv_depth=conv_depth)

    net.transform = DetectorFrameTransform(upscale=config.upscale, size_divisible=config.size_divisible)
    net.backbone.body.conv1 = _grey_first_conv(net.backbone.body.conv1)

    # Detection batches are a few frames: batch statistics would be noise, so the ResNet body's
    # BatchNorm of a pretrained start is frozen (as torchvision does for pretrained v1); a frozen
    # FPN (v2 has BatchNorm there) must not drift either. Trained from scratch there are no
    # statistics to freeze (identity statistics let activations explode): BatchNorm trains, as
    # torchvision also does without pretrained weights.
    if config.batchnorm == "frozen":
        _freeze_batchnorm(net.backbone.body, config.batchnorm_eps)
    if config.freeze == "backbone":
        _freeze_batchnorm(net.backbone.fpn, config.batchnorm_eps)
    _apply_freeze(net, config.freeze)
    return net


class TLM(nn.Module):
    """Mask R-CNN peak detector; see the module docstring for the input/output contract.

    Attributes:
        config: the :class:`TLMConfig` it was built from.
        net: the torchvision :class:`~torchvision.models.detection.MaskRCNN`.
    """

    name: ClassVar[str] = "tlm"

    def __init__(self, config: TLMConfig):
        super().__init__()
        self.config = config
        self.net = _build_net(config)

    def forward(
        self, images: Tensor | Sequence[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """(B, 1, H, W) float32 normalised counts -> losses (training) or detections (eval)."""
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 1:
                raise ValueError(f"TLM expects images of shape (B, 1, H, W), got {tuple(images.shape)}")
            frames = list(images.unbind(0))  # views, no copies
        else:
            frames = list(images)
            for frame in frames:
                if frame.dim() != 3 or frame.shape[0] != 1:
                    raise ValueError(f"TLM expects frames of shape (1, H, W), got {tuple(frame.shape)}")
        return self.net(frames, targets)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters with requires_grad (what an optimizer should get)."""
        return [p for p in self.parameters() if p.requires_grad]


def _torchvision_state_dict(source: WeightSource, version: str) -> dict[str, Tensor]:
    weights = source.torchvision_weights[version]
    try:
        return weights.get_state_dict(progress=True)
    except Exception as exc:  # noqa: BLE001 - any download/cache failure means the same to the user
        raise CheckpointError(
            f"could not get {source.name!r} base weights ({weights.url}): {exc}. There is probably no "
            "network here: download that file elsewhere and pass its local path as base_weights, "
            "or pass base_weights=None for random initialisation."
        ) from exc


def _load_torch_file(path: Path) -> dict[str, Tensor]:
    """A torchvision-style ``.pth``/``.pt`` state dict, loaded without unpickling arbitrary objects."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refusals and corrupt files alike
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch state dict with weights_only=True ({exc}). dipid "
            "never unpickles Python objects: save plain weights with torch.save(model.state_dict(), path)."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # torchvision reference scripts save {"model": state_dict, ...}
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; save it with "
            "torch.save(model.state_dict(), path)."
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_dipid_file(path: Path) -> dict[str, Tensor]:
    metadata = read_checkpoint_metadata(path)
    if metadata.get("model") != TLM.name:
        raise CheckpointError(
            f"{path}: is a dipid {metadata.get('model')!r} checkpoint, not a TLM one; pass a TLM "
            "checkpoint, a torchvision .pth, 'coco' or None as base_weights."
        )
    tensors = read_checkpoint_tensors(path)
    return {k.removeprefix("net."): v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _resolve_base_state_dict(base_weights: str | Path, version: str) -> tuple[dict[str, Tensor], str]:
    """(state dict for ``net``, provenance string) for a name or a local file."""
    if isinstance(base_weights, str) and base_weights in WEIGHT_SOURCES:
        return _torchvision_state_dict(WEIGHT_SOURCES[base_weights], version), base_weights
    path = Path(base_weights)
    if not path.exists():
        if isinstance(base_weights, str) and not path.suffix and len(path.parts) == 1:
            raise UnknownNameError("base weights", base_weights, [*WEIGHT_SOURCES, "<path to .pth/.pt/.safetensors>"])
        raise WeightsNotFoundError(
            f"{path}: base weights file not found; pass an existing .pth/.pt/.safetensors file, "
            f"one of {sorted(WEIGHT_SOURCES)} or None."
        )
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        return _load_torch_file(path), str(path)
    if suffix == ".safetensors":
        return _load_dipid_file(path), str(path)
    raise CheckpointError(
        f"{path}: unknown weights format {suffix!r}; base_weights takes a torchvision .pth/.pt state "
        "dict or a dipid .safetensors checkpoint."
    )


def load_base_state_dict(net: MaskRCNN, state: Mapping[str, Tensor], *, source: str) -> list[str]:
    """Load base weights into a (grey) ``net``; returns the skipped class-specific tensor names.

    A 3-channel first conv is folded to grey as it is loaded (the same result as loading it into
    an RGB network and folding afterwards). Predictor tensors whose shapes differ (other classes)
    are skipped; any other missing, unexpected or mismatched tensor raises CheckpointError.
    """
    state = dict(state)
    first = state.get(_FIRST_CONV_KEY)
    if first is not None and first.dim() == 4 and first.shape[1] == 3:
        state[_FIRST_CONV_KEY] = fold_rgb_kernel_to_grey(first.float())
    expected = net.state_dict()
    diff = compare_state_dicts(expected, state)
    skipped = sorted(k for k in (*diff.mismatched, *diff.missing) if k.startswith(_PREDICTOR_PREFIXES))
    diff = diff.without(skipped)
    if diff:
        raise CheckpointError(
            f"{source}: base weights do not fit this TLM architecture: {format_state_dict_diff(diff)}. "
            "Use weights of the same version (v1/v2) and anchor aspect ratios, or base_weights=None."
        )
    for key in skipped:
        state.pop(key, None)
    net.load_state_dict(state, strict=False)
    if skipped:
        logger.info("base weights %s: skipped %d class-specific tensors: %s", source, len(skipped), ", ".join(skipped))
    return skipped


def build_tlm(
    *,
    base_weights: str | Path | None = None,
    freeze: str | int = "backbone",
    version: str = "v1",
    num_classes: int = 2,
    anchor_sizes: Sequence[Sequence[int]] = ((8,), (16,), (32,), (64,), (128,)),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    upscale: float = 1.0,
    size_divisible: int = 32,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    batchnorm_eps: float | None = None,
    batchnorm: str | None = None,
) -> TLM:
    """Build a TLM, optionally starting from base weights.

    Args:
        base_weights: ``"coco"`` (torchvision's COCO weights for ``version``; needs the network
            once), a local torchvision ``.pth``/``.pt`` state dict (3- or 1-channel), a dipid TLM
            ``.safetensors`` checkpoint, or None (random initialisation). Class-specific predictor
            tensors of other shapes are skipped and logged.
        freeze: "backbone", "none" or an int 0..5 (see :class:`TLMConfig`).
        batchnorm: "frozen" or "batch"; None = "frozen" with base weights, "batch" from random init.
        batchnorm_eps: eps of the frozen BatchNorm; None = 0.0 for v1 (torchvision's COCO v1
            weights were trained with eps 0, torchvision sets it so) and 1e-5 for v2.
        Other options: see :class:`TLMConfig`.
    Returns:
        the model in training mode, on the CPU.
    """
    if batchnorm is None:
        batchnorm = "batch" if base_weights is None else "frozen"
    if batchnorm not in ("frozen", "batch"):
        raise UnknownNameError("batchnorm", batchnorm, ("frozen", "batch"))
    if batchnorm_eps is None:
        batchnorm_eps = 0.0 if (version == "v1" and batchnorm == "frozen") else 1e-5
    config = TLMConfig(
        version=version,
        num_classes=num_classes,
        freeze=freeze,
        anchor_sizes=tuple(tuple(level) for level in anchor_sizes),
        aspect_ratios=tuple(aspect_ratios),
        upscale=upscale,
        size_divisible=size_divisible,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image,
        batchnorm_eps=float(batchnorm_eps),
        batchnorm=batchnorm,
    )
    state: dict[str, Tensor] | None = None
    if base_weights is not None:
        state, config.base_weights = _resolve_base_state_dict(base_weights, version)
    model = TLM(config)
    if state is not None:
        load_base_state_dict(model.net, state, source=config.base_weights or "base weights")
    return model

