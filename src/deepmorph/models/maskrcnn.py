"""Mask R-CNN for galaxy fields: find, outline and classify every object of an image.

Mask R-CNN (He et al. 2017, ICCV, arXiv:1703.06870) is Faster R-CNN (Ren et al. 2015) with a
third head: a backbone + feature pyramid (FPN, Lin et al. 2017) turns the image into feature maps
at strides 4 to 64; a region-proposal network scores anchor boxes at each position; RoIAlign cuts
the features under each proposal; a box head classifies it and refines its box, and a small
fully convolutional head predicts its mask (28 x 28 per box, pasted back into the image).

:func:`maskrcnn` builds torchvision's implementation for astronomical images, trained from
scratch (nothing is downloaded): a ResNet-18 (or MobileNetV3) backbone whose first convolution
takes ``in_channels`` bands, batch norm that trains (torchvision's detection backbones freeze it,
for ImageNet weights we do not have), anchors of 4 to 64 pixels for galaxies of 2-40 pixels, a
narrow FPN and mask head (``fpn_channels``) so that CPUs can train it, and room for crowded fields
(``detections_per_img``).

Images go in as they are: torchvision's transform would resize every image to ``min_size`` and
standardise it with ImageNet's mean and standard deviation; here it does neither (mean 0, std 1,
no resampling, any size; images are only padded to a multiple of 32). Normalise images before
the model sees them, as :mod:`deepmorph.workflows.detect` does: sky-subtract, then
``asinh(image / sky_sigma)`` (noise ~ +-1, galaxy cores ~ 5-8).

Classes follow torchvision's convention: label 0 is the background, labels ``1..num_classes``
the object classes (for simulated fields: the four galaxy classes, then stars).

>>> model = maskrcnn(num_classes=5, in_channels=1)                    # doctest: +SKIP
>>> model.eval()(torch.zeros(2, 1, 128, 128))[0].keys()             # doctest: +SKIP
dict_keys(['boxes', 'labels', 'scores', 'masks'])
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from deepmorph.errors import DeepmorphValueError

BACKBONES = ("resnet18", "resnet34", "mobilenet")
#: Anchor side per FPN level (strides 4, 8, 16, 32, 64 with the ResNet stem): galaxies of 2-40 px.
DEFAULT_ANCHORS = ((4,), (8,), (16,), (32,), (64,))

# sparse_roi_align's CSR matrix: a product and its transpose only, both long supported
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _bilinear_axis(start: torch.Tensor, length: torch.Tensor, bins: int, samples: int, size: int):
    """RoIAlign's sample coordinates along one axis and their two bilinear neighbours and weights.

    ``bins * samples`` points per RoI, evenly spaced in ``[start, start + length]`` (feature-map
    pixels, pixel centres at integers); points more than a pixel outside the map weigh 0, points
    within a pixel of the edge take the edge pixel, as torchvision's kernel does.
    """
    t = (torch.arange(bins * samples, dtype=start.dtype, device=start.device) + 0.5) / (bins * samples)
    c = start[:, None] + t[None] * length[:, None]
    inside = ((c >= -1) & (c <= size)).to(start.dtype)
    c = c.clamp(0, size - 1)
    lo = c.floor().long()
    frac = c - lo.to(c.dtype)
    return lo, (lo + 1).clamp(max=size - 1), (1 - frac) * inside, frac * inside


def sparse_roi_align(features: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float,
                     sampling_ratio: int) -> torch.Tensor:
    """RoIAlign (``aligned=False``, fixed sampling) as one sparse-matrix product; torchvision's values.

    Each output bin is the mean of ``sampling_ratio**2`` bilinear samples, i.e. a fixed linear
    combination of at most ``4 * sampling_ratio**2`` feature pixels: the whole operation is a sparse
    (bins x pixels) matrix times the (pixels x channels) features. Its gradient is the transposed
    product, which on a CPU is ~4x faster than torchvision's RoIAlign backward (a serial loop that
    took a third of a detector's training step).

    Parameters
    ----------
    features : Tensor
        Feature maps, shape (B, C, H, W).
    rois : Tensor
        Regions, shape (K, 5): image index, x1, y1, x2, y2 in input pixels.
    output_size : (int, int)
        Bins per RoI (height, width).
    spatial_scale : float
        Feature-map pixels per input pixel.
    sampling_ratio : int
        Samples per bin side (> 0).

    Returns
    -------
    Tensor
        Shape (K, C, *output_size), differentiable with respect to ``features``.
    """
    n_img, channels, height, width = features.shape
    ph, pw = (int(v) for v in output_size)
    s = int(sampling_ratio)
    n = rois.shape[0]
    if n == 0:
        return features.new_zeros((0, channels, ph, pw))
    rois = rois.detach().to(features.dtype)
    image = rois[:, 0].long()
    x1, y1 = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
    roi_w = (rois[:, 3] * spatial_scale - x1).clamp(min=1.0)
    roi_h = (rois[:, 4] * spatial_scale - y1).clamp(min=1.0)
    y_lo, y_hi, wy_lo, wy_hi = _bilinear_axis(y1, roi_h, ph, s, height)
    x_lo, x_hi, wx_lo, wx_hi = _bilinear_axis(x1, roi_w, pw, s, width)
    # per bin: its s samples x 2 neighbours along each axis
    yi = torch.stack([y_lo, y_hi], -1).reshape(n, ph, 1, 2 * s, 1)
    wy = torch.stack([wy_lo, wy_hi], -1).reshape(n, ph, 1, 2 * s, 1)
    xi = torch.stack([x_lo, x_hi], -1).reshape(n, 1, pw, 1, 2 * s)
    wx = torch.stack([wx_lo, wx_hi], -1).reshape(n, 1, pw, 1, 2 * s)
    column = image.reshape(n, 1, 1, 1, 1) * (height * width) + yi * width + xi
    weight = wy * wx / (s * s)
    per_row = 4 * s * s
    rows = torch.arange(0, n * ph * pw * per_row + 1, per_row, device=features.device)
    matrix = torch.sparse_csr_tensor(rows, column.reshape(-1), weight.reshape(-1),
                                     (n * ph * pw, n_img * height * width), check_invariants=False)
    pixels = features.permute(0, 2, 3, 1).reshape(n_img * height * width, channels)
    return (matrix @ pixels).reshape(n, ph, pw, channels).permute(0, 3, 1, 2)


class SparseRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-scale RoIAlign, computed by :func:`sparse_roi_align` on CPUs.

    Same levels, scales and values as :class:`torchvision.ops.MultiScaleRoIAlign` (no parameters,
    so checkpoints are interchangeable); CUDA tensors and adaptive sampling (``sampling_ratio <= 0``)
    go to torchvision's kernels.
    """

    def forward(self, x: dict, boxes: list, image_shapes: list) -> torch.Tensor:
        levels = [x[k] for k in self.featmap_names]
        if levels[0].device.type != "cpu" or self.sampling_ratio <= 0:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(levels, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(levels) == 1:
            return sparse_roi_align(levels[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        level_of = self.map_levels(boxes)
        result = levels[0].new_zeros((len(rois), levels[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(levels, self.scales, strict=True)):
            index = torch.where(level_of == level)[0]
            result[index] = sparse_roi_align(feature, rois[index], self.output_size, scale,
                                             self.sampling_ratio).to(result.dtype)
        return result


class _AsIsTransform(GeneralizedRCNNTransform):
    """torchvision's batching transform without the resize: images keep their size and pixels.

    (Normalisation is ``(x - 0) / 1``: the caller normalises.) Only the padding of the batch to a
    multiple of ``size_divisible`` remains, and boxes come back in the input's pixels.
    """

    def resize(self, image, target=None):
        return image, target


class ObjectRoIHeads(RoIHeads):
    """torchvision's RoI heads with one detection per object instead of one per (object, class).

    torchvision scores each class of each proposal separately, so a faint galaxy whose class is
    uncertain (spheroid or disk?) comes out as several detections, each with a low score. Here a
    proposal's ``score`` is the probability that it is an object at all, ``1 - p(background)``; its
    ``label`` is the most probable class, whose box regression and mask it takes; ``class_probs``
    (N, num_classes) are the class probabilities given that it is an object. Non-maximum suppression
    is class-agnostic (IoU ``nms_thresh``).
    """

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        per_image = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals)  # (P, num_classes + 1, 4)
        probs_all = F.softmax(class_logits, -1)
        out_boxes, out_scores, out_labels, self._class_probs = [], [], [], []
        for boxes, probs, shape in zip(boxes_all.split(per_image), probs_all.split(per_image), image_shapes,
                                       strict=True):
            score = 1.0 - probs[:, 0]
            labels = probs[:, 1:].argmax(dim=1) + 1
            boxes = box_ops.clip_boxes_to_image(boxes[torch.arange(len(labels), device=labels.device), labels], shape)
            keep = torch.where(score > self.score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[box_ops.nms(boxes[keep], score[keep], self.nms_thresh)][: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(score[keep])
            out_labels.append(labels[keep])
            self._class_probs.append(probs[keep, 1:] / score[keep, None].clamp_min(1e-12))
        return out_boxes, out_scores, out_labels

    def forward(self, features, proposals, image_shapes, targets=None):
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if not self.training:
            for r, probs in zip(result, self._class_probs, strict=True):
                r["class_probs"] = probs
        return result, losses


class GalaxyMaskRCNN(MaskRCNN):
    """torchvision's :class:`~torchvision.models.detection.MaskRCNN`, with what deepmorph needs to know.

    Built by :func:`maskrcnn`. In training mode ``model(images, targets)`` returns the dict of
    losses (``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``,
    ``loss_rpn_box_reg``); in eval mode ``model(images)`` returns one dict per image with
    ``boxes`` (N, 4) float ``x0, y0, x1, y1`` in torchvision's pixel convention (pixel ``j`` spans
    ``[j, j + 1]``; subtract 0.5 for deepmorph's, where it spans ``[j - 0.5, j + 0.5]``),
    ``labels`` (N,) int64 in ``1..num_classes`` (the most probable class), ``scores`` (N,) the
    probability of being an object, ``class_probs`` (N, num_classes) the class probabilities given
    that, and ``masks`` (N, 1, H, W) probabilities (see :class:`ObjectRoIHeads`).

    Attributes
    ----------
    in_channels, num_classes : int
        Bands of the input; object classes (background excluded).
    options : dict
        The keyword arguments :func:`maskrcnn` was called with (saved with a run).
    """

    #: Not a classifier/regressor of the registry (it is built by :func:`maskrcnn`, not by name).
    detector = True


def _norm_layer(norm: str):
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(min(32, max(1, channels // 4)), channels)
    if norm == "frozen":
        from torchvision.ops.misc import FrozenBatchNorm2d

        return FrozenBatchNorm2d
    raise DeepmorphValueError(f"maskrcnn: norm must be 'batch', 'group' or 'frozen', got {norm!r}")


def _resnet_backbone(name: str, in_channels: int, fpn_channels: int, stem_stride: int, trainable_layers: int,
                     norm: str) -> BackboneWithFPN:
    from torchvision.models import resnet

    body = getattr(resnet, name)(weights=None, norm_layer=_norm_layer(norm))
    body.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if stem_stride == 2:
        body.maxpool = nn.Identity()  # layer1 at stride 2: small galaxies keep more feature pixels
    elif stem_stride != 4:
        raise DeepmorphValueError(f"maskrcnn: stem_stride must be 2 or 4, got {stem_stride}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers] + (["bn1"] if trainable_layers == 5
                                                                                     else [])
    for pname, p in body.named_parameters():
        if not any(pname.startswith(layer) for layer in train):
            p.requires_grad_(False)
    widths = [64, 128, 256, 512]
    return BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, widths, fpn_channels,
                           extra_blocks=LastLevelMaxPool())


def _mobilenet_backbone(in_channels: int, fpn_channels: int, trainable_layers: int, norm: str) -> BackboneWithFPN:
    """MobileNetV3-Large with an FPN on its stride-4, 8, 16 and 32 stages (torchvision's own
    detection variant keeps only strides 16 and 32, too coarse for galaxies of a few pixels)."""
    from torchvision.models import mobilenet_v3_large

    if norm != "batch":
        raise DeepmorphValueError("maskrcnn: the mobilenet backbone supports norm='batch' only")
    features = mobilenet_v3_large(weights=None).features
    first = features[0][0]
    features[0][0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                               bias=False)
    # The last block of each resolution: strides 4, 8, 16 and 32 (found by running a dummy image).
    x, last_at = torch.zeros(1, in_channels, 64, 64), {}
    with torch.no_grad():
        for i, block in enumerate(features):
            x = block(x)
            last_at[64 // x.shape[-1]] = (i, x.shape[1])
    stages = [last_at[s] for s in (4, 8, 16, 32)]
    # Five groups as for the ResNet (stem, then the stride-4 to 32 stages); freeze all but the
    # deepest ``trainable_layers``.
    ends = [0] + [i for i, _ in stages]
    frozen_up_to = ends[4 - trainable_layers] if trainable_layers < 5 else -1
    for i, block in enumerate(features):
        if i <= frozen_up_to:
            block.requires_grad_(False)
    body = nn.Sequential(OrderedDict((str(i), b) for i, b in enumerate(features[:stages[-1][0] + 1])))
    return BackboneWithFPN(body, {str(i): str(k) for k, (i, _) in enumerate(stages)}, [c for _, c in stages],
                           fpn_channels, extra_blocks=LastLevelMaxPool())


def maskrcnn(
    num_classes: int = 5,
    in_channels: int = 1,
    backbone: str = "resnet18",
    image_size: int = 128,
    fpn_channels: int = 64,
    mask_channels: int = 64,
    mask_layers: int = 2,
    box_head_size: int = 256,
    anchor_sizes: tuple = DEFAULT_ANCHORS,
    aspect_ratios: tuple = (0.5, 1.0, 2.0),
    stem_stride: int = 4,
    trainable_layers: int = 5,
    norm: str = "batch",
    rpn_pre_nms_top_n: tuple[int, int] = (1000, 1000),
    rpn_post_nms_top_n: tuple[int, int] = (500, 500),
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 256,
    box_positive_fraction: float = 0.25,
    roi_sampling_ratio: int = 2,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    weights=None,
    weights_backbone=None,
) -> GalaxyMaskRCNN:
    """A Mask R-CNN for ``in_channels``-band images of galaxy fields, untrained.

    Parameters
    ----------
    num_classes : int
        Object classes, background excluded (the network's labels are ``1..num_classes``).
    in_channels : int
        Bands per image.
    backbone : {"resnet18", "resnet34", "mobilenet"}
        Feature extractor under the FPN (trained from scratch).
    image_size : int
        Side of the training images (tiles), pixels; recorded for tiled inference (images of any
        size go through without resampling).
    fpn_channels : int
        Channels of the feature pyramid (torchvision: 256; 64 trains ~5x faster on a CPU).
    mask_channels, mask_layers : int
        Width and number of 3 x 3 convolutions of the mask head (torchvision: 256, 4).
    box_head_size : int
        Width of the two fully connected layers of the box head (torchvision: 1024).
    anchor_sizes : tuple of tuple of int
        Anchor sides (pixels) per FPN level, five levels (strides 4-64; 2-32 with ``stem_stride=2``).
    aspect_ratios : tuple of float
        Anchor height/width ratios, the same at every level.
    stem_stride : {2, 4}
        Stride of the ResNet stem: 4 as torchvision; 2 drops its max-pool (finer features for the
        smallest objects, ~3x slower).
    trainable_layers : int
        ResNet stages trained, counted from the deepest (5: all; for fine-tuning).
    norm : {"batch", "group", "frozen"}
        Normalisation layers of the backbone. "frozen" is torchvision's choice for ImageNet
        weights; from scratch it leaves the backbone unnormalised.
    rpn_pre_nms_top_n, rpn_post_nms_top_n : (int, int)
        Proposals kept per image before and after the RPN's NMS, (training, testing).
    rpn_batch_size_per_image, box_batch_size_per_image : int
        Anchors and proposals sampled per image for the losses (torchvision: 256, 512).
    box_positive_fraction : float
        Largest fraction of the sampled proposals that are objects (torchvision: 0.25).
    roi_sampling_ratio : int
        Bilinear samples per RoIAlign bin side (torchvision: 2; 1 is ~30% faster to train on a CPU).
    box_score_thresh, box_nms_thresh : float
        Detections with a lower class score are dropped; per-class NMS IoU at inference.
    detections_per_img : int
        Most detections per image (crowded fields: 300).
    weights, weights_backbone : None
        Only None: deepmorph downloads nothing and trains from scratch.

    Returns
    -------
    GalaxyMaskRCNN
    """
    options = {k: v for k, v in locals().items() if k not in ("weights", "weights_backbone")}
    if weights is not None or weights_backbone is not None:
        raise DeepmorphValueError("maskrcnn: pretrained weights are not supported (nothing is downloaded); "
                                  "train from scratch or load a run's weights")
    if backbone not in BACKBONES:
        raise DeepmorphValueError(f"maskrcnn: backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size),
                        ("fpn_channels", fpn_channels), ("mask_channels", mask_channels),
                        ("mask_layers", mask_layers), ("box_head_size", box_head_size),
                        ("detections_per_img", detections_per_img)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeepmorphValueError(f"maskrcnn: {name} must be a positive integer, got {value!r}")
    if not 0 <= trainable_layers <= 5:
        raise DeepmorphValueError(f"maskrcnn: trainable_layers must be in [0, 5], got {trainable_layers}")
    anchor_sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
    if len(anchor_sizes) != 5:
        raise DeepmorphValueError(f"maskrcnn: anchor_sizes needs one tuple per FPN level (5), got {len(anchor_sizes)}")
    if backbone == "mobilenet":
        body = _mobilenet_backbone(in_channels, fpn_channels, trainable_layers, norm)
    else:
        body = _resnet_backbone(backbone, in_channels, fpn_channels, stem_stride, trainable_layers, norm)
    anchors = AnchorGenerator(anchor_sizes, (tuple(float(a) for a in aspect_ratios),) * len(anchor_sizes))
    levels = ["0", "1", "2", "3"]
    box_pool = SparseRoIAlign(levels, output_size=7, sampling_ratio=int(roi_sampling_ratio))
    mask_pool = SparseRoIAlign(levels, output_size=14, sampling_ratio=int(roi_sampling_ratio))
    model = GalaxyMaskRCNN(
        body,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_size),
        box_predictor=FastRCNNPredictor(box_head_size, num_classes + 1),
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * mask_layers, 1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
        rpn_pre_nms_top_n_train=int(rpn_pre_nms_top_n[0]), rpn_pre_nms_top_n_test=int(rpn_pre_nms_top_n[1]),
        rpn_post_nms_top_n_train=int(rpn_post_nms_top_n[0]), rpn_post_nms_top_n_test=int(rpn_post_nms_top_n[1]),
        rpn_batch_size_per_image=int(rpn_batch_size_per_image),
        box_batch_size_per_image=int(box_batch_size_per_image), box_positive_fraction=float(box_positive_fraction),
        box_score_thresh=float(box_score_thresh), box_nms_thresh=float(box_nms_thresh),
        box_detections_per_img=int(detections_per_img),
    )
    model.roi_heads.__class__ = ObjectRoIHeads  # same modules and weights, object-level scores
    model.transform = _AsIsTransform(image_size, image_size, [0.0] * in_channels, [1.0] * in_channels)
    model.in_channels, model.num_classes, model.image_size = in_channels, num_classes, image_size
    model.options = options
    return model


__all__ = ["BACKBONES", "DEFAULT_ANCHORS", "GalaxyMaskRCNN", "maskrcnn"]
