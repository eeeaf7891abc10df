"""Inputs as shards (pipelines.shards) and what the batch job does with them at scale: every URI in
exactly one shard, repeats dropped and counted, secrets never written, transient read failures
retried (within a run, and error rows of transient kinds on a rerun), new images of a folder
picked up by a rerun without redoing the old ones."""
from __future__ import annotations

import base64
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from instseg_core.io import redact
from pipelines.rows import image_id_for
from pipelines.shards import _parquet_shards, _text_shards, shard_uris, unique_uris


def _lines(n: int) -> list[str]:
    rng = random.Random(0)
    return [f"/data/{'x' * rng.randint(1, 120)}/{i:05d}.jpg" for i in range(n)]


@pytest.mark.parametrize("kind", ["txt", "csv", "crlf"])
def test_text_manifest_shards_hold_every_line_once(tmp_path, kind):
    uris = _lines(3000)
    path = tmp_path / ("m.csv" if kind == "csv" else "m.txt")
    nl = "\r\n" if kind == "crlf" else "\n"
    body = ["# comment"] + uris if kind != "csv" else ["id,uri"] + [f"{i},{u}" for i, u in enumerate(uris)]
    path.write_text(nl.join(body) + nl, newline="")
    shards = _text_shards(str(path), 100, None)
    assert len(shards) > 10 and shards[0].start == 0 and shards[-1].stop == path.stat().st_size
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))  # contiguous byte ranges
    got = [u for sh in shards for u in shard_uris(sh)]
    assert got == uris  # each line exactly once, in order, across range boundaries


def test_parquet_manifest_shards_are_row_ranges(tmp_path):
    uris = _lines(2500)
    pq.write_table(pa.table({"n": list(range(len(uris))), "path": uris}), tmp_path / "m.parquet", row_group_size=700)
    shards = _parquet_shards(str(tmp_path / "m.parquet"), 1000, None)
    assert [(s.start, s.stop) for s in shards] == [(0, 1000), (1000, 2000), (2000, 2500)]
    assert [u for sh in shards for u in shard_uris(sh)] == uris


def test_repeats_are_dropped_and_ids_survive_re_signing():
    signed = "https://host/b/k.jpg?X-Amz-Signature=abc&X-Amz-Credential=AK&X-Amz-Date=1"
    resigned = "https://host/b/k.jpg?X-Amz-Signature=def&X-Amz-Credential=AK&X-Amz-Date=2"
    kept, ids, repeats = unique_uris(["/a.jpg", signed, "/a.jpg", resigned, "/b.jpg"])
    assert kept == ["/a.jpg", signed, "/b.jpg"] and repeats == 2
    assert ids[1] == image_id_for("https://host/b/k.jpg")
    assert redact("http://user:pw@h/x.jpg?id=7&token=t&sig=s") == "http://h/x.jpg?id=7"


def test_repeats_across_shards_are_found_by_tasks_first_occurrence_kept(ray_local, tmp_path):
    """A URI repeated anywhere in a manifest (other shards, its own shard, re-signed) is labelled
    once: at its first occurrence; each later one is counted as a repeat of its own shard."""
    from pipelines.shards import expand_shard, load_or_make_plan

    uris = [f"/img/{i % 400:04d}.jpg" for i in range(1000)]  # ~600 repeats, most in other shards
    uris[5] = uris[900] = "https://h/k.jpg?X-Amz-Signature=a"
    uris[950] = "https://h/k.jpg?X-Amz-Signature=b"  # the same object, signed again
    pq.write_table(pa.table({"uri": uris}), tmp_path / "m.parquet")
    plan = load_or_make_plan(str(tmp_path / "m.parquet"), str(tmp_path / "out"), shard_size=7,
                             extensions=(".jpg",))
    assert len(plan.shards) == 143
    kept, repeats = [], []
    for shard in plan.shards:
        got, ids, n = expand_shard(shard)
        kept += got
        repeats.append(n)
    first = {}
    for k, u in enumerate(uris):
        first.setdefault(image_id_for(redact(u)), (k, u))
    assert kept == [u for _, u in sorted(first.values())]  # first occurrences, in manifest order
    assert plan.repeats == sum(repeats) == len(uris) - len(first) == 599
    assert plan.listed == len(first)  # what a fresh run's progress line counts down from (its ETA)
    assert repeats[0] == 0 and repeats[-1] == 6


def test_appended_manifest_adds_shards_and_a_changed_one_is_refused(ray_local, tmp_path):
    """A rerun over a manifest that gained lines labels only the appended images (a repeat of an
    old URI among them is dropped); a manifest edited otherwise is refused in one line before any
    work, since the plan's shard ids would then name other images."""
    from pipelines.batch_predict import BatchPredictConfig, JobSettingsError, run_batch_predict
    from pipelines.sinks import list_parts

    photos = sorted(str(p) for p in (REPO / "samples" / "shapes").glob("*.jpg"))
    padding = [f"# {'.' * 200}"] * 30  # comments: a manifest past one 4 KiB byte range
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join(padding + photos[:3] + padding + [photos[0]]))  # no final newline
    out = tmp_path / "out"
    cfg = dict(input=str(manifest), output=str(out), model_dir=str(REPO / "samples" / "model"), num_actors=1,
               shard_size=1)  # byte ranges of 4 KiB (the smallest)
    first = run_batch_predict(BatchPredictConfig(**cfg))
    assert first["images_written"] == 3 and first["duplicate_uris_in_input"] == 1 and first["shards"] >= 2
    with manifest.open("a") as f:
        f.write("\n" + "\n".join(photos[3:5] + [photos[1]]) + "\n")
    second = run_batch_predict(BatchPredictConfig(**cfg))
    assert second["images_this_run"] == 2 and second["images_written"] == 5
    assert second["duplicate_uris_in_input"] == 2 and second["shards"] > first["shards"]
    rows = [r for p in list_parts(str(out)) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["uri"] for r in rows) == photos[:5]
    manifest.write_text(manifest.read_text().replace(photos[2], photos[5]))
    with pytest.raises(JobSettingsError, match="changed since this output's plan was made"):
        run_batch_predict(BatchPredictConfig(**cfg))


# ---------------------------------------------------------------- the job against a real HTTP server

USER, PASSWORD, SIGNATURE = "labeller", "hunter2pw", "SECRETSIG123"


class _Images(BaseHTTPRequestHandler):
    """Serves the sample photos: /private/* needs Basic auth, /signed/* a signature parameter,
    /flaky/* fails twice per path with 503, /down/* fails while ``down`` is set."""

    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}
    down = True

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path, _, query = self.path.partition("?")
        self.hits[path] = self.hits.get(path, 0) + 1
        if path.startswith("/private/"):
            want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != want:
                return self.send_error(401)
        if path.startswith("/signed/") and f"X-Amz-Signature={SIGNATURE}" not in query:
            return self.send_error(403)
        if path.startswith("/flaky/") and self.hits[path] <= 2:
            return self.send_error(503)
        if path.startswith("/down/") and _Images.down:
            return self.send_error(503)
        body = self.files.get(path.rsplit("/", 1)[-1])
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def image_server():
    photos = sorted((REPO / "samples" / "shapes").glob("*.jpg"))
    _Images.files = {p.name: p.read_bytes() for p in photos}
    _Images.hits, _Images.down = {}, True
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", [p.name for p in photos]
    server.shutdown()


def test_job_drops_repeats_redacts_secrets_and_retries(ray_local, image_server, tmp_path):
    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict
    from pipelines.sinks import list_parts

    base, names = image_server
    host = base.removeprefix("http://")
    uris = [f"http://{USER}:{PASSWORD}@{host}/private/{names[0]}",
            f"{base}/signed/{names[1]}?X-Amz-Signature={SIGNATURE}&X-Amz-Credential=AKIA%2Fx&size=full",
            f"{base}/flaky/{names[2]}",
            f"{base}/down/{names[3]}",
            str(REPO / "samples" / "shapes" / names[4])]
    manifest = tmp_path / "images.txt"
    manifest.write_text("\n".join(uris + [uris[0], uris[4], uris[1]]) + "\n")  # three repeats
    out = tmp_path / "out"
    # report=False: the report re-reads sample images for its overlays, which would add GETs to the counts below
    cfg = dict(input=str(manifest), output=str(out), model_dir=str(REPO / "samples" / "model"), batch_size=2,
               rows_per_file=2, shard_size=2, num_actors=1, report=False)
    first = run_batch_predict(BatchPredictConfig(**cfg))
    assert first["images_total"] == first["images_written"] == 5 and first["duplicate_uris_in_input"] == 3
    assert first["by_status"] == {"ok": 4, "error": 1} and first["errors_by_kind"] == {"read_error": 1}
    assert _Images.hits[f"/flaky/{names[2]}"] == 3  # two 503s retried within the run
    assert _Images.hits[f"/down/{names[3]}"] == 4  # READ_ATTEMPTS, then a read_error row

    _Images.down = False  # the outage is over: a rerun retries the transient error row only
    second = run_batch_predict(BatchPredictConfig(**cfg))
    assert second["images_this_run"] == 1 and second["by_status"] == {"ok": 5}
    assert second["images_written"] == 5 and second["incomplete_shards"] == 0
    rows = [r for p in list_parts(str(out)) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == len({r["image_id"] for r in rows}) == 5  # each image in exactly one row

    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in written) and (out / "coco_dataset.json").exists()
    for p in written:
        data = p.read_bytes()
        if p.suffix == ".parquet":
            data = json.dumps(pq.read_table(p).to_pylist(), default=str).encode()
        for secret in (PASSWORD, SIGNATURE, "AKIA"):
            assert secret.encode() not in data, (p, secret)
    kept = {r["uri"] for r in rows}
    assert f"{base}/signed/{names[1]}?size=full" in kept and f"{base}/private/{names[0]}" in kept


def test_rerun_over_a_grown_folder_labels_only_the_new_images(ray_local, tmp_path):
    """The nightly run: the same --output over a folder that gained images lists again, appends
    shards for the new images only, and leaves the old shards (and their rows) alone."""
    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict
    from pipelines.sinks import list_parts

    src = tmp_path / "in"
    src.mkdir()
    photos = sorted((REPO / "samples" / "shapes").glob("*.jpg"))
    for p in photos[:4]:
        (src / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    cfg = dict(input=str(src), output=str(out), model_dir=str(REPO / "samples" / "model"), shard_size=3,
               num_actors=1, shards_per_pass=1)  # one Ray Dataset per shard: passes hand over cleanly
    first = run_batch_predict(BatchPredictConfig(**cfg))
    assert first["images_written"] == 4 and first["shards"] == 2
    before = {p.name for p in (out / "parts").iterdir()}
    (src / "night2").mkdir()
    for p in photos[4:6]:
        (src / "night2" / p.name).write_bytes(p.read_bytes())
    second = run_batch_predict(BatchPredictConfig(**cfg))
    assert second["images_this_run"] == 2 and second["images_written"] == 6 and second["shards"] == 3
    assert before <= {p.name for p in (out / "parts").iterdir()}  # old parts untouched
    rows = [r for p in list_parts(str(out)) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == len({r["uri"] for r in rows}) == 6
    plan = json.loads((out / "_plan" / "plan.json").read_text())
    assert plan["generation"] == 1 and len(plan["shards"]) == 3


def test_sharded_coco_and_labelme_written_by_tasks(ray_local, tmp_path):
    """Each group of shards is written by its own Ray task: complete COCO files whose ids are
    sequential across all of them (from per-shard counts), matching results files, and LabelMe
    files mirroring the input folders."""
    from pycocotools.coco import COCO

    from pipelines.batch_predict import BatchPredictConfig, finish_all
    from pipelines.merge import write_outputs
    from pipelines.sinks import list_parts, parts_by_shard

    src = tmp_path / "in"
    photos = sorted((REPO / "samples" / "shapes").glob("*.jpg"))
    for k, p in enumerate(photos[:5]):
        (src / f"d{k % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"d{k % 2}" / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    from pipelines.batch_predict import run_batch_predict

    summary = run_batch_predict(BatchPredictConfig(input=str(src), output=str(out), shard_size=1, num_actors=1,
                                                   model_dir=str(REPO / "samples" / "model"), coco_layout="single"))
    single = COCO(str(out / "coco_dataset.json"))
    totals = finish_all(str(out), parts_by_shard(list_parts(str(out))), None)
    written = write_outputs(str(out), totals["shards"], parts_by_shard(list_parts(str(out))),
                            ["circle", "square", "triangle", "star"], image_root=str(src), layout="sharded",
                            labelme=True, shards_per_task=2)
    files = sorted((out / "coco").glob("dataset-*.json"))
    assert len(files) == 3 and written["images"] == summary["coco_images"] == 5  # 5 shards, 2 per task
    ids, ann_ids, anns_by_uri = [], [], {}
    for f in files:
        part = COCO(str(f))
        ids += list(part.imgs)
        ann_ids += list(part.anns)
        for a in part.anns.values():
            anns_by_uri.setdefault(part.imgs[a["image_id"]]["uri"], []).append(a["area"])
        results = json.loads(f.with_name(f.name.replace("dataset", "results")).read_text())
        assert {r["image_id"] for r in results} <= set(part.imgs)
    assert sorted(ids) == list(range(1, 6)) and sorted(ann_ids) == list(range(1, len(ann_ids) + 1))
    # the same images and masks as the single file
    assert anns_by_uri == {im["uri"]: [a["area"] for a in single.imgToAnns[i]] for i, im in single.imgs.items()}
    labelme = sorted(str(p.relative_to(out / "labelme")) for p in (out / "labelme").rglob("*.json"))
    assert labelme == sorted(f"d{k % 2}/{p.stem}.json" for k, p in enumerate(photos[:5]))
    doc = json.loads((out / "labelme" / "d0" / f"{photos[0].stem}.json").read_text())
    assert (out / "labelme" / "d0" / doc["imagePath"]).resolve() == (src / "d0" / photos[0].name).resolve()


class _FaultyS3Proxy(BaseHTTPRequestHandler):
    """Forwards to moto_server; the first ``failures`` GETs of each image object get HTTP 503
    (more than botocore's own retries absorb, so the job's read retry has to act)."""

    upstream = ""
    failures = 0
    counts: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def _forward(self):
        import http.client
        from urllib.parse import urlsplit

        key = self.path.split("?", 1)[0]
        if self.command == "GET" and key.endswith(".jpg"):
            self.counts[key] = self.counts.get(key, 0) + 1
            if self.counts[key] <= self.failures:
                body = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        up = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_s3_reads_retried_through_injected_faults(ray_local, s3_server, s3_bucket, tmp_path):
    """Every image GET fails 6 times with 503 before it succeeds: the rows are ok, none is an
    error, and each object was asked for more often than botocore alone would try."""
    import boto3

    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict

    photos = sorted((REPO / "samples" / "shapes").glob("*.jpg"))[:3]
    s3 = boto3.client("s3")
    for p in photos:
        s3.put_object(Bucket=s3_bucket, Key=f"flaky/{p.name}", Body=p.read_bytes())
    _FaultyS3Proxy.upstream, _FaultyS3Proxy.failures, _FaultyS3Proxy.counts = s3_server, 6, {}
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FaultyS3Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        summary = run_batch_predict(BatchPredictConfig(
            input=f"s3://{s3_bucket}/flaky/", output=str(tmp_path / "out"), model_dir=str(REPO / "samples" / "model"),
            num_actors=1, s3_endpoint=f"http://127.0.0.1:{proxy.server_port}", report=False))  # no overlay re-reads
    finally:
        proxy.shutdown()
    assert summary["by_status"] == {"ok": 3}, summary
    assert sorted(_FaultyS3Proxy.counts.values()) == [7, 7, 7]  # 6 injected failures, then the read


def test_repeats_of_an_s3_manifest_marked_under_an_s3_output(ray_local, s3_bucket):
    """The repeat search reads and writes through S3 (moto_server) like the rest of the plan, and a
    rerun with the manifest unchanged keeps the plan as it was."""
    import boto3

    from pipelines.shards import expand_shard, load_or_make_plan

    lines = [f"s3://{s3_bucket}/img/{i % 300:04d}.jpg" for i in range(900)]
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="lists/m.txt", Body="\n".join(lines).encode())
    manifest, out = f"s3://{s3_bucket}/lists/m.txt", f"s3://{s3_bucket}/out"
    plan = load_or_make_plan(manifest, out, shard_size=50, extensions=(".jpg",))
    assert plan.repeats == 600 and len(plan.shards) > 1
    kept = [u for sh in plan.shards for u in expand_shard(sh)[0]]
    assert kept == lines[:300]
    again = load_or_make_plan(manifest, out, shard_size=50, extensions=(".jpg",))
    assert again.to_json() == plan.to_json()
