"""The Python client (sync and async) and the client commands, against the real stack over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from client.sdk import (
    AsyncInpaintClient,
    InpaintClient,
    InpaintError,
    WebhookVerificationError,
    verify_webhook,
)
from tests.conftest import KEYS, ROOT, make_pair, png_bytes


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
