"""Talks to a running Label Studio through its own SDK; executed by the Label Studio venv's
interpreter (tests/test_label_studio.py), never imported by the suite.

Usage: python label_studio_runner.py REQUEST.json
REQUEST: {"url", "token", "out_dir", "projects": [{
    "title", "config" (path of a labeling config XML),
    "image_root" (optional: a Local Files storage on this directory, so /data/local-files/ serves it),
    "import" (optional: tasks JSON files imported through the API, one request each),
    "import_rejected" (optional: tasks files expected to be refused; their HTTP statuses are recorded),
    "tasks_storage" (optional: a directory synced as a Local Files storage in "Tasks" mode: each
                     *.json file in it read as a list of tasks),
    "fetch" (optional: data.image values to GET from the server with the token),
    "s3_storage" (optional: {"bucket", "endpoint", "region", "key", "secret"}: an S3 storage that
                  resolves s3:// URIs in data.image to signed URLs),
    "resolve" (optional: true: open every task's image the way the editor does)}]}
Writes OUT_DIR/result.json: per project {"id", "tasks": [{"id", "data", "predictions":
[{"model_version", "score", "result" (brush rle replaced by its length)}]}], "rejected": [HTTP status
of each import_rejected file], "validation_errors":
{task index: errors of LabelInterface.validate_prediction}, "fetched": {value: [status, sha256]},
"resolved": [[data.image as the editor gets it, status, sha256 of the bytes it finally gives], ...]} and
OUT_DIR/masks.npz: "<project>/<task index>/<region index>" = the brush mask decoded by the SDK's
own decoder (label_studio_sdk.converter.brush), alpha channel nonzero.
"""

import hashlib
import json
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter import brush
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.label_interface import LabelInterface


def main() -> None:
    req = json.load(open(sys.argv[1]))
    ls = LabelStudio(base_url=req["url"], api_key=req["token"])
    out, masks = {"projects": []}, {}
    for pi, spec in enumerate(req["projects"]):
        config = open(spec["config"], encoding="utf-8").read()
        project = ls.projects.create(title=spec["title"], label_config=config)
        if spec.get("s3_storage"):
            s3 = spec["s3_storage"]
            ls.import_storage.s3.create(project=project.id, bucket=s3["bucket"], s3endpoint=s3["endpoint"],
                                        region_name=s3["region"], aws_access_key_id=s3["key"],
                                        aws_secret_access_key=s3["secret"], use_blob_urls=True, presign=True,
                                        title="images on S3")
        if spec.get("image_root"):
            ls.import_storage.local.create(project=project.id, path=spec["image_root"], use_blob_urls=True,
                                           title="images")
        for path in spec.get("import", []):
            ls.projects.import_tasks(id=project.id, request=json.load(open(path, encoding="utf-8")),
                                     return_task_ids=True)
        rejected = []
        for path in spec.get("import_rejected", []):
            try:
                ls.projects.import_tasks(id=project.id, request=json.load(open(path, encoding="utf-8")))
                rejected.append(201)
            except ApiError as e:
                rejected.append(e.status_code)
        if spec.get("tasks_storage"):
            storage = ls.import_storage.local.create(project=project.id, path=spec["tasks_storage"],
                                                     regex_filter=r".*\.json", use_blob_urls=False, title="tasks")
            ls.import_storage.local.sync(id=storage.id)
            for _ in range(600):  # the sync runs in the background (a thread without Redis)
                status = ls.import_storage.local.get(id=storage.id).status
                if status in ("completed", "failed"):
                    break
                time.sleep(0.1)
            if status != "completed":
                raise RuntimeError(f"tasks storage sync ended as {status}")
        interface = LabelInterface(config)
        tasks = []
        for k, t in enumerate(ls.tasks.list(project=project.id, fields="all")):
            preds = []
            for p in ls.predictions.list(task=t.id):
                result = []
                for j, region in enumerate(p.result):
                    region = dict(region)
                    value = dict(region["value"])
                    if "rle" in value:
                        h, w = region["original_height"], region["original_width"]
                        decoded = brush.decode_rle(value["rle"]).reshape(h, w, 4)[:, :, 3] != 0
                        masks[f"{pi}/{k}/{j}"] = decoded
                        value["rle"] = len(value["rle"])
                    region["value"] = value
                    result.append(region)
                preds.append({"model_version": p.model_version, "score": p.score, "result": result})
                errors = interface.validate_prediction({"result": p.result}, return_errors=True)
                if errors is not True and errors:
                    out.setdefault("validation_errors", {}).setdefault(str(pi), {})[str(k)] = errors
            tasks.append({"id": t.id, "data": t.data, "predictions": preds})
        fetched = {}
        for value in spec.get("fetch", []):
            status, body = _get(req, req["url"] + value)
            fetched[value] = [status, hashlib.sha256(body).hexdigest() if body is not None else None]
        resolved = []
        for t in tasks if spec.get("resolve") else []:
            # the task as the editor gets it: data.image rewritten to a URL it can open
            view = _get(req, f"{req['url']}/api/tasks/{t['id']}/")
            url = json.loads(view[1])["data"]["image"]
            status, body = _get(req, req["url"] + url if url.startswith("/") else url)  # follows the redirect
            resolved.append([url, status, hashlib.sha256(body).hexdigest() if body else None])
        out["projects"].append({"id": project.id, "tasks": tasks, "fetched": fetched, "rejected": rejected,
                                "resolved": resolved})
    json.dump(out, open(f"{req['out_dir']}/result.json", "w"))
    np.savez_compressed(f"{req['out_dir']}/masks.npz", **masks)


def _get(req: dict, url: str) -> tuple[int, bytes | None]:
    """GET with the API token: (status, body), body None on an HTTP error."""
    request = urllib.request.Request(url, headers={"Authorization": f"Token {req['token']}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, None


if __name__ == "__main__":
    main()
