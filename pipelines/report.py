"""Visual QA of a batch-job output: ``report.html`` and the numbers behind it.

The page is static and self-contained (inline CSS, no script, nothing fetched from the network):
a header with the run's counts, overlays of a sample of images (``report/sample-<k>.jpg`` beside
the page, drawn by :func:`instseg_core.visualize.draw_instances`), instances per class, a score
histogram (inline SVG), instances per image, errors by kind and, with ``--review-top``, the head of
the review queue. The same numbers go into ``summary.json`` (:meth:`ReportStats.summary`).

Bounded memory at any scale: :class:`ReportStats` is a few counters plus a fixed-size sample, filled
by each merge task from its rows and merged on the driver. The sample is the
:data:`SAMPLE_SIZE` ok images with the smallest ``image_id``: ids are hashes of the URIs, so this is
a uniform sample that is the same in every run over the same images (a bottom-k sketch, which is
mergeable, unlike a reservoir's random draws).
"""

from __future__ import annotations

import heapq
import html
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from instseg_core.io import S3Options, is_s3, join, write_bytes_atomic
from pipelines.rows import STATUS_OK

log = logging.getLogger("instseg")

__all__ = ["PER_IMAGE_BUCKETS", "REPORT_DIR", "REPORT_FILE", "SAMPLE_SIZE", "SCORE_BINS", "ReportStats",
           "render_html", "write_report"]

REPORT_FILE = "report.html"
REPORT_DIR = "report"
SAMPLE_SIZE = 24
SCORE_BINS = 20  # 0.05 wide, over [0, 1]
OVERLAY_MAX_SIDE = 480  # overlays are shrunk to this (the page shows them as thumbnails)
#: instances-per-image buckets: (lowest count, label); the last bucket is open-ended
PER_IMAGE_BUCKETS: tuple[tuple[int, str], ...] = ((0, "0"), (1, "1"), (2, "2"), (3, "3"), (4, "4"), (5, "5-9"),
                                                  (10, "10-19"), (20, "20-49"), (50, "50+"))
_QUEUE_SHOWN = 20


def _bucket(n: int) -> int:
    k = 0
    for i, (low, _) in enumerate(PER_IMAGE_BUCKETS):
        if n >= low:
            k = i
    return k


@dataclass
class ReportStats:
    """Counts over output rows, and a deterministic sample of ok rows (see the module doc)."""

    labels: list[str]
    sample_size: int = SAMPLE_SIZE
    images_ok: int = 0
    images_error: int = 0
    instances: int = 0
    class_counts: Counter = field(default_factory=Counter)
    score_counts: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    per_image_counts: list[int] = field(default_factory=lambda: [0] * len(PER_IMAGE_BUCKETS))
    errors_by_kind: Counter = field(default_factory=Counter)
    _sample: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)  # (-image_id, tie, row)
    _sample_ids: set[int] = field(default_factory=set)

    def add(self, row: Mapping[str, Any]) -> None:
        if row["status"] != STATUS_OK:
            self.images_error += 1
            self.errors_by_kind[row.get("error_kind") or "unknown"] += 1
            return
        items = row["instances"] or []
        self.images_ok += 1
        self.instances += len(items)
        self.per_image_counts[_bucket(len(items))] += 1
        for it in items:
            cid = int(it["class_id"])
            self.class_counts[self.labels[cid] if 0 <= cid < len(self.labels) else (it.get("label") or str(cid))] += 1
            self.score_counts[min(SCORE_BINS - 1, max(0, int(float(it["score"]) * SCORE_BINS)))] += 1
        self._offer(dict(row))

    def _offer(self, row: dict[str, Any]) -> None:
        """Keep ``row`` if its id is among the ``sample_size`` smallest seen (a max-heap on the id)."""
        iid = int(row["image_id"])
        if self.sample_size <= 0 or iid in self._sample_ids:
            return
        if len(self._sample) < self.sample_size:
            heapq.heappush(self._sample, (-iid, 0, row))
            self._sample_ids.add(iid)
        elif -iid > self._sample[0][0]:
            _, _, dropped = heapq.heapreplace(self._sample, (-iid, 0, row))
            self._sample_ids.discard(int(dropped["image_id"]))
            self._sample_ids.add(iid)

    def merge(self, other: ReportStats) -> None:
        self.images_ok += other.images_ok
        self.images_error += other.images_error
        self.instances += other.instances
        self.class_counts.update(other.class_counts)
        self.errors_by_kind.update(other.errors_by_kind)
        self.score_counts = [a + b for a, b in zip(self.score_counts, other.score_counts)]
        self.per_image_counts = [a + b for a, b in zip(self.per_image_counts, other.per_image_counts)]
        for _, _, row in other._sample:
            self._offer(row)

    def sample(self) -> list[dict[str, Any]]:
        """The sampled rows, by ascending image id."""
        return [row for _, _, row in sorted(self._sample, key=lambda t: -t[0])]

    def summary(self) -> dict[str, Any]:
        """The report's numbers as ``summary.json`` holds them."""
        classes = {label: int(self.class_counts.get(label, 0)) for label in self.labels}
        classes.update({k: int(v) for k, v in sorted(self.class_counts.items()) if k not in classes})
        return {
            "instances_by_class": classes,
            "score_histogram": {"bin_edges": [round(k / SCORE_BINS, 4) for k in range(SCORE_BINS + 1)],
                                "counts": list(self.score_counts)},
            "instances_per_image": {label: int(n) for (_, label), n in zip(PER_IMAGE_BUCKETS, self.per_image_counts)},
            "errors_by_kind": dict(sorted(self.errors_by_kind.items())),
            "report_sample": [row["uri"] for row in self.sample()],
        }


# ---------------------------------------------------------------------- overlays


def _read_image(uri: str, s3: S3Options | None) -> np.ndarray:
    from instseg_core.inputs import decode_image_bytes, read_bytes
    from instseg_core.io import fsspec_fs

    data = fsspec_fs(uri, s3).cat_file(uri) if is_s3(uri) else read_bytes(uri)
    return decode_image_bytes(data, uri)


def _overlay_jpeg(row: Mapping[str, Any], labels: Sequence[str], s3: S3Options | None) -> bytes:
    """The row's instances drawn over its image, shrunk to :data:`OVERLAY_MAX_SIDE`, as JPEG."""
    import cv2

    from instseg_core.visualize import draw_instances
    from pipelines.rows import table_instances

    image = _read_image(row["uri"], s3)
    drawn = np.asarray(draw_instances(image, table_instances(row), labels))  # RGB
    h, w = drawn.shape[:2]
    scale = OVERLAY_MAX_SIDE / max(h, w)
    if scale < 1:
        drawn = cv2.resize(drawn, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError(f"cannot encode the overlay of {row['uri']}")
    return buf.tobytes()


# ---------------------------------------------------------------------- the page


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.meta{color:#5b6576;font-size:13px}.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:14px}
.card{border:1px solid #dde2ea;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}.card span{font-size:12px;color:#5b6576}
#overlays{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
figure{margin:0;border:1px solid #dde2ea;border-radius:6px;overflow:hidden;background:#f6f8fb}
figure img{display:block;width:100%;height:auto}figcaption{font-size:12px;padding:6px;word-break:break-all}
.missing{padding:40px 8px;text-align:center;color:#a33;font-size:12px}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 10px;border-bottom:1px solid #eef1f5;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.bar{height:10px;background:#3b6fd8;border-radius:2px}
svg text{font-size:11px;fill:#5b6576}
"""


def _cards(summary: Mapping[str, Any]) -> str:
    by_status = summary.get("by_status") or {}
    items = [("images", summary.get("images_written", 0)), ("ok", by_status.get("ok", 0)),
             ("errors", by_status.get("error", 0)), ("instances", summary.get("instances", 0)),
             ("threshold", summary.get("threshold"))]
    return "".join(f'<div class="card"><b>{html.escape(str(v))}</b><span>{k}</span></div>' for k, v in items)


def _bar_rows(counts: Mapping[str, int], row_class: str) -> str:
    top = max(counts.values(), default=0) or 1
    return "".join(
        f'<tr class="{row_class}"><td>{html.escape(str(k))}</td><td class="n">{v}</td>'
        f'<td><div class="bar" style="width:{200 * v / top:.0f}px"></div></td></tr>' for k, v in counts.items())


def _histogram_svg(counts: Sequence[int], width: int = 640, height: int = 220) -> str:
    """Bars of the score histogram over [0, 1], with the bin counts as titles (hover)."""
    left, bottom, top_pad = 44, 28, 10
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    top = max(counts) or 1
    bar_w = plot_w / len(counts)
    parts = [f'<svg id="score-histogram" role="img" aria-label="score histogram" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" '
             'stroke="#8a93a3"/>']
    for k, n in enumerate(counts):
        h = plot_h * n / top
        x = left + k * bar_w
        parts.append(f'<rect class="hist-bar" x="{x + 1:.1f}" y="{top_pad + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
                     f'height="{h:.1f}" fill="#3b6fd8"><title>{k / len(counts):.2f}-{(k + 1) / len(counts):.2f}: '
                     f'{n}</title></rect>')
    for k in range(0, len(counts) + 1, 4):
        x = left + k * bar_w
        parts.append(f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle">{k / len(counts):.1f}</text>')
    parts.append(f'<text x="{left - 6}" y="{top_pad + 10}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{left - 6}" y="{top_pad + plot_h}" text-anchor="end">0</text></svg>')
    return "".join(parts)


def render_html(summary: Mapping[str, Any], stats: ReportStats, overlays: Sequence[tuple[str, str | None, int]],
                queue: Sequence[Any] = ()) -> str:
    """The page. ``overlays``: ``(uri, image path relative to the page or None if it could not be
    drawn, instance count)``; ``queue``: the head of the review queue (:class:`pipelines.review.QueueEntry`)."""
    numbers = stats.summary()
    esc = html.escape
    figures = []
    for uri, src, n in overlays:
        body = (f'<img class="overlay" src="{esc(src)}" alt="{esc(uri)}" loading="eager">' if src
                else f'<div class="missing">image could not be read</div>')
        figures.append(f'<figure>{body}<figcaption>{esc(uri)} &middot; {n} instance{"s" if n != 1 else ""}'
                       '</figcaption></figure>')
    errors = numbers["errors_by_kind"]
    error_table = (f'<table id="error-counts"><tr><th>kind</th><th>images</th><th></th></tr>'
                   f'{_bar_rows(errors, "error-row")}</table>' if errors else '<p id="error-counts">No errors.</p>')
    queue_html = ""
    if queue:
        rows = "".join(f'<tr class="queue-row"><td class="n">{k}</td><td>{esc(e.uri)}</td><td class="n">'
                       f'{e.priority:.4f}</td><td>{esc(e.reason)}</td></tr>'
                       for k, e in enumerate(queue[:_QUEUE_SHOWN], start=1))
        queue_html = (f'<h2>Review first</h2><p class="meta">The {min(len(queue), _QUEUE_SHOWN)} highest-priority of '
                      f'the {len(queue)} images in review/queue.csv.</p><table id="review-queue"><tr><th>#</th>'
                      f'<th>image</th><th>priority</th><th>reason</th></tr>{rows}</table>')
    title = f"instseg report: {summary.get('run_id', '')}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head><body>'
        f'<h1>Labelling report</h1><div class="meta">run {esc(str(summary.get("run_id", "")))} &middot; model '
        f'{esc(str(summary.get("model", "")))} &middot; input {esc(str(summary.get("input", "")))}</div>'
        f'<div class="cards" id="totals">{_cards(summary)}</div>'
        f'<h2>Sample</h2><p class="meta">{len(overlays)} images (the same ones in every run over these images).</p>'
        f'<div id="overlays">{"".join(figures)}</div>'
        f'<h2>Instances per class</h2><table id="class-counts"><tr><th>class</th><th>instances</th><th></th></tr>'
        f'{_bar_rows(numbers["instances_by_class"], "class-row")}</table>'
        f'<h2>Scores</h2><p class="meta">Instances by score (kept instances: at or above the threshold).</p>'
        f'{_histogram_svg(numbers["score_histogram"]["counts"])}'
        f'<h2>Instances per image</h2><table id="per-image"><tr><th>instances</th><th>images</th><th></th></tr>'
        f'{_bar_rows(numbers["instances_per_image"], "per-image-row")}</table>'
        f'<h2>Errors by kind</h2>{error_table}{queue_html}</body></html>\n')


def write_report(output: str, summary: Mapping[str, Any], stats: ReportStats, labels: Sequence[str], *,
                 queue: Sequence[Any] = (), s3: S3Options | None = None) -> dict[str, Any]:
    """Draw the sample's overlays into ``<output>/report/`` and write ``<output>/report.html``.
    An image that cannot be read or drawn is shown as such (the page is still written). Returns
    ``{"report": "report.html", "overlays": n drawn}``."""
    overlays: list[tuple[str, str | None, int]] = []
    for k, row in enumerate(stats.sample()):
        name = f"{REPORT_DIR}/sample-{k:03d}.jpg"
        try:
            write_bytes_atomic(join(output, name), _overlay_jpeg(row, labels, s3), s3)
            overlays.append((row["uri"], name, len(row["instances"] or [])))
        except Exception as e:  # noqa: BLE001 - an image gone since labelling must not cost the report
            log.warning("report: no overlay for %s: %s", row["uri"], e)
            overlays.append((row["uri"], None, len(row["instances"] or [])))
    page = render_html(summary, stats, overlays, queue)
    write_bytes_atomic(join(output, REPORT_FILE), page.encode("utf-8"), s3)
    return {"report": REPORT_FILE, "overlays": sum(1 for _, src, _ in overlays if src)}
