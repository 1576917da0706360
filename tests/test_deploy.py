"""Deployment files, checked offline: Kubernetes manifests against the API schemas (strict), KEDA's
ScaledObject against the fields of its CRD we use, kustomize references, compose and the dashboard."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.config import Settings
from shared.db import sentinel_addresses
from shared.queue import INFERENCE_QUEUE

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
SENTINEL_COMPONENT = K8S / "components" / "redis-sentinel"
K8S_VERSION = "1.33"


def _trigger(kind: str, required: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": ["type", "metadata"], "additionalProperties": False,
            "properties": {"type": {"const": kind},
                           "authenticationRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                                 "properties": {"name": {"type": "string"}}},
                           "metadata": {"type": "object", "required": required,
                                        "additionalProperties": {"type": "string"}}}}  # fmt: skip


SCALED_OBJECT = {  # keda.sh/v1alpha1 ScaledObject: the fields this project uses, nothing else allowed
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                # redis: one Redis; redis-sentinel: the primary that the Sentinels name
                "triggers": {"type": "array", "minItems": 1, "items": {"oneOf": [
                    _trigger("redis", ["address", "listName", "listLength"]),
                    _trigger("redis-sentinel", ["addresses", "sentinelMaster", "listName", "listLength"])]}},
            },
        },
    },
}  # fmt: skip


TRIGGER_AUTH = {  # keda.sh/v1alpha1 TriggerAuthentication: a secret's key as a trigger parameter
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "properties": {"secretTargetRef": {
            "type": "array", "minItems": 1, "items": {"type": "object", "required": ["parameter", "name", "key"],
                                                      "additionalProperties": False,
                                                      "properties": {k: {"type": "string"}
                                                                     for k in ("parameter", "name", "key")}}}}},
    },
}  # fmt: skip


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in docs(K8S / "base" / name)]


def by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in base_resources() if d["kind"] == kind and d["metadata"]["name"] == name)


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 as kustomize applies it, for the operations the components use."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = (p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:])
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key: Any = int(last) if isinstance(node, list) else last
        if op["op"] == "test":
            assert node[key] == op["value"], f"{op} failed: {node[key]!r}"
        elif op["op"] == "replace":
            assert (key < len(node)) if isinstance(node, list) else key in node, f"{op}: nothing to replace"
            node[key] = op["value"]
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(key, op["value"])
        elif op["op"] == "add":
            node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        else:
            raise AssertionError(f"unsupported operation {op}")
    return doc


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A strategic merge patch on maps (lists are replaced: no patch here merges one)."""
    out = dict(base)
    for k, v in patch.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def with_component(path: Path) -> list[dict[str, Any]]:
    """The base's resources with a component's patches applied; each patch must hit one base object."""
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    assert k["kind"] == "Component" and k["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert set(k) == {"apiVersion", "kind", "patches"}
    resources = base_resources()
    for patch in k["patches"]:
        if "target" in patch:  # a JSON 6902 patch, its object named by the target
            target = patch["target"]
            ops = yaml.safe_load((path / patch["path"]).read_text())
            hits = [i for i, d in enumerate(resources) if d["kind"] == target["kind"]
                    and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])  # none: every one
                    and d["apiVersion"] == f"{target['group']}/{target['version']}"]  # fmt: skip
            assert len(hits) == 1 if "name" in target else hits, target
            for i in hits:
                resources[i] = json_patch(resources[i], ops)
        else:  # a strategic merge patch, its object named by itself
            for d in docs(path / patch["path"]):
                hits = [i for i, r in enumerate(resources) if (r["apiVersion"], r["kind"], r["metadata"]["name"])
                        == (d["apiVersion"], d["kind"], d["metadata"]["name"])]  # fmt: skip
                assert len(hits) == 1, d["metadata"]
                resources[hits[0]] = merge(resources[hits[0]], d)
    return resources


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in resources if d["kind"] == kind and d["metadata"]["name"] == name)


def test_every_base_manifest_is_valid_strictly():
    kinds = set()
    for d in base_resources():
        kinds.add(d["kind"])
        if d["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(d, SCALED_OBJECT if d["kind"] == "ScaledObject" else TRIGGER_AUTH)
        else:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ScaledObject",
                     "NetworkPolicy", "TriggerAuthentication"}  # fmt: skip


def test_network_policies_deny_by_default_and_keep_pods_off_private_addresses():
    policies = [d for d in base_resources() if d["kind"] == "NetworkPolicy"]
    deny = next(p for p in policies if p["metadata"]["name"] == "inpaint-default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    egress = next(p for p in policies if p["metadata"]["name"] == "inpaint-egress")["spec"]
    public = next(r["to"][0]["ipBlock"] for r in egress["egress"] if "ipBlock" in r["to"][0])
    assert public["cidr"] == "0.0.0.0/0" and {"169.254.0.0/16", "10.0.0.0/8"} <= set(public["except"])
    # Redis needs its password everywhere: in the pods' Secret, and for KEDA
    assert "INPAINT_REDIS_URL" not in by_kind("ConfigMap", "inpaint-config")["data"]
    trigger = by_kind("ScaledObject", "inpaint-worker")["spec"]["triggers"][0]
    assert trigger["authenticationRef"]["name"] == by_kind("TriggerAuthentication", "inpaint-redis")["metadata"]["name"]


def test_a_wrong_field_is_caught():
    bad = by_kind("Deployment", "inpaint-api")
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", sorted(p.name for p in (K8S / "overlays").iterdir()))
def test_overlays_reference_what_exists(overlay):
    k = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    # the base, and a model's workers (infra/k8s/models) or another overlay on top of it
    assert k["resources"][0] in ("../../base", "../multi-model"), k["resources"]
    for path in k["resources"]:
        assert (K8S / "overlays" / overlay / path / "kustomization.yaml").is_file(), path
        assert re.fullmatch(r"\.\./\.\./base|\.\./\.\./models/[a-z0-9-]+|\.\./[a-z0-9-]+", path), path
    names = {(d["kind"], d["metadata"]["name"]) for d in base_resources()}
    for patch in k.get("patches", []):
        for d in docs(K8S / "overlays" / overlay / patch["path"]):
            assert (d["kind"], d["metadata"]["name"]) in names
            if d["kind"] == "ScaledObject":
                jsonschema.validate({**by_kind("ScaledObject", d["metadata"]["name"]), **{"spec": {
                    **by_kind("ScaledObject", d["metadata"]["name"])["spec"], **d["spec"]}}}, SCALED_OBJECT)  # fmt: skip


def test_gpu_worker_deployment_keeps_the_promises():
    w = by_kind("Deployment", "inpaint-worker")
    pod = w["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] > Settings(_env_file=None).job_time_limit_s  # type: ignore[call-arg]
    metrics_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
    assert metrics_port == Settings(_env_file=None).worker_metrics_port  # type: ignore[call-arg]
    assert c["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert "replicas" not in w["spec"]  # KEDA owns the count
    keda = by_kind("ScaledObject", "inpaint-worker")
    assert keda["spec"]["scaleTargetRef"]["name"] == "inpaint-worker"
    assert keda["spec"]["triggers"][0]["metadata"]["listName"] == INFERENCE_QUEUE
    assert by_kind("PodDisruptionBudget", "inpaint-worker")["spec"]["maxUnavailable"] == 1
    assert by_kind("HorizontalPodAutoscaler", "inpaint-api")["spec"]["scaleTargetRef"]["name"] == "inpaint-api"


def test_redis_sentinel_component_points_pods_and_keda_at_the_sentinels():
    resources = with_component(SENTINEL_COMPONENT)
    config = find(resources, "ConfigMap", "inpaint-config")
    kubernetes_validate.validate(config, K8S_VERSION, strict=True)
    data = config["data"]
    settings = Settings(_env_file=None, redis_sentinels=data["INPAINT_REDIS_SENTINELS"],  # type: ignore[call-arg]
                        redis_master=data["INPAINT_REDIS_MASTER"],
                        redis_wait_replicas=data["INPAINT_REDIS_WAIT_REPLICAS"])  # fmt: skip
    assert sentinel_addresses(settings.redis_sentinels) and settings.redis_wait_replicas == 1
    assert data.items() >= by_kind("ConfigMap", "inpaint-config")["data"].items()  # the base's keys kept

    keda = find(resources, "ScaledObject", "inpaint-worker")
    jsonschema.validate(keda, SCALED_OBJECT)
    (trigger,) = keda["spec"]["triggers"]
    (base,) = by_kind("ScaledObject", "inpaint-worker")["spec"]["triggers"]
    assert base["type"] == "redis" and trigger["type"] == "redis-sentinel"
    meta = trigger["metadata"]
    assert meta["listName"] == INFERENCE_QUEUE
    assert {k: meta[k] for k in ("listLength", "activationListLength", "databaseIndex")} == {
        k: base["metadata"][k] for k in ("listLength", "activationListLength", "databaseIndex")}  # fmt: skip
    # KEDA asks the Sentinels the pods ask, for the same primary, with the base's password
    assert sentinel_addresses(meta["addresses"]) == sentinel_addresses(settings.redis_sentinels)
    assert meta["sentinelMaster"] == settings.redis_master and "address" not in meta
    auth = by_kind("TriggerAuthentication", "inpaint-redis")
    assert trigger["authenticationRef"] == base["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"password"}  # Sentinels take none

    # the egress to the dependencies' namespace lets pods reach the Sentinels' port
    egress = by_kind("NetworkPolicy", "inpaint-egress")["spec"]["egress"]
    deps = next(r for r in egress if any(t.get("namespaceSelector", {}).get("matchLabels") for t in r["to"]))
    assert "ports" not in deps or 26379 in {p["port"] for p in deps["ports"]}
    readme = (SENTINEL_COMPONENT / "README.md").read_text()
    assert "components: [../../components/redis-sentinel]" in readme and "min-replicas-to-write 1" in readme


def kustomized(tmp_path: Path, component: str) -> list[dict[str, Any]]:
    """The base with `component`, as `kubectl kustomize` renders it in an overlay of a copy."""
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "with-component"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../base"], "components": [f"../../components/{component}"]}))  # fmt: skip
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) is not installed")
def test_redis_sentinel_component_renders_with_kustomize(tmp_path):
    """The same patches as kustomize itself applies them, in an overlay of the base."""
    rendered = kustomized(tmp_path, "redis-sentinel")
    expected = with_component(SENTINEL_COMPONENT)
    for kind, name in (("ConfigMap", "inpaint-config"), ("ScaledObject", "inpaint-worker")):
        assert find(rendered, kind, name)["spec" if kind == "ScaledObject" else "data"] == find(
            expected, kind, name)["spec" if kind == "ScaledObject" else "data"]  # fmt: skip
    assert find(rendered, "ScaledObject", "inpaint-worker")["spec"]["triggers"][0]["type"] == "redis-sentinel"


def compose_vars(node: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of the loaded file's values, in the forms compose.yaml uses: ${X},
    ${X:-default}, ${X:?error}, $$."""
    if isinstance(node, dict):
        return {k: compose_vars(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [compose_vars(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        value = env.get(m["name"], "")
        if m["op"] == ":?" and not value:
            raise KeyError(f"{m['name']}: {m['arg']}")
        return value or (m["arg"] if m["op"] == ":-" else "")

    return re.sub(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}", one, node)


def env_example(commented: bool) -> dict[str, str]:
    """.env.example's settings; `commented`: the ones left commented out (`#NAME=value`) instead."""
    out: dict[str, str] = {}
    for ln in (ROOT / ".env.example").read_text().splitlines():
        m = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", ln)
        if m and bool(m[1]) == commented:
            out[m[2]] = m[3]
    return out


def flags(command: list[str]) -> dict[str, list[str]]:
    """`--flag value...` of a command line, by flag."""
    out: dict[str, list[str]] = {}
    for arg in command[1:]:
        if arg.startswith("--"):
            out[arg] = []
        else:
            out[list(out)[-1]].append(arg)
    return out


HA_ENV = {  # what compose.yaml and .env.example tell an operator to set for the `ha` profile
    "COMPOSE_PROFILES": "ha",
    "REDIS_SENTINELS": "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379",
    "REDIS_WAIT_REPLICAS": "1",
    "REDIS_MIN_REPLICAS": "1",
}


def test_compose_ha_profile_runs_a_primary_two_replicas_and_three_sentinels(tmp_path):
    text = (ROOT / "compose.yaml").read_text()
    assert env_example(commented=True).items() >= HA_ENV.items()
    assert all(f"#   {k}={v}\n" in text for k, v in HA_ENV.items())
    c = compose_vars(yaml.safe_load(text), {**env_example(commented=False), **HA_ENV})
    s = c["services"]
    ha = sorted(n for n, svc in s.items() if svc.get("profiles") == ["ha"])
    assert ha == ["redis-replica-1", "redis-replica-2", "sentinel-1", "sentinel-2", "sentinel-3"]
    primary = flags(s["redis"]["command"])
    assert primary["--min-replicas-to-write"] == ["1"] and primary["--min-replicas-max-lag"] == ["5"]
    assert primary["--masterauth"] == primary["--requirepass"]
    for name in ("redis-replica-1", "redis-replica-2"):
        replica = s[name]
        f = flags(replica["command"])
        assert replica["image"] == s["redis"]["image"] and f["--replicaof"] == ["redis", "6379"]
        assert f["--replica-announce-ip"] == [name]  # the name the Sentinels hand out once it is promoted
        # it may become the primary: the primary's flags, min-replicas included
        assert {k: v for k, v in f.items() if k not in ("--replicaof", "--replica-announce-ip")} == {
            k: v for k, v in primary.items() if k != "--replica-announce-ip"}  # fmt: skip
        assert replica["healthcheck"] and replica["restart"] == "unless-stopped"
    # each Sentinel's file, as its command writes it
    master = Settings(_env_file=None).redis_master  # type: ignore[call-arg]
    sentinels = ("sentinel-1", "sentinel-2", "sentinel-3")
    for name in sentinels:
        sentinel = s[name]
        assert sentinel["image"] == s["redis"]["image"] and sentinel["restart"] == "unless-stopped"
        script = sentinel["command"][-1].replace("/data/", f"{tmp_path}/")
        script = script.replace("exec docker-entrypoint.sh redis-server", "exit 0 #")
        env = {"PATH": os.environ["PATH"], **sentinel["environment"]}
        subprocess.run(["sh", "-c", script], check=True, env=env, timeout=10)
        conf = (tmp_path / "sentinel.conf").read_text().splitlines()
        # Sentinel rewrites its file (its id, the primary now): a restart keeps it
        (tmp_path / "sentinel.conf").write_text("rewritten by Sentinel\n")
        subprocess.run(["sh", "-c", script], check=True, env=env, timeout=10)
        assert (tmp_path / "sentinel.conf").read_text() == "rewritten by Sentinel\n"
        (tmp_path / "sentinel.conf").unlink()
        assert conf.index("sentinel resolve-hostnames yes") < conf.index(f"sentinel monitor {master} redis 6379 2")
        assert {"port 26379", "sentinel announce-hostnames yes", f"sentinel announce-ip {name}",
                f"sentinel auth-pass {master} {primary['--requirepass'][0]}",
                f"sentinel down-after-milliseconds {master} 5000"} <= set(conf)  # fmt: skip
        assert "--sentinel" in sentinel["command"][-1]
    volumes = [svc["volumes"][0].split(":")[0] for n, svc in s.items() if n in ha or n == "redis"]
    assert len(set(volumes)) == 6 and set(volumes) <= set(c["volumes"])
    # every application process finds the primary through those Sentinels and waits for a replica
    for name in ("api", "worker", "webhooks"):
        env = s[name]["environment"]
        settings = Settings(_env_file=None, redis_sentinels=env["INPAINT_REDIS_SENTINELS"],  # type: ignore[call-arg]
                            redis_wait_replicas=env["INPAINT_REDIS_WAIT_REPLICAS"])  # fmt: skip
        assert sentinel_addresses(settings.redis_sentinels) == [(n, 26379) for n in sentinels]
        assert settings.redis_wait_replicas == 1


def test_compose_default_is_one_redis_and_no_sentinels():
    raw = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert raw["x-common"]["environment"]["INPAINT_REDIS_SENTINELS"] == "${REDIS_SENTINELS:-}"
    assert raw["x-common"]["environment"]["INPAINT_REDIS_WAIT_REPLICAS"] == "${REDIS_WAIT_REPLICAS:-0}"
    assert not env_example(commented=False).keys() & HA_ENV.keys()  # commented out: opt-in
    c = compose_vars(raw, env_example(commented=False))
    s = c["services"]
    default = {n for n, svc in s.items() if "profiles" not in svc}
    assert default == {"redis", "s3", "api", "worker", "webhooks"}
    assert flags(s["redis"]["command"])["--min-replicas-to-write"] == ["0"]  # writes never wait for a replica
    assert "--replicaof" not in flags(s["redis"]["command"])
    for name in ("api", "worker", "webhooks"):
        env = s[name]["environment"]
        assert env["INPAINT_REDIS_SENTINELS"] == "" and env["INPAINT_REDIS_WAIT_REPLICAS"] == "0"
        assert env["INPAINT_REDIS_URL"].endswith("@redis:6379/0")
        assert s[name]["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_compose_file():
    c = yaml.safe_load((ROOT / "compose.yaml").read_text())
    s = c["services"]
    assert {"redis", "s3", "api", "worker", "webhooks", "prometheus", "grafana"} <= set(s)
    assert "minio" not in (ROOT / "compose.yaml").read_text().lower()
    assert "--appendonly" in s["redis"]["command"] and "noeviction" in s["redis"]["command"]
    assert (
        "--requirepass" in s["redis"]["command"]
        and "${REDIS_PASSWORD" in c["x-common"]["environment"]["INPAINT_REDIS_URL"]
    )
    assert "healthcheck" in s["redis"] and "healthcheck" in s["api"]
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert s["prometheus"]["profiles"] == ["monitoring"] and s["grafana"]["profiles"] == ["monitoring"]
    # every variable compose requires is in .env.example; no secret is written in compose itself
    text = (ROOT / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = {
        ln.split("=", 1)[0]
        for ln in (ROOT / ".env.example").read_text().splitlines()
        if "=" in ln and not ln.startswith("#")
    }
    assert required and required <= example
    assert not re.search(r"^\s+[A-Z_]*(SECRET|PASSWORD)[A-Z_]*:\s+[^$\s]", text, re.M)


def test_dashboard_queries_use_metrics_we_export():
    from shared import metrics as m

    # the service-wide ones (ClusterCollector); tests/test_deploy_models.py reads the per-model ones from Redis
    exported = {"inpaint_jobs_submitted_total", "inpaint_jobs_finished_total", "inpaint_webhook_deliveries_total",
                "inpaint_queue_jobs_waiting", "inpaint_queue_oldest_age_seconds", "inpaint_queue_messages",
                "inpaint_workers_ready", "inpaint_model_jobs_waiting", "inpaint_model_oldest_age_seconds",
                "inpaint_model_workers_ready"}  # fmt: skip
    for metric in (m.INFERENCE_SECONDS, m.BATCH_SIZE, m.QUEUE_WAIT, m.IMAGES, m.JOBS_ENDED, m.GPU_MEMORY):
        for fam in metric.collect():
            exported |= {s.name for s in fam.samples} | {fam.name}
    exported |= {f"{n}_bucket" for n in ("inpaint_worker_inference_seconds", "inpaint_worker_batch_size",
                                          "inpaint_worker_queue_wait_seconds")}  # fmt: skip
    dash = json.loads((ROOT / "infra" / "grafana" / "dashboards" / "inpaint.json").read_text())
    used = {name for p in dash["panels"] for t in p["targets"] for name in re.findall(r"inpaint_[a-z_]+", t["expr"])}
    assert used and used <= exported, used - exported


def test_images_run_as_non_root_with_healthchecks():
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "infra" / "docker" / name).read_text()
        assert re.search(r"^USER 10001$", text, re.M) and "HEALTHCHECK" in text
    assert "inpaint model fetch" in (ROOT / "infra" / "docker" / "worker.Dockerfile").read_text()
    assert "torch" not in (ROOT / "infra" / "docker" / "api.Dockerfile").read_text().replace("no torch", "")
