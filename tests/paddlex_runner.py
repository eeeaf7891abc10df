"""Runs PaddleX 3.7.2 on a model dir; executed by the PaddleX venv's interpreter, never imported.

Usage: python paddlex_runner.py REQUEST.json   (one request or a list, run in one process)
REQUEST: {"model_name", "model_dir", "inputs": [...], "threshold", "batch_size", "out_dir",
          "cpu_threads", "run_mode", "bench_rounds": 0}
"run_mode": null leaves it to PaddleX (its CPU default: "mkldnn" unless the model is on its oneDNN
blocklist); the mode and threads PaddleX actually ran with go to OUT_DIR/info.json
{"run_mode", "cpu_threads", "batch_of_one": whether PaddleX runs the graph image by image}.
Writes OUT_DIR/results.json (boxes per image, exactly as PaddleX's result dict holds them) and
OUT_DIR/masks.npz (img{i}_mask{j} = PaddleX's cropped masks). With bench_rounds > 0 it only times
prediction and writes OUT_DIR/bench.json {"images_per_s", "seconds", "images"}.
"""

import json
import sys
import time

import numpy as np
from paddlex import create_model


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def main() -> None:
    reqs = json.load(open(sys.argv[1]))
    for req in reqs if isinstance(reqs, list) else [reqs]:
        run(req)


def run(req: dict) -> None:
    # engine_config, not pp_option: PaddleX 3.7.2 silently ignores a PaddlePredictorOption's settings
    # (it reads the option's __dict__, which holds only `_cfg`) and runs with 10 threads and its
    # default run mode
    engine_config = {"cpu_threads": int(req.get("cpu_threads", 2))}
    if req.get("run_mode", "paddle") is not None:
        engine_config["run_mode"] = req.get("run_mode", "paddle")
    model = create_model(req["model_name"], model_dir=req["model_dir"], device="cpu", engine_config=engine_config,
                         threshold=req.get("threshold"))
    predictor = getattr(model, "_predictor", None)
    cfg = getattr(getattr(predictor, "runner", None), "_config", {})
    one = getattr(predictor, "model_names_only_supports_batchsize_of_one", ())  # run image by image
    json.dump({"run_mode": cfg.get("run_mode"), "cpu_threads": cfg.get("cpu_threads"),
               "batch_of_one": req["model_name"] in one}, open(f"{req['out_dir']}/info.json", "w"))
    inputs = req["inputs"]
    rounds = int(req.get("bench_rounds", 0))
    if rounds:
        list(model.predict(inputs, batch_size=req.get("batch_size", 1)))  # warm-up
        t0 = time.perf_counter()
        for _ in range(rounds):
            for _res in model.predict(inputs, batch_size=req.get("batch_size", 1)):
                pass
        dt = time.perf_counter() - t0
        json.dump({"images_per_s": rounds * len(inputs) / dt, "seconds": dt, "images": rounds * len(inputs)},
                  open(f"{req['out_dir']}/bench.json", "w"))
        return
    results, masks = [], {}
    for i, res in enumerate(model.predict(inputs, batch_size=req.get("batch_size", 1))):
        boxes = [{k: ([_plain(c) for c in v] if k == "coordinate" else _plain(v)) for k, v in b.items()}
                 for b in res["boxes"]]
        # record which coordinate values PaddleX keeps as Python ints (clipped ones)
        for b in boxes:
            if "coordinate" in b:
                b["coordinate_is_int"] = [isinstance(c, int) for c in b["coordinate"]]
        results.append({"input_path": res["input_path"], "boxes": boxes, "num_masks": len(res["masks"])})
        for j, m in enumerate(res["masks"]):
            masks[f"img{i}_mask{j}"] = np.asarray(m)
    json.dump(results, open(f"{req['out_dir']}/results.json", "w"))
    np.savez_compressed(f"{req['out_dir']}/masks.npz", **masks)


if __name__ == "__main__":
    main()
