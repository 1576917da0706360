"""The client commands: submit, status, cancel, delete, jobs, models, lora upload, and batch
submit|status|download.

They are `inpaint-client <command>` where only this package is installed, and `inpaint <command>`
beside the operator's commands where the server is installed too (two distributions may not both
install a script named `inpaint`: the last one installed would replace the other's).

Exit codes: 0 done, 1 the job failed, 3 it was canceled, 2 an error (one line on stderr:
`error: <code>: <message>`). `INPAINT_URL` and `INPAINT_API_KEY` (or `--url`, `--key`) say where and who.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import httpx

from inpaint_client.calls import LoraLike
from inpaint_client.sdk import InpaintClient, InpaintError
from inpaint_client.types import Job

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_CANCELED = 0, 1, 2, 3
# submit's options: (flag, job field, type, help)
_JOB_OPTIONS = [
    ("--steps", "num_inference_steps", int, "denoising steps (default 50)"),
    ("--guidance", "guidance_scale", float, "how closely to follow the prompt (default 7.5)"),
    ("--strength", "strength", float, "how much of the masked area to change, 0-1 (default 1)"),
    ("--seed", "seed", int, "for a reproducible result"),
    ("--negative-prompt", "negative_prompt", str, "what to keep out of the result"),
    ("-n", "num_outputs", int, "how many images (1-8)"),
    ("--format", "output_format", str, "png, jpeg or webp"),
    ("--mask-blur", "mask_blur", int, "feather the mask's edge by this many pixels (0: hard edge)"),
    ("--crop-padding", "crop_padding", int, "with --crop-to-mask: the margin around the mask, in pixels"),
    ("--webhook", "webhook", str, "an https URL told when the job ends (signed; see webhook secrets)"),
    ("--priority", "priority", str, "interactive (default) or bulk"),
]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the API's base URL (env INPAINT_URL)")
    p.add_argument("--key", help="your API key (env INPAINT_API_KEY)")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a job; with --wait or --out, follow it and save the result")
    p.add_argument("image", help="the image to edit (PNG, JPEG or WebP)")
    p.add_argument("mask", help="white (or transparent) where to repaint")
    p.add_argument("prompt")
    p.add_argument("--wait", action="store_true", help="follow the job to its end, with its progress")
    p.add_argument("--out", help="save the result here (several: NAME-1.png, NAME-2.png, …); implies --wait")
    p.add_argument("--crop-to-mask", action="store_true", help="inpaint only a square around the mask")
    p.add_argument("--idempotency-key", help="submitting again with the same key gives back the same job")
    p.add_argument("--model", help="a served model's short name or id (`models` lists them; default: the first)")
    p.add_argument("--lora", dest="loras", action="append", type=lora_arg, metavar="ID[:SCALE]",
                   help="a LoRA adapter: an uploaded one's id (`lora upload`) or an https:// URL, with an optional "
                        "scale (default 1); repeatable")  # fmt: skip
    for flag, dest, kind, text in _JOB_OPTIONS:
        p.add_argument(flag, dest=dest, type=kind, help=text)
    p.set_defaults(func=cmd_submit)
    for name, fn, text in (("status", cmd_status, "a job, as JSON"), ("cancel", cmd_cancel, "cancel a job"),
                           ("delete", cmd_delete, "erase a job and its images")):  # fmt: skip
        q = sub.add_parser(name, help=text)
        q.add_argument("id")
        q.set_defaults(func=fn)
        _common(q)
    j = sub.add_parser("jobs", help="your recent jobs")
    j.add_argument("--status")
    j.add_argument("--limit", type=int, default=20)
    j.set_defaults(func=cmd_jobs)
    m = sub.add_parser("models", help="the models served here: id, ready workers, jobs waiting")
    m.set_defaults(func=cmd_models)
    lora = sub.add_parser("lora", help="LoRA adapters").add_subparsers(dest="lora_command", required=True)
    u = lora.add_parser("upload", help="upload a .safetensors LoRA adapter; prints its id (for --lora)")
    u.add_argument("file")
    u.add_argument("--name", help="a name to know it by (default: the file's)")
    u.set_defaults(func=cmd_lora_upload)
    for q in (p, j, m, u):
        _common(q)
    batch = sub.add_parser("batch", help="scoring batches: many rows, each a job").add_subparsers(
        dest="batch_command", required=True
    )
    b = batch.add_parser("submit", help="rows from a JSONL or CSV file (prompt, image, mask_image: paths)")
    b.add_argument("file")
    b.add_argument("--steps", type=int, dest="num_inference_steps")
    b.add_argument("--error-threshold", type=int, default=-1, help="fail the batch past this many failed rows")
    b.set_defaults(func=cmd_batch_submit)
    b2 = batch.add_parser("status", help="counts and progress of a batch")
    b2.add_argument("id")
    b2.set_defaults(func=cmd_batch_status)
    b3 = batch.add_parser("download", help="a finished batch's results.jsonl and every output image")
    b3.add_argument("id")
    b3.add_argument("dir")
    b3.set_defaults(func=cmd_batch_download)
    for q in (b, b2, b3):
        _common(q)


def lora_arg(text: str) -> LoraLike:
    """`ID`, `ID:SCALE`, `https://…` or `https://…/FILE:SCALE` (a URL's port is not a scale)."""
    ref, sep, scale = text.rpartition(":")
    if not sep or not ref or (ref.startswith("https://") and "/" not in ref.removeprefix("https://")):
        return text
    try:
        return ref, float(scale)
    except ValueError:
        return text


def _client(args: argparse.Namespace) -> InpaintClient:
    return InpaintClient(args.url, args.key)


def _run(fn: Any) -> int:
    try:
        return int(fn())
    except InpaintError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # the API or the bucket unreachable, a download refused
        # A presigned URL carries its signature in the query: never printed.
        print(f"error: {type(exc).__name__}: {re.sub(r'[?][^ ]*', '?…', str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, TimeoutError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _ended(job: Job) -> int:
    if job["status"] == "succeeded":
        return EXIT_OK
    err = job.get("error")
    why = f"{err['code']} {err['message']}" if err else ""
    line = f"job {job['id']} {job['status']}: {why}".rstrip()
    print(line, file=sys.stderr)
    return EXIT_CANCELED if job["status"] == "canceled" else EXIT_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    def go() -> int:
        params = {dest: v for _, dest, _, _ in _JOB_OPTIONS if (v := getattr(args, dest)) is not None}
        if args.crop_to_mask:
            params["crop_to_mask"] = True
        with _client(args) as c:
            job = c.submit(args.image, args.mask, args.prompt, idempotency_key=args.idempotency_key,
                           model=args.model, loras=args.loras, **params)  # fmt: skip
            if not (args.wait or args.out):
                print(job["id"])
                return EXIT_OK
            job = _follow(c, job["id"])
            if (code := _ended(job)) != EXIT_OK:
                return code
            if args.out:
                for path, output in zip(_out_paths(args.out, len(job["outputs"])), job["outputs"], strict=True):
                    path.write_bytes(c.download(output["url"]))
                    print(f"saved {path}")
            else:
                print(json.dumps(job, indent=2))
            return EXIT_OK

    return _run(go)


def _out_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n + 1)]


def _follow(c: InpaintClient, job_id: str) -> Job:
    """The job's events as a progress bar (rich, where installed; else a line per change), then the job."""
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        for ev in c.events(job_id):
            print(f"{ev['event']}: {json.dumps(ev['data'])[:80]}", file=sys.stderr)
        return c.get(job_id)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True) as bar:  # fmt: skip
        task = bar.add_task("queued", total=None)
        for ev in c.events(job_id):
            data = ev["data"]
            if ev["event"] == "progress":
                bar.update(task, description="running", completed=data["step"], total=data["total"] or None)
            elif ev["event"] == "status" and data.get("status") == "queued":
                bar.update(task, description=f"queued (position {data.get('queue_position')})")
    return c.get(job_id)


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


def cmd_delete(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client(args) as c:
            c.delete(args.id)
        print(f"{args.id} deleted")
        return EXIT_OK

    return _run(go)


def cmd_jobs(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client(args) as c:
            for job in c.list(status=args.status, limit=args.limit)["data"]:
                print(f"{job['id']}  {job['status']:<9}  {job['created_at']}  {job['input']['prompt'][:50]}")
        return EXIT_OK

    return _run(go)


def cmd_models(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client(args) as c:
            for i, m in enumerate(c.models()):
                default = "  (default)" if i == 0 else ""
                print(f"{m['id']}  {m.get('short_name', '')}  ready workers {m.get('ready_workers', '?')}  "
                      f"waiting {m.get('queue_depth', '?')}{default}")  # fmt: skip
        return EXIT_OK

    return _run(go)


def cmd_lora_upload(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client(args) as c:
            print(c.upload_lora(args.file, args.name)["id"])
        return EXIT_OK

    return _run(go)


def _rows(file: str) -> list[dict[str, Any]]:
    """A local JSONL or CSV file of rows; `image` and `mask_image` are paths next to it (or base64)."""
    path = Path(file)
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        rows = [dict(r) for r in csv.DictReader(text.splitlines())]
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for row in rows:
        for key in ("image", "mask_image", "mask"):
            if isinstance(row.get(key), str) and (path.parent / row[key]).is_file():
                row[key] = (path.parent / row[key]).read_bytes()
    return rows


def cmd_batch_submit(args: argparse.Namespace) -> int:
    def go() -> int:
        params = {"num_inference_steps": args.num_inference_steps} if args.num_inference_steps else {}
        with _client(args) as c:
            batch = c.create_batch(_rows(args.file), parameters=params, error_threshold=args.error_threshold)
        print(batch["id"])
        return EXIT_OK

    return _run(go)


def cmd_batch_status(args: argparse.Namespace) -> int:
    def go() -> int:
        with _client(args) as c:
            b = c.get_batch(args.id)
        counts = " ".join(f"{k} {v}" for k, v in b["counts"].items() if v)
        print(f"{b['id']} {b['status']}: {counts or 'no rows yet'}")
        return EXIT_OK

    return _run(go)


def cmd_batch_download(args: argparse.Namespace) -> int:
    def go() -> int:
        out = Path(args.dir)
        out.mkdir(parents=True, exist_ok=True)
        with _client(args) as c:
            batch = c.get_batch(args.id)
            if not batch.get("manifest_url"):
                print(f"error: batch {args.id} is {batch['status']}: its results are not written yet", file=sys.stderr)
                return EXIT_ERROR
            lines = c.batch_results(batch)
            (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
            saved = 0
            for line in lines:
                if line.get("status") != "succeeded":
                    continue
                job = c.get(line["job_id"])
                for k, output in enumerate(job["outputs"]):
                    suffix = output["content_type"].split("/")[-1].replace("jpeg", "jpg")
                    (out / f"{line['index']:06d}-{k}.{suffix}").write_bytes(c.download(output["url"]))
                    saved += 1
        print(f"saved results.jsonl and {saved} images in {out}")
        return EXIT_OK

    return _run(go)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inpaint-client", description=(__doc__ or "").split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`inpaint-client`: the client commands alone."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
