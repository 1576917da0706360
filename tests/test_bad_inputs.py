"""Bad input is a 4xx with a stable code, never a 500, and the service still serves the next job."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from tests.conftest import auth, b64, job_body, make_pair, png_bytes, wait_for


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size; its few bytes would decode to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


IMG, MASK = make_pair(64, 48)
GOOD_IMG, GOOD_MASK = png_bytes(IMG), png_bytes(MASK)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"><rect width="64" height="48"/></svg>'
GIF = png_bytes(IMG, "GIF")


def body(**over: object) -> dict[str, object]:
    b = {"prompt": "a cat", "image": b64(GOOD_IMG), "mask": b64(GOOD_MASK), "num_inference_steps": 2}
    b.update(over)
    return {k: v for k, v in b.items() if v is not None}


CASES = [
    # (name, json body or raw bytes, expected status, expected code)
    ("not base64", body(image="%%%not-base64%%%"), 400, "invalid_base64"),
    ("empty image", body(image=""), 400, "invalid_base64"),
    ("not an image", body(image=b64(b"hello, world, this is text")), 400, "unsupported_image_format"),
    ("truncated png", body(image=b64(GOOD_IMG[: len(GOOD_IMG) // 2])), 400, "invalid_image"),
    ("svg", body(image=b64(SVG)), 400, "unsupported_image_format"),
    ("gif is not allowed", body(image=b64(GIF)), 400, "unsupported_image_format"),
    ("decompression bomb", body(image=b64(_bomb_png(60000, 60000))), 413, "image_too_large"),
    (
        "tiny image",
        body(image=b64(png_bytes(Image.new("RGB", (4, 4)))), mask=b64(png_bytes(Image.new("L", (4, 4))))),
        400,
        "image_too_small",
    ),
    ("mask size mismatch", body(mask=b64(png_bytes(MASK.resize((32, 32))))), 400, "mask_size_mismatch"),
    ("missing prompt", body(prompt=None), 422, "validation_error"),
    ("missing image", body(image=None), 422, "validation_error"),
    ("missing mask", body(mask=None), 422, "validation_error"),
    ("both mask and mask_image", body(mask_image=b64(GOOD_MASK)), 422, "validation_error"),
    ("steps too high", body(num_inference_steps=151), 422, "validation_error"),
    ("steps zero", body(num_inference_steps=0), 422, "validation_error"),
    ("guidance out of range", body(guidance_scale=31), 422, "validation_error"),
    ("strength above 1", body(strength=1.5), 422, "validation_error"),
    ("steps × strength below one step", body(num_inference_steps=1, strength=0.5), 422, "validation_error"),
    ("too many outputs", body(num_outputs=9), 422, "validation_error"),
    ("negative seed", body(seed=-1), 422, "validation_error"),
    ("steps of wrong type", body(num_inference_steps="many"), 422, "validation_error"),
    ("prompt of wrong type", body(prompt=["a", "b"]), 422, "validation_error"),
    ("unknown output format", body(output_format="bmp"), 422, "validation_error"),
    ("unknown field", body(num_inference_stpes=20), 422, "validation_error"),
    ("huge prompt", body(prompt="x" * 5000), 422, "validation_error"),
    ("webhook to a private address", body(webhook="http://10.0.0.1/hook"), 422, "webhook_url_forbidden"),
    ("webhook not http", body(webhook="file:///etc/passwd"), 422, "webhook_url_forbidden"),
    ("malformed json", b'{"prompt": "a cat", "image": ', 400, "invalid_json"),
    ("json array", b"[1, 2, 3]", 400, "invalid_json"),
]


@pytest.fixture(scope="module")
def strict_client(settings):
    """An API that refuses private webhook targets and small bodies, as production would."""
    s = settings.model_copy(update={"webhook_allow_private": False, "max_upload_bytes": 300_000})
    with TestClient(create_app(s)) as c:
        yield c


@pytest.mark.parametrize(("name", "payload", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx(strict_client, name, payload, status, code):
    if isinstance(payload, bytes):
        r = strict_client.post("/v1/jobs", headers={**auth(), "content-type": "application/json"}, content=payload)
    else:
        r = strict_client.post("/v1/jobs", headers=auth(), json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]


def test_oversize_body_is_413_before_it_is_read(strict_client):
    r = strict_client.post("/v1/jobs", headers=auth(), json=body(prompt="x" * 400_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(100):
            yield b"x" * 10_000

    r = strict_client.post("/v1/jobs", headers={**auth(), "content-type": "application/json"}, content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_other_content_types_and_broken_multipart(strict_client):
    r = strict_client.post("/v1/jobs", headers={**auth(), "content-type": "text/plain"}, content=b"hi")
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = strict_client.post("/v1/jobs", headers={**auth(), "content-type": "multipart/form-data; boundary=zz"},
                           content=b"--zz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi")  # fmt: skip
    assert 400 <= r.status_code < 500
    r = strict_client.post(
        "/v1/jobs", headers=auth(), files={"image": ("i.png", GOOD_IMG, "image/png")}, data={"prompt": "x"}
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "mask"


def test_data_url_and_mask_image_alias_are_accepted(strict_client):
    r = strict_client.post("/v1/jobs", headers=auth(), json=body(
        image="data:image/png;base64," + b64(GOOD_IMG), mask=None, mask_image=b64(GOOD_MASK)))  # fmt: skip
    assert r.status_code == 202, r.text


def test_unknown_routes_and_ids_use_the_error_format(strict_client):
    r = strict_client.get("/v1/jobs/deadbeef", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = strict_client.get("/v1/jobs/../../etc", headers=auth())
    assert r.status_code == 404 and "error" in r.json()
    r = strict_client.delete("/v1/jobs", headers=auth())
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = strict_client.get("/v1/jobs?limit=1000", headers=auth())
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


@pytest.mark.usefixtures("worker")
def test_service_still_serves_after_bad_inputs(client):
    for _, payload, _, _ in CASES[:5]:
        client.post("/v1/jobs", headers=auth(), json=payload)
    job = wait_for(client, client.post("/v1/jobs", headers=auth(), json=job_body()).json()["id"])
    assert job["status"] == "succeeded"


def test_exotic_but_valid_images_are_accepted(strict_client):
    """16-bit, palette with transparency, CMYK JPEG, RGBA WebP: normalised, not refused."""
    w, h = 32, 24
    variants = {
        "16-bit": Image.new("I;16", (w, h), 40000),
        "palette+alpha": Image.new("RGBA", (w, h), (255, 0, 0, 0)).convert("P"),
        "cmyk jpeg": Image.new("CMYK", (w, h), (0, 100, 100, 0)),
        "rgba webp": Image.new("RGBA", (w, h), (0, 0, 255, 128)),
    }
    mask = b64(png_bytes(Image.new("L", (w, h), 255)))
    for name, img in variants.items():
        fmt = "JPEG" if "jpeg" in name else "WEBP" if "webp" in name else "PNG"
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        r = strict_client.post(
            "/v1/jobs", headers=auth(), json=body(image=base64.b64encode(buf.getvalue()).decode(), mask=mask)
        )
        assert r.status_code == 202, (name, r.text)


def test_errors_are_json_not_tracebacks(strict_client):
    r = strict_client.post("/v1/jobs", headers={**auth(), "content-type": "application/json"}, content=json.dumps("x"))
    assert r.status_code == 400 and set(r.json()) == {"error"}


def test_a_corrupt_image_is_refused_and_leaves_nothing_in_storage(strict_client, storage):
    """The pixels are checked while the inputs travel to storage: a truncated image or mask is still a
    400 before any job exists, and the bytes already stored are removed."""
    import time

    prefix = "tenants/bob/jobs/"
    before = set(storage.list_keys(prefix))
    ids = lambda: [j["id"] for j in strict_client.get("/v1/jobs", headers=auth("bob")).json()["data"]]  # noqa: E731
    jobs = ids()  # (an earlier test's job may still end meanwhile: its status may change, not the list)
    big = png_bytes(Image.effect_noise((256, 256), 40).convert("RGB"))  # headers that read, pixels cut short
    big_mask = png_bytes(Image.effect_noise((256, 256), 90))
    white = png_bytes(Image.new("L", (256, 256), 255))
    for image, mask in ((big[: len(big) * 2 // 3], white), (big, big_mask[: len(big_mask) // 2])):
        r = strict_client.post("/v1/jobs", headers=auth("bob"), json=body(image=b64(image), mask=b64(mask)))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_image"
    deadline = time.monotonic() + 10
    while (left := set(storage.list_keys(prefix)) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"inputs of refused submits stayed in storage: {sorted(left)}"
    assert ids() == jobs
