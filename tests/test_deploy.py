"""Deployment files, checked offline: Kubernetes manifests against the API schemas (strict), KEDA's
ScaledObject against the fields of its CRD we use, kustomize references, compose and the dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.config import Settings
from shared.queue import INFERENCE_QUEUE

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
K8S_VERSION = "1.33"

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
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {"type": {"const": "redis"},
                                   "authenticationRef": {"type": "object", "required": ["name"],
                                                         "additionalProperties": False,
                                                         "properties": {"name": {"type": "string"}}},
                                   "metadata": {
                        "type": "object", "required": ["address", "listName", "listLength"],
                        "additionalProperties": {"type": "string"}}}}},
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
    assert k["resources"] == ["../../base"]
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

    exported = {"inpaint_jobs_submitted_total", "inpaint_jobs_finished_total", "inpaint_webhook_deliveries_total",
                "inpaint_queue_jobs_waiting", "inpaint_queue_oldest_age_seconds", "inpaint_queue_messages",
                "inpaint_workers_ready"}  # fmt: skip
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
