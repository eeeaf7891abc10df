"""Per-category annotation counts (train vs val) and their bar chart, ``histogram.png``.

Follows PaddleX's chart (figure size, dpi, bar offsets, rotated ticks, "Counts" label, legend)
with two deliberate differences:

* PaddleX takes the category names from the val file and the counts from the train file, so bars
  are mislabelled when the category lists differ. Here names and counts are keyed by the same
  category id, and the categories are the union of both splits (plus any id used by an
  annotation but not declared, labelled by its number).
* Matplotlib's default font instead of PingFang/FangSong (nothing to download).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Hashable

CategoryCount = tuple[str, int, int]  # (name, train count, val count)


def _categories(coco: dict[str, Any]) -> list[dict]:
    cats = coco.get("categories")
    if not isinstance(cats, list):
        return []
    return [c for c in cats if isinstance(c, dict) and isinstance(c.get("id"), Hashable)]


def _annotation_counts(coco: dict[str, Any]) -> Counter:
    anns = coco.get("annotations")
    if not isinstance(anns, list):
        return Counter()
    return Counter(a["category_id"] for a in anns if isinstance(a, dict) and isinstance(a.get("category_id"), Hashable))


def category_counts(train: dict[str, Any], val: dict[str, Any]) -> list[CategoryCount]:
    """``(name, train_count, val_count)`` per category, ordered by train count (descending).

    Ties keep first-seen order: train categories, then val-only ones, then undeclared ids.
    """
    names: dict[Any, str] = {}
    for coco in (train, val):
        for c in _categories(coco):
            names.setdefault(c["id"], str(c.get("name", c["id"])))  # train's name wins on conflict
    train_counts, val_counts = _annotation_counts(train), _annotation_counts(val)
    for cid in list(train_counts) + list(val_counts):
        names.setdefault(cid, str(cid))
    rows = [(name, train_counts.get(cid, 0), val_counts.get(cid, 0)) for cid, name in names.items()]
    return sorted(rows, key=lambda r: -r[1])  # sorted() is stable


def draw_histogram(counts: list[CategoryCount], path: str | os.PathLike[str]) -> None:
    """Save the train-vs-val bar chart of ``counts`` as a PNG at ``path``."""
    import numpy as np
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state, Agg when saved

    n = len(counts)
    fig = Figure(figsize=(max(8, int(n / 5)), 5), dpi=120)
    ax = fig.subplots()
    x = np.arange(n)
    ax.bar(x, [c[1] for c in counts], width=0.5, label="train")
    ax.bar(x + 0.5, [c[2] for c in counts], width=0.5, label="val")
    ax.set_xticks(x + 0.25)
    ax.set_xticklabels([c[0] for c in counts], rotation=90)
    ax.set_ylabel("Counts")
    ax.legend()
    fig.tight_layout()  # keeps the rotated names inside the image
    fig.savefig(os.fspath(path), format="png")
