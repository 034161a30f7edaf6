"""Inference copies of the models: BatchNorm folded into convolutions, channels-last memory.

Both changes leave the maths unchanged (outputs agree to float rounding, ~1e-6 relative, which
``tests/test_equivalence.py`` checks end to end against the unmodified models):

* **BatchNorm folding.** In eval mode a BatchNorm (or torchvision's FrozenBatchNorm2d) right
  after a convolution is an affine map per channel, so it can be folded into the convolution's
  weight and bias: ``bn(conv(x)) == conv'(x)``. That removes one full read and write of every
  activation it touched (ResNet-50 has 53 of them). A BatchNorm after a ReLU (the SSLM's
  blocks) is left alone: folding it into the next 3x3 convolution would be wrong at the zero
  padding of the frame border.
* **Channels-last memory.** oneDNN (CPU) and cuDNN (tensor cores) run convolutions fastest on
  NHWC tensors; a model whose weights are channels-last makes its convolutions produce
  channels-last activations, with no change to the values.

The copies are for inference only: their state dicts no longer match the checkpoint layout, so
they are never saved or trained. :class:`dipid.JointPredictor` makes them (``optimize=True`` in
:class:`dipid.predict.PredictorSettings`) and keeps the models it was given untouched. A TLM
copy can also drop low-scored detections inside the network and limit its RPN proposals
(``min_score=``, ``proposals=``): settings of the run, never written into the model given.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from dipid.errors import DipidError

__all__ = ["fold_batchnorm", "inference_copy", "limit_detections"]

logger = logging.getLogger(__name__)

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
# torchvision's ResNet blocks (and the stem, seen through IntermediateLayerGetter) name their
# convolution/norm pairs conv1/bn1, conv2/bn2, conv3/bn3 and call them in that order.
_NAMED_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _folded(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """A new convolution computing ``norm(conv(x))`` (``norm`` in eval mode)."""
    eps = float(norm.eps)
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, eps, norm.weight, norm.bias
    )
    fused = copy.deepcopy(conv)
    fused.weight = weight
    fused.bias = bias
    return fused


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    if not (isinstance(conv, nn.Conv2d) and isinstance(norm, _NORMS)):
        return False
    if isinstance(norm, nn.BatchNorm2d) and (not norm.track_running_stats or norm.running_mean is None):
        return False  # normalises with batch statistics even in eval: not an affine map
    return norm.weight is not None and conv.out_channels == norm.weight.numel()


def fold_batchnorm(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a convolution into it.

    Recognised pairs: consecutive ``Conv2d``, norm entries of an ``nn.Sequential`` (torchvision's
    ``Conv2dNormActivation``, ResNet downsample branches, the SSLM's classifier), and the
    ``convN``/``bnN`` attributes of torchvision's ResNet blocks and stem. The norm is replaced by
    ``nn.Identity``. Call it on a model in eval mode only.

    Returns:
        the number of norms folded.
    """
    if module.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call .eval() on a copy first)")
    folded = 0
    for child in module.children():
        folded += fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if _foldable(conv, norm):
                module._modules[first] = _folded(conv, norm)
                module._modules[second] = nn.Identity()
                folded += 1
    for conv_name, norm_name in _NAMED_PAIRS:
        conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
        if conv is not None and norm is not None and _foldable(conv, norm):
            setattr(module, conv_name, _folded(conv, norm))
            setattr(module, norm_name, nn.Identity())
            folded += 1
    return folded


@torch.no_grad()
def inference_copy(
    model: nn.Module,
    *,
    device: str | torch.device = "cpu",
    fold_norms: bool = True,
    channels_last: bool = True,
    min_score: float | None = None,
    proposals: int | None = None,
) -> nn.Module:
    """An eval-mode copy of ``model`` on ``device``, by default with BatchNorm folded and
    channels-last weights (both off: a plain copy, the unoptimised reference).

    ``model`` itself is not modified (its configuration included: the copy has its own). Outputs
    of the copy equal the original's in eval mode up to float rounding; inputs may stay in the
    default (NCHW) layout. ``min_score`` and ``proposals`` apply to a TLM copy, see
    :func:`limit_detections`.
    """
    fast = copy.deepcopy(model).eval()
    if min_score is not None or proposals is not None:
        limit_detections(fast, min_score=min_score, proposals=proposals)
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    count = fold_batchnorm(fast) if fold_norms else 0
    fast = fast.to(device)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        backbone = getattr(getattr(fast, "net", None), "backbone", None)
        if backbone is not None:
            # torchvision's RoIAlign reads the feature maps pixel by pixel per box; on channels-last
            # maps its CPU kernel was 1.5x slower (0.23 -> 0.33 s a frame for 1000 proposals).
            backbone.register_forward_hook(_contiguous_feature_maps)
    logger.debug("inference copy of %s: %d BatchNorm layers folded, channels_last=%s",
                 type(model).__name__, count, channels_last)
    return fast


def limit_detections(tlm: nn.Module, *, min_score: float | None = None, proposals: int | None = None) -> None:
    """Set, in place, what a TLM (an inference copy: see :func:`inference_copy`) computes per frame in eval mode.

    Args:
        min_score: detections scoring below this are dropped inside the network (never lowers the
            model's own ``score_thresh``). Dropping them there spares the mask head, the costliest
            part per detection; the kept detections are unchanged, as box NMS only ever suppresses
            a box with a higher-scored one.
        proposals: RPN proposals per frame that reach the box head (None: the model's own).
    Raises:
        TypeError: ``tlm`` is not a torchvision Mask R-CNN wrapper (no ``net.roi_heads``/``net.rpn``).
        DipidError: ``proposals`` given, and this torchvision keeps the limit elsewhere.
    """
    net = getattr(tlm, "net", None)
    heads, rpn = getattr(net, "roi_heads", None), getattr(net, "rpn", None)
    if heads is None or rpn is None:
        raise TypeError(f"limit_detections needs a TLM (a Mask R-CNN in .net), got {type(tlm).__name__}")
    if min_score is not None:
        heads.score_thresh = max(float(heads.score_thresh), float(min_score))
    if proposals is not None:
        # torchvision keeps the limit in a private dict read by rpn.post_nms_top_n() and offers no
        # setter; the alternative, rebuilding the network from a changed config, costs a full
        # Mask R-CNN construction per predictor. Checked so a torchvision change fails loudly here.
        limits = getattr(rpn, "_post_nms_top_n", None)
        if not isinstance(limits, dict) or "testing" not in limits:
            raise DipidError("this torchvision's RegionProposalNetwork keeps no _post_nms_top_n['testing'] limit, "
                             "so the proposals setting cannot be applied: leave PredictorSettings.proposals at None "
                             "or install a torchvision version pyproject.toml allows")
        limits["testing"] = int(proposals)


def _contiguous_feature_maps(module: nn.Module, inputs: Any, output: "OrderedDict[str, torch.Tensor]"):
    """Forward hook: the backbone's feature maps back in the default (NCHW) layout."""
    return OrderedDict((name, feature.contiguous()) for name, feature in output.items())
