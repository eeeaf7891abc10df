"""Training building blocks: data order, LR schedule, EMA, checkpoints (optimizer state by name),
recipes, the synthetic dataset and COCO training samples."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import paddle
import pytest

from instseg_core.training.checkpoint import (load_checkpoint, optimizer_state_by_structured_name,
                                              restore_optimizer, save_checkpoint)
from instseg_core.training.data import CocoInstanceDataset, load_batch, random_flip, resize, TrainSample
from instseg_core.training.engine import epoch_order
from instseg_core.training.recipes import recipe_for
from instseg_core.training.schedule import ModelEMA, learning_rate


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 3), (1, 2)])
def test_epoch_order_covers_every_image_equally(n, world):
    shards = [epoch_order(n, seed=3, epoch=1, rank=r, world_size=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal step counts on every rank
    seen = [i for s in shards for i in s]
    assert set(seen) == set(range(n))
    assert len(seen) - n < world  # at most world-1 repeats from the padding
    assert shards == [epoch_order(n, seed=3, epoch=1, rank=r, world_size=world) for r in range(world)]
    if n > 3:
        assert epoch_order(n, seed=3, epoch=2) != epoch_order(n, seed=3, epoch=1)


def test_learning_rate_warmup_then_cosine_and_constant():
    kw = dict(base_lr=0.1, total_steps=110, warmup_steps=10)
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(5, **kw) == pytest.approx(0.05)
    assert learning_rate(10, **kw) == pytest.approx(0.1)
    assert learning_rate(60, **kw) == pytest.approx(0.05)
    assert learning_rate(110, **kw) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(50, schedule="constant", **kw) == 0.1
    assert learning_rate(0, warmup_start_factor=0.001, **kw) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(50, schedule="step", **kw)
    # piecewise: x0.1 at 8/12 and 11/12 of the run (steps 73 and 101 of 110), warm-up on top
    pw = dict(kw, schedule="piecewise", milestones=(8 / 12, 11 / 12))
    assert [learning_rate(s, **pw) for s in (5, 10, 72)] == pytest.approx([0.05, 0.1, 0.1])
    assert [learning_rate(s, **pw) for s in (73, 100, 101, 109)] == pytest.approx([0.01, 0.01, 0.001, 0.001])


def test_ema_tracks_the_weights_with_ramped_decay():
    layer = paddle.nn.Linear(2, 1)
    ema = ModelEMA(layer, decay=0.9, tau=1.0)
    start = layer.weight.numpy().copy()
    layer.weight.set_value(start + 1.0)
    ema.update(layer)
    d = 0.9 * (1 - math.exp(-1))
    np.testing.assert_allclose(ema.state_dict()["weight"].numpy(), start * d + (start + 1.0) * (1 - d), rtol=1e-6)


def test_checkpoint_round_trip_survives_a_rebuild_with_other_parameter_names(tmp_path):
    paddle.seed(0)
    a = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(4, 1))
    opt = paddle.optimizer.AdamW(learning_rate=0.01, parameters=a.parameters())
    a(paddle.randn([5, 3])).mean().backward()
    opt.step()
    saved_opt = optimizer_state_by_structured_name(opt, a)
    assert any(k.startswith("0.weight::") for k in saved_opt)
    save_checkpoint(tmp_path / "3", "3", weights=a.state_dict(), optimizer_state=saved_opt,
                    states={"epoch": 4, "step": 12, "best_ap": 0.25})
    _ = paddle.nn.Linear(7, 7)  # shifts Paddle's generated names for the rebuilt model
    b = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(4, 1))
    assert b[0].weight.name != a[0].weight.name
    ck = load_checkpoint(tmp_path / "3")
    b.set_state_dict({k: paddle.to_tensor(v) for k, v in ck["pdparams"].items()})
    opt_b = paddle.optimizer.AdamW(learning_rate=0.01, parameters=b.parameters())
    assert restore_optimizer(opt_b, b, ck["pdopt"]) == len(saved_opt)
    moment = [k for k in opt_b.state_dict() if k.startswith(b[0].weight.name + "_moment1")][0]
    ref = [k for k in opt.state_dict() if k.startswith(a[0].weight.name + "_moment1")][0]
    np.testing.assert_array_equal(opt_b.state_dict()[moment].numpy(), opt.state_dict()[ref].numpy())
    assert int(ck["pdstates"]["epoch"]) == 4 and float(ck["pdstates"]["best_ap"]) == 0.25
    assert not (tmp_path / "3.tmp").exists()


def test_recipe_overrides_from_the_train_section():
    r = recipe_for("PP-YOLOE_seg-S", {"learning_rate": 0.02, "warmup_steps": 5, "input_size": 256})
    assert (r.optimizer, r.base_lr, r.warmup_steps, r.input_size, r.multiscale) == ("momentum", 0.02, 5, 256, ())
    d = recipe_for("Mask-RT-DETR-L", {})
    assert d.optimizer == "adamw" and d.grad_clip_norm == 0.1 and d.backbone_lr_mult == 0.1
    with pytest.raises(ValueError, match="multiple of 32"):
        recipe_for("PP-YOLOE_seg-S", {"input_size": 250})
    # the R-CNN / SOLOv2 1x recipes: Momentum 0.01, piecewise decay, keep-ratio sizes (short sides)
    m = recipe_for("MaskRCNN-ResNet50", {})
    assert (m.optimizer, m.base_lr, m.schedule, m.ema_decay) == ("momentum", 0.01, "piecewise", 0)
    assert m.keep_ratio_max == 1333 and m.mean == (0.485, 0.456, 0.406)
    assert m.milestones == pytest.approx((8 / 12, 11 / 12)) and m.multiscale == tuple(range(640, 801, 32))
    assert recipe_for("Cascade-MaskRCNN-ResNet50-FPN", {}).grad_clip_norm == 35.0
    s = recipe_for("SOLOv2", {"input_size": 512})
    assert (s.warmup_start_factor, s.input_size, s.multiscale, s.keep_ratio) == (0.0, 512, (), True)


def test_synthetic_dataset_is_deterministic_and_checks_clean(tmp_path):
    from instseg_core.datasets.check import check_dataset
    from instseg_core.datasets.synthetic import CLASSES, make_dataset

    a = make_dataset(tmp_path / "a", num_train=6, num_val=2, size=128, seed=5)
    b = make_dataset(tmp_path / "b", num_train=6, num_val=2, size=128, seed=5)
    ja = json.loads((a / "annotations" / "instance_train.json").read_text())
    assert ja == json.loads((b / "annotations" / "instance_train.json").read_text())
    assert [c["name"] for c in ja["categories"]] == list(CLASSES)
    assert len(ja["images"]) == 6 and len(ja["annotations"]) >= 6
    result = check_dataset(a, tmp_path / "out")
    assert result["check_pass"] is True
    ds = CocoInstanceDataset(a / "annotations" / "instance_train.json", a / "images")
    s = ds[0]
    assert s.masks.shape[1:] == (128, 128) and len(s.labels) == len(s.boxes) == len(s.masks) > 0


def _sample(h=40, w=60):
    masks = np.zeros((1, h, w), np.uint8)
    masks[0, 10:20, 5:15] = 1
    return TrainSample(np.zeros((h, w, 3), np.uint8), np.array([2]), np.array([[5, 10, 15, 20]], np.float32), masks)


def test_flip_and_resize_keep_boxes_on_their_masks():
    class Always(random.Random):
        def random(self):
            return 0.0

    f = random_flip(_sample(), Always())
    np.testing.assert_array_equal(f.boxes, [[45, 10, 55, 20]])
    assert f.masks[0, 10:20, 45:55].all() and f.masks.sum() == 100
    r = resize(f, (80, 120))
    np.testing.assert_allclose(r.boxes, [[90, 20, 110, 40]])
    ys, xs = np.nonzero(r.masks[0])
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (90, 110, 20, 40)
    assert r.scale_factor == (2.0, 2.0)


def test_coco_batch_has_targets_at_input_resolution(tiny_coco):
    ds = CocoInstanceDataset(*tiny_coco)
    inputs, targets = load_batch(ds, [0, 1], size=160)
    assert inputs["image"].shape == [2, 3, 160, 160]
    for t in targets:
        n = t["labels"].shape[0]
        assert t["boxes"].shape == [n, 4] and t["masks"].shape == [n, 160, 160]
        b = t["boxes"].numpy()
        assert (b[:, 2] > b[:, 0]).all() and (b <= 160).all()


@pytest.fixture
def tiny_coco():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny_val2017"
    ann = root / "annotations" / "instances_val2017_mini8.json"
    if not ann.exists():
        pytest.skip("shared/data/coco_tiny_val2017 not available")
    return ann, root / "val2017"


def test_augmentation_of_an_image_does_not_depend_on_the_number_of_workers(tiny_coco):
    """Two ranks with half the batch see each image flipped and resized as one process would."""
    from instseg_core.training.data import make_train_transform
    from instseg_core.training.engine import _batches

    ds = CocoInstanceDataset(*tiny_coco)
    tf = make_train_transform(64, multiscale=(32, 64, 96), flip=True)

    def images_by_index(order, batch_size, seed=5):
        got = {}
        for k, (inputs, targets) in _batches(ds, order, batch_size, tf, rng_seed=seed):
            for j, i in enumerate(order[k * batch_size:(k + 1) * batch_size]):
                h, w = (int(v) for v in inputs["im_shape"].numpy()[j])
                got[i] = (inputs["image"].numpy()[j, :, :h, :w], targets[j]["boxes"].numpy())
        return got

    one = images_by_index([0, 1], 2)
    two = {**images_by_index([0], 1), **images_by_index([1], 1)}
    same = lambda a, b: a.shape == b.shape and np.array_equal(a, b)  # noqa: E731
    for i in (0, 1):
        assert same(one[i][0], two[i][0]) and same(one[i][1], two[i][1])
    # another epoch's seed draws other augmentations (for at least one of 2 images: p = 1 - 1/36)
    other = images_by_index([0, 1], 2, seed=6)
    assert not all(same(one[i][0], other[i][0]) for i in (0, 1))


def test_keep_ratio_training_resize():
    from instseg_core.training.data import TrainSample, keep_ratio_size, make_train_transform

    assert keep_ratio_size((480, 640), 800, 1333) == (800, 1067)
    assert keep_ratio_size((400, 1600), 800, 1333) == (333, 1333)  # the long side caps the scale
    img = np.zeros((60, 120, 3), np.uint8)
    masks = np.zeros((1, 60, 120), np.uint8)
    masks[0, 10:30, 20:60] = 1
    sample = TrainSample(img, np.array([0]), np.array([[20, 10, 60, 30]], np.float32), masks, orig_hw=(60, 120))
    tf = make_train_transform(96, (64, 96), flip=False, keep_ratio_max=160)
    sizes = set()
    for seed in range(12):
        out = tf(sample, random.Random(seed))
        h, w = out.image.shape[1:]
        sizes.add((h, w))
        assert w == 2 * h and out.masks.shape[1:] == (h, w)
        np.testing.assert_allclose(out.boxes[0], np.array([20, 10, 60, 30]) * h / 60, rtol=1e-5)
    assert sizes == {(64, 128), (80, 160)}  # short side 96 is capped by the long side 160


def test_optimizer_keeps_per_parameter_lr_multipliers():
    from instseg_core.training.engine import build_optimizer

    class Net(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.backbone = paddle.nn.Sequential(paddle.nn.Linear(2, 2), paddle.nn.Linear(2, 2))
            self.head = paddle.nn.Linear(2, 1)

    net = Net()
    for name, mult in (("MaskRCNN-ResNet50-FPN", 1.0), ("Mask-RT-DETR-S", 0.1)):
        for p in net.parameters():  # backbone[1] as ResNet.set_stage_lr_mult marks an SSLDv2 stage
            p.optimize_attr["learning_rate"] = 0.5 if any(p is q for q in net.backbone[1].parameters()) else 1.0
        build_optimizer(net, recipe_for(name, {}))
        # the multiplier Paddle applies to each parameter, after it built the groups
        lr = [[p.optimize_attr["learning_rate"] for p in part.parameters()]
              for part in (net.backbone[0], net.backbone[1], net.head)]
        assert lr == [pytest.approx([mult] * 2), pytest.approx([0.5 * mult] * 2), pytest.approx([1.0] * 2)]
