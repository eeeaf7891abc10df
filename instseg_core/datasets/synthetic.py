"""A synthetic instance-segmentation dataset: coloured shapes on textured backgrounds.

Written in PaddleX's COCO layout (``images/``, ``annotations/instance_{train,val}.json``), so every
tool (check, train, evaluate, the Ray jobs) runs on it. Shapes of several classes overlap; a shape
drawn later hides part of an earlier one and the earlier one's annotation is its *visible* part
(polygons of the visible mask, several polygons when it is cut in two). Instances left with fewer
than ``min_visible`` pixels are dropped. Everything is a function of ``seed``.

    python -m instseg_core.datasets.synthetic OUT_DIR --train 400 --val 80 --size 160
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np

from instseg_core.masks import mask_to_polygons

CLASSES = ("circle", "square", "triangle", "star")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour gradient + noise + random lines: texture the model must ignore."""
    base = rng.uniform(40, 215, size=3)
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    grad = (gx[..., None] * rng.uniform(-60, 60, 3) + gy[..., None] * rng.uniform(-60, 60, 3))
    img = base + grad + rng.normal(0, 12, size=(size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(img, p1, p2, color, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _shape_mask(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    """A filled shape of class ``cls`` at a random place, scale and rotation."""
    mask = np.zeros((size, size), np.uint8)
    r = float(rng.uniform(0.12, 0.28) * size)
    cx, cy = (float(v) for v in rng.uniform(r * 0.6, size - r * 0.6, 2))
    angle = float(rng.uniform(0, 2 * math.pi))
    if cls == "circle":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(r)), 1, -1, cv2.LINE_8)
        return mask
    if cls == "square":
        corners = [angle + k * math.pi / 2 + math.pi / 4 for k in range(4)]
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    elif cls == "triangle":
        pts = [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
               for k in range(3)]
    elif cls == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = angle + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    else:
        raise ValueError(f"unknown shape class {cls!r}")
    cv2.fillPoly(mask, [np.round(np.array(pts)).astype(np.int32)], 1)
    return mask


def make_image(rng: np.random.Generator, size: int, max_objects: int, min_visible: int = 40
               ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One BGR image and its ``(class index, visible mask)`` instances."""
    img = _background(rng, size)
    placed: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        mask = _shape_mask(rng, CLASSES[cls], size)
        color = rng.integers(0, 256, 3).astype(np.float32)
        shade = color + rng.normal(0, 10, size=(size, size, 3))  # slightly textured fill
        m = mask.astype(bool)
        img[m] = np.clip(shade[m], 0, 255).astype(np.uint8)
        placed = [(c, prev & ~mask) for c, prev in placed]  # the new shape hides what it covers
        placed.append((cls, mask))
    return img, [(c, m) for c, m in placed if int(m.sum()) >= min_visible]


def _annotations(instances, image_id: int, first_ann_id: int) -> list[dict]:
    anns = []
    for c, m in instances:
        polygons = [p for p in mask_to_polygons(m) if len(p) >= 6]
        if not polygons:
            continue
        ys, xs = np.nonzero(m)
        x1, y1 = int(xs.min()), int(ys.min())
        anns.append({"id": first_ann_id + len(anns), "image_id": image_id, "category_id": c + 1,
                     "segmentation": polygons, "area": float(m.sum()), "iscrowd": 0,
                     "bbox": [x1, y1, int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1]})
    return anns


def make_dataset(out_dir: str | Path, *, num_train: int = 400, num_val: int = 80, size: int = 160,
                 max_objects: int = 3, seed: int = 0) -> Path:
    """Write the dataset into ``out_dir`` (PaddleX layout); returns ``out_dir``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    image_id, ann_id = 1, 1
    for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
        rng = np.random.default_rng(split_seed)
        images, anns = [], []
        for _ in range(count):
            img, instances = make_image(rng, size, max_objects)
            name = f"{split}_{image_id:06d}.jpg"
            cv2.imwrite(str(out / "images" / name), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            images.append({"id": image_id, "file_name": name, "height": size, "width": size})
            new = _annotations(instances, image_id, ann_id)
            anns.extend(new)
            ann_id += len(new)
            image_id += 1
        coco = {"info": {"description": f"instseg synthetic shapes ({split}, seed {seed})"},
                "images": images, "annotations": anns, "categories": categories}
        (out / "annotations" / f"instance_{split}.json").write_text(json.dumps(coco), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate the synthetic shapes dataset (PaddleX COCO layout).")
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=80)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_dataset(a.out_dir, num_train=a.train, num_val=a.val, size=a.size, max_objects=a.max_objects, seed=a.seed)
    print(a.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
