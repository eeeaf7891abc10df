"""Where actors get the model: a local dir, a dir on S3 (copied once per node), or an official name.

The model is loaded from a path in each actor, never shipped through the object store (an
evicted constructor argument makes actor restarts fail: ray-project/ray#53727).
"""

from __future__ import annotations

from pathlib import Path

from instseg_core.inference.model_dir import CONFIG_FILE, GRAPH_FILES, PARAMS_FILE, ModelDir, resolve_model_dir
from instseg_core.io import S3Options, cached_fetch, fsspec_fs, is_remote, redact


def local_model_dir(model_dir: str, s3: S3Options | None = None) -> str:
    """A local path for ``model_dir``; remote dirs are copied into ``$INSTSEG_HOME/remote_models``
    once per node (:func:`instseg_core.io.cached_fetch`: file lock + atomic rename, so concurrent
    actors copy once)."""
    if not is_remote(model_dir):
        return model_dir
    base = model_dir.rstrip("/")

    def fetch(staging: Path) -> None:
        fs = fsspec_fs(model_dir, s3)
        staging.mkdir()
        try:
            for n in (*GRAPH_FILES, PARAMS_FILE, CONFIG_FILE):
                if fs.exists(f"{base}/{n}"):
                    fs.get(f"{base}/{n}", str(staging / n))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"cannot copy model dir {redact(model_dir)}: {e}") from None

    # a copy without inference.yml is not a model dir: copy again rather than serve it
    return str(cached_fetch(model_dir, "remote_models", fetch, ready=lambda d: (d / CONFIG_FILE).is_file()))


def validate_model_source(model_name: str | None, model_dir: str | None,
                          s3: S3Options | None = None) -> ModelDir:
    """Check the model on the driver before any Ray work starts; returns its (local) dir: labels,
    model name, ``draw_threshold``."""
    local = local_model_dir(model_dir, s3) if model_dir else None
    return resolve_model_dir(model_name, local)
