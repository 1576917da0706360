"""End to end through real Redis, SeaweedFS and a Celery worker process running tiny-random."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from shared import keys
from shared.jobs.store import JobStore
from shared.jobs.view import manifest_key
from shared.services import Services
from shared.storage import Storage, job_prefix
from tests.conftest import ROOT, at, auth, b64, job_body, make_pair, png_bytes, wait_for

pytestmark = pytest.mark.usefixtures("worker")


def test_a_jobs_image_and_mask_travel_as_one_object(client, storage: Storage):
    """One put at submit, one get in the worker: the image and the mask share one stored object."""
    jid = client.post("/v1/jobs", headers=auth(), json=job_body()).json()["id"]
    prefix = job_prefix("alice", jid)
    assert storage.list_keys(prefix + "input") == [prefix + "inputs"]
    assert wait_for(client, jid)["status"] == "succeeded"


def test_submit_poll_fetch_keeps_size_and_unmasked_pixels(client, storage: Storage):
    # 61×45: not a multiple of 8, so the pad-and-crop path runs too
    img, mask = make_pair(61, 45, box=(10, 8, 30, 25))
    r = client.post("/v1/jobs", headers=auth(), json={
        "prompt": "a red apple", "image": b64(png_bytes(img)), "mask": b64(png_bytes(mask)),
        "num_inference_steps": 4, "seed": 7})  # fmt: skip
    assert r.status_code == 202, r.text
    created = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{created['id']}"
    assert created["status"] in ("queued", "running")
    assert created["input"]["seed"] == 7

    job = wait_for(client, created["id"])
    assert job["status"] == "succeeded", job
    assert job["model"] == {"name": "tiny-random", "revision": "tiny-random-v1"}
    assert job["progress"]["step"] == job["progress"]["total"] >= 4
    assert job["started_at"] and job["finished_at"] and job["error"] is None
    assert job["nsfw_content_detected"] is None
    assert job["metrics"]["inference_s"] > 0
    [out] = job["outputs"]
    assert (out["width"], out["height"], out["content_type"]) == (61, 45, "image/png")

    data = httpx.get(out["url"]).content  # the presigned URL, as a client would use it
    result = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert result.shape == (45, 61, 3)
    keep = np.asarray(mask) < 128
    assert np.array_equal(result[keep], np.asarray(img)[keep])
    assert not np.array_equal(result[~keep], np.asarray(img)[~keep])  # the masked area was repainted

    manifest = storage.get_json(job_prefix("alice", job["id"]) + "manifest.json")
    assert manifest is not None and manifest["status"] == "succeeded"


def test_same_seed_same_pixels_and_num_outputs(client):
    body = job_body(num_outputs=2, seed=1234)
    jobs = [wait_for(client, client.post("/v1/jobs", headers=auth(), json=body).json()["id"]) for _ in range(2)]
    pixels = [[httpx.get(o["url"]).content for o in j["outputs"]] for j in jobs]
    assert all(j["status"] == "succeeded" and len(j["outputs"]) == 2 for j in jobs)
    decoded = [[np.asarray(Image.open(io.BytesIO(b))) for b in p] for p in pixels]
    assert np.array_equal(decoded[0][0], decoded[1][0]) and np.array_equal(decoded[0][1], decoded[1][1])
    assert not np.array_equal(decoded[0][0], decoded[0][1])  # the two outputs use seeds 1234 and 1235


def test_multipart_submit_and_output_format(client):
    img, mask = make_pair(40, 40)
    r = client.post(
        "/v1/jobs",
        headers=auth(),
        files={
            "image": ("a.bin", png_bytes(img, "JPEG"), "application/octet-stream"),
            "mask": ("m", png_bytes(mask), "image/png"),
        },
        data={"prompt": "a boat", "num_inference_steps": "2", "output_format": "webp"},
    )
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["id"])
    assert job["status"] == "succeeded"
    assert job["outputs"][0]["content_type"] == "image/webp"
    assert Image.open(io.BytesIO(httpx.get(job["outputs"][0]["url"]).content)).format == "WEBP"


def test_exif_rotation_applies_to_image_and_mask(client):
    # Stored landscape 40×24 with orientation 6 (rotate 90°): the job sees a 24×40 portrait image.
    img, mask = make_pair(40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6
    body = job_body()
    body["image"] = b64(png_bytes(img, "JPEG", exif=exif.tobytes()))
    body["mask"] = b64(png_bytes(mask.rotate(-90, expand=True)))  # already upright: 24×40
    r = client.post("/v1/jobs", headers=auth(), json=body)
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert (job["outputs"][0]["width"], job["outputs"][0]["height"]) == (24, 40)


def test_cancel_queued_and_running_then_next_job_runs(client, storage: Storage):
    slow = client.post("/v1/jobs", headers=auth(), json=job_body(256, 256, num_inference_steps=150)).json()
    wait_for(client, slow["id"], until=lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
    queued = client.post("/v1/jobs", headers=auth(), json=job_body()).json()
    assert client.get(f"/v1/jobs/{queued['id']}", headers=auth()).json()["queue_position"] == 0

    r = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth())
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    t_cancel = time.time()
    r = client.post(f"/v1/jobs/{slow['id']}/cancel", headers=auth())
    assert r.status_code == 202 and r.json()["status"] == "running"
    at_cancel = r.json()

    ended = wait_for(client, slow["id"], timeout=30)
    assert ended["status"] == "canceled" and ended["outputs"] == []
    assert ended["progress"]["step"] < 150
    # Stopped within two denoising steps (step time measured on this job so far), plus a little slack.
    step_s = (t_cancel - at(at_cancel["started_at"])) / max(at_cancel["progress"]["step"], 1)
    assert at(ended["finished_at"]) - t_cancel <= 2 * step_s + 0.15, (step_s, at(ended["finished_at"]) - t_cancel)
    assert storage.list_keys(job_prefix("alice", slow["id"]) + "outputs/") == []
    never = client.get(f"/v1/jobs/{queued['id']}", headers=auth()).json()
    assert never["status"] == "canceled" and never["started_at"] is None

    # A finished job cannot be canceled, and stays as it was.
    r = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth())
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_cancelable"
    assert r.json()["job"]["status"] == "canceled"

    nxt = wait_for(client, client.post("/v1/jobs", headers=auth(), json=job_body()).json()["id"])
    assert nxt["status"] == "succeeded"


def test_tenants_are_isolated_and_keys_required(client):
    job = client.post("/v1/jobs", headers=auth("alice"), json=job_body()).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth("bob")).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth("bob")).status_code == 404
    assert job["id"] not in [j["id"] for j in client.get("/v1/jobs?limit=100", headers=auth("bob")).json()["data"]]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5"}):
        r = client.get(f"/v1/jobs/{job['id']}", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert client.post("/v1/jobs", json=job_body()).status_code == 401
    wait_for(client, job["id"])


def test_created_key_works_and_revocation_is_immediate(client, svc: Services):
    from shared.auth import hash_key

    info, key = svc.keystore.create("carol")
    stored = svc.r.hgetall("inpaint:apikeys")
    assert hash_key(key) in stored and key not in str(stored)  # only its hash is stored
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    assert svc.keystore.revoke(info.id)
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_list_is_newest_first_with_cursor(client):
    ids = [client.post("/v1/jobs", headers=auth("bob"), json=job_body()).json()["id"] for _ in range(3)]
    page1 = client.get("/v1/jobs?limit=2", headers=auth("bob")).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"]
    page2 = client.get(f"/v1/jobs?limit=2&cursor={page1['next_cursor']}", headers=auth("bob")).json()
    assert page2["data"][0]["id"] == ids[0]
    for jid in ids:
        wait_for(client, jid, "bob")
    done = client.get("/v1/jobs?status=succeeded&limit=100", headers=auth("bob")).json()["data"]
    assert set(ids) <= {j["id"] for j in done} and all(j["status"] == "succeeded" for j in done)
    assert client.get("/v1/jobs?status=bogus", headers=auth("bob")).status_code == 422


def test_finished_job_answered_from_s3_when_redis_forgets(client, store: JobStore, storage: Storage):
    job = wait_for(client, client.post("/v1/jobs", headers=auth(), json=job_body()).json()["id"])
    # The worker writes the manifest right after the job's terminal status, which the poll may see first.
    deadline = time.monotonic() + 10
    while storage.get_json(manifest_key("alice", job["id"])) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert storage.get_json(manifest_key("alice", job["id"])) is not None
    store.r.delete(keys.job(job["id"]))
    again = client.get(f"/v1/jobs/{job['id']}", headers=auth())
    assert again.status_code == 200
    body = again.json()
    assert body["status"] == "succeeded" and body["outputs"][0]["width"] == job["outputs"][0]["width"]
    assert httpx.get(body["outputs"][0]["url"]).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth("bob")).status_code == 404


def test_idempotency_key_sequential_concurrent_and_conflict(client):
    body = job_body()
    h = {**auth(), "Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", headers=h, json=body)
    second = client.post("/v1/jobs", headers=h, json=body)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = client.post("/v1/jobs", headers=h, json=job_body(seed=99))
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    # Same key from another tenant is another key.
    assert (
        client.post("/v1/jobs", headers={**auth("bob"), "Idempotency-Key": "order-42"}, json=body).json()["id"]
        != first.json()["id"]
    )

    results: list[str] = []
    hc = {**auth(), "Idempotency-Key": "concurrent-1"}

    def go() -> None:
        results.append(client.post("/v1/jobs", headers=hc, json=body).json()["id"])

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1


def test_probes_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": True, "s3": True, "workers": 1}
    assert ready.json()["models"] == ["tiny-random@tiny-random-v1"] and ready.json()["fallback"] is False
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "JobCreate" in spec["components"]["schemas"]
    assert spec["security"] == [{"bearer": []}] and spec["paths"]["/healthz"]["get"]["security"] == []
    assert {"/v1/webhooks/default/secret", "/v1/webhooks/default/secret/rotate"} <= set(spec["paths"])
    assert "text/plain" in client.get("/metrics").headers["content-type"]


def test_score_replays_the_model_card_sample(client):
    """The card's real-time request (two cat prompts), answered in its format, rows in input order."""
    img, mask = make_pair(64, 64)
    sample = {"input_data": {"columns": ["prompt", "image", "mask_image"], "index": [0, 1], "data": [
        {"prompt": "Face of a yellow cat, high resolution, sitting on a park bench",
         "image": b64(png_bytes(img)), "mask_image": b64(png_bytes(mask))},
        {"prompt": "Face of a green cat, high resolution, sitting on a park bench",
         "image": b64(png_bytes(img.rotate(90))), "mask_image": b64(png_bytes(mask))},
    ]}}  # fmt: skip
    r = client.post("/score", headers=auth(), json=sample)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [set(row) for row in rows] == [{"prompt", "generated_image", "nsfw_content_detected"}] * 2
    assert [row["prompt"] for row in rows] == [d["prompt"] for d in sample["input_data"]["data"]]
    outs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(row["generated_image"])))) for row in rows]
    assert all(o.shape == (64, 64, 3) for o in outs) and rows[0]["nsfw_content_detected"] is None
    keep = np.asarray(mask) < 128
    assert np.array_equal(outs[1][keep], np.asarray(img.rotate(90))[keep])  # row 2 is row 2's image

    # Azure's split orientation (lists aligned with columns), and `mask` as a column name
    split = {
        "input_data": {
            "columns": ["prompt", "image", "mask"],
            "data": [["a cat", b64(png_bytes(img)), b64(png_bytes(mask))]],
        }
    }
    assert client.post("/score", headers=auth(), json=split).status_code == 200
    bad = {"input_data": {"data": [{"prompt": "x", "image": "%%", "mask_image": b64(png_bytes(mask))}]}}
    r = client.post("/score", headers=auth(), json=bad)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_base64"
    assert client.post("/score", headers=auth(), json={"input_data": {"data": []}}).status_code == 422


def test_crop_to_mask_and_an_openai_style_mask_through_the_service(client, worker):
    """A 384×256 photo, a small hole to fill, the mask given OpenAI's way (the photo with the area to
    edit erased): the job inpaints only the hole's square and keeps every other pixel. The pictures
    are the README's."""
    img, _ = make_pair(384, 256)
    hole = Image.new("L", (384, 256), 0)
    ImageDraw.Draw(hole).ellipse((250, 60, 310, 120), fill=255)
    erased = img.convert("RGBA")
    erased.putalpha(Image.eval(hole, lambda v: 255 - v))  # transparent where the hole is
    body = {"prompt": "a red ball", "image": b64(png_bytes(img)), "mask": b64(png_bytes(erased)),
            "num_inference_steps": 3, "crop_to_mask": True, "crop_padding": 16, "mask_blur": 3}  # fmt: skip
    job = wait_for(client, client.post("/v1/jobs", headers=auth(), json=body).json()["id"])
    assert job["status"] == "succeeded" and job["input"]["crop_to_mask"] is True, job
    out = Image.open(io.BytesIO(httpx.get(job["outputs"][0]["url"]).content)).convert("RGB")
    assert out.size == (384, 256)
    got, before = np.asarray(out), np.asarray(img)
    keep = np.asarray(hole) < 128
    assert np.array_equal(got[keep], before[keep]) and not np.array_equal(got[~keep], before[~keep])
    examples = ROOT / "docs" / "examples"
    examples.mkdir(exist_ok=True)
    img.save(examples / "crop-before.png")
    erased.save(examples / "openai-mask.png")
    out.save(examples / "crop-after.png")


def test_replicates_shape_and_prefer_wait(client, worker, webhook_worker, receiver):
    body = {"version": "ignored", "input": {k: v for k, v in job_body(64, 64).items()},
            "webhook": receiver.url("/replicate"), "webhook_events_filter": ["start", "completed"]}  # fmt: skip
    r = client.post("/v1/jobs", headers={**auth(), "Prefer": "wait"}, json=body)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text  # done within the wait
    assert r.headers["Preference-Applied"] == "wait=60" and r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"
    assert r.json()["input"]["webhook_events"] == ["completed", "started"]
    hooks = receiver.wait("/replicate", 2)
    assert {json.loads(h["body"])["type"] for h in hooks} == {"job.started", "job.succeeded"}
    # not done in time: 202 as without the preference, after about N seconds
    started = time.monotonic()
    r = client.post("/v1/jobs", headers={**auth(), "Prefer": "respond-async, wait=1"},
                    json=job_body(64, 64, num_inference_steps=150))  # fmt: skip
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running") and 0.9 < time.monotonic() - started < 5
    client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth())
    bad = client.post("/v1/jobs", headers=auth(), json={"input": job_body(), "model": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_images_by_https_url_are_fetched_once_and_checked(client, worker, files):
    img, mask = make_pair(64, 64)
    files.files.update({
        "/photo.png": (200, png_bytes(img), {"content-type": "image/png"}),
        "/mask.png": (200, png_bytes(mask), {}),
        "/moved.png": (302, b"", {"location": files.url("/photo.png")}),
        "/page.html": (200, b"<html>not an image</html>", {"content-type": "image/png"}),
    })  # fmt: skip
    body = {
        "prompt": "a cat",
        "image": files.url("/photo.png"),
        "mask": files.url("/mask.png"),
        "num_inference_steps": 2,
    }
    r = client.post("/v1/jobs", headers=auth(), json=body)
    assert r.status_code == 202, r.text
    assert wait_for(client, r.json()["id"])["status"] == "succeeded"
    assert files.hits.count("/photo.png") == 1 and files.hits.count("/mask.png") == 1  # once, at submit
    for image, status, code in [
        ("http://127.0.0.1:9/photo.png", 422, "image_url_forbidden"),  # https only
        (files.url("/moved.png"), 400, "image_fetch_failed"),  # redirects are not followed
        (files.url("/missing.png"), 400, "image_fetch_failed"),
        (files.url("/page.html"), 400, "unsupported_image_format"),  # judged by its content
        ("https://127.0.0.1:1/photo.png", 400, "image_fetch_failed"),  # nothing listens
    ]:
        r = client.post("/v1/jobs", headers=auth(), json={**body, "image": image})
        assert r.status_code == status and r.json()["error"]["code"] == code, (image, r.text)
        assert r.json()["error"]["param"] == "image"


def test_delete_erases_a_job_whatever_its_state(client, worker, storage, store):
    def erased(jid: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while storage.list_keys(job_prefix("alice", jid)) or store.get(jid) is not None:
            assert time.monotonic() < deadline, storage.list_keys(job_prefix("alice", jid))
            time.sleep(0.1)
        assert client.get(f"/v1/jobs/{jid}", headers=auth()).status_code == 404

    ended = wait_for(client, client.post("/v1/jobs", headers=auth(), json=job_body()).json()["id"])
    deadline = time.monotonic() + 10
    while storage.get_json(manifest_key("alice", ended["id"])) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.delete(f"/v1/jobs/{ended['id']}", headers=auth("bob")).status_code == 404  # not bob's
    assert client.delete(f"/v1/jobs/{ended['id']}", headers=auth()).status_code == 204
    erased(ended["id"])
    assert httpx.get(ended["outputs"][0]["url"]).status_code == 404  # the output itself is gone
    running = client.post("/v1/jobs", headers=auth(), json=job_body(num_inference_steps=150)).json()["id"]
    waiting = client.post("/v1/jobs", headers=auth(), json=job_body(guidance_scale=3.0)).json()["id"]
    wait_for(client, running, until=lambda j: j["status"] == "running")
    assert client.delete(f"/v1/jobs/{waiting}", headers=auth()).status_code == 204  # queued: erased at once
    erased(waiting, timeout=1)
    assert client.delete(f"/v1/jobs/{running}", headers=auth()).status_code == 204  # running: when it stops
    erased(running)
    assert client.delete(f"/v1/jobs/{running}", headers=auth()).status_code == 404


def test_images_expire_after_the_retention_and_the_job_stays(client, worker, settings, storage):
    from shared.jobs import erasure
    from shared.services import build_services

    job = wait_for(client, client.post("/v1/jobs", headers=auth(), json=job_body()).json()["id"])
    svc = build_services(settings.model_copy(update={"retention_s": 1}))  # what an I/O worker with it does
    rec = svc.jobs.get(job["id"])
    assert rec is not None
    erasure.note_ended(svc, rec)
    time.sleep(1.2)
    assert erasure.expire_due(svc) >= 1
    left = storage.list_keys(job_prefix("alice", job["id"]))
    assert left == [manifest_key("alice", job["id"])]  # inputs and outputs gone, the job's record kept
    after = client.get(f"/v1/jobs/{job['id']}", headers=auth()).json()
    assert after["status"] == "succeeded" and after["outputs"] == [] and after["input"] == job["input"]


def test_an_unexpected_error_is_a_problem_document_and_the_connection_stays_usable(settings, caplog):
    from api.app import create_app
    from tests.conftest import serve

    app = create_app(settings)

    def broken(job_id: str) -> None:
        raise RuntimeError("a bug")

    app.state.services.jobs.get = broken
    with serve(app) as base, httpx.Client(base_url=base, headers=auth()) as c:
        r = c.get("/v1/jobs/0123abcd", headers={"X-Request-Id": "req-1"})
        assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json", r.text
        assert r.json()["error"]["code"] == "internal" and r.json()["error"]["request_id"] == "req-1"
        assert r.headers["x-request-id"] == "req-1"
        assert c.get("/healthz").status_code == 200  # the same kept-alive connection, not reset
        assert len(c._transport._pool.connections) == 1
    logged = [rec for rec in caplog.records if rec.exc_info and "req-1" in rec.getMessage()]
    assert logged and "a bug" in str(logged[0].exc_info[1])


def test_a_damaged_manifest_is_a_clean_answer_for_that_request(client, storage: Storage):
    job_id = "0123456789abcdef0123456789abcdef"
    storage.put(manifest_key("alice", job_id), b"{not json", "application/json")
    r = client.get(f"/v1/jobs/{job_id}", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    storage.put(manifest_key("alice", job_id), b'{"id": 1}', "application/json")
    assert client.get(f"/v1/jobs/{job_id}", headers=auth()).status_code == 404
    assert client.get("/healthz").status_code == 200


def test_an_idempotency_key_whose_job_was_deleted_names_the_next_job_it_makes(client):
    headers = {**auth(), "Idempotency-Key": f"reused-{time.time()}"}
    first = client.post("/v1/jobs", headers=headers, json=job_body()).json()["id"]
    assert client.delete(f"/v1/jobs/{first}", headers=auth()).status_code == 204
    second = client.post("/v1/jobs", headers=headers, json=job_body())
    assert second.status_code == 202 and second.json()["id"] != first, second.text
    again = client.post("/v1/jobs", headers=headers, json=job_body())
    assert again.json()["id"] == second.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
