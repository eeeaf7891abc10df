"""Folder and prefix listings at scale (pipelines.shards.list_folder): pages of ``shard_size`` files
written while a folder is listed, every file in exactly one page, a relisting that pages only the
files added since, and a listing whose memory does not grow with the folder."""
from __future__ import annotations

import os
import shutil
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.shards import _folder_key, list_folder, load_or_make_plan, probe_input, shard_uris


def _touch(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.close(os.open(folder / name, os.O_CREAT | os.O_WRONLY, 0o644))
    return [str(folder / name) for name in names]


def _page_rows(plan, folder: str) -> list[int]:
    return [sh.stop for sh in plan.shards if Path(sh.source).name.startswith(_folder_key(folder) + "-")]


def test_local_folder_pages_of_shard_size_and_a_relisting_pages_only_new_files(ray_local, tmp_path):
    src = tmp_path / "in"
    flat = _touch(src, [f"{i:05d}.jpg" for i in range(2500)])
    nested = _touch(src / "sub", ["a.jpg", "b.JPG"])
    _touch(src, ["notes.txt"])
    out = str(tmp_path / "out")
    plan = load_or_make_plan(str(src), out, shard_size=1000, extensions=(".jpg",))
    assert _page_rows(plan, str(src)) == [1000, 1000, 500] and _page_rows(plan, str(src / "sub")) == [2]
    pages = [shard_uris(sh) for sh in plan.shards]
    assert all(p == sorted(p) for p in pages)  # each page sorted (across pages: directory order)
    listed = [u for p in pages for u in p]
    assert len(listed) == plan.listed == 2502 and set(listed) == set(flat + nested)

    added = _touch(src, [f"new{i:03d}.jpg" for i in range(30)]) + _touch(src / "sub", ["c.jpg"])
    again = load_or_make_plan(str(src), out, shard_size=1000, extensions=(".jpg",))
    assert again.shards[:len(plan.shards)] == plan.shards and again.generation == 1 and again.new == 31
    assert sorted(u for sh in again.shards[len(plan.shards):] for u in shard_uris(sh)) == sorted(added)


def test_s3_prefix_pages_in_key_order_and_a_relisting_pages_only_new_keys(ray_local, s3_server, s3_bucket,
                                                                         tmp_path, monkeypatch):
    """2,500 keys in one flat prefix (three ListObjectsV2 pages) plus a sub-prefix; the driver never
    lists the prefix through s3fs (its isdir/ls gather every key in memory)."""
    import boto3
    import s3fs

    client = boto3.client("s3")
    keys = [f"flat/{i:05d}.jpg" for i in range(2500)] + ["flat/sub/x.jpg", "flat/notes.txt", "flat/"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b""), keys))

    def no_full_listing(*args, **kwargs):
        raise AssertionError("the driver listed a prefix through s3fs")

    monkeypatch.setattr(s3fs.S3FileSystem, "_lsdir", no_full_listing)
    source, out = f"s3://{s3_bucket}/flat/", str(tmp_path / "out")
    probe_input(source, (".jpg",))
    plan = load_or_make_plan(source, out, shard_size=1000, extensions=(".jpg",))
    root, sub = f"s3://{s3_bucket}/flat", f"s3://{s3_bucket}/flat/sub"
    assert _page_rows(plan, root) == [1000, 1000, 500] and _page_rows(plan, sub) == [1]
    listed = [u for sh in plan.shards for u in shard_uris(sh)]
    assert listed == [f"s3://{s3_bucket}/{k}" for k in sorted(keys[:2501])]  # S3 key order: globally sorted

    new = ["flat/new1.jpg", "flat/zz.jpg", "flat/sub/y.jpg"]
    for k in new:
        client.put_object(Bucket=s3_bucket, Key=k, Body=b"")
    again = load_or_make_plan(source, out, shard_size=1000, extensions=(".jpg",))
    assert again.new == 3 and again.shards[:len(plan.shards)] == plan.shards
    assert sorted(u for sh in again.shards[len(plan.shards):] for u in shard_uris(sh)) == \
        sorted(f"s3://{s3_bucket}/{k}" for k in new)


def test_listing_memory_is_one_page_not_the_folder(tmp_path):
    """200k files in one folder, listed in-process under tracemalloc: the listing's peak is a page
    of names (the whole folder's entries took 141 MB before), a relisting's is 8 bytes per old
    URI plus a page (a set of the old URIs took as much again)."""
    src, out = tmp_path / "flat", str(tmp_path / "out")
    names = [f"{i:08d}-{'x' * 40}.jpg" for i in range(200_000)]
    try:
        paths = _touch(src, names)
        all_names = sum(sys.getsizeof(p) + 8 for p in paths)  # what holding every path in a list takes: ~30 MB
        del paths
        _touch(tmp_path / "warm", ["a.jpg"])
        list_folder(str(tmp_path / "warm"), out, 1000, (".jpg",), None)  # imports are not the listing's

        tracemalloc.start()
        _, pages = list_folder(str(src), out, 1000, (".jpg",), None)
        listing_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(pages) == 200 and {n for _, n in pages} == {1000}
        assert listing_peak < all_names / 10, (listing_peak, all_names)

        added = _touch(src, [f"new{i:03d}.jpg" for i in range(100)])
        tracemalloc.start()
        _, new_pages = list_folder(str(src), out, 1000, (".jpg",), None, pages, 1)
        relisting_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert [n for _, n in new_pages] == [100]
        assert pq.read_table(new_pages[0][0]).column("uri").to_pylist() == sorted(added)
        assert relisting_peak < 8 * len(names) + all_names / 10, (relisting_peak, all_names)
    finally:
        shutil.rmtree(src, ignore_errors=True)
