"""The deployment paths as the docs give them, checked without a GPU or a cluster: one compose worker
per GPU, each on its own device; the NetworkPolicy component for a managed Redis and S3 on private
addresses; the weights fetched with HF_HUB_OFFLINE off; Docker installed only for the compose test;
`inpaint up` saying where `inpaint` is; every deployment running production, `inpaint up` development."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stack.cli import compose_gpu_workers, main
from stack.up import _path_hint
from tests.test_deploy import K8S, K8S_VERSION, base_resources, compose_vars, find, kustomized, with_component

ROOT = Path(__file__).resolve().parents[1]
MANAGED_DEPS = K8S / "components" / "managed-deps"


def gpus_override(gpus: int, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["compose-gpus", str(gpus), "--file", str(ROOT / "compose.yaml")]) == 0
    return capsys.readouterr().out


def device_ids(service: dict[str, Any]) -> list[str]:
    """The GPUs Docker gives a service: `device_ids` as written, `count: N` as devices 0 … N-1
    (moby, daemon/nvidia_linux.go: countToDevices)."""
    requests = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    ids: list[str] = []
    for req in requests:
        assert req["driver"] == "nvidia" and "gpu" in req["capabilities"]
        assert not ("count" in req and "device_ids" in req), req  # Docker refuses both in one request
        ids += req.get("device_ids") or [str(i) for i in range(int(req.get("count", 0)))]
    return ids


def test_compose_gpus_gives_each_worker_its_own_gpu(capsys):
    text = gpus_override(4, capsys)
    override = yaml.safe_load(text)
    assert "compose.gpus.yaml" in text.split("services:")[0]  # the header says how to use it
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    worker = compose["services"]["worker"]
    workers = {"worker": worker, **override["services"]}
    assert list(workers) == ["worker", "worker-1", "worker-2", "worker-3"]
    assert [device_ids(w) for w in workers.values()] == [["0"], ["1"], ["2"], ["3"]]
    for name, service in override["services"].items():
        # a copy of compose.yaml's worker (image, command, environment, volumes, grace period) but its GPU,
        # answering to the name Prometheus scrapes
        assert {k: v for k, v in service.items() if k not in ("deploy", "networks")} == {
            k: v for k, v in worker.items() if k != "deploy"
        }, name
        assert service["networks"] == {"default": {"aliases": ["worker"]}}
    prometheus = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "inpaint-worker")
    assert job["dns_sd_configs"][0]["names"] == ["worker"]
    # one GPU: compose.yaml alone, the override adds nothing
    assert yaml.safe_load(gpus_override(1, capsys)) == {"services": {}}
    assert compose_gpu_workers(compose, 2)["services"].keys() == {"worker-1"}


def test_compose_gpus_refuses_a_count_below_one_and_a_missing_file(capsys, tmp_path):
    assert main(["compose-gpus", "0", "--file", str(ROOT / "compose.yaml")]) == 2
    assert main(["compose-gpus", "2", "--file", str(tmp_path / "compose.yaml")]) == 2
    err = capsys.readouterr().err
    assert "1 or more" in err and "--file" in err


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_merges_the_override_into_one_gpu_per_worker(capsys, tmp_path):
    """docker-compose's own merge of compose.yaml and the override (no engine needed): every worker,
    and nothing else, holds one GPU, each a different one."""
    shutil.copy2(ROOT / "compose.yaml", tmp_path / "compose.yaml")
    shutil.copy2(ROOT / ".env.example", tmp_path / ".env")
    (tmp_path / "compose.gpus.yaml").write_text(gpus_override(8, capsys))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    out = subprocess.run(["docker-compose", "-f", "compose.yaml", "-f", "compose.gpus.yaml", "config"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    # the services of the default profile (a model's workers under `sdxl`/`flux` have GPUs of their own)
    gpus = {name: device_ids(s) for name, s in services.items() if device_ids(s) and not s.get("profiles")}
    assert gpus == {"worker": ["0"], **{f"worker-{i}": [str(i)] for i in range(1, 8)}}
    for name in gpus:
        merged = services[name]
        assert merged["image"] == services["worker"]["image"] and merged["command"] == ["inpaint", "worker"]
        assert merged["environment"] == services["worker"]["environment"]
        assert merged["volumes"] == services["worker"]["volumes"]


def egress_rules(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return find(resources, "NetworkPolicy", "inpaint-egress")["spec"]["egress"]


def reaches(rules: list[dict[str, Any]], address: str, port: int) -> bool:
    """Whether a pod may connect to address:port outside the cluster (namespace and pod peers name
    pods, not such addresses)."""
    ip = ipaddress.ip_address(address)
    for rule in rules:
        if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
            continue
        for peer in rule.get("to", []):
            block = peer.get("ipBlock")
            if (
                block
                and ip in ipaddress.ip_network(block["cidr"])
                and not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
            ):
                return True
    return False


def component_cidrs() -> dict[int, list[str]]:
    """The CIDRs the component's patch opens, by port."""
    ops = yaml.safe_load((MANAGED_DEPS / "egress.yaml").read_text())
    out: dict[int, list[str]] = {}
    for op in ops:
        assert op["op"] == "add" and op["path"] == "/spec/egress/0"
        for port in op["value"]["ports"]:
            out.setdefault(port["port"], []).extend(peer["ipBlock"]["cidr"] for peer in op["value"]["to"])
    return out


def test_managed_deps_component_opens_the_configured_cidrs_on_their_ports_only():
    cidrs = component_cidrs()
    assert set(cidrs) == {6379, 443}
    redis = str(next(ipaddress.ip_network(cidrs[6379][0]).hosts()))
    s3 = str(next(ipaddress.ip_network(cidrs[443][0]).hosts()))
    assert ipaddress.ip_address(redis).is_private and ipaddress.ip_address(s3).is_private

    base = egress_rules(base_resources())
    assert not reaches(base, redis, 6379) and not reaches(base, s3, 443)  # what the component is for

    resources = with_component(MANAGED_DEPS)
    policy = find(resources, "NetworkPolicy", "inpaint-egress")
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    rules = policy["spec"]["egress"]
    assert rules[len(rules) - len(base) :] == base  # the base's rules, unchanged
    assert reaches(rules, redis, 6379) and reaches(rules, s3, 443)
    assert not reaches(rules, redis, 22) and not reaches(rules, redis, 443) and not reaches(rules, s3, 6379)
    assert not reaches(rules, "10.200.0.1", 6379)  # the rest of the private ranges stays closed
    assert not reaches(rules, "169.254.169.254", 80)  # and the metadata address
    assert reaches(rules, "52.216.0.1", 443)  # public addresses as before (S3's public endpoints)
    assert "components: [../../components/managed-deps]" in (MANAGED_DEPS / "README.md").read_text()
    assert "components/managed-deps" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) is not installed")
def test_managed_deps_component_renders_with_kustomize(tmp_path):
    rendered = kustomized(tmp_path, "managed-deps")
    assert egress_rules(rendered) == egress_rules(with_component(MANAGED_DEPS))


def test_every_weights_fetch_we_show_turns_hf_hub_offline_off():
    """The worker image sets HF_HUB_OFFLINE=1 (a worker never downloads); a fetch run in it must say 0."""
    dockerfile = (ROOT / "infra" / "docker" / "worker.Dockerfile").read_text()
    assert re.search(r"^ENV .*HF_HUB_OFFLINE=1", dockerfile, re.M)
    shown = [
        line
        for path in ("infra/docker/worker.Dockerfile", "compose.yaml", "docs/deploy.md")
        for line in (ROOT / path).read_text().splitlines()
        if re.search(r"docker (compose )?run .*inpaint model fetch|RUN .*inpaint model fetch", line)
    ]
    assert len(shown) >= 4, shown
    for line in shown:
        assert "HF_HUB_OFFLINE=0" in line, line
    job = next(d for d in yaml.safe_load_all((K8S / "base" / "worker.yaml").read_text()) if d["kind"] == "Job")
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_HUB_OFFLINE"] == "0"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_installs_docker_only_when_the_compose_test_runs():
    # Run under `make test INPAINT_SKIP_COMPOSE=1`, make hands the variable to child makes in MAKEFLAGS.
    drop = ("INPAINT_SKIP_COMPOSE", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKELEVEL")
    env = {k: v for k, v in os.environ.items() if k not in drop}

    def planned(*args: str) -> str:
        out = subprocess.run(["make", "-n", "test", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "docker.io" in planned()
    assert "docker.io" not in planned("INPAINT_SKIP_COMPOSE=1")
    assert "pytest" in planned("INPAINT_SKIP_COMPOSE=1")


def test_inpaint_up_says_how_to_reach_inpaint_when_it_is_not_on_path(tmp_path, monkeypatch):
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "inpaint", "activate"):
        (bin_dir / name).write_text("")
    (bin_dir / "inpaint").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    python = str(bin_dir / "python")
    hint = _path_hint(python, path="/usr/bin:/bin")
    assert hint.split() == ["commands", ".venv/bin/inpaint", "(not", "on", "PATH:", "`source",
                            ".venv/bin/activate`", "puts", "it", "first)"]  # fmt: skip
    assert _path_hint(python, path=f"{bin_dir}:/usr/bin") == ""  # activated: nothing to say
    other = tmp_path / "other"
    other.mkdir()
    (other / "inpaint").write_text("")
    (other / "inpaint").chmod(0o755)
    assert f"PATH finds {other / 'inpaint'} first" in _path_hint(python, path=f"{other}:{bin_dir}")
    (bin_dir / "activate").unlink()
    assert "add .venv/bin to PATH" in _path_hint(python, path="/usr/bin")
    (bin_dir / "inpaint").unlink()
    assert _path_hint(python, path="/usr/bin") == ""  # run from a checkout (python -m stack.cli): no script


def test_every_deployment_runs_production_and_inpaint_up_says_development(tmp_path, monkeypatch, capsys):
    """The production guard checks nothing in development: what we ship must not start there by default."""
    for image in ("api", "worker"):
        dockerfile = (ROOT / "infra" / "docker" / f"{image}.Dockerfile").read_text()
        assert re.search(r"^ENV .*\bINPAINT_ENVIRONMENT=production\b", dockerfile, re.M), image
    common = yaml.safe_load((ROOT / "compose.yaml").read_text())["x-common"]["environment"]
    assert compose_vars(common["INPAINT_ENVIRONMENT"], {}) == "production"  # unless .env says otherwise
    resources = base_resources()
    assert find(resources, "ConfigMap", "inpaint-config")["data"]["INPAINT_ENVIRONMENT"] == "production"
    for name in ("inpaint-api", "inpaint-worker", "inpaint-webhooks"):
        pod = find(resources, "Deployment", name)["spec"]["template"]["spec"]
        assert {"configMapRef": {"name": "inpaint-config"}} in pod["containers"][0]["envFrom"], name
    # The API port is open to everyone: no NetworkPolicy rule pretends it is for monitoring only.
    metrics = find(resources, "NetworkPolicy", "inpaint-metrics-ingress")["spec"]["ingress"]
    assert {p["port"] for rule in metrics for p in rule["ports"]} == {9100, 9101}

    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("INPAINT_ENVIRONMENT", raising=False)
    monkeypatch.setattr("stack.up.run_up", lambda s: 0 if s.environment == "development" else 1)
    from shared.config import get_settings

    get_settings.cache_clear()
    try:
        assert main(["up"]) == 0
    finally:
        get_settings.cache_clear()
    assert "environment: development" in capsys.readouterr().out
