"""Visual QA: the batch job's ``report.html`` (opened in a real headless Chromium), its numbers in
``summary.json``, and the evaluation's per-category AP and precision/recall PNGs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO, missing_tool
from pipelines.report import PER_IMAGE_BUCKETS, SAMPLE_SIZE, SCORE_BINS, ReportStats

SHAPES = REPO / "samples" / "shapes"
DEMO = REPO / "samples" / "model"
LABELS = ["circle", "square", "triangle", "star"]


def _row(image_id: int, scores: list[float], status: str = "ok", kind: str | None = None) -> dict:
    items = [{"class_id": k % 4, "label": LABELS[k % 4], "score": s, "bbox": [0, 0, 1, 1],
              "rle": {"size": [2, 2], "counts": "04"}, "area": 1} for k, s in enumerate(scores)]
    return {"image_id": image_id, "uri": f"/img/{image_id}.jpg", "width": 2, "height": 2, "status": status,
            "error_kind": kind, "instances": items if status == "ok" else []}


def test_stats_merge_like_one_pass_and_keep_a_bounded_deterministic_sample():
    rng = np.random.default_rng(3)
    rows = [_row(int(i), list(rng.uniform(0.5, 1.0, int(rng.integers(0, 12))))) for i in rng.permutation(500) + 10]
    rows += [_row(7, [], "error", "corrupt"), _row(8, [], "error", "not_found"), _row(9, [], "error", "corrupt")]
    whole = ReportStats(LABELS)
    for r in rows:
        whole.add(r)
    merged = ReportStats(LABELS)
    for k in range(0, len(rows), 61):  # one per merge task, then merged as the driver does
        part = ReportStats(LABELS)
        for r in rows[k:k + 61]:
            part.add(r)
        merged.merge(part)
    assert merged.summary() == whole.summary()
    s = whole.summary()
    assert sum(s["instances_by_class"].values()) == whole.instances == sum(s["score_histogram"]["counts"])
    assert len(s["score_histogram"]["counts"]) == SCORE_BINS and s["score_histogram"]["bin_edges"][-1] == 1.0
    assert sum(s["instances_per_image"].values()) == 500 and list(s["instances_per_image"]) == \
        [label for _, label in PER_IMAGE_BUCKETS]
    assert s["errors_by_kind"] == {"corrupt": 2, "not_found": 1}
    # the sample: the SAMPLE_SIZE smallest ids of ok rows, whatever the order they came in
    assert [r["image_id"] for r in whole.sample()] == list(range(10, 10 + SAMPLE_SIZE))


def _chromium() -> str:
    from headless_chromium import find_chromium

    exe = find_chromium()
    if exe is None:
        missing_tool("Chromium not found (Debian: apt-get install chromium; or set INSTSEG_CHROMIUM)")
    return exe


@pytest.mark.slow
def test_report_html_in_headless_chromium(ray_local, tmp_path):
    from headless_chromium import Chromium

    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict

    exe = _chromium()
    src = tmp_path / "in"
    shutil.copytree(SHAPES, src)
    (src / "broken.jpg").write_bytes(b"not an image")
    (src / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    summary = run_batch_predict(BatchPredictConfig(input=str(src), output=str(out), model_dir=str(DEMO),
                                                   batch_size=4, review_top=3, progress_interval_s=-1))
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["report"] == "report.html"
    assert summary["errors_by_kind"] == {"corrupt": 1, "empty": 1}
    by_class = summary["instances_by_class"]
    assert list(by_class) == LABELS and sum(by_class.values()) == summary["instances"] > 0
    assert sum(summary["score_histogram"]["counts"]) == summary["instances"]
    assert sum(summary["instances_per_image"].values()) == summary["by_status"]["ok"] == 6
    assert sorted(Path(u).name for u in summary["report_sample"]) == sorted(p.name for p in SHAPES.glob("*.jpg"))

    with Chromium(exe) as page:
        page.open((out / "report.html").as_uri())
        dom = page.evaluate("""(() => {
            const cells = sel => [...document.querySelectorAll(sel)].map(tr => [...tr.cells].map(c => c.textContent));
            return {
              overlays: [...document.querySelectorAll('#overlays img.overlay')].map(
                  i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight, shown: i.clientWidth})),
              classes: cells('#class-counts tr.class-row'),
              errors: cells('#error-counts tr.error-row'),
              bars: document.querySelectorAll('svg#score-histogram rect.hist-bar').length,
              histogram: document.querySelector('svg#score-histogram').getBoundingClientRect().height,
              queue: cells('#review-queue tr.queue-row'),
              scripts: document.scripts.length,
            };
        })()""")
        shot = page.screenshot()
    (tmp_path / "report.png").write_bytes(shot)

    assert len(dom["overlays"]) == 6  # every ok image: fewer than the sample size
    for img in dom["overlays"]:  # each overlay file loaded and decoded (the samples are 160 px)
        assert img["src"].startswith("report/") and (img["w"], img["h"]) == (160, 160) and img["shown"] > 100, img
    assert [(c[0], int(c[1])) for c in dom["classes"]] == list(by_class.items())
    assert sorted((c[0], int(c[1])) for c in dom["errors"]) == [("corrupt", 1), ("empty", 1)]
    assert dom["bars"] == SCORE_BINS and dom["histogram"] > 100
    assert len(dom["queue"]) == 3 and dom["scripts"] == 0

    png = cv2.imdecode(np.frombuffer(shot, np.uint8), cv2.IMREAD_COLOR)
    assert png.shape[1] == 1280 and png.shape[0] > 1200  # the whole page, not the first screen
    not_white = (png < 235).any(axis=2).mean()
    colours = len(np.unique(png.reshape(-1, 3) // 8, axis=0))
    assert not_white > 0.05 and colours > 200, (not_white, colours)  # text, bars and photo overlays drawn


@pytest.mark.slow
def test_no_report_flag(ray_local, tmp_path):
    from jobs.batch_predict import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(
        ["--input", str(SHAPES), "--output", str(tmp_path / "o"), "--model-dir", str(DEMO), "--no-report",
         "--review-top", "2"]))
    assert cfg.report is False and cfg.review_top == 2
    cfg = config_from_args(build_parser().parse_args(
        ["--input", str(SHAPES), "--output", str(tmp_path / "o"), "--model-dir", str(DEMO)]))
    assert cfg.report is True and cfg.review_top == 0


# ---------------------------------------------------------------------- evaluation: per-category AP, PR curves


def test_per_category_ap_and_pr_curves_png():
    from instseg_core.datasets.synthetic import make_image
    from instseg_core.evaluation import evaluate_coco_curves
    from instseg_core.masks import encode_rle
    from instseg_core.pr_curves import pr_curves_png

    rng = np.random.default_rng(5)
    images, anns, results = [], [], []
    for image_id in range(1, 21):
        _, instances = make_image(rng, 96, 3)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 96, "width": 96})
        for cls, mask in instances:
            rle = encode_rle(mask[None])[0]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cls + 1, "segmentation": rle,
                         "iscrowd": 0})
            if rng.uniform() < 0.8:  # found, sometimes with the wrong class
                cid = cls + 1 if rng.uniform() < 0.8 else (cls + 1) % 4 + 1
                results.append({"image_id": image_id, "category_id": cid, "segmentation": rle,
                                "score": float(rng.uniform(0.3, 1.0))})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": k + 1, "name": n} for k, n in enumerate(LABELS)] + [{"id": 5, "name": "unused"}]}
    stats, curves = evaluate_coco_curves(gt, results)
    for iou_type in ("segm", "bbox"):
        ap = curves[iou_type].category_ap()
        assert ap[5] is None  # no ground truth: no AP, as pycocotools leaves it out of the mean
        assert np.mean([v for v in ap.values() if v is not None]) == pytest.approx(stats[iou_type]["AP"])
        p50 = curves[iou_type].curve(1, 0.5)
        assert p50.shape == (101,) and p50[0] > 0.5
    png = pr_curves_png(curves["segm"], {k + 1: n for k, n in enumerate(LABELS + ["unused"])}, "test")
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert (img < 200).any(axis=2).mean() > 0.01  # lines and text, not an empty canvas


@pytest.mark.slow
def test_evaluate_job_writes_pr_curves_and_per_category_ap(ray_local, tmp_path):
    from instseg_core.datasets.synthetic import make_dataset
    from pipelines.evaluate import EvaluateConfig, evaluate_with_ray

    data = make_dataset(tmp_path / "ds", num_train=0, num_val=8, seed=31)
    result = evaluate_with_ray(EvaluateConfig(dataset_dir=str(data), output=str(tmp_path / "ev"),
                                              model_dir=str(DEMO), progress_interval_s=-1))
    assert [c["name"] for c in result["per_category"]] == LABELS
    present = [c["segm_AP"] for c in result["per_category"] if c["segm_AP"] is not None]
    assert np.mean(present) == pytest.approx(result["metrics"]["segm"]["AP"])
    assert result["pr_curves"] == ["pr_curves_segm.png", "pr_curves_bbox.png"]
    for name in result["pr_curves"]:
        img = cv2.imread(str(tmp_path / "ev" / name))
        assert img is not None and img.shape[0] > 300
