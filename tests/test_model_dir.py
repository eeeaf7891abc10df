import pytest
import yaml

from instseg_core.inference.model_dir import ModelDirError, load_model_dir, resolve_model_dir
from instseg_core.models import MODEL_NAMES, get_spec


def _write_dir(path, name="MaskRCNN-ResNet50-FPN", graph="inference.json", **overrides):
    path.mkdir(parents=True, exist_ok=True)
    spec = get_spec(name)
    cfg = {"mode": "paddle", "draw_threshold": 0.5, "metric": "COCO", "Global": {"model_name": name},
           "arch": spec.arch, "Preprocess": spec.preprocess, "label_list": list(spec.labels)}
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (path / "inference.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if graph:
        (path / graph).write_text("{}")
    (path / "inference.pdiparams").write_bytes(b"\0")
    return path


def test_valid_dir_reads_config(tmp_path):
    md = load_model_dir(_write_dir(tmp_path / "m"), "MaskRCNN-ResNet50-FPN")
    assert md.arch == "RCNN" and md.draw_threshold == 0.5 and len(md.labels) == 80
    assert md.model_file.name == "inference.json"


def test_pdmodel_accepted_and_json_preferred(tmp_path):
    d = _write_dir(tmp_path / "m", graph="inference.pdmodel")
    assert load_model_dir(d).model_file.name == "inference.pdmodel"
    (d / "inference.json").write_text("{}")
    assert load_model_dir(d).model_file.name == "inference.json"


def test_model_name_taken_from_yml(tmp_path):
    assert load_model_dir(_write_dir(tmp_path / "m", "SOLOv2")).model_name == "SOLOv2"


@pytest.mark.parametrize("missing", ["inference.json", "inference.pdiparams", "inference.yml"])
def test_missing_file(tmp_path, missing):
    d = _write_dir(tmp_path / "m")
    (d / missing).unlink()
    with pytest.raises(ModelDirError, match=f"incomplete: missing .*{missing.split('.')[1]}"):
        load_model_dir(d)


def test_missing_dir(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nope")


def test_name_mismatch(tmp_path):
    with pytest.raises(ModelDirError, match="model name mismatch.*'SOLOv2'"):
        load_model_dir(_write_dir(tmp_path / "m"), "SOLOv2")


def test_unknown_preprocess_op(tmp_path):
    d = _write_dir(tmp_path / "m", Preprocess=[{"type": "Mosaic"}])
    with pytest.raises(ValueError, match=r"inference.yml: unknown preprocess op 'Mosaic'"):
        load_model_dir(d)


def test_bad_yaml_and_unknown_arch(tmp_path):
    d = _write_dir(tmp_path / "m", arch="YOLOX")
    with pytest.raises(ModelDirError, match="unknown or missing arch 'YOLOX'"):
        load_model_dir(d)
    (d / "inference.yml").write_text("a: [unclosed")
    with pytest.raises(ModelDirError, match="not valid YAML"):
        load_model_dir(d)


def test_missing_draw_threshold_defaults(tmp_path, caplog):
    d = _write_dir(tmp_path / "m", draw_threshold=None)
    assert load_model_dir(d).draw_threshold == 0.5
    assert "no draw_threshold" in caplog.text


def test_resolve_needs_a_name_or_dir():
    with pytest.raises(ModelDirError, match="model_name"):
        resolve_model_dir(None, None)
    with pytest.raises(ValueError, match="unknown model name 'Mask-RCNN'"):
        resolve_model_dir("Mask-RCNN", None)


def test_specs_cover_the_15_models():
    assert len(MODEL_NAMES) == 15
    assert {get_spec(n).family for n in MODEL_NAMES} == {"Mask-RT-DETR", "MaskRCNN", "CascadeRCNN", "SOLOv2",
                                                           "PPYOLOE_seg"}
    assert {n for n in MODEL_NAMES if get_spec(n).batch1_only} == {
        "SOLOv2", "PP-YOLOE_seg-S", "Cascade-MaskRCNN-ResNet50-FPN", "Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN"}
    s = get_spec("Mask-RT-DETR-L")
    assert s.inference_url.endswith("/paddle3.0.0/Mask-RT-DETR-L_infer.tar")
    assert s.pretrained_url.endswith("/official_pretrained_model/Mask-RT-DETR-L_pretrained.pdparams")
