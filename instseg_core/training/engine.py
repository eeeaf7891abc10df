"""The training loop behind ``Global.mode=train`` (one process, or one worker of a Ray Train group).

``train(cfg)`` reads the module YAML's ``Global`` and ``Train`` sections, trains on
``<dataset>/annotations/instance_train.json``, evaluates mask AP on ``instance_val.json`` every
``eval_interval`` epochs and writes PaddleX's outputs into ``Global.output``::

    config.yaml  train.log  train_result.json
    <epoch>/<epoch>.{pdparams,pdopt,pdstates,pdema}      (0-based epoch id, the 5 newest kept)
    best_model/best_model.{pdparams,pdopt,pdstates,pdema}  best_model.info.json  best_model/inference/

Distributed: ``rank``/``world_size`` shard every epoch's image order (see :func:`epoch_order`), the
model is wrapped in ``paddle.DataParallel`` when ``world_size > 1`` (its BatchNorms made
cross-rank unless ``Train.sync_bn: false``), and only rank 0 evaluates and
writes files. ``on_epoch_end(epoch, metrics, checkpoint_dir_or_None)`` is called on every rank after
each epoch (Ray Train reports through it).

Randomness is re-seeded from ``(seed, epoch, rank)`` at the start of every epoch, so a run resumed
from an epoch checkpoint replays exactly the data order and augmentations it would have seen.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import yaml

from ..models import get_spec
from .checkpoint import (load_checkpoint, optimizer_state_by_structured_name, restore_optimizer,
                         save_checkpoint)
from .cross_rank_bn import convert_to_cross_rank_bn
from .data import CocoInstanceDataset, collate, make_train_transform
from .recipes import TrainRecipe, evaluation_inputs, recipe_for
from .schedule import ModelEMA, learning_rate

log = logging.getLogger("instseg.train")

KEEP_LAST = 5
EpochCallback = Callable[[int, Dict[str, Any], Optional[Path]], None]


@dataclass
class TrainSettings:
    """The ``Global`` + ``Train`` keys the loop uses, validated."""

    model_name: str
    dataset_dir: str
    output: Path
    device: str
    num_classes: int
    epochs: int
    batch_size: int
    log_interval: int
    eval_interval: int
    pretrain_weight_path: Optional[str]
    resume_path: Optional[str]
    seed: int
    amp: str
    sync_bn: bool
    draw_threshold: float
    arch: Dict[str, Any]
    recipe: TrainRecipe

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "TrainSettings":
        g, t = cfg.get("Global") or {}, cfg.get("Train") or {}
        if not g.get("dataset_dir"):
            raise ValueError("Global.dataset_dir is not set (a dataset in PaddleX's COCO layout)")
        name = g["model"]
        spec = get_spec(name)

        def positive(key: str, default: Any) -> int:
            v = t.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Train.{key} must be a positive integer, got {v!r}")
            return v

        amp = str(t.get("amp") or "OFF").upper()
        if amp not in ("OFF", "O1", "O2"):
            raise ValueError(f"Train.amp must be OFF, O1 or O2, got {t.get('amp')!r}")
        return cls(
            model_name=name, dataset_dir=str(g["dataset_dir"]), output=Path(g.get("output", "output")),
            device=str(g.get("device") or "cpu").split(",")[0],
            num_classes=positive("num_classes", len(spec.labels)), epochs=positive("epochs_iters", 1),
            batch_size=positive("batch_size", spec.train_batch_size),
            log_interval=positive("log_interval", 10), eval_interval=positive("eval_interval", 1),
            pretrain_weight_path=t.get("pretrain_weight_path") or None, resume_path=t.get("resume_path") or None,
            seed=int(t.get("seed", 0)), amp=amp, sync_bn=bool(t.get("sync_bn", True)),
            draw_threshold=float(t.get("draw_threshold", 0.5)),
            arch=dict(t.get("arch") or {}), recipe=recipe_for(name, t))


# ------------------------------------------------------------------------------------ data order

def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> List[int]:
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
             ) -> Iterator[Tuple[int, Any]]:
    """``(step_in_epoch, (inputs, targets))``; the next batch is decoded in a thread meanwhile
    (OpenCV releases the GIL, so decoding overlaps the forward/backward pass)."""
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def load(k: int):
        # Augmentation is drawn per image from (seed, epoch, image index), not per batch or rank:
        # N workers apply the same flips and sizes to an image as one process would.
        return collate([transform(dataset[i], random.Random(rng_seed * 100_003 + i)) for i in chunks[k]])

    pending: Dict[str, Any] = {}

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
    by_mult: Dict[float, List[Any]] = {}
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

def _dataset_splits(dataset_dir: str, num_classes: int) -> Tuple[CocoInstanceDataset, CocoInstanceDataset]:
    from ..datasets.coco import annotation_path, find_dataset_root
    from .remote import localize_dataset

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


def _fmt_losses(losses: Dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:.4f}" for k, v in losses.items())


def _entry(output: Path, ckpt_dir: Path, name: str, score: float, with_inference: bool) -> Dict[str, Any]:
    rel = ckpt_dir.relative_to(output)
    e: Dict[str, Any] = {"score": float(score)}
    for suffix in ("pdparams", "pdopt", "pdstates", "pdema"):
        if (ckpt_dir / f"{name}.{suffix}").exists():
            e[suffix] = str(rel / f"{name}.{suffix}")
    if with_inference and (ckpt_dir / "inference" / "inference.yml").exists():
        e["inference_config"] = str(rel / "inference" / "inference.yml")
        e["pdmodel"] = str(rel / "inference" / "inference.json")
        e["pdiparams"] = str(rel / "inference" / "inference.pdiparams")
    return e


def _write_train_result(output: Path, model_name: str, last: List[Dict[str, Any]], best: Dict[str, Any],
                        done: bool) -> None:
    models = {f"last_{i + 1}": (last[i] if i < len(last) else {}) for i in range(KEEP_LAST)}
    models["best"] = best
    record = {"model_name": model_name, "label_dict": "", "train_log": "train.log", "visualdl_log": "",
              "config": "config.yaml", "models": models, "done_flag": done}
    tmp = output / "train_result.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, output / "train_result.json")


# ------------------------------------------------------------------------------------ the loop

def train(cfg: Dict[str, Any], *, rank: int = 0, world_size: int = 1,
          on_epoch_end: Optional[EpochCallback] = None, resume_path: Optional[str] = None) -> Dict[str, Any]:
    """Train the model of ``cfg`` (see the module doc); returns the ``train_result.json`` record
    (rank 0) or ``{"done_flag": True}`` on other ranks. ``resume_path`` overrides ``Train.resume_path``."""
    from ..modeling import build_model
    from ..modeling.weights import load_weights
    from .evaluator import evaluate_model

    s = TrainSettings.from_config(cfg)
    r = s.recipe
    is_main = rank == 0
    handler = _attach_log_file(s.output) if is_main else None
    try:
        _set_device(s.device)
        if is_main:
            with open(s.output / "config.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
            _recover_best_model(s.output)
        train_ds, val_ds = _dataset_splits(s.dataset_dir, s.num_classes)
        _seed_everything(s.seed, -1, 0)  # identical initial weights on every rank
        model = build_model(s.model_name, num_classes=s.num_classes, **s.arch)
        _init_priors(model)
        if s.pretrain_weight_path and not (resume_path or s.resume_path):
            rep = load_weights(model, s.pretrain_weight_path, strict_shapes=False)
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
        scaler = paddle.amp.GradScaler(init_loss_scaling=1024) if use_amp else None

        start_epoch, step, best_ap = 0, 0, -1.0
        resume = resume_path or s.resume_path
        if resume:
            start_epoch, step, best_ap = _resume(resume, model, optimizer, ema)
            log.info("resumed from %s: epoch %d, step %d, best AP %.4f", resume, start_epoch, step, best_ap)

        steps_per_epoch = math.ceil(len(epoch_order(len(train_ds), seed=0, epoch=0, rank=0,
                                                    world_size=world_size)) / s.batch_size)
        total_steps = int(s.epochs * steps_per_epoch * r.cosine_epochs_factor)
        transform = make_train_transform(r.input_size, r.multiscale, True, r.mean, r.std, r.keep_ratio_max)
        last: List[Dict[str, Any]] = _previous_entries(s.output, start_epoch) if resume and is_main else []
        best: Dict[str, Any] = _previous_best(s.output) if resume and is_main else {}
        if is_main:
            log.info("training %s: %d train / %d val images, %d classes, %d epochs x %d steps, batch %d x %d "
                     "worker(s), device %s", s.model_name, len(train_ds), len(val_ds), s.num_classes, s.epochs,
                     steps_per_epoch, s.batch_size, world_size, s.device)

        for epoch in range(start_epoch, s.epochs):
            _seed_everything(s.seed, epoch, rank)
            order = epoch_order(len(train_ds), seed=s.seed, epoch=epoch, rank=rank, world_size=world_size)
            t0 = time.time()
            for k, (inputs, targets) in _batches(train_ds, order, s.batch_size, transform,
                                                  (s.seed * 7919 + epoch) * 1009):
                lr = learning_rate(step, base_lr=r.base_lr, total_steps=total_steps, warmup_steps=r.warmup_steps,
                                   warmup_start_factor=r.warmup_start_factor, schedule=r.schedule,
                                   milestones=r.milestones)
                optimizer.set_lr(lr)
                if use_amp:
                    with paddle.amp.auto_cast(level=s.amp):
                        losses = net(inputs, targets)
                    scaler.scale(losses["loss"]).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    losses = net(inputs, targets)
                    losses["loss"].backward()
                    optimizer.step()
                optimizer.clear_grad()
                if ema is not None:
                    ema.update(model)
                step += 1
                if is_main and (k % s.log_interval == 0 or k == steps_per_epoch - 1):
                    values = {n: float(v.item()) for n, v in losses.items()}
                    if not math.isfinite(values["loss"]):
                        raise FloatingPointError(f"loss is {values['loss']} at epoch {epoch} step {k}: "
                                                 f"lower Train.learning_rate or check the dataset")
                    dt = (time.time() - t0) / (k + 1)
                    eta = dt * ((s.epochs - epoch) * steps_per_epoch - k - 1)
                    log.info("epoch [%d/%d] step [%d/%d] lr %.6g %s | %.2f s/step, eta %s", epoch + 1, s.epochs,
                             k + 1, steps_per_epoch, lr, _fmt_losses(values), dt, _eta(eta))
            metrics: Dict[str, Any] = {"epoch": epoch + 1, "step": step}
            ckpt_dir = None
            evaluate_now = (epoch + 1) % s.eval_interval == 0 or epoch + 1 == s.epochs
            if is_main and evaluate_now:
                eval_state = ema.state_dict() if ema is not None else None
                raw = _swap_in(model, eval_state)
                try:
                    stats = evaluate_model(model, val_ds, **evaluation_inputs(s.model_name, r))
                finally:
                    _swap_back(model, raw)
                ap = float(stats["segm"]["AP"])
                metrics.update(AP=ap, box_AP=float(stats["bbox"]["AP"]))
                log.info("epoch %d: mask AP %.4f, box AP %.4f", epoch + 1, ap, stats["bbox"]["AP"])
                name = str(epoch)
                ckpt_dir = save_checkpoint(
                    s.output / name, name,
                    weights=eval_state if eval_state is not None else model.state_dict(),
                    raw_weights=model.state_dict() if ema is not None else None,
                    optimizer_state=optimizer_state_by_structured_name(optimizer, model),
                    states={"epoch": epoch + 1, "step": step, "best_ap": max(best_ap, ap), "seed": s.seed,
                            "ema_updates": ema.updates if ema is not None else 0})
                last.insert(0, _entry(s.output, ckpt_dir, name, ap, with_inference=False))
                for old in last[KEEP_LAST:]:
                    shutil.rmtree(s.output / Path(old["pdparams"]).parent, ignore_errors=True)
                del last[KEEP_LAST:]
                if ap >= best_ap:
                    best_ap = ap
                    best = _save_best(s, model, eval_state, ckpt_dir, name, ap, epoch, train_ds.label_list)
                _write_train_result(s.output, s.model_name, last, best, done=epoch + 1 == s.epochs)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics, ckpt_dir)
        if is_main:
            result = json.loads((s.output / "train_result.json").read_text(encoding="utf-8"))
            if best.get("pdparams"):  # say where the result is (PaddleX's layout under Global.output)
                log.info("training done: best mask AP %.4f; weights %s; inference dir %s", best["score"],
                         s.output / best["pdparams"], s.output / "best_model" / "inference")
            return result
        return {"done_flag": True}
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _init_priors(model: nn.Layer) -> None:
    """Detector priors for a fresh head (class bias at p=0.01, zero box/class convs), as the
    reference initialises before training; pretrained weights loaded afterwards override them."""
    head = getattr(model, "yolo_head", None)
    if head is not None and hasattr(head, "init_prediction_priors"):
        head.init_prediction_priors()


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _swap_in(model: nn.Layer, state: Optional[Dict[str, paddle.Tensor]]):
    """Load ``state`` (EMA weights) into ``model`` for evaluation; returns what to restore."""
    if state is None:
        return None
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.set_state_dict(state)
    return raw


def _swap_back(model: nn.Layer, raw) -> None:
    if raw is not None:
        model.set_state_dict(raw)


def _save_best(s: TrainSettings, model: nn.Layer, eval_state, ckpt_dir: Path, name: str, ap: float,
               epoch: int, labels: List[str]) -> Dict[str, Any]:
    """Copy the checkpoint and export the model into ``best_model/``.

    Written into ``best_model.tmp/`` and swapped in by renames once complete, so a process killed
    during the export (seconds) leaves the previous best model in place, not a partial one.
    """
    from ..export import export_model

    best_dir, tmp_dir, old_dir = (s.output / f"best_model{x}" for x in ("", ".tmp", ".old"))
    for d in (tmp_dir, old_dir):
        shutil.rmtree(d, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    for f in ckpt_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp_dir / f"best_model{f.suffix}")
    (tmp_dir / "best_model.info.json").write_text(json.dumps({"metric": ap, "epoch": epoch}) + "\n")
    raw = _swap_in(model, eval_state)
    try:
        export_model(model, None, tmp_dir / "inference", input_size=s.recipe.input_size, labels=labels,
                     draw_threshold=s.draw_threshold)
    finally:
        _swap_back(model, raw)
    if best_dir.exists():
        os.replace(best_dir, old_dir)
    os.replace(tmp_dir, best_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    return _entry(s.output, best_dir, "best_model", ap, with_inference=True)


def _recover_best_model(output: Path) -> None:
    """Undo what a process killed inside :func:`_save_best` left: drop an unfinished
    ``best_model.tmp/``, and put ``best_model.old/`` back if it died between the two renames."""
    shutil.rmtree(output / "best_model.tmp", ignore_errors=True)
    old = output / "best_model.old"
    if old.is_dir():
        if (output / "best_model").exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, output / "best_model")


def _resume(path: str, model: nn.Layer, optimizer, ema: Optional[ModelEMA]) -> Tuple[int, int, float]:
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


def _previous_record(output: Path) -> Dict[str, Any]:
    try:
        return json.loads((output / "train_result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _previous_entries(output: Path, start_epoch: int) -> List[Dict[str, Any]]:
    """The ``last_N`` checkpoints ``train_result.json`` in ``output`` lists, newest first, minus
    those of epochs a run resumed at ``start_epoch`` trains again: a run that died after writing an
    epoch's checkpoint but before it was reported (Ray Train restarts from the one before) would
    otherwise list that epoch twice."""
    models = _previous_record(output).get("models", {})
    entries = [models[f"last_{i + 1}"] for i in range(KEEP_LAST) if models.get(f"last_{i + 1}")]
    return [e for e in entries if _entry_epoch(e) is None or _entry_epoch(e) < start_epoch]


def _entry_epoch(entry: Dict[str, Any]) -> int | None:
    """The 0-based epoch of a ``last_N`` entry (its checkpoint directory is named after it)."""
    name = Path(str(entry.get("pdparams", ""))).parent.name
    return int(name) if name.isdigit() else None


def _previous_best(output: Path) -> Dict[str, Any]:
    return _previous_record(output).get("models", {}).get("best", {})
