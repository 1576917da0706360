"""LoRA adapters through the whole service: uploaded with `POST /v1/loras`, named by jobs, applied by a
real worker process (tiny-random) for their own micro-batch only."""

from __future__ import annotations

import base64
import io
import pickle
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import auth, job_body, wait_for
from tests.lora_files import sdxl_adapter, tiny_adapter

pytestmark = pytest.mark.usefixtures("worker")


def _upload(client: TestClient, data: bytes, name: str = "style.safetensors") -> Any:
    return client.post("/v1/loras", headers=auth(), files={"content": (name, data, "application/octet-stream")})


def _submit(client: TestClient, **params: Any) -> str:
    r = client.post("/v1/jobs", headers=auth(), json=job_body(64, 64, **params))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _pixels(job: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(httpx.get(job["outputs"][0]["url"]).content)), dtype=np.int16)


@pytest.fixture(scope="module")
def adapters(client: TestClient) -> tuple[str, str]:
    ids = []
    for seed in (1, 2):
        r = _upload(client, tiny_adapter(seed), f"style-{seed}.safetensors")
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids[0], ids[1]


def test_an_adapter_changes_the_job_and_the_next_job_without_it_is_its_own_reference(
    client: TestClient, adapters: tuple[str, str]
) -> None:
    first, _ = adapters
    plain = wait_for(client, _submit(client, seed=5, num_inference_steps=3))
    styled = wait_for(client, _submit(client, seed=5, num_inference_steps=3, loras=[{"id": first, "scale": 1.0}]))
    after = wait_for(client, _submit(client, seed=5, num_inference_steps=3))  # the worker held the adapter just now
    assert [j["status"] for j in (plain, styled, after)] == ["succeeded"] * 3, (plain, styled, after)
    assert styled["input"]["loras"] == [{"id": first, "url": None, "scale": 1.0}]
    assert np.abs(_pixels(styled) - _pixels(plain)).max() > 8  # the adapter did change the image
    assert np.array_equal(_pixels(after), _pixels(plain))  # nothing of it stayed behind: bit for bit


def test_jobs_share_a_micro_batch_only_with_the_same_adapters_at_the_same_scales(
    client: TestClient, adapters: tuple[str, str]
) -> None:
    first, second = adapters
    blocker = _submit(client, num_inference_steps=150, num_outputs=2, guidance_scale=6.5, prompt="blocker")
    same = [_submit(client, seed=20 + i, loras=[{"id": first, "scale": 0.8}]) for i in range(2)]
    other = _submit(client, seed=30, loras=[{"id": second, "scale": 0.8}])
    rescaled = _submit(client, seed=31, loras=[{"id": first, "scale": 0.5}])
    assert wait_for(client, blocker, timeout=180)["status"] == "succeeded"
    jobs = {job_id: wait_for(client, job_id, timeout=120) for job_id in [*same, other, rescaled]}
    assert all(j["status"] == "succeeded" for j in jobs.values()), jobs
    assert [jobs[j]["metrics"]["batch_size"] for j in same] == [2, 2]
    assert jobs[other]["metrics"]["batch_size"] == 1 and jobs[rescaled]["metrics"]["batch_size"] == 1


def test_a_pickle_and_an_adapter_of_another_architecture_are_each_422(client: TestClient) -> None:
    # (an oversized file: test_bad_uploads_are_clear_4xx, under a small cap)
    r = _upload(client, pickle.dumps({"lora_A": [1.0, 2.0]}), "evil.safetensors")
    assert r.status_code == 422 and r.json()["error"]["code"] == "lora_not_safetensors"
    r = _upload(client, sdxl_adapter(), "sdxl.safetensors")  # a valid file: its fit is judged per job
    assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", headers=auth(), json=job_body(64, 64, loras=[{"id": r.json()["id"]}]))
    assert r.status_code == 422 and r.json()["error"]["code"] == "lora_incompatible", r.text
    assert "sdxl" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", headers=auth(), json=job_body(64, 64, loras=[{"id": "lora_" + "0" * 24}]))
    assert r.status_code == 422 and r.json()["error"]["code"] == "lora_not_found"


def test_a_multipart_job_names_its_adapters_as_lora_parts(client: TestClient, adapters: tuple[str, str]) -> None:
    """The README's curl line: `-F lora=ID:SCALE`, one part per adapter."""
    first, second = adapters
    body = job_body(64, 64)
    files = {"image": ("i.png", base64.b64decode(body["image"]), "image/png"),
             "mask": ("m.png", base64.b64decode(body["mask"]), "image/png")}  # fmt: skip
    data = {"prompt": "a plum", "num_inference_steps": "2", "lora": [f"{first}:0.8", second]}
    r = client.post("/v1/jobs", headers=auth(), files=files, data=data)
    assert r.status_code == 202, r.text
    assert r.json()["input"]["loras"] == [
        {"id": first, "url": None, "scale": 0.8}, {"id": second, "url": None, "scale": 1.0},
    ]  # fmt: skip
    assert wait_for(client, r.json()["id"])["status"] == "succeeded"


def test_adapters_past_the_cap_are_refused_before_any_is_fetched(client: TestClient) -> None:
    from shared.loras import refs_in

    urls = [{"url": f"https://127.0.0.1:1/{i}.safetensors"} for i in range(4)]
    assert refs_in({"loras": urls}) == [] and len(refs_in({"input": {"loras": urls[:3]}})) == 3
    r = client.post("/v1/jobs", headers=auth(), json=job_body(64, 64, loras=urls))
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
    # A multipart body that gives both a `loras` field and `lora` parts is a 422, not a 500.
    body = job_body(64, 64)
    files_ = {"image": ("i.png", base64.b64decode(body["image"]), "image/png"),
              "mask": ("m.png", base64.b64decode(body["mask"]), "image/png")}  # fmt: skip
    r = client.post("/v1/jobs", headers=auth(), files=files_, data={"prompt": "p", "loras": "x", "lora": "lora_a"})
    assert r.status_code == 422, r.text
