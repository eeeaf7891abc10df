"""``instseg predict``: what it writes."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "samples" / "model"


def test_cli_outputs_of_same_named_images_do_not_overwrite(tmp_path):
    """`instseg predict --input dir/` with a/img.jpg and b/img.jpg writes two result files (paths
    kept below the input dir); the same file given twice gets a `_2` name."""
    from instseg_core.cli import main

    src = tmp_path / "in"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        (src / sub / "img.jpg").write_bytes((REPO / "samples" / "shapes_0.jpg").read_bytes())
    out = tmp_path / "out"
    assert main(["predict", "--model-dir", str(DEMO), "--input", str(src), "--quiet", "--save-path", str(out)]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*_res.*"))
    assert written == ["a/img_res.jpg", "a/img_res.json", "b/img_res.jpg", "b/img_res.json"], written
    assert json.loads((out / "b" / "img_res.json").read_text())["input_path"].endswith("b/img.jpg")
    out2 = tmp_path / "out2"
    img = str(src / "a" / "img.jpg")
    assert main(["predict", "--model-dir", str(DEMO), "--input", img, str(src / "b" / "img.jpg"), "--quiet",
                 "--save-path", str(out2)]) == 0
    assert sorted(p.name for p in out2.glob("*_res.json")) == ["img_2_res.json", "img_res.json"]


def test_save_path_file_and_skip_errors(tmp_path, capsys):
    """A .json or image --save-path is that file (one image); for several images it is a clear error.
    --skip-errors reports a corrupt image and goes on (exit code 1), instead of stopping at it."""
    from instseg_core.cli import main

    img = str(REPO / "samples" / "shapes_0.jpg")
    assert main(["predict", "--model-dir", str(DEMO), "--input", img, "--quiet", "--save-path",
                 str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text())["input_path"] == img
    assert main(["predict", "--model-dir", str(DEMO), "--input", img, "--quiet", "--save-path",
                 str(tmp_path / "over.png")]) == 0
    assert (tmp_path / "over.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["predict", "--model-dir", str(DEMO), "--input", str(REPO / "samples" / "shapes"), "--quiet",
                 "--save-path", str(tmp_path / "many.png")]) == 2
    assert "holds one image's result" in capsys.readouterr().err

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.jpg", "c.jpg"):
        (src / name).write_bytes((REPO / "samples" / "shapes_0.jpg").read_bytes())
    (src / "b.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert main(["predict", "--model-dir", str(DEMO), "--input", str(src), "--quiet", "--save-path", str(out)]) == 2
    assert "b.jpg" in capsys.readouterr().err
    assert main(["predict", "--model-dir", str(DEMO), "--input", str(src), "--quiet", "--skip-errors",
                 "--save-path", str(out)]) == 1
    err = capsys.readouterr().err
    assert "skipped: " in err and "b.jpg" in err
    assert sorted(p.name for p in out.glob("*_res.json")) == ["a_res.json", "c_res.json"]


def test_progress_over_a_directory(tmp_path, caplog):
    """Over several images `instseg predict` logs done/total, the rate and an ETA (time-based:
    --progress-interval-s 0 logs after every image), counting skipped images as errors; one image
    logs no progress line."""
    import logging

    from instseg_core.cli import main

    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes((REPO / "samples" / "shapes_0.jpg").read_bytes())
    (src / "9_bad.jpg").write_bytes(b"not a jpeg")
    caplog.set_level(logging.INFO, logger="instseg")
    assert main(["predict", "--model-dir", str(DEMO), "--input", str(src), "--quiet", "--skip-errors",
                 "--progress-interval-s", "0"]) == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("progress:", "predicted:"))]
    assert [ln.split(",")[0] for ln in lines] == [f"progress: {i}/5 images ({20 * i:.1f}%)" for i in range(1, 6)] \
        + ["predicted: 5/5 images (100.0%)"], lines
    assert "ETA " in lines[2] and lines[-1].split(", ")[2] == "1 errors", lines
    caplog.clear()
    assert main(["predict", "--model-dir", str(DEMO), "--input", str(src / "0.jpg"), "--quiet"]) == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("progress:")]
