"""Abuse: a schema-driven fuzz of every operation (no 5xx), and a corpus of broken and odd images."""

from __future__ import annotations

import io
import random
import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from PIL import Image

from api.app import create_app
from shared.config import Settings
from shared.services import Services
from tests.conftest import auth, b64, make_pair, png_bytes, wait_for


def test_no_operation_answers_5xx(settings: Settings):
    """Schemathesis generates requests for every operation of the served OpenAPI (authenticated)."""
    # Its own Redis database: what the fuzzer enqueues is never run and never disturbs other tests.
    isolated = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/2"})
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(isolated))
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(headers=auth())
            if case.path == "/readyz":  # 503 is its answer when no worker is up (none is, in this database)
                return
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

        check()
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}", "POST /score"} <= set(seen)


def _corpus() -> list[tuple[str, bytes, bytes]]:
    """(name, image, mask) pairs: truncated, bit-flipped, polyglot, animated, deep, CMYK, palette, rotated."""
    rng = random.Random(7)
    img, mask = make_pair(32, 32)
    good_png, good_jpg, good_webp = png_bytes(img), png_bytes(img, "JPEG"), png_bytes(img, "WEBP")
    m = png_bytes(mask)
    out: list[tuple[str, bytes, bytes]] = []
    for name, data in (("png", good_png), ("jpeg", good_jpg), ("webp", good_webp)):
        for frac in (0.1, 0.5, 0.9, 0.99):
            out.append((f"truncated {name} {frac}", data[: int(len(data) * frac)], m))
        for k in range(4):
            flipped = bytearray(data)
            for _ in range(3):
                flipped[rng.randrange(8, len(flipped))] ^= 1 << rng.randrange(8)
            out.append((f"bit-flipped {name} {k}", bytes(flipped), m))
    out.append(("png + html polyglot", good_png + b"<html><script>alert(1)</script></html>", m))
    out.append(("jpeg + zip polyglot", good_jpg + b"PK\x03\x04" + b"\x00" * 26, m))
    out.append(("html with png magic", b"\x89PNG\r\n\x1a\n<html></html>", m))
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    for fmt in ("GIF", "WEBP"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100)
        out.append((f"animated {fmt}", buf.getvalue(), m))
    out.append(("16-bit", png_bytes(Image.new("I;16", (32, 32), 30000)), m))
    out.append(("cmyk jpeg", png_bytes(Image.new("CMYK", (32, 32), (10, 200, 30, 0)), "JPEG"), m))
    pal = Image.new("P", (32, 32), 3)
    pal.info["transparency"] = 3
    out.append(("palette with transparency", png_bytes(pal), m))
    exif = Image.Exif()
    exif[0x0112] = 8
    out.append(("exif rotated", png_bytes(img, "JPEG", exif=exif.tobytes()), m))
    out.append(("mask is a jpeg", good_png, png_bytes(mask.convert("RGB"), "JPEG")))
    out.append(("mask truncated", good_png, m[: len(m) // 2]))
    return out


@pytest.mark.usefixtures("worker")
def test_fuzzed_images_are_clean_4xx_or_correct_jobs(client: TestClient, svc: Services):
    workers_before = {w["name"] for w in svc.registry.ready()}
    accepted = []
    for name, image, mask in _corpus():
        r = client.post(
            "/v1/jobs",
            headers=auth(),
            json={"prompt": name, "image": b64(image), "mask": b64(mask), "num_inference_steps": 2},
        )
        assert r.status_code in (202, 400, 413), (name, r.status_code, r.text)
        if r.status_code == 202:
            accepted.append((name, r.json()["id"]))
        else:
            assert r.json()["error"]["code"], name
    assert {"animated WEBP", "16-bit", "cmyk jpeg", "palette with transparency", "exif rotated"} <= {
        n for n, _ in accepted
    }
    for name, jid in accepted:
        job = wait_for(client, jid)
        assert job["status"] == "succeeded", (name, job["error"])  # no damage here slips past the API's check
    time.sleep(0.5)
    assert {w["name"] for w in svc.registry.ready()} == workers_before  # no worker process died


@pytest.mark.usefixtures("worker")
def test_a_png_with_sound_checksums_but_broken_pixels_fails_its_job_as_bad_input(client: TestClient, svc: Services):
    """The API checks a PNG by its chunks' checksums, not by decoding it: a file whose checksums were
    made right over a broken pixel stream is accepted, and the worker's decode fails its job with
    `invalid_input`, the worker unharmed."""
    from tests.test_imaging import _rechecksummed

    img, mask = make_pair(32, 32)
    crafted = _rechecksummed(png_bytes(img), lambda z: z[: len(z) // 2])
    workers_before = {w["name"] for w in svc.registry.ready()}
    r = client.post(
        "/v1/jobs", headers=auth(), json={"prompt": "x", "image": b64(crafted), "mask": b64(png_bytes(mask))}
    )
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input", job
    assert "truncated or corrupt" in job["error"]["message"]
    time.sleep(0.5)
    assert {w["name"] for w in svc.registry.ready()} == workers_before


def test_score_past_its_deadline_is_504_with_the_job_ids(settings: Settings):
    """No worker consumes this Redis database: /score gives up at its deadline and names the jobs."""
    isolated = settings.model_copy(
        update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/3", "score_timeout_s": 1.0}
    )
    img, mask = make_pair(32, 32)
    body = {
        "input_data": {"data": [{"prompt": "a cat", "image": b64(png_bytes(img)), "mask_image": b64(png_bytes(mask))}]}
    }
    with TestClient(create_app(isolated)) as c:
        r = c.post("/score", headers=auth(), json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        [jid] = r.json()["jobs"]
        assert c.get(f"/v1/jobs/{jid}", headers=auth()).json()["status"] == "queued"


def test_an_openai_edit_resized_from_a_png_with_broken_pixels_is_a_400(client: TestClient):
    """`size` resizes the upload in the API, so its pixels are decoded there: a PNG whose checksums
    hold over a broken pixel stream is refused then, in OpenAI's error shape, never a 500."""
    from tests.test_imaging import _rechecksummed

    img, _ = make_pair(32, 32)
    crafted = _rechecksummed(png_bytes(img.convert("RGBA")), lambda z: z[: len(z) // 2])
    r = client.post("/v1/images/edits", headers=auth(), files={"image": ("i.png", crafted, "image/png")},
                    data={"prompt": "x", "size": "16x16"})  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_image" and r.json()["error"]["type"] == "invalid_request_error"
