"""Datasets on object storage: copy once into a local cache, then train from local files."""
from __future__ import annotations

from pathlib import Path

from instseg_core.io import cached_fetch, fsspec_fs, is_remote

MARKER = ".complete"


def localize_dataset(dataset_dir: str) -> str:
    """``dataset_dir`` itself when local; for ``s3://...`` (any fsspec URL) a local copy.

    The copy lives in ``$INSTSEG_HOME/datasets/<hash of the URL>`` (:func:`instseg_core.io.cached_fetch`:
    copied once per host, renamed into place when complete) and holds a ``.complete`` marker, so a
    partial copy left by an older version (which copied in place) is never taken for a dataset.
    """
    if not is_remote(dataset_dir):
        return dataset_dir

    def fetch(staging: Path) -> None:
        staging.mkdir()
        fsspec_fs(dataset_dir).get(dataset_dir.rstrip("/") + "/", str(staging), recursive=True)
        (staging / MARKER).write_text(dataset_dir + "\n")

    return str(cached_fetch(dataset_dir, "datasets", fetch, ready=lambda d: (d / MARKER).exists()))
