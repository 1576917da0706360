"""Client commands of `inpaint`: submit, status, cancel, jobs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from client.sdk import InpaintClient, InpaintError

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_CANCELED = 0, 1, 2, 3


def add_commands(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a job (and wait for it with --wait)")
    p.add_argument("image")
    p.add_argument("mask")
    p.add_argument("prompt")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--out", help="where to save the first output (implies --wait)")
    p.add_argument("--steps", type=int, dest="num_inference_steps")
    p.add_argument("--guidance", type=float, dest="guidance_scale")
    p.add_argument("--seed", type=int)
    p.add_argument("--negative-prompt")
    p.set_defaults(func=cmd_submit)
    for name, fn in (("status", cmd_status), ("cancel", cmd_cancel)):
        q = sub.add_parser(name, help=f"{name} of a job")
        q.add_argument("id")
        q.set_defaults(func=fn)
    j = sub.add_parser("jobs", help="your recent jobs")
    j.add_argument("--status")
    j.add_argument("--limit", type=int, default=20)
    j.set_defaults(func=cmd_jobs)
    for q in (p, j, *[sub.choices[n] for n in ("status", "cancel")]):
        q.add_argument("--url", help="API base URL (env INPAINT_URL)")
        q.add_argument("--key", help="API key (env INPAINT_API_KEY)")


def _client(args: argparse.Namespace) -> InpaintClient:
    return InpaintClient(args.url, args.key)


def _run(fn: Any) -> int:
    try:
        return int(fn())
    except InpaintError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def cmd_submit(args: argparse.Namespace) -> int:
    def go() -> int:
        params = {k: v for k in ("num_inference_steps", "guidance_scale", "seed", "negative_prompt")
                  if (v := getattr(args, k)) is not None}  # fmt: skip
        with _client(args) as c:
            job = c.submit(args.image, args.mask, args.prompt, **params)
            if not (args.wait or args.out):
                print(job["id"])
                return EXIT_OK
            job = _wait_with_progress(c, job["id"])
            if job["status"] != "succeeded":
                err = job.get("error") or {}
                print(
                    f"job {job['id']} {job['status']}: {err.get('code', '')} {err.get('message', '')}".rstrip(),
                    file=sys.stderr,
                )
                return EXIT_CANCELED if job["status"] == "canceled" else EXIT_FAILED
            if args.out:
                with open(args.out, "wb") as fh:
                    fh.write(c.download(job["outputs"][0]["url"]))
                print(f"saved {args.out}")
            else:
                print(json.dumps(job, indent=2))
            return EXIT_OK

    return _run(go)


def _wait_with_progress(c: InpaintClient, job_id: str) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True) as bar:  # fmt: skip
        task = bar.add_task("queued", total=None)

        def update(job: dict[str, Any]) -> None:
            if job["status"] == "queued":
                bar.update(task, description=f"queued (position {job.get('queue_position')})")
            else:
                prog = job.get("progress") or {}
                bar.update(
                    task, description=job["status"], completed=prog.get("step", 0), total=prog.get("total") or None
                )

        return c.wait(job_id, on_update=update)


def cmd_status(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client(args) as c:
            print(json.dumps(c.get(args.id), indent=2))
        return EXIT_OK

    return _run(go)


def cmd_cancel(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client(args) as c:
            job = c.cancel(args.id)
        print(f"{job['id']} {job['status']}")
        return EXIT_OK

    return _run(go)


def cmd_jobs(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client(args) as c:
            for job in c.list(status=args.status, limit=args.limit)["data"]:
                print(f"{job['id']}  {job['status']:<9}  {job['created_at']}  {job['input']['prompt'][:50]}")
        return EXIT_OK

    return _run(go)
