"""Command line: ``instseg predict ...`` and ``instseg models``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Iterator, Sequence

from instseg_core.models import MODEL_SPECS


class _OutputNames:
    """Output stems that never collide in one run: an image found in an input directory keeps its
    path below it (``a/img`` and ``b/img`` -> ``<save>/a/img_res.json``, ``<save>/b/img_res.json``);
    a name seen before gets ``_2``, ``_3``..."""

    def __init__(self, inputs: Any):
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        self.dirs = [os.path.abspath(str(i)) for i in items if isinstance(i, (str, os.PathLike)) and os.path.isdir(i)]
        self.seen: dict[str, int] = {}
        self.given: dict[str, str] = {}  # input path -> its stem (the pages of one TIFF share it)

    def stem_for(self, input_path: str | None) -> str | None:
        if not input_path or "://" in input_path:
            return None  # URLs and arrays: the result's own naming
        path = os.path.abspath(input_path)
        if path not in self.given:
            stem = os.path.splitext(os.path.basename(path))[0]
            for d in self.dirs:
                if path.startswith(d + os.sep):
                    stem = os.path.splitext(os.path.relpath(path, d))[0]
                    break
            n = self.seen[stem] = self.seen.get(stem, 0) + 1
            self.given[path] = stem if n == 1 else f"{stem}_{n}"
        return self.given[path]


def int_or_none(flag: str, text: str) -> int | None:
    """``text`` as an integer, or None for ``none`` (any case); ValueError naming ``flag`` otherwise."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} takes an integer or 'none', got {text!r}") from None


def _hpi_kwargs(args: argparse.Namespace) -> dict:
    """``use_hpip`` / ``hpi_config`` from ``--hpi``, ``--hpi-backend`` and ``--hpi-config`` (either of
    the last two implies the first)."""
    from instseg_core.inference.hpi import hpi_from_flags

    if not (args.hpi or args.hpi_backend or args.hpi_config):
        return {}
    return {"use_hpip": True, "hpi_config": hpi_from_flags(args.hpi_backend, args.hpi_config)}


def _predict(args: argparse.Namespace) -> int:
    from instseg_core.inference.predictor import DEFAULT_MAX_MASK_SIDE, create_model
    from instseg_core.inputs import InputError
    from instseg_core.inference.model_dir import ModelDirError

    try:
        side = args.max_mask_side
        if side is not None:
            side = int_or_none("--max-mask-side", side)
        model = create_model(args.model, model_dir=args.model_dir, device=args.device, threshold=args.threshold,
                             batch_size=args.batch_size, cpu_threads=args.cpu_threads,
                             enable_onednn=args.onednn, use_tensorrt=args.tensorrt, mask_format=args.mask_format,
                             max_mask_side=side if args.max_mask_side is not None else DEFAULT_MAX_MASK_SIDE,
                             **_hpi_kwargs(args))
        n = skipped = 0
        names = _OutputNames(args.input)
        save_file = _save_file_kind(args.save_path)
        progress = _progress_for(args)
        for res in _results(model, args):
            if isinstance(res, InputError):  # --skip-errors: report and go on
                print(f"instseg: skipped: {res}", file=sys.stderr)
                skipped += 1
                if progress:
                    progress.step(errors=1)
                continue
            if progress:
                progress.step()
            if not args.quiet:
                res.print(format_json=False)
            if save_file and n == 1:
                raise ValueError(f"--save-path {args.save_path} is a file and holds one image's result; give a "
                                 f"directory to save several")
            if save_file == "json":
                res.save_to_json(args.save_path)
            elif save_file == "image":
                res.save_to_img(args.save_path)
            elif args.save_path:
                res.output_stem = names.stem_for(res["input_path"])
                res.save_all(args.save_path)
            n += 1
    except (InputError, ModelDirError, ValueError) as e:
        print(f"instseg: error: {e}", file=sys.stderr)
        return 2
    if progress:
        progress.prefix = "predicted"
        logging.getLogger("instseg").info("%s", progress.line())
    else:
        logging.getLogger("instseg").info("predicted %d image(s)%s", n, f", skipped {skipped}" if skipped else "")
    return 1 if skipped else 0


def _progress_for(args: argparse.Namespace) -> Any:
    """A :class:`~instseg_core.progress.ProgressLog` when the input is a directory, prefix or list
    (the total counted from one listing), else None: one image needs no progress line."""
    from instseg_core.inputs import InputError, iter_input_items
    from instseg_core.progress import ProgressLog

    if args.progress_interval_s < 0:
        return None
    single = isinstance(args.input, str) and not os.path.isdir(args.input) and "://" not in args.input
    if single:
        return None
    try:
        total = sum(1 for _ in iter_input_items(args.input))  # a listing, no image read
    except InputError:
        return None  # the prediction itself reports it, in input order
    return ProgressLog(total, args.progress_interval_s) if total > 1 else None


def _save_file_kind(save_path: str | None) -> str | None:
    """``"json"`` / ``"image"`` when ``--save-path`` names a file of that kind, else None (a directory)."""
    if not save_path or os.path.isdir(save_path):
        return None
    suffix = os.path.splitext(save_path)[1].lower()
    if suffix == ".json":
        return "json"
    return "image" if suffix in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff") else None


def _results(model: Any, args: argparse.Namespace) -> Iterator[Any]:
    """The results, in order; with ``--skip-errors`` a bad input yields its InputError instead of
    ending the run (each input item is then predicted on its own)."""
    if not args.skip_errors:
        yield from model.predict(args.input, batch_size=args.batch_size, threshold=args.threshold)
        return
    from instseg_core.inputs import InputError, iter_input_items

    for item in iter_input_items(args.input):
        try:
            yield from model.predict(item, batch_size=1, threshold=args.threshold)
        except InputError as e:
            yield e


def _models(_: argparse.Namespace) -> int:
    for spec in MODEL_SPECS.values():
        flag = "  (batch 1 in PaddleX)" if spec.batch1_only else ""
        print(f"{spec.name:42s} {spec.family:13s} mask AP {spec.mask_ap:4.1f}{flag}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from instseg_core.config import ConfigError, apply_overrides, load_config
    from instseg_core.modes import run_config

    try:
        cfg = apply_overrides(load_config(args.config), args.override or [])
        return run_config(cfg)
    except ConfigError as e:
        print(f"instseg: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from instseg_core.inference.hpi import BACKENDS

    p = argparse.ArgumentParser(prog="instseg", description="Instance segmentation (PaddleX-compatible models)")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("predict", help="predict images, print results, optionally save JSON and overlays")
    pr.add_argument("--model", help="official model name (optional with --model-dir)")
    pr.add_argument("--model-dir", help="PaddleX-format inference dir (default: download the official model)")
    pr.add_argument("--input", required=True, nargs="+", help="image files, dirs, http(s) or s3:// URLs")
    pr.add_argument("--threshold", type=float, default=None, help="score threshold (default: inference.yml)")
    pr.add_argument("--batch-size", type=int, default=1)
    pr.add_argument("--device", default=None, help="cpu | gpu | gpu:N (default: GPU 0 if available)")
    pr.add_argument("--cpu-threads", type=int, default=None)
    pr.add_argument("--onednn", action=argparse.BooleanOptionalAction, default=None, help="force oneDNN on/off")
    pr.add_argument("--tensorrt", action="store_true", help="GPU: Paddle-TensorRT FP16 with an engine cache")
    pr.add_argument("--hpi", action="store_true", help="high-performance mode: the fastest backend for the model "
                                                       "(OpenVINO / ONNX Runtime on CPU), else Paddle Inference")
    pr.add_argument("--hpi-backend", choices=BACKENDS,
                    help="high-performance mode with this backend (implies --hpi)")
    pr.add_argument("--hpi-config", help="PaddleX's hpi_config as a dict literal, e.g. \"{'backend': 'openvino'}\"")
    pr.add_argument("--save-path", default=None,
                    help="dir for <stem>_res.json and overlay images; a .json or image file path saves that one "
                         "file of a single image")
    pr.add_argument("--mask-format", choices=("paddlex", "rle"), default="paddlex")
    pr.add_argument("--max-mask-side", default=None,
                    help="longest side at which the graph draws masks; larger photos are presented scaled down and "
                         "their kept masks upsampled (default 1333; 'none': full size, as PaddleX)")
    pr.add_argument("--quiet", action="store_true", help="do not print each result")
    pr.add_argument("--progress-interval-s", type=float, default=10.0,
                    help="over several images: a progress line (done/total, images/s, ETA) at most every this "
                         "many seconds (default 10; 0: after every image; -1: none)")
    pr.add_argument("--skip-errors", action="store_true",
                    help="report an unreadable input and go on (exit code 1 at the end) instead of stopping")
    pr.set_defaults(func=_predict)

    rn = sub.add_parser("run", help="run a module config (PaddleX layout): check_dataset, predict, ...")
    rn.add_argument("-c", "--config", required=True, help="module YAML, or a model name for its packaged config")
    rn.add_argument("-o", "--override", action="append", metavar="Key.sub=value",
                    help="override a config value (repeatable), e.g. -o Global.mode=check_dataset")
    rn.set_defaults(func=_run)

    ls = sub.add_parser("models", help="list the 15 model names")
    ls.set_defaults(func=_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``instseg`` command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "input", None) is not None and len(args.input) == 1:
        args.input = args.input[0]
    if args.command == "predict" and not (args.model or args.model_dir):
        print("instseg: error: give --model NAME or --model-dir DIR", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
