"""Precision/recall curves of an evaluation, one PNG per IoU type: a panel per category.

Each panel shows the category's precision over recall at IoU 0.50 and 0.75 and averaged over
0.50:0.95 (COCO's AP is the area under that last curve), with its AP in the title. Categories
without ground truth in the evaluated split say so instead of a curve.
"""
from __future__ import annotations

import io
import math
from typing import Mapping

from instseg_core.evaluation import PRCurves

__all__ = ["pr_curves_png"]

_PANEL_IN = (2.6, 2.2)  # inches per category panel
_MAX_COLUMNS = 8


def pr_curves_png(curves: PRCurves, names: Mapping[int, str], title: str = "") -> bytes:
    """The PNG bytes of ``curves`` (``names``: category id -> name)."""
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state, Agg when saved

    cats = curves.category_ids
    ap = curves.category_ap()
    cols = min(_MAX_COLUMNS, max(1, math.ceil(math.sqrt(len(cats)))))
    rows = max(1, math.ceil(len(cats) / cols))
    fig = Figure(figsize=(_PANEL_IN[0] * cols, _PANEL_IN[1] * rows + 0.4), dpi=90, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    recall = curves.recall
    for k, ax in enumerate(axes.flat):
        if k >= len(cats):
            ax.set_axis_off()
            continue
        cid = cats[k]
        name = names.get(cid, str(cid))
        if ap[cid] is None:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", color="gray", transform=ax.transAxes)
            ax.set_title(name, fontsize=9)
        else:
            for iou, style in ((0.5, {"color": "#3b6fd8", "linewidth": 1.4, "label": "IoU 0.50"}),
                               (0.75, {"color": "#d8843b", "linewidth": 1.4, "linestyle": "--", "label": "IoU 0.75"}),
                               (None, {"color": "black", "linewidth": 1.0, "label": "0.50:0.95"})):
                p = curves.curve(cid, iou)
                keep = p > -1
                ax.plot(recall[keep], p[keep], **style)
            ax.set_title(f"{name}  AP {ap[cid]:.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if k % cols == 0:
            ax.set_ylabel("precision", fontsize=8)
        if k >= len(cats) - cols:
            ax.set_xlabel("recall", fontsize=8)
    first = next((a for a in axes.flat if a.lines), None)
    if first is not None:  # one legend, in the first panel with curves
        first.legend(fontsize=7, loc="lower left")
    fig.suptitle(title or f"precision / recall ({curves.iou_type})", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
