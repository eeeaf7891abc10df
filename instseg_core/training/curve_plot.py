"""``train_curves.png``: the loss terms (mean per epoch) and the evaluation AP of a training run."""
from __future__ import annotations

import io
import os
from typing import Mapping

from instseg_core.io import atomic_write


def draw_train_curves(losses: Mapping[str, Mapping[int, float]], ap: Mapping[str, Mapping[int, float]],
                      path: str | os.PathLike, title: str = "") -> None:
    """Save a two-panel PNG at ``path`` (replaced atomically, so a viewer never sees half of it).

    ``losses``: loss term -> {epoch: mean loss}; ``ap``: metric (``mask AP``, ``box AP``) ->
    {epoch: AP in [0, 1]}. Epochs are 1-based. Either may be empty (that panel says so).
    """
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state, Agg when saved
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), dpi=100)
    ax_loss, ax_ap = fig.subplots(1, 2)
    for ax, series, ylabel in ((ax_loss, losses, "loss (mean over the epoch)"), (ax_ap, ap, "AP (val)")):
        drawn = False
        # the total ("loss", the weighted sum of the terms) first, in black and thicker
        for name in sorted(series, key=lambda n: n != "loss"):
            points = series[name]
            if not points:
                continue
            epochs = sorted(points)
            style = {"color": "black", "linewidth": 2.5} if name == "loss" else {"linewidth": 1.2}
            ax.plot(epochs, [points[e] for e in epochs], marker="o", markersize=4, label=name, **style)
            drawn = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no evaluation yet" if ax is ax_ap else "no epoch finished yet",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
    values = [v for points in ap.values() for v in points.values()]
    if values:
        # from just below 0 (an AP of 0, common early on, stays visible above the axis) to a
        # little above the best AP
        top = min(1.05, max(0.05, 1.15 * max(values)))
        ax_ap.set_ylim(-0.03 * top, top)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
