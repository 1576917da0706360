"""The `inpaint` command: run the stack or its parts, manage keys and weights, write the compose override
for more GPUs, and act as a client."""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

from inpaint_client.cli import add_commands as add_client_commands


def _settings():  # type: ignore[no-untyped-def]
    from shared.config import get_settings

    return get_settings()


def cmd_up(args: argparse.Namespace) -> int:
    from stack.up import run_up

    s = _settings()
    # The local start keeps the settings' default (development) unless INPAINT_ENVIRONMENT says otherwise;
    # the images, compose and Kubernetes run production.
    note = "the local default; images and deployments run production" if s.environment == "development" else "set"
    print(f"environment: {s.environment} (INPAINT_ENVIRONMENT, {note})", flush=True)
    return run_up(s)


KEEP_ALIVE_S = 75


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    s = _settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host or s.api_host,
        port=args.port or s.api_port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
        # Longer than the idle expiry of clients' pools (httpx: 5 s, uvicorn's own default too) and of load
        # balancers (60 s): a client that reuses a kept-alive connection must never send its request into
        # one the server is closing at that instant (the request is lost unanswered, a ReadError).
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from shared import catalog
    from workers.models.presets import ModelUnavailable, check_available

    s = _settings()
    # Fail here, in the parent, with a clear line, rather than in a child that Celery respawns forever.
    try:
        catalog.check_worker(s)
        name = check_available(s)
    except (ModelUnavailable, catalog.UnknownModel) as exc:
        raise SystemExit(f"inpaint worker: {exc}") from None
    if name not in ("classical", "sim"):
        from workers.models.loading import pick_device
        from workers.models.precision import PrecisionUnavailable, check_precision

        try:
            check_precision(s.precision, pick_device(s.device))
        except PrecisionUnavailable as exc:
            raise SystemExit(f"inpaint worker: {exc}") from None
    from shared.queue import lane_queue
    from workers.app import app
    from workers.gpu import tasks  # noqa: F401 - registers the task and the pipeline loader

    # One model per worker: it consumes only its model's queue (the default model's is `inpaint`).
    queue = lane_queue(catalog.lane(catalog.worker_model(s), s))
    app.worker_main([
        "worker", "-Q", queue, "--pool", "prefork", "--concurrency", str(args.concurrency),
        "-n", f"inference-{args.name}@%h", "--loglevel", args.log_level.upper(), "--without-gossip", "--without-mingle",
    ])  # fmt: skip
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    from shared import tracing
    from shared.config import get_settings
    from shared.metrics import serve
    from workers.app import app
    from workers.io import tasks  # noqa: F401 - registers the delivery and batch-step tasks

    serve(get_settings().webhooks_metrics_port, get_settings().metrics_host)
    tracing.setup("webhooks", celery=True)  # the threads pool runs tasks in this very process

    # Deliveries are network waits: threads, many at once, no model in memory.
    app.worker_main([
        "worker", "-Q", "webhooks", "--pool", "threads", "--concurrency", str(args.concurrency),
        "-n", f"webhooks-{args.name}@%h", "--loglevel", args.log_level.upper(), "--without-gossip", "--without-mingle",
    ])  # fmt: skip
    return 0


def _keystore():  # type: ignore[no-untyped-def]
    from shared.auth import KeyStore
    from shared.db import connect

    return KeyStore(connect(_settings()))


def cmd_keys_create(args: argparse.Namespace) -> int:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.tenant):
        print("error: a tenant is 1-64 letters, digits, '_', '.' or '-'", file=sys.stderr)
        return 2
    info, key = _keystore().create(args.tenant)
    print(f"id: {info.id}\nkey: {key}")
    print(f"(tenant {args.tenant}; the key is shown once, only its hash is stored)", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    import datetime

    for info in _keystore().list(args.tenant):
        made = datetime.datetime.fromtimestamp(info.created_at, datetime.UTC).isoformat(timespec="seconds")
        print(f"{info.id}\t{info.tenant}\t{made}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    ok = _keystore().revoke(args.id)
    print("revoked" if ok else "no such key", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_model_fetch(args: argparse.Namespace) -> int:
    from shared import catalog
    from workers.models.fixtures import FIXTURES, ensure_fixture
    from workers.models.locks import lock_path
    from workers.models.presets import FILES, fetch_model

    s = _settings()
    model = catalog.find(args.name)
    if model is not None and model.name in FIXTURES:
        print(ensure_fixture(model.name, s.data_dir / "models")[0])
        return 0
    if model is None or model.name not in FILES:
        print(f"error: unknown model {args.name!r} ({', '.join([*FILES, *FIXTURES])})", file=sys.stderr)
        return 2
    try:
        path, lock = fetch_model(s, model.name)
    except Exception as exc:  # noqa: BLE001 - offline, auth, licence, disk: one clear line
        print(f"error: could not fetch {model.repo}@{model.revision or 'main'}: {exc}", file=sys.stderr)
        return 1
    print(f"{model.repo}@{lock.revision} is in {path}; workers serve this revision ({lock_path(s, model.name)})")
    print(f"its weights come under their own licence, {model.licence} ({model.licence_url}): "
          "read its use restrictions before serving it")  # fmt: skip
    return 0


def compose_gpu_workers(compose: dict[str, Any], gpus: int) -> dict[str, Any]:
    """A compose override: `worker-N`, a copy of compose.yaml's `worker`, on GPU N for N = 1 … gpus-1.
    `worker` keeps GPU 0: Docker gives its `count: 1` device 0 (and so would to every replica of it)."""
    worker = compose["services"]["worker"]
    services: dict[str, Any] = {}
    for gpu in range(1, gpus):
        service = copy.deepcopy(worker)
        reservations = service["deploy"]["resources"]["reservations"]
        reservations["devices"] = [{"driver": "nvidia", "device_ids": [str(gpu)], "capabilities": ["gpu"]}]
        # the name Prometheus looks up (infra/prometheus/prometheus.yml) answers for every worker
        service["networks"] = {"default": {"aliases": ["worker"]}}
        services[f"worker-{gpu}"] = service
    return {"services": services}


def cmd_compose_gpus(args: argparse.Namespace) -> int:
    import yaml

    if args.gpus < 1:
        print("error: the number of GPUs is 1 or more", file=sys.stderr)
        return 2
    try:
        compose = yaml.safe_load(Path(args.file).read_text())
    except yaml.YAMLError as exc:
        print(f"error: {args.file} is not YAML: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc} (run it where compose.yaml is, or give --file)", file=sys.stderr)
        return 2
    try:
        workers = compose_gpu_workers(compose, args.gpus)
    except (KeyError, TypeError, AttributeError):
        print(f"error: {args.file} has no `worker` service with a GPU reservation to copy", file=sys.stderr)
        return 2
    f, out = args.file, "compose.gpus.yaml"
    print(f"# `inpaint compose-gpus {args.gpus}`: one worker per GPU, copies of the worker of {f}; make it again")
    print(f"# when that worker changes. `worker` has GPU 0, worker-N has GPU N. Saved as {out}:")
    print(f"#   docker compose -f {f} -f {out} up -d  (or COMPOSE_FILE={f}:{out} in .env)")
    print(yaml.safe_dump(workers, sort_keys=False, width=120), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inpaint", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="the whole stack on this machine").set_defaults(func=cmd_up)
    p = sub.add_parser("api", help="the HTTP API (uvicorn)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_api)
    for name, fn, conc in (("worker", cmd_worker, 1), ("webhooks", cmd_webhooks, 16)):
        p = sub.add_parser(
            name, help={"worker": "an inference worker", "webhooks": "the I/O worker: webhooks, batch steps"}[name]
        )
        p.add_argument("--concurrency", type=int, default=conc)
        p.add_argument("--name", default="1")
        p.add_argument("--log-level", default="info")
        p.set_defaults(func=fn)
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="print a new key's id and the key once; only its hash is stored")
    k.add_argument("--tenant", required=True)
    k.set_defaults(func=cmd_keys_create)
    k = keys.add_parser("list", help="key ids, tenants and creation times (never the keys)")
    k.add_argument("--tenant")
    k.set_defaults(func=cmd_keys_list)
    k = keys.add_parser("revoke", help="revoke a key by its id; every API replica refuses it at once")
    k.add_argument("id")
    k.set_defaults(func=cmd_keys_revoke)
    model = sub.add_parser("model", help="model weights").add_subparsers(dest="model_command", required=True)
    m = model.add_parser("fetch", help="download, verify and lock a model's weights in the local cache")
    m.add_argument("name", nargs="?", default="sd2-inpainting")
    m.set_defaults(func=cmd_model_fetch)
    p = sub.add_parser("compose-gpus", help="a compose override with one worker per GPU, on stdout")
    p.add_argument("gpus", type=int, help="how many GPUs this host has")
    p.add_argument("--file", default="compose.yaml", help="the compose file whose worker is copied")
    p.set_defaults(func=cmd_compose_gpus)
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shared.logs import configure_logging

    configure_logging(os.environ.get("INPAINT_LOG_FORMAT", "text"))
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
