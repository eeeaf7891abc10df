import cv2
import numpy as np
import pytest

from instseg_core.inference.preprocess import PreprocessConfigError, Preprocessor, build_preprocess, collate
from instseg_core.models import get_spec


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_keep_ratio_resize_rounding_and_inputs():
    pre = Preprocessor(get_spec("MaskRCNN-ResNet50-FPN").preprocess)
    s = pre(_img(480, 640))
    # scale = min(1333/640, 800/480) = 1.6667 -> (1067, 800) with Python round
    assert s.resized_hw == (800, 1067)
    batch = collate([s])
    assert batch["image"].shape == (1, 3, 800, 1088)  # PadStride 32 pads width only
    assert batch["image"].dtype == np.float32
    assert s.scale_factor == pytest.approx((800 / 480, 1067 / 640))
    assert np.all(batch["image"][..., 1067:] == 0) and np.any(batch["image"][..., :1067] != 0)
    np.testing.assert_allclose(batch["im_shape"], [[800, 1067]])


def test_normalize_matches_paddlex_formula():
    img = _img(40, 60)
    pre = Preprocessor([{"type": "Resize", "target_size": [40, 60], "keep_ratio": False, "interp": 2},
                        {"type": "NormalizeImage", "is_scale": True, "mean": [0.485, 0.456, 0.406],
                         "std": [0.229, 0.224, 0.225]}, {"type": "Permute"}])
    got = collate([pre(img)])["image"][0]
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_solov2_normalises_before_resize():
    img = _img(100, 150)
    spec = get_spec("SOLOv2").preprocess
    s = Preprocessor(spec)(img)
    image = collate([s])["image"][0]
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    norm = (rgb / 255.0 - mean) / std
    h, w = s.resized_hw
    want = cv2.resize(norm.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    np.testing.assert_allclose(image[:, :h, :w], want, atol=1e-4)
    assert image.shape == (3, 800, 1216)
    assert (h, w) == (800, 1200)


def test_fixed_size_resize_and_none_norm():
    s = Preprocessor(get_spec("Mask-RT-DETR-L").preprocess)(_img(300, 500))
    image = collate([s])["image"]
    assert image.shape == (1, 3, 640, 640) and s.resized_hw == (640, 640)
    assert 0.0 <= image.min() and image.max() <= 1.0  # /255 only


def test_collate_pads_to_largest_and_keeps_im_shape():
    pre = Preprocessor(get_spec("MaskRCNN-ResNet50").preprocess)  # stride -1: no padding
    a, b = pre(_img(480, 640)), pre(_img(640, 480, 1))
    batch = collate([a, b])
    assert batch["image"].shape == (2, 3, 1067, 1067)
    np.testing.assert_array_equal(batch["im_shape"], [[800, 1067], [1067, 800]])
    assert batch["scale_factor"].dtype == np.float32


@pytest.mark.parametrize("bad, msg", [
    ([{"type": "Mosaic"}], "unknown preprocess op 'Mosaic'"),
    ([{"target_size": 3}], "has no 'type'"),
    ([{"type": "Resize", "target_size": [8, 8], "interp": 9}], "interp"),
    ([{"type": "Resize", "target_size": [8, 8], "bogus": 1}], "bad arguments for Resize"),
])
def test_bad_preprocess_config(bad, msg):
    with pytest.raises(PreprocessConfigError, match=msg):
        build_preprocess(bad)
