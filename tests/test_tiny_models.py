"""Tiny stand-in models: exported signature, dygraph/exported agreement, batching, inference.yml."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
import yaml
from paddle import inference as paddle_infer

from instseg_core.models import MODEL_NAMES, MODEL_SPECS
from tiny_models import (
    FAMILIES,
    INPUT_NAMES,
    OUTPUT_NAMES,
    build_tiny_model,
    export_tiny_model,
)

# One official name per family.
NAME_OF_FAMILY = {
    "Mask-RT-DETR": "Mask-RT-DETR-S",
    "MaskRCNN": "MaskRCNN-ResNet50-FPN",
    "CascadeRCNN": "Cascade-MaskRCNN-ResNet50-FPN",
    "SOLOv2": "SOLOv2",
    "PPYOLOE_seg": "PP-YOLOE_seg-S",
}
BOX_FAMILIES = [f for f in FAMILIES if f != "SOLOv2"]
MASK_DTYPE = {"Mask-RT-DETR": np.int32, "MaskRCNN": np.int32, "CascadeRCNN": np.int32, "PPYOLOE_seg": np.float32}
YML_KEYS = ["mode", "draw_threshold", "metric", "use_dynamic_shape", "Global", "arch", "min_subgraph_size", "mask",
            "Preprocess", "label_list"]


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """A normalised CHW float32 'photo': smooth gradients plus a few bright/dark rectangles."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype("float32")
    img = np.stack([np.sin(xx / rng.uniform(5, 30) + c) * np.cos(yy / rng.uniform(5, 30)) for c in range(3)])
    for _ in range(4):
        y0, x0 = rng.randint(0, h // 2), rng.randint(0, w // 2)
        img[:, y0:y0 + h // 3, x0:x0 + w // 3] += rng.uniform(-2, 2, size=(3, 1, 1))
    return (img + rng.normal(0, 0.1, img.shape)).astype("float32")


def make_batch(images: list[np.ndarray], scales: list[tuple[float, float]]) -> dict[str, np.ndarray]:
    """Inputs the way the predictor builds them: images zero-padded bottom/right to a common size."""
    hp = max(im.shape[1] for im in images)
    wp = max(im.shape[2] for im in images)
    batch = np.zeros((len(images), 3, hp, wp), "float32")
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    return {
        "im_shape": np.array([im.shape[1:] for im in images], "float32"),
        "image": batch,
        "scale_factor": np.array(scales, "float32"),
    }


class Exported:
    """A paddle.inference predictor over an exported dir, fed by input name."""

    def __init__(self, model_dir):
        config = paddle_infer.Config(str(model_dir / "inference.json"), str(model_dir / "inference.pdiparams"))
        config.disable_mkldnn()  # PIR graphs can fail to convert attributes under oneDNN on CPU
        config.disable_glog_info()
        self.predictor = paddle_infer.create_predictor(config)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name in self.predictor.get_input_names():
            self.predictor.get_input_handle(name).copy_from_cpu(feeds[name])
        self.predictor.run()
        return [self.predictor.get_output_handle(n).copy_to_cpu() for n in self.predictor.get_output_names()]


def dygraph(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with paddle.no_grad():
        out = model(*(paddle.to_tensor(feeds[n]) for n in INPUT_NAMES))
    return [out[k].numpy() for k in sorted(out)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (export dir, predictor), exported once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: (d := export_tiny_model(n, root / n), Exported(d)) for f, n in NAME_OF_FAMILY.items()}


# Image A: original 150x200 resized by 0.8 -> 120x160; image B: original 100x250 resized by 0.8 -> 80x200.
IMG_A, SCALE_A = synthetic_image(120, 160, seed=1), (0.8, 0.8)
IMG_B, SCALE_B = synthetic_image(80, 200, seed=2), (0.8, 0.8)


@pytest.mark.parametrize("family", FAMILIES)
def test_signature(exported, family):
    model_dir, predictor = exported[family]
    assert predictor.predictor.get_input_names() == list(INPUT_NAMES)
    assert len(predictor.predictor.get_output_names()) == len(OUTPUT_NAMES[family])
    outs = predictor(make_batch([IMG_A], [SCALE_A]))
    h0, w0 = 150, 200
    if family == "SOLOv2":
        bbox_num, labels, scores, segm = outs
        assert bbox_num.dtype == np.int64 and bbox_num.shape == (1,)
        k = int(bbox_num[0])
        assert labels.dtype == np.int64 and labels.shape == (k,)
        assert scores.dtype == np.float32 and scores.shape == (k,)
        assert segm.dtype == np.uint8 and segm.shape == (k, h0, w0)
        assert np.all(np.diff(scores) <= 0), "SOLOv2 rows are sorted by score, descending"
        assert set(np.unique(segm)) <= {0, 1} and segm.any()
        return
    bbox, bbox_num, mask = outs
    assert bbox.dtype == np.float32 and bbox.ndim == 2 and bbox.shape[1] == 6
    assert bbox_num.dtype == np.int32 and bbox_num.shape == (1,) and bbox_num[0] == len(bbox)
    assert mask.dtype == MASK_DTYPE[family] and mask.shape == (len(bbox), h0, w0)
    assert set(np.unique(mask)) <= {0, 1} and mask.any()
    # Masks lie inside their (clipped) boxes.
    for row, m in zip(bbox, mask):
        ys, xs = np.nonzero(m == 1)
        if len(xs):
            x1, y1, x2, y2 = np.clip(row[2:], 0, [w0, h0, w0, h0])
            assert xs.min() >= np.floor(x1) and xs.max() < np.ceil(x2)
            assert ys.min() >= np.floor(y1) and ys.max() < np.ceil(y2)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_matches_dygraph(exported, family):
    feeds = make_batch([IMG_A], [SCALE_A])
    got = exported[family][1](feeds)
    want = dygraph(build_tiny_model(family), feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", BOX_FAMILIES)
def test_batch_equals_one_at_a_time(exported, family):
    predictor = exported[family][1]
    a = predictor(make_batch([IMG_A], [SCALE_A]))
    b = predictor(make_batch([IMG_B], [SCALE_B]))
    bbox, bbox_num, mask = predictor(make_batch([IMG_A, IMG_B], [SCALE_A, SCALE_B]))
    assert bbox_num.tolist() == [a[1][0], b[1][0]]
    na = int(a[1][0])
    np.testing.assert_allclose(bbox[:na], a[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(bbox[na:], b[0], rtol=1e-5, atol=1e-4)
    # Masks padded to the largest original size of the batch: (150, 250).
    assert mask.shape[1:] == (150, 250)
    pad = 0 if family == "PPYOLOE_seg" else -1
    np.testing.assert_array_equal(mask[:na, :150, :200], a[2])
    np.testing.assert_array_equal(mask[na:, :100, :250], b[2])
    assert np.all(mask[:na, :, 200:] == pad) and np.all(mask[na:, 100:, :] == pad)


def test_dygraph_batch_equals_one_at_a_time():
    # SOLOv2 is batch-1 in PaddleX, but the network still batches exactly.
    model = build_tiny_model("SOLOv2")
    a = dygraph(model, make_batch([IMG_A], [SCALE_A]))
    b = dygraph(model, make_batch([IMG_B], [SCALE_B]))
    both = dygraph(model, make_batch([IMG_A, IMG_B], [SCALE_A, SCALE_B]))
    k = int(a[0][0])
    np.testing.assert_array_equal(both[1], np.concatenate([a[1], b[1]]))
    np.testing.assert_array_equal(both[3][:k, :150, :200], a[3])
    np.testing.assert_array_equal(both[3][k:, :100, :250], b[3])


@pytest.mark.parametrize("family", BOX_FAMILIES)
def test_rows_exercise_threshold_and_degenerate_box(family):
    """On varied images: low- and high-score rows, and a high-score box that is degenerate once
    clipped to the image, placed before other high-score rows."""
    model = build_tiny_model(family)
    for seed in range(4):
        h, w = 60 + 20 * seed, 90 + 10 * seed
        bbox, _, mask = dygraph(model, make_batch([synthetic_image(h, w, seed)], [(1.0, 1.0)]))
        scores = bbox[:, 1]
        assert (scores < 0.5).sum() >= 1 and (scores > 0.5).sum() >= 3
        x1, y1 = np.maximum(bbox[:, 2], 0), np.maximum(bbox[:, 3], 0)
        x2, y2 = np.minimum(bbox[:, 4], w), np.minimum(bbox[:, 5], h)
        degenerate = np.nonzero((x2 <= x1) | (y2 <= y1))[0]
        assert len(degenerate) >= 1
        d = degenerate[0]
        assert scores[d] > 0.8 and (scores[d + 1:] > 0.5).sum() >= 2
        assert not mask[d].any() if family == "PPYOLOE_seg" else not (mask[d] == 1).any()


def test_outputs_depend_on_image_and_seed():
    model = build_tiny_model("MaskRCNN")
    a = dygraph(model, make_batch([IMG_A], [SCALE_A]))
    c = dygraph(model, make_batch([synthetic_image(120, 160, seed=7)], [SCALE_A]))
    assert not np.allclose(a[0][:, 1], c[0][:, 1]) and not np.array_equal(a[2], c[2])
    same = dygraph(build_tiny_model("MaskRCNN", seed=0), make_batch([IMG_A], [SCALE_A]))
    other = dygraph(build_tiny_model("MaskRCNN", seed=1), make_batch([IMG_A], [SCALE_A]))
    np.testing.assert_array_equal(a[0], same[0])
    assert not np.allclose(a[0][:, 1], other[0][:, 1])
    classes = dygraph(build_tiny_model("MaskRCNN", num_classes=3), make_batch([IMG_A], [SCALE_A]))[0][:, 0]
    assert classes.tolist() == [(7 * k) % 3 for k in range(len(classes))]


def test_all_names_export(tmp_path):
    feeds = make_batch([IMG_A], [SCALE_A])
    for name in MODEL_NAMES:
        spec = MODEL_SPECS[name]
        d = export_tiny_model(name, tmp_path / name)
        assert d == tmp_path / name
        assert {p.name for p in d.iterdir()} >= {"inference.json", "inference.pdiparams", "inference.yml"}
        cfg = yaml.safe_load((d / "inference.yml").read_text())
        assert list(cfg) == YML_KEYS
        assert cfg["Global"] == {"model_name": name}
        assert cfg["arch"] == spec.arch and cfg["mask"] is True and cfg["mode"] == "paddle"
        assert cfg["min_subgraph_size"] == {"DETR": 3, "RCNN": 40, "SOLOv2": 60, "PPYOLOE": 3}[spec.arch]
        assert cfg["Preprocess"] == spec.preprocess and cfg["label_list"] == list(spec.labels)
        assert cfg["draw_threshold"] == 0.5 and cfg["use_dynamic_shape"] is False
        assert len(Exported(d)(feeds)) == len(OUTPUT_NAMES[spec.family])


def test_yml_options(tmp_path):
    d = export_tiny_model("MaskRCNN-ResNet50-FPN", tmp_path / "a", input_size=320, labels=["cat", "dog"],
                          draw_threshold=0.3, with_model_name=False)
    cfg = yaml.safe_load((d / "inference.yml").read_text())
    assert "Global" not in cfg and cfg["label_list"] == ["cat", "dog"] and cfg["draw_threshold"] == 0.3
    assert [op for op in cfg["Preprocess"] if op["type"] == "Resize"][0]["target_size"] == [320, 533]
    bbox = Exported(d)(make_batch([IMG_A], [SCALE_A]))[0]
    assert set(bbox[:, 0].tolist()) <= {0.0, 1.0}

    d = export_tiny_model("Mask-RT-DETR-L", tmp_path / "b", input_size=256, num_classes=5)
    cfg = yaml.safe_load((d / "inference.yml").read_text())
    assert cfg["Preprocess"][0]["target_size"] == [256, 256]
    assert cfg["label_list"] == list(MODEL_SPECS["Mask-RT-DETR-L"].labels[:5])
    assert MODEL_SPECS["Mask-RT-DETR-L"].preprocess[0]["target_size"] == [640, 640]  # spec left alone

    with pytest.raises(ValueError):
        export_tiny_model("SOLOv2", tmp_path / "c", labels=["a"], num_classes=2)
    with pytest.raises(ValueError):
        export_tiny_model("NoSuchModel", tmp_path / "d")
    with pytest.raises(ValueError):
        build_tiny_model("NoSuchFamily")
