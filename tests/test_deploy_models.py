"""Several models on one fleet, as deployed: each served model has its own workers on its own queue, in
Kubernetes (one Deployment and one KEDA ScaledObject per model, stamped from one component) and in
compose (a worker service per model under a profile), and the dashboard shows each model's queue.
The queues are computed with the functions the API and the workers use (shared.catalog, shared.queue)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from shared import catalog
from shared.config import Settings
from shared.metrics import ClusterCollector
from shared.queue import INFERENCE_QUEUE, lane_queue
from tests.test_deploy import K8S, K8S_VERSION, ROOT, SCALED_OBJECT, compose_vars, env_example, find
from workers.models import locks
from workers.models.presets import LicenceNotAccepted, check_licence

MODELS_DIR = K8S / "models"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) is not installed")


def render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a pod or container gets from these variables (INPAINT_*)."""
    fields = {k.removeprefix("INPAINT_").lower(): v for k, v in env.items() if k.startswith("INPAINT_")}
    keep = {"models", "model", "accept_licenses"}
    return Settings(_env_file=None, **{k: v for k, v in fields.items() if k in keep})  # type: ignore[call-arg]


def container_env(deployment: dict[str, Any], config: dict[str, str]) -> dict[str, str]:
    """The ConfigMap's variables with the container's own `env` over them (what the pod sees)."""
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    return {**config, **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}}


def selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return selector.items() <= labels.items()


def workers_by_model(resources: list[dict[str, Any]], config: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in resources:
        if d["kind"] == "Deployment" and d["spec"]["template"]["spec"]["containers"][0]["command"] == [
            "inpaint", "worker"]:  # fmt: skip
            out.setdefault(container_env(d, config)["INPAINT_MODEL"], []).append(d)
    return out


@needs_kubectl
@pytest.mark.parametrize("overlay", ["multi-model", "multi-model-flux"])
def test_each_served_model_has_one_worker_deployment_and_one_scaler_on_its_own_queue(overlay):
    resources = render(K8S / "overlays" / overlay)
    for d in resources:  # strictly valid, as the base is
        if d["kind"] == "ScaledObject":
            jsonschema.validate(d, SCALED_OBJECT)
        elif not d["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    assert "MODEL" not in json.dumps(resources).replace("INPAINT_MODEL", "")  # every placeholder replaced
    config = find(resources, "ConfigMap", "inpaint-config")["data"]
    settings = settings_of(config)
    served = catalog.served(settings)
    workers = workers_by_model(resources, config)
    assert set(workers) == {m.name for m in served} and len(served) >= 2
    scalers = [d for d in resources if d["kind"] == "ScaledObject"]
    assert len(scalers) == len(served)
    queues = set()
    for name, (deployment,) in workers.items():  # one Deployment per model
        env = container_env(deployment, config)
        assert settings_of(env).model_list() == settings.model_list()  # every pod reads the same list
        model = catalog.worker_model(settings_of(env))
        queue = lane_queue(catalog.lane(model, settings))
        (scaler,) = [s for s in scalers if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        assert scaler["spec"]["triggers"][0]["metadata"]["listName"] == queue
        queues.add(queue)
        check_licence(settings_of(env), model)  # a restricted licence is served only where it is accepted
        pdbs = [p for p in resources if p["kind"] == "PodDisruptionBudget"
                and selects(p["spec"]["selector"]["matchLabels"], deployment)]  # fmt: skip
        assert len(pdbs) == 1  # more than one would make every eviction of its pods fail
        others = [w for (w,) in workers.values() if w is not deployment]
        assert not any(selects(deployment["spec"]["selector"]["matchLabels"], w) for w in others)
        if model == catalog.default(settings):  # the base's worker, as single-model deployments have it
            assert deployment["metadata"]["name"] == "inpaint-worker" and queue == INFERENCE_QUEUE
            assert scaler["spec"]["minReplicaCount"] >= 1
        else:
            assert deployment["metadata"]["name"] == f"inpaint-worker-{name}"
            assert scaler["spec"]["minReplicaCount"] == 0  # scaled from zero
            assert deployment["metadata"]["labels"]["inpaint.dev/model"] == name
            fetch_job_writes_the_lock_the_worker_reads(resources, deployment, name)
    assert len(queues) == len(served)


def fetch_job_writes_the_lock_the_worker_reads(resources: list[dict[str, Any]], worker: dict[str, Any], name: str):
    """`inpaint model fetch NAME` pins SDXL and FLUX in a lock beside the weights: the Job writes it on
    the volume, and the worker, mounting that volume as its Hugging Face cache, reads the same file."""
    job = find(resources, "Job", f"inpaint-model-fetch-{name}")["spec"]["template"]["spec"]
    fetch = job["containers"][0]
    assert fetch["command"] == ["inpaint", "model", "fetch", name]
    job_env = {e["name"]: e.get("value") for e in fetch["env"]}
    (job_mount,) = fetch["volumeMounts"]
    job_lock = locks.lock_path(Settings(_env_file=None, hf_cache_dir=job_env["INPAINT_HF_CACHE_DIR"]), name)  # type: ignore[call-arg]
    on_volume = job_lock.relative_to(job_mount["mountPath"])
    c = worker["spec"]["template"]["spec"]["containers"][0]
    worker_env = {e["name"]: e.get("value") for e in c["env"]}
    worker_lock = locks.lock_path(Settings(_env_file=None, hf_cache_dir=worker_env["INPAINT_HF_CACHE_DIR"]), name)  # type: ignore[call-arg]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == job_mount["name"]]
    assert mount["readOnly"] and worker_lock.relative_to(mount["mountPath"]) == on_volume


@needs_kubectl
def test_flux_is_served_only_where_its_licence_is_accepted():
    plain = render(K8S / "overlays" / "multi-model")
    config = find(plain, "ConfigMap", "inpaint-config")["data"]
    assert "INPAINT_ACCEPT_LICENSES" not in config and catalog.FLUX not in workers_by_model(plain, config)
    with pytest.raises(LicenceNotAccepted):
        check_licence(settings_of(config), catalog.MODELS[catalog.FLUX])
    text = (K8S / "overlays" / "multi-model-flux" / "config.yaml").read_text()
    assert "THE OPERATOR'S DECISION" in text and "Non-Commercial" in text


@needs_kubectl
def test_every_model_directory_names_only_its_model():
    for path in sorted(MODELS_DIR.iterdir()):
        k = yaml.safe_load((path / "kustomization.yaml").read_text())
        assert k["components"] == ["../../components/model-worker"]
        (gen,) = k["configMapGenerator"]
        assert gen["name"] == path.name and catalog.find(path.name) is not None
        assert gen["options"]["annotations"] == {"config.kubernetes.io/local-config": "true"}
        resources = render(path)
        assert {d["metadata"]["name"] for d in resources} == {f"inpaint-worker-{path.name}",
                                                             f"inpaint-model-fetch-{path.name}"}  # fmt: skip
        assert all(d["metadata"]["namespace"] == "inpaint" for d in resources)
        assert all(d["metadata"]["labels"]["inpaint.dev/model"] == path.name for d in resources)
        assert not any(d["kind"] == "ConfigMap" for d in resources)  # the name only, never applied


@needs_kubectl
def test_redis_sentinel_component_reaches_every_models_scaler(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "sentinel"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["../multi-model-flux"], "components": ["../../components/redis-sentinel"]}))  # fmt: skip
    scalers = [d for d in render(overlay) if d["kind"] == "ScaledObject"]
    assert len(scalers) == 3
    for s in scalers:
        jsonschema.validate(s, SCALED_OBJECT)
        (trigger,) = s["spec"]["triggers"]
        assert trigger["type"] == "redis-sentinel" and trigger["metadata"]["listName"].startswith(INFERENCE_QUEUE)


MODEL_PROFILES = {"worker-sdxl": ("sdxl", catalog.SDXL), "worker-flux": ("flux", catalog.FLUX)}


def test_compose_runs_each_extra_model_under_its_profile_and_nothing_changes_by_default():
    raw = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert raw["x-common"]["environment"]["INPAINT_MODELS"] == "${INPAINT_MODELS:-}"
    # by default: the same services, and the API serves the worker's model alone, on queue `inpaint`
    plain = compose_vars(raw, env_example(commented=False))
    assert {n for n, s in plain["services"].items() if "profiles" not in s} == {"redis", "s3", "api", "worker",
                                                                               "webhooks"}  # fmt: skip
    api = settings_of({**plain["services"]["api"]["environment"], "INPAINT_MODEL": catalog.SD2})  # the image's
    assert [m.name for m in catalog.served(api)] == [catalog.SD2]
    for name, (_, model) in MODEL_PROFILES.items():  # a profile started without INPAINT_MODELS: never `inpaint`
        alone = settings_of(plain["services"][name]["environment"])
        assert lane_queue(catalog.lane(catalog.worker_model(alone), alone)) == f"{INFERENCE_QUEUE}.{model}"
    # every model, as .env.example's commented lines say (FLUX's licence accepted on purpose here)
    env = {**env_example(commented=False), **env_example(commented=True)}
    env["INPAINT_MODELS"] = f"{catalog.SD2},{catalog.SDXL},{catalog.FLUX}"
    s = compose_vars(raw, env)["services"]
    served = catalog.served(settings_of(s["api"]["environment"]))
    queues = {lane_queue(catalog.lane(catalog.worker_model(settings_of({
        "INPAINT_MODEL": catalog.SD2, **s["worker"]["environment"]})), settings_of(s["api"]["environment"])))}  # fmt: skip
    gpus = {tuple(s["worker"]["deploy"]["resources"]["reservations"]["devices"][0].get("device_ids", ["0"]))}
    for name, (profile, model) in MODEL_PROFILES.items():
        svc = s[name]
        assert svc["profiles"] == [profile] and svc["command"] == ["inpaint", "worker"]
        settings = settings_of(svc["environment"])
        assert settings.model == model and settings.model_list() == [m.name for m in served]
        queue = lane_queue(catalog.lane(catalog.worker_model(settings), settings))
        assert queue == f"{INFERENCE_QUEUE}.{model}" and queue not in queues
        queues.add(queue)
        (gpu,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["driver"] == "nvidia" and "count" not in gpu and tuple(gpu["device_ids"]) not in gpus
        gpus.add(tuple(gpu["device_ids"]))
        assert svc["image"] == s["worker"]["image"] and svc["volumes"] == s["worker"]["volumes"]
        assert svc["networks"] == {"default": {"aliases": ["worker"]}}  # scraped with the other workers
        # the fetch shown writes its lock beside the weights, on the volume this worker reads them from
        image_env = dict(
            re.findall(r"(INPAINT_HF_CACHE_DIR)=(\S+)", (ROOT / "infra/docker/worker.Dockerfile").read_text())
        )
        lock = locks.lock_path(
            settings.model_copy(update={"hf_cache_dir": Path(image_env["INPAINT_HF_CACHE_DIR"])}), model
        )
        assert any(lock.is_relative_to(v.split(":")[1]) for v in svc["volumes"])
        fetch = "docker compose run --rm --no-deps -e HF_HUB_OFFLINE=0 "
        assert re.search(re.escape(fetch) + r"(-e HF_TOKEN )?" + f"{name} inpaint model fetch {model}\n",
                         (ROOT / "compose.yaml").read_text())  # fmt: skip
    # FLUX's worker refuses to start until the operator accepts its licence in .env
    no_licence = compose_vars(raw, {**env, "INPAINT_ACCEPT_LICENSES": ""})["services"]["worker-flux"]
    with pytest.raises(LicenceNotAccepted):
        check_licence(settings_of(no_licence["environment"]), catalog.MODELS[catalog.FLUX])
    check_licence(settings_of(s["worker-flux"]["environment"]), catalog.MODELS[catalog.FLUX])


def test_dashboard_shows_each_models_queue_from_metrics_we_export(redis_server):
    """The per-model panels query families that ClusterCollector (every API replica's /metrics) yields,
    with the `model` label they group by; one value per model, however many replicas report it."""
    settings = settings_of({"INPAINT_MODELS": f"{catalog.SD2},{catalog.SDXL}"})
    lanes = {m.name: catalog.lane(m, settings) for m in catalog.served(settings)}
    r = redis.Redis.from_url(redis_server.url, db=31, decode_responses=True)
    families = {f.name: f for f in ClusterCollector(r, lanes).collect()}
    dash = json.loads((ROOT / "infra" / "grafana" / "dashboards" / "inpaint.json").read_text())
    per_model = [t["expr"] for p in dash["panels"] for t in p["targets"] if "model" in t["expr"]]
    assert len(per_model) == 3
    for expr in per_model:
        (name,) = re.findall(r"inpaint_[a-z_]+", expr)
        assert name in families and re.fullmatch(rf"max by \(model\) \({name}\)", expr), expr
        assert {s.labels["model"] for s in families[name].samples} == set(lanes)
