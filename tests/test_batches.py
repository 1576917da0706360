"""`POST /v1/batches`: inline and file rows become jobs through the real queue, worker and S3."""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import auth, b64, make_pair, png_bytes

DONE = ("succeeded", "failed", "canceled")


def row(prompt: str, w: int = 64, h: int = 64, **extra: Any) -> dict[str, Any]:
    img, mask = make_pair(w, h)
    return {"prompt": prompt, "image": b64(png_bytes(img)), "mask_image": b64(png_bytes(mask)), **extra}


def wait_batch(client: Any, batch_id: str, timeout: float = 240, until: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/batches/{batch_id}", headers=auth())
        assert r.status_code == 200, r.text
        b = r.json()
        if (until or (lambda x: x["status"] in DONE))(b):
            return dict(b)
        assert time.monotonic() < deadline, {k: b[k] for k in ("status", "counts", "progress")}
        time.sleep(0.25)


def manifest(b: dict[str, Any]) -> list[dict[str, Any]]:
    text = httpx.get(b["manifest_url"]).text
    return [json.loads(line) for line in text.splitlines()]


def test_the_cards_body_as_a_batch(client, worker, webhook_worker):
    body = {"input_data": {"columns": ["prompt", "image", "mask_image"], "index": [0, 1],
            "data": [row("A yellow cat, high resolution, sitting on a park bench"),
                     row("A cat with a hat, sitting on a park bench")]},
            "parameters": {"num_inference_steps": 2}}  # fmt: skip
    r = client.post("/v1/batches", headers=auth(), json=body)
    assert r.status_code == 202, r.text
    created = r.json()
    assert set(created) >= {"id", "status", "jobs", "counts"} and created["status"] in ("queued", "running")
    b = wait_batch(client, created["id"])
    assert b["status"] == "succeeded" and b["counts"]["succeeded"] == 2 and b["progress"]["rows_total"] == 2
    lines = manifest(b)
    assert [ln["index"] for ln in lines] == [0, 1] and [ln["job_id"] for ln in lines] == b["jobs"]
    assert lines[1]["prompt"].startswith("A cat with a hat") and all(len(ln["outputs"]) == 1 for ln in lines)
    job = client.get(f"/v1/jobs/{b['jobs'][0]}", headers=auth()).json()
    assert job["status"] == "succeeded" and job["input"]["num_inference_steps"] == 2


def test_500_rows_from_a_jsonl_file_with_bad_rows_reported(client, worker, webhook_worker, storage):
    rows = [row(f"row {i}", seed=i) for i in range(500)]
    rows[7]["image"] = "%%% not base64"
    rows[123] = row("wrong mask", mask_image=b64(png_bytes(make_pair(32, 32)[1])))
    rows[321].pop("prompt")
    key = "tenants/alice/uploads/rows.jsonl"
    storage.put(key, ("\n".join(json.dumps(x) for x in rows) + "\n").encode(), "application/x-ndjson")
    r = client.post("/v1/batches", headers=auth(), json={"input_file": key, "parameters": {"num_inference_steps": 2}})
    assert r.status_code == 202, r.text
    b = wait_batch(client, r.json()["id"], timeout=400)
    assert b["status"] == "succeeded", b["counts"]
    assert b["counts"]["succeeded"] == 497 and b["counts"]["rejected"] == 3 and b["progress"]["rows_total"] == 500
    rejected = {x["index"]: x["error"]["code"] for x in b["rejected_rows"]}
    assert rejected == {7: "invalid_base64", 123: "mask_size_mismatch", 321: "validation_error"}
    lines = manifest(b)
    assert [ln["index"] for ln in lines] == list(range(500))
    assert [ln["status"] for ln in lines].count("succeeded") == 497
    assert lines[7]["status"] == "rejected" and lines[7]["job_id"] is None
    assert lines[499]["prompt"] == "row 499" and lines[499]["outputs"]
    assert len(set(b["jobs"]) - {None}) == 497  # one job per good row, none twice


def test_error_threshold_fails_the_batch_and_stops_reading_rows(client, worker, webhook_worker, storage):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["prompt", "image", "mask"])
    good = row("fine")
    for i in range(6):
        w.writerow(["bad", "not-base64!", good["mask_image"]] if i < 2 else ["fine", good["image"], good["mask_image"]])
    key = "tenants/alice/uploads/rows.csv"
    storage.put(key, buf.getvalue().encode(), "text/csv")
    r = client.post("/v1/batches", headers=auth(), json={"input_file": key, "error_threshold": 1})
    assert r.status_code == 202, r.text
    b = wait_batch(client, r.json()["id"])
    assert b["status"] == "failed" and "more than 1" in b["error"]
    assert b["counts"]["rejected"] == 2 and b["progress"]["rows_submitted"] == 2 and b["jobs"] == [None, None]


def test_cancel_a_batch(client, worker, webhook_worker):
    body = {"input_data": {"data": [row(f"r{i}") for i in range(30)]}, "parameters": {"num_inference_steps": 40}}
    bid = client.post("/v1/batches", headers=auth(), json=body).json()["id"]
    wait_batch(client, bid, until=lambda x: x["progress"]["rows_submitted"] > 0)
    r = client.post(f"/v1/batches/{bid}/cancel", headers=auth())
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    b = wait_batch(client, bid, until=lambda x: x["counts"]["queued"] == x["counts"]["running"] == 0)
    assert b["status"] == "canceled" and b["counts"]["canceled"] > 0
    assert b["counts"]["succeeded"] + b["counts"]["canceled"] + b["counts"]["failed"] == len(
        [j for j in b["jobs"] if j]
    )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 422, "validation_error"),
        ({"input_file": "tenants/alice/x.jsonl", "input_data": {"data": [{}]}}, 422, "validation_error"),
        ({"input_file": "tenants/bob/uploads/rows.jsonl"}, 422, "input_file_forbidden"),
        ({"input_file": "tenants/alice/../bob/rows.jsonl"}, 422, "input_file_forbidden"),
        ({"input_file": "tenants/alice/uploads/none.jsonl"}, 422, "input_file_missing"),
        ({"input_data": {"data": []}}, 422, "validation_error"),
        ({"input_data": {"data": [row("x")]}, "error_threshold": -2}, 422, "validation_error"),
    ],
)
def test_bad_batch_requests(client, body, status, code):
    r = client.post("/v1/batches", headers=auth(), json=body)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_another_tenants_batch_is_404(client, worker, webhook_worker):
    bid = client.post("/v1/batches", headers=auth(), json={"input_data": {"data": [row("x")]}}).json()["id"]
    assert client.get(f"/v1/batches/{bid}", headers=auth("bob")).status_code == 404
    assert client.post(f"/v1/batches/{bid}/cancel", headers=auth("bob")).status_code == 404
    wait_batch(client, bid)


class _Died(BaseException):
    """The expander's process dying where it raises (a BaseException: no handler of the step takes it)."""


@pytest.mark.parametrize("dies_at", [0, 2, 4])
def test_an_expander_that_dies_between_a_rows_job_and_its_bookkeeping_loses_and_duplicates_no_row(
    settings, dies_at: int
) -> None:
    """A step dies after row `dies_at`'s job was made and before the row was recorded; the step runs
    again (the batch lock lapses; here it is released by the step's `finally`). On a Redis database
    of its own, no worker serves it: the test asserts what was queued."""
    from shared.batches.expander import advance
    from shared.batches.rows import row_job_id
    from shared.jobs.record import new_job_id
    from shared.services import build_services
    from tests.conftest import isolated

    svc = build_services(isolated(settings, 15))
    key = f"tenants/alice/uploads/{new_job_id()}.jsonl"
    svc.storage.put(key, "".join(json.dumps(row(f"row {i}", seed=i)) + "\n" for i in range(6)).encode(), "x-ndjson")
    bid = new_job_id()
    svc.batches.create(bid, "alice", key, "jsonl", {"num_inference_steps": 3}, -1)
    real = svc.batches.record_row

    def dying(batch_id: str, index: int, *args: Any, **kw: Any) -> None:
        if index == dies_at:
            raise _Died
        real(batch_id, index, *args, **kw)

    svc.batches.record_row = dying  # type: ignore[method-assign]
    with pytest.raises(_Died):
        advance(svc, bid)
    assert svc.jobs.get(row_job_id(bid, dies_at)) is not None  # its job exists; the row was not recorded
    svc.batches.record_row = real  # type: ignore[method-assign]
    for _ in range(10):
        if advance(svc, bid) != "more":
            break
    b = svc.batches.get(bid)
    assert b is not None and b.expanded and b.rows_submitted == 6
    assert svc.batches.job_ids(bid) == [row_job_id(bid, i) for i in range(6)]  # each row once, in order
    assert svc.jobs.waiting_counts("alice") == (6, 6)  # six jobs queued, none twice
    assert all(svc.jobs.get(row_job_id(bid, i)).attempts == 0 for i in range(6))  # type: ignore[union-attr]
