"""Every Kubernetes manifest under cluster/ against its real schema, and every command line in
them against the job's own parser.

Schemas (tests/schemas/, sources and versions in its README): the KubeRay v1.7.0 CRDs for
RayCluster, RayJob, RayService and RayCronJob; Kubernetes v1.32.2's CronJob, ServiceAccount,
Role, RoleBinding and ConfigMap (strict JSON schemas: no unknown fields); Ray's own schema of the
cluster launcher config (shipped in the installed ray package). The CRD schemas are made strict
here the same way (an unknown field is an error, as `kubectl apply` with server-side field
validation reports it). What no schema says is checked by hand: metadata (ObjectMeta, name rules
and KubeRay's name-length limits), CEL rules (not evaluated: a manifest must not use a field that
has one), KubeRay's submission modes.

Also run, not only read: the nightly CronJob's script against a stand-in kubectl, the VM
launcher's token fetch against a stand-in botocore, and the RayService's Serve args through
pipelines.serve_settings.ServeSettings.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"
SCHEMAS = REPO / "tests" / "schemas"
KUBERAY = SCHEMAS / "kuberay-v1.7.0"
K8S = SCHEMAS / "kubernetes-v1.32.2"
NIGHTLY = CLUSTER / "kuberay" / "nightly"
RUN_PLACEHOLDER = "@RUN@"
SAMPLE_RUN = "20260101-0200"  # what create-rayjob.sh puts in place of @RUN@: date -u +%Y%m%d-%H%M

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are ~1 MB each

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
CORE_FILES = {("batch/v1", "CronJob"): "cronjob-batch-v1.json", ("v1", "ServiceAccount"): "serviceaccount-v1.json",
              ("v1", "ConfigMap"): "configmap-v1.json", ("rbac.authorization.k8s.io/v1", "Role"): "role-rbac-v1.json",
              ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding-rbac-v1.json"}
# Built-in API groups: a kind of theirs without a vendored schema still gets the basic checks
# (apiVersion, kind, metadata); a kind of any other group fails until its schema is vendored.
CORE_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1",
                     "policy/v1", "autoscaling/v2", "scheduling.k8s.io/v1"}
# KubeRay v1.7.0, ray-operator/controllers/ray/utils/constant.go: the longest names its
# generated Services and clusters allow.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47, "RayCronJob": 36}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # rayjob_types.go

# YAML files under cluster/ that are not Kubernetes manifests, and what checks them instead.
NOT_MANIFESTS = {
    "runtime_env.yaml": "Ray runtime env: tests/test_ray_job_submit.py",
    "vm/aws-gpu.yaml": "Ray cluster launcher config: test_vm_launcher_config_matches_rays_schema",
}
SERVE_CONFIG_DIR = "serve/"  # `serve deploy` configs: test_serve_deploy_configs


# ---------------------------------------------------------------------------------- schemas


def _strict(node: Any) -> None:
    """additionalProperties: false on every object schema that lists its properties."""
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict) and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


def _cel_rules_not_evaluated(validator, rules, instance, schema):
    """A field carrying CEL rules (x-kubernetes-validations) is refused: they are not evaluated
    offline, so a manifest using one would be checked less than it looks."""
    messages = "; ".join(rule.get("message", rule.get("rule", "")) for rule in rules)
    yield jsonschema.ValidationError(f"uses a field with CEL rules that are not checked offline ({messages})")


_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                          {"x-kubernetes-validations": _cel_rules_not_evaluated})


@lru_cache(maxsize=None)
def _crd_validator(kind: str):
    crd = yaml.load((KUBERAY / CRD_FILES[kind]).read_text(encoding="utf-8"), Loader=_LOADER)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _strict(schema)
    _Validator.check_schema(schema)
    return _Validator(schema)


@lru_cache(maxsize=None)
def _core_schema(name: str) -> dict:
    return json.loads((K8S / name).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _core_validator(name: str):
    schema = _core_schema(name)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@lru_cache(maxsize=None)
def _object_meta_validator():
    """Kubernetes' ObjectMeta (strict), taken from the ServiceAccount schema."""
    return jsonschema.Draft7Validator(_core_schema("serviceaccount-v1.json")["properties"]["metadata"])


_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035 label (KubeRay's names, Services)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def manifest_errors(doc: Any) -> list[str]:
    """Everything wrong with one manifest document; [] when it is valid."""
    if not isinstance(doc, dict) or not isinstance(doc.get("apiVersion"), str) or not isinstance(doc.get("kind"), str):
        return ["not a Kubernetes object: needs string apiVersion and kind"]
    api, kind = doc["apiVersion"], doc["kind"]
    errors = []
    if api == "ray.io/v1" and kind in CRD_FILES:
        validator = _crd_validator(kind)
    elif (api, kind) in CORE_FILES:
        validator = _core_validator(CORE_FILES[api, kind])
    elif api in CORE_API_VERSIONS:
        validator = None  # basic checks only (below)
    else:
        return [f"{api} {kind}: no schema vendored in tests/schemas/ for this kind"]
    if validator is not None:
        errors += [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                   for e in validator.iter_errors(doc)]
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return errors + ["metadata: missing"]
    errors += [f"metadata.{'.'.join(map(str, e.absolute_path))}: {e.message}"
               for e in _object_meta_validator().iter_errors(meta)]
    name = meta.get("name")
    if not isinstance(name, str):
        errors.append("metadata.name: missing (these manifests are applied with kubectl apply)")
    elif kind in MAX_NAME_LENGTH:
        if not _DNS_LABEL.match(name) or len(name) > MAX_NAME_LENGTH[kind]:
            errors.append(f"metadata.name {name!r}: a {kind} name must be a DNS-1035 label of at most "
                          f"{MAX_NAME_LENGTH[kind]} characters")
    elif not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
        errors.append(f"metadata.name {name!r}: not a DNS-1123 subdomain")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63:
            errors.append(f"metadata.labels.{key}: label values are strings of at most 63 characters")
    if kind == "RayJob":
        errors += _rayjob_spec_errors(doc.get("spec") or {})
    elif kind == "RayCronJob":
        errors += _rayjob_spec_errors((doc.get("spec") or {}).get("jobTemplate") or {})
    return errors


def _rayjob_spec_errors(spec: dict) -> list[str]:
    mode = spec.get("submissionMode", "K8sJobMode")
    return [] if mode in SUBMISSION_MODES else [f"submissionMode {mode!r}: not one of {sorted(SUBMISSION_MODES)}"]


# ---------------------------------------------------------------------------------- documents


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _rel(path: Path) -> str:
    return path.relative_to(CLUSTER).as_posix()


def cluster_manifests() -> Iterator[tuple[str, dict]]:
    """(label, document) for every Kubernetes manifest under cluster/, including the manifests
    embedded in ConfigMaps (the nightly RayJob template, with @RUN@ filled in)."""
    for path in _yaml_files():
        rel = _rel(path)
        if rel in NOT_MANIFESTS or rel.startswith(SERVE_CONFIG_DIR):
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is None:
                continue
            label = rel if i == 0 else f"{rel}[{i}]"
            yield label, doc
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        yield f"{label}#{key}", yaml.safe_load(text.replace(RUN_PLACEHOLDER, SAMPLE_RUN))


MANIFESTS = dict(cluster_manifests())


def _doc(label: str) -> dict:
    return copy.deepcopy(MANIFESTS[label])


def _nightly_template_text() -> str:
    return MANIFESTS["kuberay/nightly/rayjob-template.yaml"]["data"]["rayjob.yaml"]


def _nightly_script() -> str:
    return MANIFESTS["kuberay/nightly/rayjob-template.yaml"]["data"]["create-rayjob.sh"]


# ---------------------------------------------------------------------------------- the schemas themselves


def test_vendored_schemas_are_the_files_their_readme_names():
    """tests/schemas/README.md lists each vendored file with its SHA-256: the files are the
    upstream data as fetched, and the README says where each one came from."""
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", readme, flags=re.M))
    on_disk = {p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*") if p.is_file() and p.name != "README.md"}
    assert set(listed) == on_disk
    for rel, digest in listed.items():
        assert hashlib.sha256((SCHEMAS / rel).read_bytes()).hexdigest() == digest, rel


def test_every_yaml_file_under_cluster_is_checked_by_something():
    kinds = {(doc.get("apiVersion"), doc.get("kind")) for doc in MANIFESTS.values()}
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService"),
            ("ray.io/v1", "RayCronJob"), ("batch/v1", "CronJob"), ("v1", "ServiceAccount"), ("v1", "ConfigMap"),
            ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")} <= kinds
    assert "kuberay/nightly/rayjob-template.yaml#rayjob.yaml" in MANIFESTS
    for path in _yaml_files():
        rel = _rel(path)
        assert rel in NOT_MANIFESTS or rel.startswith(SERVE_CONFIG_DIR) or rel in MANIFESTS, rel
    for rel in NOT_MANIFESTS:
        assert (CLUSTER / rel).is_file(), f"{rel} is listed as checked elsewhere but does not exist"


@pytest.mark.parametrize("label", sorted(MANIFESTS))
def test_manifest_is_valid_against_its_schema(label):
    errors = manifest_errors(MANIFESTS[label])
    assert not errors, f"{label}:\n  " + "\n  ".join(errors)


def _set(doc: dict, path: str, value: Any) -> dict:
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()
GPU_GROUP = "spec.workerGroupSpecs.0"
BROKEN = {
    "rayjob field typo": ("kuberay/rayjob-batch-predict.yaml", "spec.entrypont", "python -m jobs.batch_predict"),
    "rayjob wrong type": ("kuberay/rayjob-batch-predict.yaml", "spec.activeDeadlineSeconds", "one day"),
    "rayjob unknown submission mode": ("kuberay/rayjob-batch-predict.yaml", "spec.submissionMode", "BatchMode"),
    "rayjob field with a CEL rule": ("kuberay/rayjob-batch-predict.yaml", "spec.managedBy", "someone"),
    "raycluster missing head": ("kuberay/raycluster.yaml", "spec.headGroupSpec", _DELETE),
    "raycluster auth mode enum": ("kuberay/raycluster.yaml", "spec.authOptions.mode", "tokens"),
    "raycluster replicas type": ("kuberay/raycluster.yaml", f"{GPU_GROUP}.replicas", "four"),
    "raycluster bad quantity": ("kuberay/raycluster.yaml",
                                f"{GPU_GROUP}.template.spec.containers.0.resources.limits.memory", "32 GB"),
    "raycluster container typo": ("kuberay/raycluster.yaml", f"{GPU_GROUP}.template.spec.containers.0.imag", "x"),
    "raycluster name too long": ("kuberay/raycluster.yaml", "metadata.name", "instseg-" + "x" * 50),
    "rayservice missing cluster": ("kuberay/rayservice.yaml", "spec.rayClusterConfig", _DELETE),
    "rayservice config not a string": ("kuberay/rayservice.yaml", "spec.serveConfigV2", {"applications": []}),
    "raycronjob missing schedule": ("kuberay/raycronjob-nightly.yaml", "spec.schedule", _DELETE),
    "cronjob field typo": ("kuberay/nightly/cronjob.yaml", "spec.schedul", "0 2 * * *"),
    "cronjob missing job template": ("kuberay/nightly/cronjob.yaml", "spec.jobTemplate", _DELETE),
    "cronjob pod field typo": ("kuberay/nightly/cronjob.yaml", "spec.jobTemplate.spec.template.spec.serviceAcountName",
                               "instseg-nightly"),
    "role rule typo": ("kuberay/nightly/role.yaml", "rules.0.verb", ["get"]),
    "rolebinding missing roleRef": ("kuberay/nightly/rolebinding.yaml", "roleRef", _DELETE),
    "serviceaccount metadata typo": ("kuberay/nightly/serviceaccount.yaml", "metadata.lables", {"a": "b"}),
    "configmap data not strings": ("kuberay/nightly/rayjob-template.yaml", "data.keep", 14),
    "nightly rayjob name not a DNS label": ("kuberay/nightly/rayjob-template.yaml#rayjob.yaml", "metadata.name",
                                            "Instseg_Nightly"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_manifest_is_rejected(case):
    """The checks can fail: each manifest above, broken in one place, is refused."""
    label, path, value = BROKEN[case]
    assert not manifest_errors(_doc(label))
    errors = manifest_errors(_set(_doc(label), path, value))
    assert errors, f"{case}: accepted"
    field = path.split(".")[-1]
    assert any(field in e for e in errors), errors  # the error names what is wrong


def test_an_unknown_kind_is_not_waved_through():
    assert manifest_errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert not manifest_errors({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"}})
    assert manifest_errors({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"nmae": "w"}})


# ---------------------------------------------------------------------------------- command lines


def _parse_job_command(argv: list[str]) -> Any:
    """argv = python -m jobs.<name> ARGS: parsed with that job's own build_parser (and, for the
    batch job, turned into its config, which checks what argparse cannot)."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), argv
    module = importlib.import_module(argv[2])
    try:
        args = module.build_parser().parse_args(argv[3:])
        if argv[2] == "jobs.batch_predict":
            return module.config_from_args(args)
        return args
    except SystemExit as e:  # argparse and jobs._common.fail exit on a bad command line
        raise AssertionError(f"{shlex.join(argv)}: refused by {argv[2]}'s parser (exit {e.code})") from None


def _entrypoints() -> dict[str, str]:
    found = {}
    for label, doc in MANIFESTS.items():
        spec = doc.get("spec") or {}
        if doc.get("kind") == "RayJob":
            found[label] = spec["entrypoint"]
        elif doc.get("kind") == "RayCronJob":
            found[label] = spec["jobTemplate"]["entrypoint"]
    return found


def test_every_rayjob_entrypoint_parses_with_the_jobs_own_parser():
    entrypoints = _entrypoints()
    assert {"kuberay/rayjob-batch-predict.yaml", "kuberay/nightly/rayjob-template.yaml#rayjob.yaml",
            "kuberay/raycronjob-nightly.yaml"} <= set(entrypoints)
    configs = {label: _parse_job_command(shlex.split(text)) for label, text in entrypoints.items()}
    for cfg in configs.values():
        assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://") and cfg.device == "gpu"
    nightly = configs["kuberay/nightly/rayjob-template.yaml#rayjob.yaml"]
    assert nightly.run_id == f"nightly-{SAMPLE_RUN}"
    # every night resumes the same output: that is what makes reruns label only new images
    assert nightly.output == configs["kuberay/raycronjob-nightly.yaml"].output


def test_a_bad_entrypoint_is_refused_by_the_parser():
    entrypoint = shlex.split(_entrypoints()["kuberay/rayjob-batch-predict.yaml"])
    for broken in (entrypoint + ["--num-gpus-per-actor", "half"], entrypoint + ["--coco-layout", "tiled"],
                   entrypoint + ["--no-such-flag"], [a for a in entrypoint if a != "--output"]):
        with pytest.raises(AssertionError, match="refused"):
            _parse_job_command(broken)


def _submit_sh_commands(text: str) -> list[list[str]]:
    """The argument lists of every `cluster/submit.sh ...` command in a text (line continuations
    joined, comments and leading `VAR=value` assignments dropped)."""
    text = re.sub(r"\\\n[#\s]*", " ", text)
    commands = []
    for line in text.splitlines():
        line = line.lstrip("#").strip()
        at = line.find("cluster/submit.sh ")
        if at < 0:
            continue
        argv = shlex.split(line[at:].split("`")[0], comments=True)  # up to the end of inline code
        if not any(re.fullmatch(r"[A-Z_]*\.\.\.", a) for a in argv):  # "ARGS..." or "..." in prose
            commands.append(argv[1:])
    return commands


def test_submit_sh_runs_the_batch_job_and_its_documented_calls_parse():
    script = (CLUSTER / "submit.sh").read_text(encoding="utf-8")
    assert re.search(r'-- python -m jobs\.batch_predict "\$@"\s*$', script)
    sources = {"submit.sh": script}
    for rel in ("README.md", "vm/aws-gpu.yaml", "kuberay/raycluster.yaml"):
        sources[rel] = (CLUSTER / rel).read_text(encoding="utf-8")
    sources["../README.md"] = (REPO / "README.md").read_text(encoding="utf-8")
    seen = 0
    for name, text in sources.items():
        for args in _submit_sh_commands(text):
            _parse_job_command(["python", "-m", "jobs.batch_predict", *args])
            seen += 1
    assert seen >= 4


# ---------------------------------------------------------------------------------- nightly runs


def _stub_kubectl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A stand-in kubectl: `get rayjobs` prints runs.txt (or fails when get.fail exists),
    `create -f -` keeps stdin in created.yaml, every call is logged to calls.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "kubectl"
    stub.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        state = os.environ["STUB_STATE"]
        args = sys.argv[1:]
        with open(os.path.join(state, "calls.txt"), "a") as f:
            f.write(" ".join(args) + "\\n")
        if args[:2] == ["get", "rayjobs"]:
            if os.path.exists(os.path.join(state, "get.fail")):
                sys.exit("error: the server has asked for the client to provide credentials")
            runs = os.path.join(state, "runs.txt")
            sys.stdout.write(open(runs).read() if os.path.exists(runs) else "")
        elif args[:3] == ["create", "-f", "-"]:
            with open(os.path.join(state, "created.yaml"), "w") as f:
                f.write(sys.stdin.read())
            print("rayjob.ray.io/created")
        elif args[:2] == ["delete", "rayjob"]:
            print("rayjob.ray.io/" + args[2] + " deleted")
        else:
            sys.exit("unexpected kubectl call: " + " ".join(args))
        """))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    mounted = tmp_path / "etc"  # what the CronJob mounts from the ConfigMap
    mounted.mkdir()
    (mounted / "rayjob.yaml").write_text(_nightly_template_text())
    (mounted / "create-rayjob.sh").write_text(_nightly_script())
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "STUB_STATE": str(tmp_path),
           "KEEP_FINISHED_RUNS": "3", "HOME": str(tmp_path)}
    return env, mounted / "create-rayjob.sh"


def _run_script(tmp_path: Path, runs: str = "") -> subprocess.CompletedProcess:
    env, script = _stub_kubectl(tmp_path)
    (tmp_path / "runs.txt").write_text(runs)
    return subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True, timeout=30)


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.txt").read_text().splitlines()


def test_nightly_script_creates_a_dated_rayjob(tmp_path):
    done = _run_script(tmp_path, "instseg-nightly-20251230-0200=Complete\n")
    assert done.returncode == 0, done.stderr
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    stamp = created["metadata"]["name"].removeprefix("instseg-nightly-")
    assert re.fullmatch(r"\d{8}-\d{4}", stamp), created["metadata"]["name"]
    assert RUN_PLACEHOLDER not in (tmp_path / "created.yaml").read_text()
    assert not manifest_errors(created)
    assert _parse_job_command(shlex.split(created["spec"]["entrypoint"])).run_id == f"nightly-{stamp}"
    selector = _calls(tmp_path)[0].split(" -l ")[1].split()[0]
    key, value = selector.split("=")
    assert created["metadata"]["labels"][key] == value  # tomorrow's run finds this one
    assert not [c for c in _calls(tmp_path) if c.startswith("delete")]


@pytest.mark.parametrize("status", ["Running", "", "Initializing", "Suspended", "Retrying"])
def test_nightly_script_skips_while_a_run_is_going(tmp_path, status):
    done = _run_script(tmp_path, f"instseg-nightly-20251230-0200=Complete\ninstseg-nightly-20251231-0200={status}\n")
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout and "instseg-nightly-20251231-0200" in done.stdout
    assert not (tmp_path / "created.yaml").exists()
    assert [c.split()[0] for c in _calls(tmp_path)] == ["get"]


def test_nightly_script_keeps_the_newest_finished_runs(tmp_path):
    runs = "".join(f"instseg-nightly-2025120{d}-0200={s}\n"
                   for d, s in zip(range(1, 7), ["Complete", "Failed", "Complete", "ValidationFailed", "Complete",
                                                 "Complete"]))
    done = _run_script(tmp_path, runs)  # KEEP_FINISHED_RUNS=3: the three oldest go
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "created.yaml").exists()
    deletes = [c.split()[2] for c in _calls(tmp_path) if c.startswith("delete")]
    assert deletes == ["instseg-nightly-20251201-0200", "instseg-nightly-20251202-0200",
                       "instseg-nightly-20251203-0200"]


def test_nightly_script_creates_nothing_when_kubectl_fails(tmp_path):
    env, script = _stub_kubectl(tmp_path)
    (tmp_path / "get.fail").write_text("")
    done = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert not (tmp_path / "created.yaml").exists()


def test_nightly_pod_may_do_what_its_script_does_and_no_more():
    role = MANIFESTS["kuberay/nightly/role.yaml"]
    binding = MANIFESTS["kuberay/nightly/rolebinding.yaml"]
    account = MANIFESTS["kuberay/nightly/serviceaccount.yaml"]
    cron = MANIFESTS["kuberay/nightly/cronjob.yaml"]
    configmap = MANIFESTS["kuberay/nightly/rayjob-template.yaml"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    used = set()
    for verb, resource in re.findall(r"kubectl (get|create|delete) (\S+)", _nightly_script()):
        used.add({"get": "list"}.get(verb, verb))  # `get rayjobs -l ...` lists
    assert used == {"list", "create", "delete"} and used <= set(rule["verbs"])
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert [s["name"] for s in binding["subjects"]] == [account["metadata"]["name"]]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "nightly"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "nightly"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert container["command"] == ["/bin/sh", f"{mount['mountPath']}/create-rayjob.sh"]
    # a run stops before the next night's tick, so two runs never share the output
    template = MANIFESTS["kuberay/nightly/rayjob-template.yaml#rayjob.yaml"]
    assert cron["spec"]["schedule"].split()[2:] == ["*", "*", "*"]  # daily
    assert template["spec"]["activeDeadlineSeconds"] < 24 * 3600


def test_raycronjob_runs_the_same_rayjob_as_the_cronjob_route():
    template = MANIFESTS["kuberay/nightly/rayjob-template.yaml#rayjob.yaml"]["spec"]
    raycron = MANIFESTS["kuberay/raycronjob-nightly.yaml"]
    job = copy.deepcopy(raycron["spec"]["jobTemplate"])
    ours = copy.deepcopy(template)
    argv = shlex.split(ours.pop("entrypoint"))
    at = argv.index("--run-id")
    del argv[at:at + 2]  # RayCronJob cannot put the date in; the job picks a run id
    assert shlex.split(job.pop("entrypoint")) == argv
    assert job == ours
    assert raycron["spec"]["schedule"] == MANIFESTS["kuberay/nightly/cronjob.yaml"]["spec"]["schedule"]
    assert raycron["spec"]["timeZone"] == MANIFESTS["kuberay/nightly/cronjob.yaml"]["spec"]["timeZone"]


# ---------------------------------------------------------------------------------- Ray pods


def _ray_cluster_specs() -> dict[str, dict]:
    specs = {}
    for label, doc in MANIFESTS.items():
        spec = doc.get("spec") or {}
        cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig"),
                   "RayCronJob": (spec.get("jobTemplate") or {}).get("rayClusterSpec")}.get(doc.get("kind"))
        if cluster:
            specs[label] = cluster
    return specs


def test_ray_pods_share_service_account_image_version_and_token_auth():
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text(encoding="utf-8")
    ray_version = re.search(r"^FROM rayproject/ray:([0-9.]+)-", dockerfile, flags=re.M).group(1)
    specs = _ray_cluster_specs()
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-batch-predict.yaml", "kuberay/rayservice.yaml",
            "kuberay/raycronjob-nightly.yaml", "kuberay/nightly/rayjob-template.yaml#rayjob.yaml"} <= set(specs)
    images = set()
    for label, cluster in specs.items():
        assert cluster["rayVersion"] == ray_version, label
        assert cluster["authOptions"] == {"mode": "token"}, label
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            pod = group["template"]["spec"]
            assert pod.get("serviceAccountName") == "instseg-s3", f"{label}: {group.get('groupName', 'head')}"
            images.update(c["image"] for c in pod["containers"])
    assert len(images) == 1, images
    assert "serve" in re.search(r'"ray\[([a-z,]+)\]==', dockerfile).group(1).split(",")  # the RayService's image


# ---------------------------------------------------------------------------------- Serve


def _serve_schema_errors(config: dict) -> list[str]:
    """Ray Serve's own config schema, plus unknown keys (which it ignores silently)."""
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError: report it
        return [str(e)]
    errors = [f"unknown key {k}" for k in set(config) - set(ServeDeploySchema.model_fields)]
    errors += [f"http_options: unknown key {k}"
               for k in set(config.get("http_options") or {}) - set(HTTPOptionsSchema.model_fields)]
    for app in config.get("applications", []):
        errors += [f"{app.get('name')}: unknown key {k}" for k in set(app) - set(ServeApplicationSchema.model_fields)]
        for dep in app.get("deployments", []):
            errors += [f"{app.get('name')}/{dep.get('name')}: unknown key {k}"
                       for k in set(dep) - set(DeploymentSchema.model_fields)]
    return errors


# Deployment options that ServeSettings derives and checks (deployment_options()); a config's
# deployments entry setting one of them would override them unchecked.
_SETTINGS_OWNED = {"num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests",
                   "max_queued_requests"}


def _check_serve_config(config: dict, where: str) -> list:
    from pipelines.serve import APP_NAME, DEPLOYMENT_NAME
    from pipelines.serve_settings import ServeSettings

    assert not _serve_schema_errors(config), (where, _serve_schema_errors(config))
    settings = []
    for app in config["applications"]:
        if app["import_path"] != "pipelines.serve:app":
            continue
        assert app["name"] == APP_NAME, where
        settings.append(ServeSettings.from_args(app.get("args") or {}))
        for dep in app.get("deployments", []):
            assert dep["name"] == DEPLOYMENT_NAME, f"{where}: no deployment {dep['name']!r} in pipelines.serve"
            assert not set(dep) & _SETTINGS_OWNED, f"{where}: set these in args (ServeSettings): {set(dep) & _SETTINGS_OWNED}"
    assert settings, f"{where}: no pipelines.serve:app application"
    return settings


def test_rayservice_serve_config_is_valid_and_its_args_parse_with_serve_settings():
    service = MANIFESTS["kuberay/rayservice.yaml"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (settings,) = _check_serve_config(config, "rayservice.yaml")
    assert settings.model_dir.startswith("s3://")  # replicas on other nodes read the model from storage
    assert settings.replica_device == "gpu" and 0 < settings.num_gpus <= 1
    assert settings.url_allowlist == ()
    scaling = settings.autoscaling_config
    gpu = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}["gpu"]
    per_pod = int(1 / settings.num_gpus)  # one GPU per pod
    assert gpu["minReplicas"] * per_pod <= scaling["min_replicas"] and scaling["max_replicas"] <= gpu["maxReplicas"] * per_pod
    cpus = float(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert per_pod * settings.ray_actor_options["num_cpus"] <= cpus
    assert config["http_options"]["port"] == 8000  # KubeRay's serve Service targets port 8000


def test_serve_settings_refuse_a_broken_args_block():
    from pipelines.serve_settings import ServeSettingsError

    config = yaml.safe_load(MANIFESTS["kuberay/rayservice.yaml"]["spec"]["serveConfigV2"])
    for key, value in (("max_batch_sise", 8), ("device", "tpu"), ("ray_actor_options", {"num_gpu": 1})):
        broken = copy.deepcopy(config)
        broken["applications"][0]["args"][key] = value
        with pytest.raises(ServeSettingsError):
            _check_serve_config(broken, "broken")
    broken = copy.deepcopy(config)
    broken["applications"][0]["deployments"][0]["num_replicas"] = 3
    with pytest.raises(AssertionError, match="set these in args"):
        _check_serve_config(broken, "broken")


def test_serve_deploy_configs():
    """The `serve deploy` configs in cluster/serve/ (if any) pass the same checks."""
    configs = sorted((CLUSTER / "serve").glob("*.y*ml")) if (CLUSTER / "serve").is_dir() else []
    if not configs:
        pytest.skip("no cluster/serve/ configs yet")
    for path in configs:
        _check_serve_config(yaml.safe_load(path.read_text(encoding="utf-8")), _rel(path))


# ---------------------------------------------------------------------------------- VM launcher


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "vm" / "aws-gpu.yaml").read_text(encoding="utf-8"))


def test_vm_launcher_config_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    assert not [e.message for e in validator.iter_errors(_launcher())]
    broken = _launcher()
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0
    assert list(validator.iter_errors(broken))


def test_vm_launcher_gives_every_node_the_same_token_from_ssm():
    config = _launcher()
    options = config["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    (param,) = [o.split("=", 1)[1] for o in options if o.startswith("--env INSTSEG_RAY_TOKEN_PARAMETER=")]
    assert param.startswith("/")
    # setup_commands run on every node; no node type replaces them with a list lacking the fetch
    assert any("get_parameter" in c for c in config["setup_commands"])
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert not config.get(key)
    for node_type in config["available_node_types"].values():
        assert "worker_setup_commands" not in node_type and "docker" not in node_type
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token" in command
    text = (CLUSTER / "vm" / "aws-gpu.yaml").read_text(encoding="utf-8")
    assert not re.search(r"\b[0-9a-f]{32,}\b", text), "something token-like is committed"


def _stub_botocore(tmp_path: Path, value: str) -> Path:
    pkg = tmp_path / "stubs" / "botocore"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "session.py").write_text(textwrap.dedent(f"""\
        import os
        class _SSM:
            def get_parameter(self, Name, WithDecryption):
                assert WithDecryption and Name == os.environ["EXPECT_PARAMETER"], Name
                return {{"Parameter": {{"Name": Name, "Value": {value!r}}}}}
        class _Session:
            def create_client(self, service):
                assert service == "ssm", service
                return _SSM()
        def get_session():
            return _Session()
        """))
    return tmp_path / "stubs"


@pytest.mark.parametrize("value", ["0123abcd" * 8 + "\n", "  "])
def test_vm_launcher_setup_command_writes_the_token_file(tmp_path, value):
    """The setup command itself, run by bash against a stand-in botocore: the token lands in
    ~/.ray/auth_token, readable by its owner only, and is never printed; an empty parameter fails."""
    config = _launcher()
    (command,) = [c for c in config["setup_commands"] if "get_parameter" in c]
    env_options = dict(o.removeprefix("--env ").split("=", 1) for o in config["docker"]["run_options"]
                       if o.startswith("--env "))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    home = tmp_path / "home"
    home.mkdir()
    env = {**env_options, "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(home),
           "PYTHONPATH": str(_stub_botocore(tmp_path, value)),
           "EXPECT_PARAMETER": env_options["INSTSEG_RAY_TOKEN_PARAMETER"]}
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    token_file = home / ".ray" / "auth_token"
    if value.strip():
        assert done.returncode == 0, done.stderr
        assert token_file.read_text() == value.strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert value.strip() not in done.stdout + done.stderr
    else:
        assert done.returncode != 0 and "empty" in done.stderr
        assert not token_file.exists()
