"""The review queue (``--review-top K``): its measure, its bounded heaps, and the batch job's files.

On ``samples/shapes`` with the demo model, next to blurred, noised and cropped copies made here,
two runs (different shard sizes, so the merge tasks see different groupings) write the same
``review/queue.csv``, the hard copies come first, and the queue equals the top K of every row
scored and sorted in one place.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO
from instseg_core.masks import encode_rle
from instseg_core.review_score import review_score

SHAPES = REPO / "samples" / "shapes"
DEMO = REPO / "samples" / "model"


# ---------------------------------------------------------------------- the measure


def _instance(box, mask_box=None, score=0.9, label="circle", size=(100, 100)) -> dict:
    """A row instance whose mask fills ``mask_box`` (default: its box)."""
    m = np.zeros((1, *size), np.uint8)
    x1, y1, x2, y2 = mask_box or box
    m[0, y1:y2, x1:x2] = 1
    rle = encode_rle(m)[0]
    return {"class_id": 0, "label": label, "score": score, "bbox": [float(v) for v in box], "rle": rle,
            "area": int(m.sum())}


def test_measure_orders_doubt():
    good = review_score([_instance((10, 10, 40, 40), score=0.95)], 0.5)
    weak = review_score([_instance((10, 10, 40, 40), score=0.55)], 0.5)
    corner = review_score([_instance((10, 10, 40, 40), mask_box=(10, 10, 20, 20), score=0.95)], 0.5)
    dup = review_score([_instance((10, 10, 40, 40), score=0.95),
                        _instance((11, 10, 40, 40), score=0.9, label="square")], 0.5)
    two = review_score([_instance((10, 10, 40, 40), score=0.95), _instance((60, 60, 90, 90), score=0.95)], 0.5)
    empty = review_score([], 0.5)
    assert good.priority == pytest.approx(0.05)
    assert weak.priority > good.priority and weak.reason.startswith("weakest circle 0.55")
    assert corner.priority > weak.priority and "mask/box IoU 0.11" in corner.reason
    assert dup.priority > 0.95 and "overlaps circle" in dup.reason  # the lower-scored square is the doubt
    assert good.priority < two.priority < weak.priority  # two confident labels: more chances of one error
    assert empty.priority == 0.5 and empty.reason == "no instance above 0.50"
    assert review_score([], 0.7).priority == pytest.approx(0.3)
    # crowded images saturate near 1: the expected number of wrong labels orders them
    crowd = [_instance((4 * k, 0, 4 * k + 3, 3), score=0.6) for k in range(25)]
    assert review_score(crowd, 0.5).priority == review_score(crowd[:20], 0.5).priority == 1.0
    assert review_score(crowd, 0.5).expected_errors > review_score(crowd[:20], 0.5).expected_errors
    assert review_score(crowd[:20], 0.5).expected_errors == pytest.approx(20 * 0.4, abs=1e-3)
    with pytest.raises(ValueError, match="threshold"):
        review_score([], 1.5)


def test_bounded_heaps_merge_to_the_global_top_k():
    from pipelines.review import QueueEntry, ReviewQueue

    rng = random.Random(7)
    # few distinct priorities: ties, broken by image id, are the common case
    entries = [QueueEntry(rng.choice([0.1, 0.25, 0.5, 0.75, 0.9, 1.0]), rng.randrange(1 << 62), f"u{k}", "", "p",
                          rng.choice([1.0, 2.5, 7.0])) for k in range(3000)]
    entries += entries[:50]  # an image seen twice (retried work) counts once
    expected = sorted({e.image_id: e for e in entries}.values(),
                      key=lambda e: (-e.priority, -e.expected_errors, e.image_id))[:40]
    groups = [entries[k:k + 237] for k in range(0, len(entries), 237)]
    merged = ReviewQueue(40, 0.5)
    for g in groups:  # each merge task's heap, then the driver's
        q = ReviewQueue(40, 0.5)
        q.merge(g)
        assert len(q) <= 40
        merged.merge(q.entries())
    assert merged.ranked() == expected
    assert ReviewQueue(0, 0.5).ranked() == []


# ---------------------------------------------------------------------- the batch job


def _hard_copies(src: Path) -> dict[str, str]:
    """The samples and a blurred, a noised and a cropped copy of each; file name -> kind."""
    src.mkdir(parents=True)
    kinds = {}
    for k, path in enumerate(sorted(SHAPES.glob("*.jpg"))):
        img = cv2.imread(str(path))
        rng = np.random.default_rng(k)
        copies = {"orig": img, "blur": cv2.GaussianBlur(img, (0, 0), 4),
                  "noise": np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8),
                  "crop": img[:, : img.shape[1] // 2].copy()}  # objects cut at the new edge
        for kind, pixels in copies.items():
            name = f"{kind}_{path.stem}.png"
            cv2.imwrite(str(src / name), pixels)
            kinds[name] = kind
    return kinds


def _queue(output: Path) -> list[dict]:
    with open(output / "review" / "queue.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_batch_job_queue_is_stable_and_puts_hard_images_first(ray_local, tmp_path):
    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict
    from pipelines.sinks import list_parts
    from pipelines.writers import iter_rows

    kinds = _hard_copies(tmp_path / "in")
    top = 8
    outs = []
    for name, shard_size in (("a", 4), ("b", 100)):
        out = tmp_path / name
        summary = run_batch_predict(BatchPredictConfig(
            input=str(tmp_path / "in"), output=str(out), model_dir=str(DEMO), batch_size=4, shard_size=shard_size,
            review_top=top, report=False, progress_interval_s=-1))
        assert summary["review"]["images"] == top and summary["report"] is None
        outs.append(out)
    assert not (outs[0] / "report.html").exists()  # --no-report
    first, second = _queue(outs[0]), _queue(outs[1])
    assert first == second  # the same images, priorities and reasons: a stable queue
    assert list(first[0]) == ["uri", "image_id", "priority", "reason"] and len(first) == top

    # best-first, and equal to every row scored and sorted in one place
    rows = list(iter_rows(list_parts(str(outs[0]))))
    scored = [(review_score(r["instances"], 0.5), r["image_id"], r["uri"]) for r in rows]
    ranked_rows = sorted(scored, key=lambda t: (-t[0].priority, -t[0].expected_errors, t[1]))
    assert [(float(q["priority"]), int(q["image_id"]), q["uri"]) for q in first] == \
        [(s.priority, i, u) for s, i, u in ranked_rows[:top]]

    # the hard copies first: none of the originals among the first six, and a better median rank
    ranked = [kinds[Path(u).name] for _, _, u in ranked_rows]
    print("queue:", [(Path(q["uri"]).name, q["priority"], q["reason"]) for q in first])
    assert "orig" not in ranked[:6], ranked
    ranks = {kind: [k for k, x in enumerate(ranked) if x == kind] for kind in ("orig", "blur", "noise", "crop")}
    assert np.median(ranks["blur"] + ranks["noise"] + ranks["crop"]) < np.median(ranks["orig"]), ranks

    # LabelMe files for exactly the queued images; Label Studio tasks in queue order
    labelme = sorted(p.name for p in (outs[0] / "review" / "labelme").rglob("*.json"))
    assert labelme == sorted(Path(q["uri"]).stem + ".json" for q in first)
    tasks = json.loads((outs[0] / "review" / "label_studio" / "tasks.json").read_text())
    assert [t["data"]["uri"] for t in tasks] == [q["uri"] for q in first]
    assert [t["data"]["review_rank"] for t in tasks] == list(range(1, top + 1))
    assert [t["data"]["review_priority"] for t in tasks] == [float(q["priority"]) for q in first]
    assert (outs[0] / "review" / "label_studio" / "config.xml").read_text().startswith("<View>")


def test_review_top_is_checked_before_ray(tmp_path):
    from pipelines.batch_predict import BatchPredictConfig, JobSettingsError, check_settings

    with pytest.raises(JobSettingsError, match="review_top must be a non-negative integer"):
        check_settings(BatchPredictConfig(input=str(SHAPES), output=str(tmp_path / "o"), model_dir=str(DEMO),
                                          review_top=-1))
