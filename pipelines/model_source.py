"""Where actors get the model: a local dir, a dir on S3 (copied once per node), or an official name.

The model is loaded from a path in each actor, never shipped through the object store (an
evicted constructor argument makes actor restarts fail: ray-project/ray#53727).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from instseg_core.inference.download import cache_root
from instseg_core.inference.model_dir import CONFIG_FILE, GRAPH_FILES, PARAMS_FILE, ModelDir, resolve_model_dir
from pipelines.storage import S3Options, fsspec_fs, is_remote, redact


def local_model_dir(model_dir: str, s3: S3Options | None = None) -> str:
    """A local path for ``model_dir``; remote dirs are copied into ``$INSTSEG_HOME/remote_models``
    once per node (file lock + atomic rename, so concurrent actors copy once)."""
    if not is_remote(model_dir):
        return model_dir
    root = cache_root() / "remote_models"
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(model_dir.rstrip("/").encode()).hexdigest()[:16]
    target = root / key
    if (target / CONFIG_FILE).is_file():
        return str(target)
    import fcntl

    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / CONFIG_FILE).is_file():
            return str(target)
        fs = fsspec_fs(model_dir, s3)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        try:
            base = model_dir.rstrip("/")
            names = [n for n in (*GRAPH_FILES, PARAMS_FILE, CONFIG_FILE) if fs.exists(f"{base}/{n}")]
            for n in names:
                fs.get(f"{base}/{n}", str(tmp / n))
            os.replace(tmp, target)  # inference.yml present only once every file is
        except FileNotFoundError as e:
            raise FileNotFoundError(f"cannot copy model dir {redact(model_dir)}: {e}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def validate_model_source(model_name: str | None, model_dir: str | None,
                          s3: S3Options | None = None) -> ModelDir:
    """Check the model on the driver before any Ray work starts; returns its (local) dir: labels,
    model name, ``draw_threshold``."""
    local = local_model_dir(model_dir, s3) if model_dir else None
    return resolve_model_dir(model_name, local)
