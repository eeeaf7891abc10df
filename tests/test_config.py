import logging

import pytest

from instseg_core.config import (CONFIG_DIR, ConfigError, apply_overrides, check_config, load_config,
                                 parse_override, parse_value)
from instseg_core.models import MODEL_NAMES, get_spec


@pytest.mark.parametrize("text, want", [
    ("None", None), ("null", None), ("true", True), ("F", False), ("10", 10), ("1e-4", 1e-4), ("[1, 2]", [1, 2]),
    ("{'a': 1}", {"a": 1}), ("gpu:0,1", "gpu:0,1"), ("./out/dir", "./out/dir"), ("'quoted'", "quoted"),
    # PaddleX turns every substring of "None" into None; these stay strings here
    ("n", "n"), ("o", "o"), ("No", "No"), ("one", "one"),
    ("__import__('os').system('true')", "__import__('os').system('true')"),  # never evaluated
])
def test_parse_value(text, want):
    assert parse_value(text) == want


def test_parse_override_and_errors():
    assert parse_override("Train.learning_rate=0.001") == (["Train", "learning_rate"], 0.001)
    assert parse_override("Predict.input=a=b.jpg") == (["Predict", "input"], "a=b.jpg")
    for bad in ("Train.lr", "=3", "Train..lr=1", ".x=1"):
        with pytest.raises(ConfigError, match="malformed override"):
            parse_override(bad)


def test_apply_overrides_warns_on_unknown_keys(caplog):
    cfg = {"Global": {"mode": "train", "model": "SOLOv2"}, "Train": {"epochs_iters": 40}}
    with caplog.at_level(logging.WARNING, logger="instseg"):
        out = apply_overrides(cfg, ["Train.epochs_iters=2", "Train.new_key=5", "Extra.a.b=c"])
    assert out["Train"] == {"epochs_iters": 2, "new_key": 5} and out["Extra"] == {"a": {"b": "c"}}
    assert cfg["Train"]["epochs_iters"] == 40  # the input is not modified
    assert "unknown key Train.new_key" in caplog.text and "new section Extra" in caplog.text
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides(cfg, ["Train.epochs_iters.x=1"])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_packaged_configs(name):
    cfg = load_config(name)
    spec = get_spec(name)
    assert set(cfg) == {"Global", "CheckDataset", "Train", "Evaluate", "Export", "Predict"}
    assert cfg["Global"]["model"] == name
    assert cfg["Train"]["learning_rate"] == pytest.approx(spec.train_lr)
    assert isinstance(cfg["Train"]["learning_rate"], float)
    assert cfg["Train"]["batch_size"] == spec.train_batch_size
    assert cfg["Train"]["pretrain_weight_path"] == spec.pretrained_url
    assert cfg["CheckDataset"]["convert"] == {"enable": False, "src_dataset_type": None}
    check_config(cfg)
    assert (CONFIG_DIR / f"{name}.yaml").is_file()


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("Global: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="Global.mode"):
        check_config({"Global": {"model": "SOLOv2", "mode": "fly"}})
