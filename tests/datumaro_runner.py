"""Reads COCO dataset files with datumaro (CVAT's dataset library) as "coco_instances", the format
CVAT's "COCO 1.0" importer hands to it; executed by the datumaro venv's interpreter
(tests/test_cvat.py), never imported by the suite.

Usage: python datumaro_runner.py REQUEST.json
REQUEST: {"out_dir", "datasets": [path of a COCO dataset JSON, ...]}
Each file is laid out as CVAT unpacks an uploaded zip (ROOT/annotations/instances_default.json, an
empty ROOT/images/) and imported. Writes OUT_DIR/result.json: per dataset {"labels": [names],
"items": [{"id", "coco_id", "annotations": [{"type", "label", "attributes", "id", "group",
"points" (polygons)}]}]} and OUT_DIR/masks.npz: "<dataset>/<item index>/<annotation index>" = a mask.
"""

import json
import os
import shutil
import sys

import numpy as np
from datumaro.components.annotation import AnnotationType
from datumaro.components.dataset import Dataset


def main() -> None:
    req = json.load(open(sys.argv[1]))
    out, masks = [], {}
    for d, path in enumerate(req["datasets"]):
        root = os.path.join(req["out_dir"], f"dm{d}")
        os.makedirs(os.path.join(root, "annotations"))
        os.makedirs(os.path.join(root, "images"))
        shutil.copy(path, os.path.join(root, "annotations", "instances_default.json"))
        ds = Dataset.import_from(root, "coco_instances")
        names = [c.name for c in ds.categories()[AnnotationType.label].items]
        items = []
        for i, item in enumerate(ds):
            anns = []
            for k, a in enumerate(item.annotations):
                ann = {"type": a.type.name, "label": names[a.label] if a.label is not None else None,
                       "attributes": {n: (v if isinstance(v, (bool, int, float, str)) else str(v))
                                      for n, v in a.attributes.items()},
                       "id": a.id, "group": a.group}
                if a.type == AnnotationType.mask:
                    masks[f"{d}/{i}/{k}"] = np.asarray(a.image).astype(bool)
                elif a.type == AnnotationType.polygon:
                    ann["points"] = [float(v) for v in a.points]
                anns.append(ann)
            items.append({"id": item.id, "coco_id": item.attributes.get("id"), "annotations": anns})
        out.append({"labels": names, "items": items})
    json.dump(out, open(os.path.join(req["out_dir"], "result.json"), "w"))
    np.savez_compressed(os.path.join(req["out_dir"], "masks.npz"), **masks)


if __name__ == "__main__":
    main()
