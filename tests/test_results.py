"""InstanceSegResult: PaddleX layout, printing, JSON, RLE, file naming and atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from instseg_core import masks as M
from instseg_core.results import InstanceSegResult
from instseg_core.structures import Instances

LABELS = ["person", "bicycle", "car"]
H, W = 6, 8


def _box_instances() -> Instances:
    masks = np.zeros((2, H, W), dtype=bool)
    masks[0, 1:5, 1:6] = True
    masks[1, 0:6, 0:8] = True
    masks[1, 0, 0] = False
    boxes = np.array([[1.4, 1.2, 5.6, 4.9], [0, 0, W, H]], dtype=np.float32)
    return Instances(boxes, np.array([0.9, 0.7], dtype=np.float32), np.array([0, 2]), masks, (H, W))


def _solo_instances() -> Instances:
    masks = np.zeros((2, H, W), dtype=bool)
    masks[0, 2:4, 3:7] = True
    masks[1, 0:2, 0:1] = True
    return Instances(M.masks_to_xyxy(masks), np.array([0.8, 0.6], dtype=np.float32), np.array([1, 0]), masks,
                     (H, W), boxes_from_masks=True)


def _result(instances: Instances | None = None, input_path: str | None = "/a/b/demo.jpg",
            page_index: int | None = None, mask_format: str = "paddlex") -> InstanceSegResult:
    instances = instances if instances is not None else _box_instances()
    img = np.zeros((H, W, 3), dtype=np.uint8)
    return InstanceSegResult(input_path=input_path, page_index=page_index, input_img=img,
                             instances=instances, labels=LABELS, mask_format=mask_format)


def test_keys_in_paddlex_order_and_instances_kept():
    inst = _box_instances()
    res = _result(inst)
    assert list(res) == ["input_path", "page_index", "input_img", "boxes", "masks"]
    assert res.instances is inst
    assert res["input_path"] == "/a/b/demo.jpg" and res["page_index"] is None
    assert res["input_img"].shape == (H, W, 3)


def test_box_entries_and_clipped_coordinates_are_ints():
    boxes = _result()["boxes"]
    assert [list(b) for b in boxes] == [["cls_id", "label", "score", "coordinate"]] * 2
    assert boxes[0]["cls_id"] == 0 and boxes[0]["label"] == "person"
    assert boxes[0]["score"] == float(np.float32(0.9)) and type(boxes[0]["score"]) is float
    assert boxes[0]["coordinate"] == [float(np.float32(v)) for v in (1.4, 1.2, 5.6, 4.9)]
    assert all(type(v) is float for v in boxes[0]["coordinate"])
    assert boxes[1]["coordinate"] == [0, 0, W, H]
    assert all(type(v) is int for v in boxes[1]["coordinate"])


def test_paddlex_masks_cropped_to_rounded_box():
    res = _result()
    m0, m1 = res["masks"]
    assert m0.dtype == np.uint8 and m0.shape == (round(4.9) - round(1.2), round(5.6) - round(1.4))  # (4, 5)
    assert np.array_equal(m0, res.instances.masks[0, 1:5, 1:6].astype(np.uint8))
    assert m1.shape == (H, W) and m1[0, 0] == 0 and m1.sum() == H * W - 1


def test_crop_rounds_half_to_even():
    masks = np.ones((1, H, W), dtype=bool)
    inst = Instances(np.array([[0.5, 1.5, 2.5, 3.5]]), [0.9], [0], masks, (H, W))
    # round(0.5)=0, round(1.5)=2, round(2.5)=2, round(3.5)=4
    assert _result(inst)["masks"][0].shape == (2, 2)


def test_label_list_too_short_falls_back_to_id():
    inst = Instances(np.array([[1, 1, 3, 3]]), [0.9], [7], np.ones((1, H, W), bool), (H, W))
    assert _result(inst)["boxes"][0]["label"] == "7"


def test_solov2_format():
    res = _result(_solo_instances())
    assert res["boxes"] == [
        {"label": "bicycle", "score": float(np.float32(0.8)), "class_id": 1},
        {"label": "person", "score": float(np.float32(0.6)), "class_id": 0},
    ]
    assert [m.shape for m in res["masks"]] == [(H, W), (H, W)]
    assert all(m.dtype == np.uint8 for m in res["masks"])
    assert np.array_equal(res["masks"][0], res.instances.masks[0])


def test_print_json(capsys):
    _result().print()
    out = capsys.readouterr().out
    data = json.loads(out)
    assert list(data["res"]) == ["input_path", "page_index", "boxes", "masks"]
    assert data["res"]["masks"] == "..."
    assert data["res"]["boxes"][1]["coordinate"] == [0, 0, W, H]
    assert '\n    "res": {' in out  # indent 4


def test_print_repr_style_and_alias(capsys):
    _result().print(format_json=False)
    out = capsys.readouterr().out.strip()
    assert out.startswith("{'res': {'input_path': '/a/b/demo.jpg', 'page_index': None, 'boxes': [")
    assert "'coordinate': [1.4, 1.2, 5.6, 4.9]" in out  # float32 reprs, like PaddleX
    assert "'score': 0.8999999761581421" in out
    assert "'coordinate': [0, 0, 8, 6]" in out
    assert out.endswith("'masks': '...'}}")
    _result().print(json_format=False)
    assert capsys.readouterr().out.strip() == out
    _result().print(json_format=True, indent=2)
    assert json.loads(capsys.readouterr().out)["res"]["masks"] == "..."


def test_print_solov2_and_rle(capsys):
    _result(_solo_instances(), mask_format="rle").print(format_json=False)
    out = capsys.readouterr().out
    assert "'class_id': 1" in out and "'masks': '...'" in out


def test_json_property_types():
    res = _result()
    data = res.json
    assert list(data) == ["res"] and "input_img" not in data["res"]
    assert data["res"]["masks"][0] == res["masks"][0].tolist()
    assert type(data["res"]["masks"][0][0][0]) is int
    assert data["res"]["boxes"][1]["coordinate"] == [0, 0, W, H]
    json.dumps(data)  # JSON-native throughout
    assert "input_img" in res  # the result itself is untouched


def test_json_converts_numpy_scalars_added_later():
    res = _result()
    res["boxes"][0]["score"] = np.float32(0.5)
    assert type(res.json["res"]["boxes"][0]["score"]) is float


def test_rle_format_round_trips():
    inst = _box_instances()
    res = _result(inst, mask_format="rle")
    rles = res["masks"]
    assert all(set(r) == {"size", "counts"} and isinstance(r["counts"], str) for r in rles)
    assert rles[0]["size"] == [H, W]
    assert np.array_equal(M.decode_rle(rles), inst.masks)
    assert np.array_equal(M.decode_rle(res.json["res"]["masks"]), inst.masks)
    assert res["boxes"][1]["coordinate"] == [0, 0, W, H]


def test_rle_from_rle_instances_and_solov2_coordinate():
    solo = _solo_instances()
    res = _result(solo.to_rle(), mask_format="rle")
    assert res["boxes"][0] == {"label": "bicycle", "score": float(np.float32(0.8)), "class_id": 1,
                               "coordinate": [3, 2, 7, 4]}
    assert np.array_equal(M.decode_rle(res["masks"]), solo.masks)
    # paddlex format from RLE instances decodes them
    assert np.array_equal(_result(solo.to_rle())["masks"][0], solo.masks[0].astype(np.uint8))


def test_bad_mask_format():
    with pytest.raises(ValueError, match="mask_format"):
        _result(mask_format="polygon")


def test_pickle_round_trip():
    res = pickle.loads(pickle.dumps(_result()))
    assert list(res) == ["input_path", "page_index", "input_img", "boxes", "masks"]
    assert res.instances.image_size == (H, W) and res.labels == tuple(LABELS)


# ----------------------------------------------------------------------------- saving


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_save_to_json_directory(tmp_path):
    res = _result()
    written = res.save_to_json(tmp_path / "out" / "deep")
    assert written == str(tmp_path / "out" / "deep" / "demo_res.json")
    data = json.loads((tmp_path / "out" / "deep" / "demo_res.json").read_text(encoding="utf-8"))
    assert data == res.json["res"]  # only the inner object
    assert _files(tmp_path) == ["out/deep/demo_res.json"]  # no temp files left


def test_save_to_json_explicit_file_and_unicode(tmp_path):
    res = InstanceSegResult(input_path="x.png", page_index=None, input_img=np.zeros((H, W, 3), np.uint8),
                            instances=_box_instances(), labels=["人", "b", "车"])
    res.save_to_json(tmp_path / "sub" / "named.json", indent=2)
    text = (tmp_path / "sub" / "named.json").read_text(encoding="utf-8")
    assert '"人"' in text and text.startswith('{\n  "input_path"')
    assert _files(tmp_path) == ["sub/named.json"]


def test_page_index_and_url_stems(tmp_path):
    _result(input_path="/data/scan.tiff", page_index=2).save_all(tmp_path)
    _result(input_path="https://host/img/photo.JPG?sig=abc").save_all(tmp_path)
    assert _files(tmp_path) == ["photo_res.JPG", "photo_res.json", "scan_2_res.json", "scan_2_res.tiff"]


def test_no_input_path_stem_is_fixed_per_object(tmp_path):
    res = _result(input_path=None)
    res.save_to_json(tmp_path)
    res.save_to_img(tmp_path)
    files = _files(tmp_path)
    assert len(files) == 2
    stems = {re.fullmatch(r"(\d+_\d{4})_res\.(json|png)", f).group(1) for f in files}
    assert len(stems) == 1


def test_save_to_img_suffix_rules(tmp_path):
    _result(input_path="/a/doc.pdf").save_to_img(tmp_path / "d1")  # not an image -> .png
    _result(input_path="/a/frame.bmp").save_to_img(tmp_path / "d2")
    _result(input_path="/a/raster.sr").save_to_img(tmp_path / "d3")  # unwritable by Pillow -> .png
    assert _files(tmp_path) == ["d1/doc_res.png", "d2/frame_res.bmp", "d3/raster_res.png"]
    assert Image.open(tmp_path / "d2" / "frame_res.bmp").format == "BMP"


def test_save_to_img_explicit_image_path(tmp_path):
    res = _result()
    res.save_to_img(tmp_path / "x" / "overlay.jpg")
    with Image.open(tmp_path / "x" / "overlay.jpg") as im:
        assert im.format == "JPEG" and im.size == (W, H)
    assert _files(tmp_path) == ["x/overlay.jpg"]


def test_atomic_write_cleans_up_on_failure(tmp_path, monkeypatch):
    res = _result()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(RuntimeError):
        res.save_to_img(tmp_path)
    assert _files(tmp_path) == []


def test_saved_file_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = _result().save_to_json(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_img_property():
    img = _result().img
    assert list(img) == ["res"] and isinstance(img["res"], Image.Image)
    assert img["res"].size == (W, H) and img["res"].mode == "RGB"
