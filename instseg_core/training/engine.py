"""The training loop behind ``Global.mode=train`` (one process, or one worker of a Ray Train group).

``train(cfg)`` reads the module YAML's ``Global`` and ``Train`` sections, trains on
``<dataset>/annotations/instance_train.json``, evaluates mask AP on ``instance_val.json`` every
``eval_interval`` epochs and writes PaddleX's outputs into ``Global.output``::

    config.yaml  train.log  train_result.json  train_curves.png  tensorboard/events.out.tfevents.*
    <epoch>/<epoch>.{pdparams,pdopt,pdstates,pdema}      (0-based epoch id, the 5 newest kept)
    best_model/best_model.{pdparams,pdopt,pdstates,pdema}  best_model.info.json  best_model/inference/

Distributed: ``rank``/``world_size`` shard every epoch's image order (see :func:`epoch_order`), the
model is wrapped in ``paddle.DataParallel`` when ``world_size > 1`` (its BatchNorms made
cross-rank unless ``Train.sync_bn: false``), and only rank 0 evaluates and
writes files. ``on_epoch_end(epoch, metrics, checkpoint_dir_or_None)`` is called on every rank after
each epoch (Ray Train reports through it).

The loop itself is short: each step is a :class:`TrainStep` (forward, backward with AMP when
asked, optimizer update, EMA); rank 0 calls its hooks at fixed points, after each step
(:class:`~instseg_core.training.hooks.StepLogger`) and after each epoch
(:class:`~instseg_core.training.hooks.EvaluateAndCheckpoint`: evaluation, checkpoints, best model,
``train_result.json``), and :class:`~instseg_core.training.curves.TrainingCurves` at both
(TensorBoard scalars, ``train_curves.png``).

Randomness is re-seeded from ``(seed, epoch, rank)`` at the start of every epoch, so a run resumed
from an epoch checkpoint replays exactly the data order and augmentations it would have seen.
"""
from __future__ import annotations

import json
import logging
import math
import random
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import yaml

from instseg_core.training.checkpoint import load_checkpoint, restore_optimizer
from instseg_core.training.cross_rank_bn import convert_to_cross_rank_bn
from instseg_core.training.curves import TrainingCurves
from instseg_core.training.data import CocoInstanceDataset, collate, make_train_transform
from instseg_core.training.hooks import EvaluateAndCheckpoint, StepLogger, recover_best_model
from instseg_core.training.recipes import TrainRecipe
from instseg_core.training.schedule import ModelEMA, learning_rate
from instseg_core.training.settings import TrainSettings

log = logging.getLogger("instseg.train")

EpochCallback = Callable[[int, dict[str, Any], Path | None], None]


# ------------------------------------------------------------------------------------ data order

def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's image indices for ``epoch``: a seeded permutation, dealt round-robin to ranks.

    The permutation is padded by wrapping around so every rank gets the same number of images
    (equal step counts keep the gradient all-reduce in lock-step); across ranks each image is
    seen once per epoch, plus at most ``world_size - 1`` repeats.
    """
    if n <= 0:
        return []
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    total = math.ceil(n / world_size) * world_size
    perm = np.concatenate([perm, perm[: total - n]]) if total > n else perm
    return [int(i) for i in perm[rank::world_size]]


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 101 + rank) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    paddle.seed(s)


def _batches(dataset: CocoInstanceDataset, order: Sequence[int], batch_size: int, transform, rng_seed: int
             ) -> Iterator[tuple[int, Any]]:
    """``(step_in_epoch, (inputs, targets))``; the next batch is decoded in a thread meanwhile
    (OpenCV releases the GIL, so decoding overlaps the forward/backward pass)."""
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def load(k: int):
        # Augmentation is drawn per image from (seed, epoch, image index), not per batch or rank:
        # N workers apply the same flips and sizes to an image as one process would.
        return collate([transform(dataset[i], random.Random(rng_seed * 100_003 + i)) for i in chunks[k]])

    pending: dict[str, Any] = {}

    def prefetch(k: int) -> None:
        try:
            pending["value"] = load(k)
        except BaseException as e:  # re-raised in the consumer
            pending["error"] = e

    thread = None
    for k in range(len(chunks)):
        if thread is None:
            batch = load(k)
        else:
            thread.join()
            if "error" in pending:
                raise pending.pop("error")
            batch = pending.pop("value")
        thread = None
        if k + 1 < len(chunks):
            thread = threading.Thread(target=prefetch, args=(k + 1,), daemon=True)
            thread.start()
        yield k, batch


# ------------------------------------------------------------------------------------ optimizer

def build_optimizer(model: nn.Layer, recipe: TrainRecipe) -> paddle.optimizer.Optimizer:
    """The family's optimizer: backbone parameters get ``backbone_lr_mult``; AdamW's decay skips
    norms and biases (1-D parameters); Momentum uses L2 decay on everything, as the configs do.

    Parameters carrying their own LR multiplier (``optimize_attr["learning_rate"]``, e.g. the
    SSLDv2 backbone's per-stage ``lr_mult_list``) get a group of their own: Paddle replaces that
    attribute with the group's learning rate when an optimizer is built from groups.
    """
    backbone_ids = {id(p) for p in model.backbone.parameters()} if hasattr(model, "backbone") else set()
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    by_mult: dict[float, list[Any]] = {}
    for p in trainable:
        mult = float(p.optimize_attr.get("learning_rate", 1.0))
        if id(p) in backbone_ids:
            mult *= recipe.backbone_lr_mult
        by_mult.setdefault(mult, []).append(p)
    groups = [{"params": ps, "learning_rate": m} if m != 1.0 else {"params": ps} for m, ps in by_mult.items()]
    clip = nn.ClipGradByGlobalNorm(recipe.grad_clip_norm) if recipe.grad_clip_norm > 0 else None
    if recipe.optimizer == "adamw":
        decay_names = {p.name for p in trainable if len(p.shape) > 1}
        return paddle.optimizer.AdamW(learning_rate=recipe.base_lr, parameters=groups,
                                      weight_decay=recipe.weight_decay, grad_clip=clip,
                                      apply_decay_param_fun=lambda name: name in decay_names)
    if recipe.optimizer == "momentum":
        return paddle.optimizer.Momentum(learning_rate=recipe.base_lr, momentum=0.9, parameters=groups,
                                         weight_decay=paddle.regularizer.L2Decay(recipe.weight_decay),
                                         grad_clip=clip)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


# ------------------------------------------------------------------------------------ helpers

def _dataset_splits(dataset_dir: str, num_classes: int) -> tuple[CocoInstanceDataset, CocoInstanceDataset]:
    from instseg_core.datasets.coco import annotation_path, find_dataset_root
    from instseg_core.training.remote import localize_dataset

    root = find_dataset_root(localize_dataset(dataset_dir))
    train_ds = CocoInstanceDataset(annotation_path(root, "train"), root / "images")
    val_ds = CocoInstanceDataset(annotation_path(root, "val"), root / "images", category_ids=train_ds.category_ids)
    if train_ds.num_classes != num_classes:
        raise ValueError(f"Train.num_classes={num_classes} but {annotation_path(root, 'train')} has "
                         f"{train_ds.num_classes} categories ({', '.join(train_ds.label_list[:10])}"
                         f"{', ...' if train_ds.num_classes > 10 else ''}); set -o Train.num_classes="
                         f"{train_ds.num_classes}")
    if len(train_ds) == 0:
        raise ValueError(f"{train_ds.ann_file} lists no images")
    return train_ds, val_ds


def _set_device(device: str) -> None:
    if device.startswith("gpu") and not paddle.device.is_compiled_with_cuda():
        raise ValueError(f"Global.device={device!r} but this paddle build has no CUDA support")
    paddle.set_device(device if device != "gpu" else "gpu:0")


def _attach_log_file(output: Path) -> logging.Handler:
    output.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


# ------------------------------------------------------------------------------------ the loop

class TrainStep:
    """One optimisation step: forward, backward, optimizer update, EMA update.

    With ``amp_level`` (``"O1"``/``"O2"``, GPU only) the forward runs under float16 autocast and
    the loss is scaled (Paddle's ``GradScaler``, initial scale 1024) so small gradients survive.
    ``net`` is what runs forward: the model, or its ``paddle.DataParallel`` wrapper.
    """

    def __init__(self, net: nn.Layer, model: nn.Layer, optimizer: paddle.optimizer.Optimizer,
                 ema: ModelEMA | None = None, amp_level: str | None = None) -> None:
        self.net, self.model, self.optimizer, self.ema, self.amp_level = net, model, optimizer, ema, amp_level
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=1024) if amp_level else None

    def __call__(self, inputs: Any, targets: Any, lr: float) -> dict[str, paddle.Tensor]:
        """Train on one batch at learning rate ``lr``; returns the model's losses (``"loss"``: their sum)."""
        self.optimizer.set_lr(lr)
        if self.scaler is not None:
            with paddle.amp.auto_cast(level=self.amp_level):
                losses = self.net(inputs, targets)
            self.scaler.scale(losses["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            losses = self.net(inputs, targets)
            losses["loss"].backward()
            self.optimizer.step()
        self.optimizer.clear_grad()
        if self.ema is not None:
            self.ema.update(self.model)
        return losses


def train(cfg: dict[str, Any], *, rank: int = 0, world_size: int = 1,
          on_epoch_end: EpochCallback | None = None, resume_path: str | None = None) -> dict[str, Any]:
    """Train the model of ``cfg`` (see the module doc); returns the ``train_result.json`` record
    (rank 0) or ``{"done_flag": True}`` on other ranks. ``resume_path`` overrides ``Train.resume_path``."""
    from instseg_core.modeling import build_model
    from instseg_core.modeling.inference_weights import is_inference_dir, weights_from_inference_dir
    from instseg_core.modeling.weights import load_weights

    s = TrainSettings.from_config(cfg)
    r = s.recipe
    is_main = rank == 0
    handler = _attach_log_file(s.output) if is_main else None
    curves: TrainingCurves | None = None
    try:
        _set_device(s.device)
        if is_main:
            with open(s.output / "config.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
            recover_best_model(s.output)
        train_ds, val_ds = _dataset_splits(s.dataset_dir, s.num_classes)
        _seed_everything(s.seed, -1, 0)  # identical initial weights on every rank
        model = build_model(s.model_name, num_classes=s.num_classes, **s.arch)
        _init_priors(model)
        _match_resume_form(model, resume_path or s.resume_path)
        if s.pretrain_weight_path and not (resume_path or s.resume_path):
            pretrained: Any = s.pretrain_weight_path
            if is_inference_dir(pretrained):  # an exported model: its weights, fused as it runs
                pretrained = weights_from_inference_dir(pretrained, model)
            rep = load_weights(model, pretrained, strict_shapes=False)
            log.info("pretrained weights %s: %d loaded, %d missing, %d skipped (shape), %d unexpected",
                     s.pretrain_weight_path, rep.loaded, len(rep.missing), len(rep.skipped), len(rep.unexpected))
        model.train()
        if world_size > 1 and s.sync_bn:
            # batch statistics over all ranks' images: N workers of batch b train like one process
            # of batch N*b (Paddle's SyncBatchNorm has no CPU kernel; this one runs on gloo and NCCL)
            n_bn = convert_to_cross_rank_bn(model)
            if is_main:
                log.info("BatchNorm statistics synchronised across %d ranks (%d layers)", world_size, n_bn)
        net = paddle.DataParallel(model) if world_size > 1 else model
        optimizer = build_optimizer(model, r)
        ema = ModelEMA(model, r.ema_decay) if r.ema_decay > 0 else None
        use_amp = s.amp != "OFF" and s.device.startswith("gpu")
        if s.amp != "OFF" and not use_amp:
            # float16 autocast is a GPU feature; on CPU it would only slow training down.
            log.warning("Train.amp=%s ignored on device %s: mixed precision runs on GPUs only", s.amp, s.device)
        train_step = TrainStep(net, model, optimizer, ema, s.amp if use_amp else None)

        start_epoch, step, best_ap = 0, 0, -1.0
        resume = resume_path or s.resume_path
        if resume:
            start_epoch, step, best_ap = _resume(resume, model, optimizer, ema)
            log.info("resumed from %s: epoch %d, step %d, best AP %.4f", resume, start_epoch, step, best_ap)

        steps_per_epoch = math.ceil(len(epoch_order(len(train_ds), seed=0, epoch=0, rank=0,
                                                    world_size=world_size)) / s.batch_size)
        total_steps = int(s.epochs * steps_per_epoch * r.cosine_epochs_factor)
        transform = make_train_transform(r.input_size, r.multiscale, True, r.mean, r.std, r.keep_ratio_max)
        # rank 0's hooks: the other ranks only train (and report through on_epoch_end)
        log_step = StepLogger(s.epochs, steps_per_epoch, s.log_interval) if is_main else None
        end_epoch = EvaluateAndCheckpoint(s, model, optimizer, ema, val_ds, train_ds.label_list,
                                          best_ap) if is_main else None
        if end_epoch is not None and resume:
            end_epoch.resumed(start_epoch)
        curves = TrainingCurves(s.output, s.model_name, (start_epoch, step) if resume else None) if is_main else None
        if is_main:
            log.info("training %s: %d train / %d val images, %d classes, %d epochs x %d steps, batch %d x %d "
                     "worker(s), device %s", s.model_name, len(train_ds), len(val_ds), s.num_classes, s.epochs,
                     steps_per_epoch, s.batch_size, world_size, s.device)

        for epoch in range(start_epoch, s.epochs):
            _seed_everything(s.seed, epoch, rank)
            order = epoch_order(len(train_ds), seed=s.seed, epoch=epoch, rank=rank, world_size=world_size)
            if log_step is not None:
                log_step.start_epoch()
            for k, (inputs, targets) in _batches(train_ds, order, s.batch_size, transform,
                                                  (s.seed * 7919 + epoch) * 1009):
                lr = learning_rate(step, base_lr=r.base_lr, total_steps=total_steps, warmup_steps=r.warmup_steps,
                                   warmup_start_factor=r.warmup_start_factor, schedule=r.schedule,
                                   milestones=r.milestones)
                losses = train_step(inputs, targets, lr)
                step += 1
                if log_step is not None:
                    logged = log_step(epoch, k, lr, losses)
                    if curves is not None:
                        curves.after_step(step, losses, lr, logged)
            metrics: dict[str, Any] = {"epoch": epoch + 1, "step": step}
            ckpt_dir = None
            if end_epoch is not None:
                scores, ckpt_dir = end_epoch(epoch, step)
                metrics.update(scores)
            if curves is not None:
                curves.after_epoch(epoch, metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics, ckpt_dir)
        if end_epoch is not None:
            result = json.loads((s.output / "train_result.json").read_text(encoding="utf-8"))
            best = end_epoch.best
            if best.get("pdparams"):  # say where the result is (PaddleX's layout under Global.output)
                log.info("training done: best mask AP %.4f; weights %s; inference dir %s", best["score"],
                         s.output / best["pdparams"], s.output / "best_model" / "inference")
            return result
        return {"done_flag": True}
    finally:
        if curves is not None:
            curves.close()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _init_priors(model: nn.Layer) -> None:
    """Detector priors for a fresh head (class bias at p=0.01, zero box/class convs), as the
    reference initialises before training; pretrained weights loaded afterwards override them."""
    head = getattr(model, "yolo_head", None)
    if head is not None and hasattr(head, "init_prediction_priors"):
        head.init_prediction_priors()


def _match_resume_form(model: nn.Layer, resume: str | None) -> None:
    """A run fine-tuned from an inference dir trains and checkpoints its RepVGG blocks fused: fuse
    the new network too before resuming it (before the optimizer takes its parameters)."""
    from instseg_core.export import convert_to_deploy
    from instseg_core.modeling.inference_weights import in_deploy_form

    if resume:
        ck = load_checkpoint(resume)
        if in_deploy_form(ck["pdema"] or ck["pdparams"], model):
            convert_to_deploy(model)


def _resume(path: str, model: nn.Layer, optimizer: paddle.optimizer.Optimizer, ema: ModelEMA | None
            ) -> tuple[int, int, float]:
    ck = load_checkpoint(path)
    raw = ck["pdema"] or ck["pdparams"]  # with EMA, .pdema holds the raw training weights
    missing = [k for k in model.state_dict() if k not in raw]
    if missing:
        raise ValueError(f"resume checkpoint {path!r} does not fit this model: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]})")
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in raw.items()})
    states = ck["pdstates"]
    if ema is not None:
        ema.set_state_dict(ck["pdparams"], int(states.get("ema_updates", 0)))
    if ck["pdopt"]:
        restore_optimizer(optimizer, model, ck["pdopt"])
    return (int(states.get("epoch", 0)), int(states.get("step", 0)), float(states.get("best_ap", -1.0)))
