"""Replicate's own Python client (`replicate`, pinned), unchanged, against the service by base URL:
predictions by model and by version, files, waiting, listing, canceling, webhooks, errors. Then the
JSON shapes over raw HTTP, against the fields Replicate's clients read."""

from __future__ import annotations

import base64
import io
import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from standardwebhooks.webhooks import Webhook

from tests.conftest import KEYS, make_pair, png_bytes, serve

MODEL = "inpaint/tiny-random"  # what the suite's worker serves
FAST = {"num_inference_steps": 3}


_TRANSPORTS: list[httpx.HTTPTransport] = []


def sdk(base: str, tenant: str = "alice", ca: Path | None = None) -> replicate.Client:
    """A client as a user makes one: a key and the base URL; for HTTPS, a transport that trusts the
    suite's certificate (what a private CA asks of any client). Its connections close after the test."""
    verify: Any = ssl.create_default_context(cafile=str(ca)) if ca is not None else True
    transport = httpx.HTTPTransport(verify=verify)
    _TRANSPORTS.append(transport)
    return replicate.Client(api_token=KEYS[tenant], base_url=base, transport=transport)


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while _TRANSPORTS:
        _TRANSPORTS.pop().close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pictures")
    img, mask = make_pair(64, 64)
    (folder / "photo.png").write_bytes(png_bytes(img))
    (folder / "mask.png").write_bytes(png_bytes(mask))
    return folder / "photo.png", folder / "mask.png"


def data_url(path: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"


@pytest.fixture(scope="module")
def https_api(settings: Any, worker: object, tls: tuple[Path, Path]) -> Any:
    from api.app import create_app

    with serve(create_app(settings), tls=tls) as base:
        yield base


def image_at(url: str, tenant: str = "alice") -> Image.Image:
    got = httpx.get(url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png", got.text[:200]
    return Image.open(io.BytesIO(got.content))


def test_run_with_open_files_uploads_them_and_answers_the_outputs(http_api, pictures):
    c = sdk(http_api)
    photo, mask = pictures
    with photo.open("rb") as image, mask.open("rb") as m:
        out = c.run(MODEL, input={"prompt": "a red apple", "image": image, "mask": m, "num_outputs": 2, **FAST})
    assert isinstance(out, list) and len(out) == 2
    for url in out:  # http URLs stay strings (the client wraps https and data: URLs only)
        assert str(url).startswith(f"{http_api}/v1/predictions/")
        assert image_at(str(url)).size == (64, 64)
    uploaded = [f for f in c.files.list() if f.name in ("photo.png", "mask.png")]
    assert len(uploaded) >= 2 and all(f.urls["get"].startswith(http_api) for f in uploaded)
    assert image_at(str(out[0]), "alice") and httpx.get(str(out[0]), timeout=10).status_code == 401


def test_run_over_https_with_data_urls_reads_outputs_through_file_output(https_api, pictures, tls):
    c = sdk(https_api, ca=tls[0])
    photo, mask = pictures
    with photo.open("rb") as image, mask.open("rb") as m:
        out = c.run(MODEL, input={"prompt": "a pear", "image": image, "mask": m, **FAST},
                    file_encoding_strategy="base64")  # fmt: skip
    assert len(out) == 1 and isinstance(out[0], FileOutput)
    data = out[0].read()  # the client's own httpx client, which sends the API key: the API serves it
    img = Image.open(io.BytesIO(data))
    assert img.size == (64, 64) and img.format == "PNG"


def test_predictions_by_version_and_by_model_wait_get_list_and_the_same_job(http_api, pictures):
    c = sdk(http_api)
    model = c.models.get(MODEL)
    assert model.owner == "inpaint" and model.name == "tiny-random" and model.latest_version is not None
    version = model.latest_version
    assert c.models.get(MODEL).versions.get(version.id).id == version.id
    ready = httpx.get(f"{http_api}/readyz").json()["models"]
    assert f"tiny-random@{version.id}" in ready  # a version is the model's pinned revision
    img, mask = (data_url(p) for p in pictures)
    body = {"prompt": "a plum", "image": img, "mask": mask, **FAST}

    by_version = c.predictions.create(version=version.id, input=body)
    assert by_version.status in ("starting", "processing") and by_version.version == version.id
    by_version.wait()
    assert by_version.status == "succeeded" and len(by_version.output) == 1
    assert by_version.metrics["predict_time"] > 0 and by_version.completed_at and by_version.model == MODEL
    assert by_version.progress is not None and by_version.progress.current == by_version.progress.total

    by_model = c.models.predictions.create(model=MODEL, input={**body, "seed": 3})
    assert c.predictions.get(by_model.id).id == by_model.id
    by_model.wait()
    assert by_model.input["seed"] == 3 and by_model.status == "succeeded"
    listed = [p.id for p in c.predictions.list().results]
    assert by_model.id in listed and by_version.id in listed
    assert listed.index(by_model.id) < listed.index(by_version.id)  # newest first

    out = c.run(f"{MODEL}:{version.id}", input=body)  # `owner/name:version`
    assert len(out) == 1
    job = httpx.get(f"{http_api}/v1/jobs/{by_model.id}", headers={"Authorization": f"Bearer {KEYS['alice']}"}).json()
    assert job["status"] == "succeeded" and job["input"]["seed"] == 3  # the same job


def test_a_long_prediction_is_canceled(http_api, pictures):
    c = sdk(http_api)
    img, mask = (data_url(p) for p in pictures)
    body = {"prompt": "a long one", "image": img, "mask": mask, "num_inference_steps": 150, "num_outputs": 4,
            "guidance_scale": 6.1}  # fmt: skip
    # A wait that ends before the job: answered `starting`, whether the job is queued or running, so
    # that clients go on polling (they take any other status of a waited create for its end).
    p = c.models.predictions.create(model=MODEL, input=body, wait=1)
    assert p.status == "starting"
    deadline = time.monotonic() + 60
    while p.status == "starting" and time.monotonic() < deadline:
        time.sleep(0.2)
        p.reload()
    assert p.status == "processing"
    canceled = c.predictions.cancel(p.id)
    assert canceled.id == p.id
    p.wait()
    assert p.status == "canceled" and p.output is None


def test_a_webhook_filtered_to_completed_arrives_once_with_the_prediction(http_api, pictures, webhook_worker, receiver):
    c = sdk(http_api)
    img, mask = (data_url(p) for p in pictures)
    p = c.models.predictions.create(model=MODEL, input={"prompt": "hook", "image": img, "mask": mask, **FAST},
                                    webhook=receiver.url("/replicate"), webhook_events_filter=["completed"])  # fmt: skip
    p.wait()
    hits = receiver.wait("/replicate", 1)
    time.sleep(1.5)
    assert len(receiver.at("/replicate")) == 1
    secret = httpx.get(f"{http_api}/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {KEYS['alice']}"})
    payload = Webhook(secret.json()["key"]).verify(hits[0]["body"], hits[0]["headers"])
    assert payload["id"] == p.id and payload["status"] == "succeeded" and len(payload["output"]) == 1
    assert payload["model"] == MODEL and payload["version"] == p.version


def test_a_photo_sized_data_url_and_a_file_beside_a_data_url(http_api, tmp_path):
    """A prediction's body takes images of a real size (as `/v1/jobs` does), and one image may be a file
    while the other is a data: URL."""
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (96, 96, 160, 160))
    (tmp_path / "photo.png").write_bytes(png_bytes(photo))
    (tmp_path / "mask.png").write_bytes(png_bytes(mask))
    assert len(data_url(tmp_path / "photo.png")) > 64 * 1024  # past the small routes' limit
    c = sdk(http_api)
    out = c.run(MODEL, input={"prompt": "big", "image": data_url(tmp_path / "photo.png"),
                              "mask": data_url(tmp_path / "mask.png"), **FAST})  # fmt: skip
    assert image_at(str(out[0])).size == (256, 256)
    with (tmp_path / "mask.png").open("rb") as f:
        mask_file = c.files.create(f)
    out = c.run(MODEL, input={"prompt": "mixed", "image": data_url(tmp_path / "photo.png"),
                              "mask": mask_file.urls["get"], **FAST})  # fmt: skip
    assert image_at(str(out[0])).size == (256, 256)


def test_another_tenants_prediction_and_file_are_404(http_api, pictures):
    alice, bob = sdk(http_api), sdk(http_api, "bob")
    with pictures[0].open("rb") as f:
        uploaded = alice.files.create(f)
    img = data_url(pictures[0])
    p = alice.models.predictions.create(model=MODEL, input={"prompt": "mine", "image": img, "mask": img, **FAST})
    for call in (lambda: bob.predictions.get(p.id), lambda: bob.predictions.cancel(p.id),
                 lambda: bob.files.get(uploaded.id)):  # fmt: skip
        with pytest.raises(ReplicateError) as err:
            call()
        assert err.value.status == 404
    # Bob naming Alice's file as an input: not his file, so a 404 too, never her bytes.
    with pytest.raises(ReplicateError) as err:
        bob.models.predictions.create(model=MODEL, input={"prompt": "x", "image": uploaded.urls["get"], "mask": img})
    assert err.value.status == 404


def test_a_missing_image_or_an_unknown_input_is_a_422_that_names_it(http_api):
    c = sdk(http_api)
    with pytest.raises(ReplicateError) as err:
        c.models.predictions.create(model=MODEL, input={"prompt": "no image"})
    assert err.value.status == 422 and "image" in (err.value.detail or "")
    with pytest.raises(ReplicateError) as err:
        c.models.predictions.create(model=MODEL, input={"prompt": "x", "image": "x", "colour": "red"})
    assert err.value.status == 422 and "input.colour" in (err.value.detail or "")
    with pytest.raises(ReplicateError) as err:
        c.models.get("someone/else")
    assert err.value.status == 404


PREDICTION_FIELDS = {"id", "model", "version", "input", "output", "logs", "error", "status", "created_at",
                     "started_at", "completed_at", "data_removed", "metrics", "source", "urls"}  # fmt: skip


def test_the_json_shapes(http_api, pictures):
    auth = {"Authorization": f"Bearer {KEYS['alice']}"}
    img = data_url(pictures[0])
    body = {"input": {"prompt": "shapes", "image": img, "mask": img, **FAST}}
    r = httpx.post(f"{http_api}/v1/models/{MODEL}/predictions", json=body, headers={**auth, "Prefer": "wait=30"},
                   timeout=40)  # fmt: skip
    assert r.status_code == 201 and r.headers["location"] == f"/v1/predictions/{r.json()['id']}"
    p = r.json()
    assert set(p) == PREDICTION_FIELDS and p["status"] == "succeeded", p
    assert p["urls"] == {
        "get": f"{http_api}/v1/predictions/{p['id']}",
        "cancel": f"{http_api}/v1/predictions/{p['id']}/cancel",
    }
    assert p["error"] is None and isinstance(p["metrics"]["predict_time"], float)
    assert p["input"]["prompt"] == "shapes" and "image" not in p["input"]  # images are not echoed back
    assert json.loads(json.dumps(p)) == httpx.get(p["urls"]["get"], headers=auth).json()

    model = httpx.get(f"{http_api}/v1/models/{MODEL}", headers=auth).json()
    assert {"url", "owner", "name", "description", "visibility", "run_count", "latest_version"} <= set(model)
    version = model["latest_version"]
    assert set(version) == {"id", "created_at", "cog_version", "openapi_schema"}
    inputs = version["openapi_schema"]["components"]["schemas"]["Input"]
    assert {"prompt", "image", "mask", "num_inference_steps", "seed"} <= set(inputs["properties"])
    versions = httpx.get(f"{http_api}/v1/models/{MODEL}/versions", headers=auth).json()
    assert versions["results"] == [version]
    page = httpx.get(f"{http_api}/v1/predictions", params={"limit": 1}, headers=auth).json()
    assert set(page) == {"previous", "next", "results"} and len(page["results"]) == 1 and page["next"]
    assert httpx.get(page["next"], headers=auth).json()["results"][0]["id"] != page["results"][0]["id"]

    missing = httpx.post(f"{http_api}/v1/predictions", json={"version": "nope", "input": {}}, headers=auth)
    problem = missing.json()
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert problem["status"] == 404 and problem["title"] == "Not Found" and "nope" in problem["detail"]
    assert problem["error"]["code"] == "not_found"
