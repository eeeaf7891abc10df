"""The pipeline's output row: one per input image, the Parquet schema every stage agrees on.

``instances[].bbox`` is ``[x1, y1, x2, y2]`` in original-image pixels (PaddleX's ``coordinate``);
COCO exports convert it to ``[x, y, w, h]``. ``rle`` is COCO compressed RLE of the full-image mask.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from instseg_core.structures import Instances

STATUS_OK, STATUS_ERROR = "ok", "error"

INSTANCE_TYPE = pa.struct([
    ("class_id", pa.int32()),
    ("label", pa.string()),
    ("score", pa.float32()),
    ("bbox", pa.list_(pa.float32(), 4)),
    ("rle", pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])),
    ("area", pa.int64()),
])

ROW_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("uri", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),
    ("error_kind", pa.string()),
    ("error", pa.string()),
    ("num_instances", pa.int32()),
    ("instances", pa.list_(INSTANCE_TYPE)),
    ("run_id", pa.string()),
    ("model", pa.string()),
])


def image_id_for(uri: str) -> int:
    """A stable, positive 63-bit id for a URI (the same URI gets the same id in every run)."""
    return int.from_bytes(hashlib.sha1(uri.encode("utf-8")).digest()[:8], "big") & ((1 << 63) - 1)


def ok_row(uri: str, instances: Instances, labels: Sequence[str], run_id: str, model: str) -> dict[str, Any]:
    """The row of a predicted image; masks are RLE-encoded here (dense masks never leave the actor)."""
    h, w = instances.image_size
    rles = instances.rle_masks()
    areas = instances.areas()
    items = []
    for i in range(len(instances)):
        cid = int(instances.class_ids[i])
        items.append({
            "class_id": cid,
            "label": labels[cid] if 0 <= cid < len(labels) else str(cid),
            "score": float(instances.scores[i]),
            "bbox": [float(v) for v in instances.boxes[i]],
            "rle": {"size": [int(s) for s in rles[i]["size"]], "counts": rles[i]["counts"]},
            "area": int(areas[i]),
        })
    return {"image_id": image_id_for(uri), "uri": uri, "width": w, "height": h, "status": STATUS_OK,
            "error_kind": None, "error": None, "num_instances": len(items), "instances": items,
            "run_id": run_id, "model": model}


def error_row(uri: str, kind: str, message: str, run_id: str, model: str) -> dict[str, Any]:
    """The row of an image that could not be read, decoded or predicted."""
    return {"image_id": image_id_for(uri), "uri": uri, "width": 0, "height": 0, "status": STATUS_ERROR,
            "error_kind": kind, "error": message, "num_instances": 0, "instances": [], "run_id": run_id,
            "model": model}


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows as an Arrow table with :data:`ROW_SCHEMA`."""
    return pa.Table.from_pylist(list(rows), schema=ROW_SCHEMA)


def table_instances(row: dict[str, Any]) -> Instances:
    """Rebuild :class:`Instances` (RLE masks) from a row read back from Parquet."""
    items = row["instances"] or []
    return Instances(
        boxes=np.array([it["bbox"] for it in items], dtype=np.float32).reshape(-1, 4),
        scores=np.array([it["score"] for it in items], dtype=np.float32),
        class_ids=np.array([it["class_id"] for it in items], dtype=np.int64),
        masks=[{"size": list(it["rle"]["size"]), "counts": it["rle"]["counts"]} for it in items],
        image_size=(row["height"], row["width"]),
    )
