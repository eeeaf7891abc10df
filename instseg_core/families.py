"""The five model families: one record each, holding everything that differs between them.

:data:`FAMILIES` maps a family name (``ModelSpec.family``) to its :class:`Family`: how to build its
network, which weights key tells its class count, its training recipe, how its exported graph is
laid out, and the post-process of that graph's outputs. A plain dict, no registry: adding a family
means adding one entry here and one network under :mod:`instseg_core.modeling` that follows
:class:`~instseg_core.modeling.base.InstanceSegModel`.

Importing this module imports neither Paddle nor any network (builders import theirs when called),
so the predictor and ``import instseg_core`` can read the records without loading Paddle.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from instseg_core.inference.postprocess import (
    BOX_OUTPUTS,
    SOLOV2_OUTPUTS,
    PostProcess,
    box_outputs_to_instances,
    solov2_outputs_to_instances,
)

if TYPE_CHECKING:
    from instseg_core.modeling.base import InstanceSegModel

__all__ = ["ARCHS", "CASCADE_RCNN", "FAMILIES", "IMAGENET_MEAN", "IMAGENET_STD", "MASKRCNN", "MASK_RTDETR",
           "PPYOLOE_SEG", "SOLOV2", "SOLOV2_ARCH_KEYS", "ExportLayout", "Family", "TrainRecipe", "family_of_arch"]

MASK_RTDETR, MASKRCNN, CASCADE_RCNN, SOLOV2, PPYOLOE_SEG = "Mask-RT-DETR", "MaskRCNN", "CascadeRCNN", "SOLOv2", "PPYOLOE_seg"

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# the architecture overrides SOLOv2's builder accepts (slim variants for tests and experiments)
SOLOV2_ARCH_KEYS = ("fpn_channels", "seg_feat_channels", "stacked_convs", "num_grids", "kernel_out_channels",
                    "mask_mid_channels")


@dataclass(frozen=True)
class TrainRecipe:
    """A family's training settings, from its official PaddleDetection config;
    :func:`instseg_core.training.recipes.recipe_for` applies a module YAML's ``Train`` overrides."""

    optimizer: str  # "momentum" | "adamw"
    base_lr: float
    weight_decay: float
    schedule: str  # "cosine" | "constant" | "piecewise"
    warmup_steps: int
    warmup_start_factor: float
    grad_clip_norm: float  # 0 = no clipping
    backbone_lr_mult: float
    ema_decay: float  # 0 = no EMA
    input_size: int  # square side, or with keep_ratio_max the short side (evaluation and export size)
    multiscale: tuple[int, ...] = ()  # training sizes (square sides or short sides) drawn per image
    cosine_epochs_factor: float = 1.0  # cosine period = epochs * factor (PP-YOLOE decays over 96/80)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    milestones: tuple[float, ...] = ()  # piecewise: fractions of the run where the LR drops x0.1
    keep_ratio_max: int = 0  # > 0: keep-ratio resize (short side as above, long side <= this)

    @property
    def keep_ratio(self) -> bool:
        """Whether the family trains and is exported with a keep-ratio resize (R-CNN, SOLOv2)."""
        return self.keep_ratio_max > 0


@dataclass(frozen=True)
class ExportLayout:
    """How :func:`instseg_core.export.export_model` lays out a family's graph around the network's
    ``export_forward`` (see :class:`~instseg_core.modeling.base.InstanceSegModel`)."""

    square_input: bool  # a fixed square input (the yml Resize [s, s]); False: any size, keep-ratio Resize
    batch_inference: bool  # the graph runs a whole batch per call (written to inference.yml)
    graph_batch: int  # the graph's batch dimension: -1 any; 1 where its post-process handles one image
    score_floor: bool  # the graph can drop detections at or below export's score_floor before drawing masks
    min_subgraph_size: int  # inference.yml min_subgraph_size, as PaddleDetection's exporter writes it


Builder = Callable[..., "InstanceSegModel"]


@dataclass(frozen=True)
class Family:
    """Everything that differs between model families (the model names of one family differ only
    in their ``ModelSpec``). The export wrapper is the network's own ``export_forward``
    (:class:`~instseg_core.modeling.base.InstanceSegModel`), laid out as ``export`` says."""

    name: str
    arch: str  # the `arch` of its inference.yml
    build: Builder  # build(model_name, num_classes, **arch_overrides) -> a randomly initialised network
    class_count_keys: tuple[str, ...]  # weights keys whose first dimension is the class count (any one will do)
    recipe: TrainRecipe
    export: ExportLayout
    output_keys: tuple[str, ...]  # what the eval forward and the exported graph return, in graph order
    postprocess: PostProcess  # the graph's raw outputs -> one Instances per image


def _no_arch(name: str, arch: dict[str, Any]) -> None:
    if arch:
        raise ValueError(f"{name} takes no architecture overrides, got {sorted(arch)}")


# Builders import their network only when called (Paddle is not loaded by importing this module).
def _build_ppyoloe_seg(name: str, num_classes: int, **arch: Any) -> InstanceSegModel:
    from instseg_core.modeling.ppyoloe_seg import ppyoloe_seg_s

    return ppyoloe_seg_s(num_classes=num_classes, **arch)


def _build_mask_rtdetr(name: str, num_classes: int, **arch: Any) -> InstanceSegModel:
    from instseg_core.modeling.mask_rtdetr import mask_rtdetr

    _no_arch(name, arch)
    return mask_rtdetr(name.rsplit("-", 1)[1], num_classes=num_classes)


def _build_mask_rcnn(name: str, num_classes: int, **arch: Any) -> InstanceSegModel:
    from instseg_core.modeling.mask_rcnn import mask_rcnn

    _no_arch(name, arch)
    return mask_rcnn(name, num_classes=num_classes)


def _build_solov2(name: str, num_classes: int, **arch: Any) -> InstanceSegModel:
    from instseg_core.modeling.solov2 import solov2

    unknown = sorted(set(arch) - set(SOLOV2_ARCH_KEYS))
    if unknown:
        raise ValueError(f"SOLOv2 takes the architecture overrides {', '.join(SOLOV2_ARCH_KEYS)}; got {unknown}")
    return solov2(num_classes=num_classes, **arch)


_IMAGENET: dict[str, Any] = {"mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD)}
# mask_rcnn_*_1x_coco: Momentum 0.9 + L2 1e-4, LR 0.01, warm-up 1000 steps from 0.001, x0.1 at
# epochs 8 and 11 of 12 (here: at 8/12 and 11/12 of any run length), no EMA, keep-ratio resize
# with the short side drawn from 640..800 (long side <= 1333), ImageNet normalisation.
_MASK_RCNN_RECIPE = TrainRecipe("momentum", 0.01, 1e-4, "piecewise", 1000, 0.001, 0.0, 1.0, 0.0, 800,
                                tuple(range(640, 801, 32)), **_IMAGENET,
                                milestones=(8 / 12, 11 / 12), keep_ratio_max=1333)
# PP-YOLOE_seg and Mask-RT-DETR: batch-capable graphs on a fixed square input
_SQUARE_EXPORT = ExportLayout(square_input=True, batch_inference=True, graph_batch=-1, score_floor=True,
                              min_subgraph_size=3)
# the R-CNN post-process handles one image per call in a graph; any input size
_RCNN_EXPORT = ExportLayout(square_input=False, batch_inference=False, graph_batch=1, score_floor=False,
                            min_subgraph_size=40)
# the R-CNN mask logits conv has one output per class (the box classifier has C + 1)
_RCNN_CLASS_KEYS = ("mask_head.mask_fcn_logits.bias",)

FAMILIES: dict[str, Family] = {
    MASK_RTDETR: Family(
        name=MASK_RTDETR, arch="DETR", build=_build_mask_rtdetr, class_count_keys=("transformer.score_head.bias",),
        # mask_rtdetr_*_6x_coco: AdamW 1e-4, weight decay 1e-4, grad-norm clip 0.1, backbone LR x0.1,
        # 2000-step linear warm-up from 0.001, constant LR, EMA 0.9999, multi-scale 480..800.
        recipe=TrainRecipe("adamw", 1e-4, 1e-4, "constant", 2000, 0.001, 0.1, 0.1, 0.9999, 640,
                           tuple(range(480, 801, 32))),
        export=_SQUARE_EXPORT, output_keys=BOX_OUTPUTS, postprocess=box_outputs_to_instances),
    MASKRCNN: Family(
        name=MASKRCNN, arch="RCNN", build=_build_mask_rcnn, class_count_keys=_RCNN_CLASS_KEYS,
        recipe=_MASK_RCNN_RECIPE, export=_RCNN_EXPORT, output_keys=BOX_OUTPUTS, postprocess=box_outputs_to_instances),
    CASCADE_RCNN: Family(
        name=CASCADE_RCNN, arch="RCNN", build=_build_mask_rcnn, class_count_keys=_RCNN_CLASS_KEYS,
        # cascade_mask_rcnn_*_1x_coco: as Mask R-CNN, plus gradient clipping at global norm 35
        recipe=replace(_MASK_RCNN_RECIPE, grad_clip_norm=35.0),
        export=_RCNN_EXPORT, output_keys=BOX_OUTPUTS, postprocess=box_outputs_to_instances),
    SOLOV2: Family(
        name=SOLOV2, arch="SOLOv2", build=_build_solov2,
        # SOLOv2 files may carry either name of the aliased category conv
        class_count_keys=("solov2_head.bbox_head.solo_cate.bias", "solov2_head.solo_cate.bias"),
        # solov2_r50_fpn_1x_coco: as Mask R-CNN but warm-up from 0 and one training size (800 x 1333)
        recipe=replace(_MASK_RCNN_RECIPE, warmup_start_factor=0.0, multiscale=()),
        # any input size; the post-process reads image 0 only (PaddleX runs it one at a time)
        export=ExportLayout(square_input=False, batch_inference=False, graph_batch=-1, score_floor=False,
                            min_subgraph_size=60),
        output_keys=SOLOV2_OUTPUTS, postprocess=solov2_outputs_to_instances),
    PPYOLOE_SEG: Family(
        name=PPYOLOE_SEG, arch="PPYOLOE", build=_build_ppyoloe_seg, class_count_keys=("yolo_head.pred_cls.0.bias",),
        # ppyoloe_seg_s_80e_coco: Momentum 0.9 + L2 5e-4, cosine over 96 epochs for an 80-epoch run,
        # linear warm-up from 0, EMA 0.9998, multi-scale 320..768.
        recipe=TrainRecipe("momentum", 0.001, 5e-4, "cosine", 100, 0.0, 0.0, 1.0, 0.9998, 640,
                           tuple(range(320, 769, 32)), cosine_epochs_factor=96 / 80),
        export=_SQUARE_EXPORT, output_keys=BOX_OUTPUTS, postprocess=box_outputs_to_instances),
}

ARCHS: frozenset[str] = frozenset(f.arch for f in FAMILIES.values())


def family_of_arch(arch: str) -> Family:
    """The family of an inference dir's ``arch`` (MaskRCNN and CascadeRCNN share ``RCNN`` and with it
    everything an inference dir needs: the same outputs and post-process)."""
    for family in FAMILIES.values():
        if family.arch == arch:
            return family
    raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
