"""Datasets on object storage: copy once into a local cache, then train from local files."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from instseg_core.inference.download import cache_root


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def localize_dataset(dataset_dir: str) -> str:
    """``dataset_dir`` itself when local; for ``s3://...`` (any fsspec URL) a local copy.

    The copy lives in ``$INSTSEG_HOME/datasets/<hash of the URL>`` and is reused when a
    ``.complete`` marker exists (written last, so an interrupted copy is redone).
    """
    if not is_remote(dataset_dir):
        return dataset_dir
    import fsspec

    key = hashlib.sha1(dataset_dir.rstrip("/").encode()).hexdigest()[:16]
    local = Path(cache_root()) / "datasets" / key
    marker = local / ".complete"
    if marker.exists():
        return str(local)
    kwargs = {}
    if dataset_dir.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        kwargs["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    fs, _, (root,) = fsspec.get_fs_token_paths(dataset_dir, storage_options=kwargs)
    local.mkdir(parents=True, exist_ok=True)
    fs.get(root.rstrip("/") + "/", str(local), recursive=True)
    marker.write_text(dataset_dir + "\n")
    return str(local)
