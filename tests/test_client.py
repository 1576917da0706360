"""The Python client (sync and async) and the client commands, against the real stack over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from inpaint_client import (
    AsyncInpaintClient,
    InpaintClient,
    InpaintError,
    WebhookVerificationError,
    verify_webhook,
)
from PIL import Image

from tests.conftest import KEYS, ROOT, make_pair, png_bytes
from tests.lora_files import tiny_adapter


def test_sync_client_submits_follows_waits_and_downloads(http_api, tmp_path):
    img, mask = make_pair(64, 64)
    mask_path = tmp_path / "mask.png"
    mask_path.write_bytes(png_bytes(mask))
    with InpaintClient(http_api, KEYS["alice"]) as c:
        job = c.submit(img, mask_path, "a red apple", num_inference_steps=30, seed=3)  # a PIL image and a path
        assert job["status"] == "queued"
        events = list(c.events(job["id"]))
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "succeeded" and "progress" in kinds
        steps = [e["data"]["step"] for e in events if e["event"] == "progress"]
        assert steps == sorted(steps) and steps[-1] == events[-1]["data"]["progress"]["total"]
        done = c.wait(job["id"], timeout=60)
        png = c.download(done["outputs"][0]["url"])
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert c.list(limit=1)["data"][0]["id"] == job["id"]
        with pytest.raises(InpaintError) as err:
            c.get("0" * 32)
        assert err.value.status == 404 and err.value.code == "not_found"
        with pytest.raises(InpaintError) as err:
            c.submit(img, make_pair(32, 32)[1], "x")
        assert err.value.code == "mask_size_mismatch"
        slow = c.submit(img, mask, "slow", num_inference_steps=150)
        with pytest.raises(TimeoutError):
            c.wait(slow["id"], timeout=0.3)
        assert c.cancel(slow["id"])["id"] == slow["id"]
        assert c.wait(slow["id"], timeout=60)["status"] == "canceled"


def test_async_client(http_api):
    img, mask = make_pair(64, 64)

    async def go() -> tuple[list[str], dict, bytes]:
        async with AsyncInpaintClient(http_api, KEYS["alice"]) as c:
            job = await c.submit(png_bytes(img), png_bytes(mask), "a pear", num_inference_steps=20)
            kinds = [e["event"] async for e in c.events(job["id"])]
            done = await c.wait(job["id"], timeout=60)
            return kinds, done, await c.download(done["outputs"][0]["url"])

    kinds, done, png = asyncio.run(go())
    assert kinds[-1] == "succeeded" and "progress" in kinds and done["status"] == "succeeded"
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (64, 64, 3)


def test_verify_webhook(http_api, webhook_worker, receiver, settings):
    img, mask = make_pair(64, 64)
    with InpaintClient(http_api, KEYS["alice"]) as c:
        job = c.submit(img, mask, "hook", num_inference_steps=2, webhook=receiver.url("/client"))
        c.wait(job["id"], timeout=60)
    hit = receiver.wait("/client", 1)[-1]
    body: bytes = hit["body"]
    with InpaintClient(http_api, KEYS["alice"]) as c:
        secret = c.webhook_secret()
    payload = verify_webhook(hit["headers"], body.decode(), secret)
    assert payload["data"]["id"] == job["id"]
    rotated = "whsec_" + "b" * 43 + "= " + secret  # a new secret first, the old one still valid
    assert verify_webhook(hit["headers"], body, rotated)["type"].startswith("job.")
    with pytest.raises(WebhookVerificationError):
        verify_webhook(hit["headers"], body.replace(job["id"].encode(), b"f" * 32), secret)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(hit["headers"], body, "whsec_" + "c" * 43 + "=")


def cli(*args: str, url: str, key: str = KEYS["alice"]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "INPAINT_URL": url, "INPAINT_API_KEY": key, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stack.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_submit_wait_out_status_jobs_and_exit_codes(http_api, tmp_path: Path):
    img, mask = make_pair(64, 64)
    (tmp_path / "i.png").write_bytes(png_bytes(img))
    (tmp_path / "m.png").write_bytes(png_bytes(mask))
    out = tmp_path / "result.png"
    r = cli("submit", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "a plum", "--steps", "5", "--out", str(out),
            url=http_api)  # fmt: skip
    assert r.returncode == 0, r.stderr
    with Image.open(out) as result:
        assert result.size == (64, 64)
    r = cli("jobs", "--limit", "1", url=http_api)
    assert r.returncode == 0 and "succeeded" in r.stdout
    job_id = r.stdout.split()[0]
    r = cli("status", job_id, url=http_api)
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == job_id
    # errors: one line, a stable code, an exit code scripts can use
    r = cli("submit", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "x", url=http_api, key="wrong")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unauthorized:") and len(r.stderr.splitlines()) == 1
    r = cli("status", "0" * 32, url=http_api)
    assert r.returncode == 2 and "not_found" in r.stderr
    r = cli("submit", str(tmp_path / "missing.png"), str(tmp_path / "m.png"), "x", url=http_api)
    assert r.returncode == 2 and r.stderr.startswith("error:")


def test_models_lora_upload_and_a_job_naming_both(http_api, tmp_path: Path):
    """`inpaint models`, `inpaint lora upload` and `submit --model --lora ID:SCALE` through the real API."""
    r = cli("models", url=http_api)
    assert r.returncode == 0 and r.stdout.split()[:2] == ["inpaint/tiny-random", "tiny-random"], r.stderr
    assert "(default)" in r.stdout and "ready workers 1" in r.stdout
    (tmp_path / "style.safetensors").write_bytes(tiny_adapter(5))
    r = cli("lora", "upload", str(tmp_path / "style.safetensors"), url=http_api)
    assert r.returncode == 0, r.stderr
    lora_id = r.stdout.strip()
    img, mask = make_pair(64, 64)
    (tmp_path / "i.png").write_bytes(png_bytes(img))
    (tmp_path / "m.png").write_bytes(png_bytes(mask))
    pair = (str(tmp_path / "i.png"), str(tmp_path / "m.png"))
    r = cli("submit", *pair, "a plum", "--model", "inpaint/tiny-random", "--lora", f"{lora_id}:0.5", "--steps", "3",
            url=http_api)  # fmt: skip
    assert r.returncode == 0, r.stderr
    with InpaintClient(http_api, KEYS["alice"]) as c:
        (model,) = c.models()
        assert model["short_name"] == "tiny-random" and model["ready_workers"] == 1
        assert c.upload_lora(tmp_path / "style.safetensors")["id"] == lora_id  # the same content: the same one
        job = c.wait(r.stdout.strip(), timeout=60)
        assert job["model_id"] == "inpaint/tiny-random"
        assert [(x.get("id"), x.get("scale")) for x in job["input"]["loras"]] == [(lora_id, 0.5)]
        with pytest.raises(InpaintError) as err:
            c.submit(img, mask, "x", model="flux-fill")
        assert err.value.status == 422 and "tiny-random" in err.value.message  # the served ones, listed


def test_the_official_openai_client_edits_an_image(http_api):
    """`openai.OpenAI(base_url=…)` and `images.edit(...)`, unchanged: the mask OpenAI's way (transparent =
    edit), both answer formats, and an error in OpenAI's shape."""
    import openai

    img, _ = make_pair(64, 64)
    erased = img.convert("RGBA")
    erased.paste((0, 0, 0, 0), (16, 16, 48, 48))  # the area to edit, erased
    client = openai.OpenAI(base_url=f"{http_api}/v1", api_key=KEYS["alice"], max_retries=0)
    steps = {"num_inference_steps": 3}
    res = client.images.edit(image=("photo.png", png_bytes(erased)), prompt="a red ball", n=2, size="64x64",
                             response_format="b64_json", extra_body=steps)  # fmt: skip
    assert len(res.data) == 2
    out = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json or "")))
    assert out.size == (64, 64)
    got, before = np.asarray(out.convert("RGB")), np.asarray(img)
    assert np.array_equal(got[:10], before[:10]) and not np.array_equal(got[20:40, 20:40], before[20:40, 20:40])
    by_url = client.images.edit(image=("photo.png", png_bytes(img)), mask=("mask.png", png_bytes(erased)),
                                prompt="a red ball", extra_body=steps)  # fmt: skip
    assert httpx.get(by_url.data[0].url or "").status_code == 200
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("photo.png", png_bytes(img)), prompt="x", n=20, extra_body=steps)
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == "num_outputs"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{http_api}/v1", api_key="wrong", max_retries=0).images.edit(
            image=("photo.png", png_bytes(img)), prompt="x"
        )


def test_cli_outputs_options_and_batches(http_api, webhook_worker, tmp_path: Path):
    img, mask = make_pair(64, 64)
    (tmp_path / "i.png").write_bytes(png_bytes(img))
    (tmp_path / "m.png").write_bytes(png_bytes(mask))
    out = tmp_path / "cat.png"
    r = cli("submit", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "a cat", "--steps", "3", "-n", "2",
            "--strength", "0.9", "--idempotency-key", "cli-1", "--out", str(out), url=http_api)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cat-1.png").is_file() and (tmp_path / "cat-2.png").is_file()  # every output saved
    r = cli("jobs", "--limit", "1", url=http_api)
    job = json.loads(cli("status", r.stdout.split()[0], url=http_api).stdout)
    assert job["input"]["strength"] == 0.9 and job["input"]["num_outputs"] == 2
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"row {i}", "image": "i.png", "mask_image": "m.png"}) + "\n"
                            for i in range(3)))  # fmt: skip
    r = cli("batch", "submit", str(rows), "--steps", "2", url=http_api)
    assert r.returncode == 0, r.stderr
    batch_id = r.stdout.strip()
    with InpaintClient(http_api, KEYS["alice"]) as c:
        assert c.wait_batch(batch_id, timeout=120)["counts"]["succeeded"] == 3
    r = cli("batch", "status", batch_id, url=http_api)
    assert r.returncode == 0 and "succeeded 3" in r.stdout
    r = cli("batch", "download", batch_id, str(tmp_path / "out"), url=http_api)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "000000-0.png", "000001-0.png", "000002-0.png", "results.jsonl",
    ]  # fmt: skip


class Flaky(httpx.BaseTransport):
    """A transport that answers the first `busy` requests 429 (Retry-After), and cuts the first event
    stream after its first event; everything else goes to the real API."""

    def __init__(self, busy: int):
        self.real, self.busy, self.cut, self.seen = httpx.HTTPTransport(), busy, True, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path, request.headers.get("last-event-id")))
        if self.busy > 0 and request.method == "POST":
            self.busy -= 1
            return httpx.Response(
                429, headers={"Retry-After": "0.2"}, json={"error": {"code": "queue_full", "message": "busy"}}
            )
        resp = self.real.handle_request(request)
        if request.url.path.endswith("/events") and self.cut:
            self.cut = False
            return httpx.Response(resp.status_code, headers=resp.headers, stream=_CutAfterFirstEvent(resp))
        return resp


class _CutAfterFirstEvent(httpx.SyncByteStream):
    def __init__(self, resp: httpx.Response):
        self.resp = resp

    def __iter__(self) -> Iterator[bytes]:
        buffered = b""
        for chunk in self.resp.stream:  # type: ignore[union-attr]
            buffered += chunk
            if b"event: status" in buffered and buffered.endswith(b"\n\n"):
                yield buffered
                raise httpx.ReadError("connection reset")  # mid-stream, after one event
        yield buffered

    def close(self) -> None:
        self.resp.close()


def test_client_honours_retry_after_and_resumes_a_dropped_event_stream(http_api):
    img, mask = make_pair(64, 64)
    transport = Flaky(busy=2)
    http = httpx.Client(base_url=http_api, transport=transport, headers={"Authorization": f"Bearer {KEYS['alice']}"})
    with InpaintClient(http_client=http) as c:
        job = c.submit(img, mask, "a pear", num_inference_steps=20)  # two 429s first: retried after Retry-After
        assert [m for m, _, _ in transport.seen].count("POST") == 3
        events = list(c.events(job["id"]))
    assert events[-1]["event"] == "succeeded"
    streams = [last for m, path, last in transport.seen if path.endswith("/events")]
    assert len(streams) == 2 and streams[0] is None and streams[1]  # resumed with Last-Event-ID
    ids = [int(e["id"]) for e in events if e["id"]]
    assert ids == sorted(ids) and len(ids) == len(set(ids))  # nothing twice across the reconnect


def test_the_client_installs_alone_and_works(http_api, tmp_path: Path, webhook_worker, receiver):
    """`pip install ./client` into an empty virtualenv (httpx and httpx-sse come with it; nothing of the
    server), then a job, its events and a verified webhook from that environment."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT / "client")], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    have = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in have.splitlines()}
    assert "inpaint-client" in names and not names & {
        "fastapi",
        "celery",
        "redis",
        "pillow",
        "numpy",
        "inpaint-service",
    }
    img, mask = make_pair(64, 64)
    (tmp_path / "i.png").write_bytes(png_bytes(img))
    (tmp_path / "m.png").write_bytes(png_bytes(mask))
    script = f"""
import json, sys
from inpaint_client import InpaintClient
with InpaintClient({http_api!r}, {KEYS["alice"]!r}) as c:
    job = c.submit({str(tmp_path / "i.png")!r}, {str(tmp_path / "m.png")!r}, "a plum", num_inference_steps=3,
                   webhook={receiver.url("/alone")!r})
    kinds = [e["event"] for e in c.events(job["id"])]
    done = c.wait(job["id"], timeout=60)
    print(json.dumps({{"kinds": kinds, "status": done["status"], "bytes": len(c.download(done["outputs"][0]["url"])),
                      "secret": c.webhook_secret()}}))
"""
    run = subprocess.run([py, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["status"] == "succeeded" and got["kinds"][-1] == "succeeded" and got["bytes"] > 0
    hit = receiver.wait("/alone", 1)[0]
    check = "import json,sys; from inpaint_client import verify_webhook; d=json.load(sys.stdin); "
    check += "print(verify_webhook(d['h'], d['b'].encode(), d['s'])['type'])"
    doc = json.dumps({"h": hit["headers"], "b": hit["body"].decode(), "s": got["secret"]})
    verified = subprocess.run([py, "-c", check], input=doc, capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and verified.stdout.strip() == "job.succeeded", verified.stderr
