"""Scoring batches and the outside world: a batch fetches each distinct image URL once however many rows
use it and however often a row waits for queue room, and a huge batch body is refused without stalling
the API's other requests."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from shared.config import Settings
from shared.services import Services, build_services
from stack.services import free_port, wait_port
from tests.conftest import Files, WorkerProcess, auth, isolated, make_pair, png_bytes

FETCH_DB, BODY_DB = 6, 7  # Redis databases of their own: no session worker serves them


@pytest.fixture
def batch_svc(settings: Settings) -> Services:
    # Three waiting jobs per tenant: a 20-row batch waits for queue room several times.
    return build_services(isolated(settings, FETCH_DB).model_copy(update={"max_queued_per_tenant": 3}))


def _drain(svc: Services, batch_id: str) -> int:
    """Free queue room as a GPU worker would: end the batch's queued jobs (canceled). How many."""
    from shared.jobs import lifecycle

    ids = [j for j in svc.batches.job_ids(batch_id) if j]
    ended = 0
    for rec in svc.jobs.get_many(ids):
        if rec is not None and not rec.status.is_terminal:
            lifecycle.cancel(svc, rec)
            ended += 1
    return ended


def test_a_batch_fetches_each_distinct_image_url_once(batch_svc: Services, files: Files) -> None:
    from api.app import create_app
    from shared.batches.expander import advance

    img, mask = make_pair(64, 64)
    files.files["/b/img.png"] = (200, png_bytes(img), {})
    files.files["/b/mask.png"] = (200, png_bytes(mask), {})
    for k in range(4):
        files.files[f"/b/mask/{k}.png"] = (200, png_bytes(mask), {})
    files.hits.clear()
    # Every row takes `parameters.image`; half the rows bring a mask URL of their own (four distinct).
    rows = [{"prompt": f"row {i}"} if i < 10 else {"prompt": f"row {i}", "mask_image": files.url(f"/b/mask/{i % 4}.png")}
            for i in range(20)]  # fmt: skip
    body = {
        "input_data": {"data": rows},
        "parameters": {"image": files.url("/b/img.png"), "mask_image": files.url("/b/mask.png"),
                       "num_inference_steps": 2},
    }  # fmt: skip
    with TestClient(create_app(batch_svc.settings)) as c:
        r = c.post("/v1/batches", headers=auth(), json=body)
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    waits, outcome = 0, ""
    deadline = time.monotonic() + 60
    while outcome not in ("idle", "done", "gone"):
        assert time.monotonic() < deadline, outcome
        outcome = advance(batch_svc, bid)
        if outcome == "wait":
            waits += 1
            assert _drain(batch_svc, bid) > 0
    b = batch_svc.batches.get(bid)
    assert b is not None and b.expanded and b.rows_submitted == 20 and b.rejected == 0, b.fields
    assert waits >= 3  # rows were refused for queue room and taken again
    hits = Counter(files.hits)
    wanted = ["/b/img.png", "/b/mask.png", *(f"/b/mask/{k}.png" for k in range(4))]
    assert {p: hits[p] for p in wanted} == dict.fromkeys(wanted, 1), dict(hits)


def test_a_failing_image_url_is_the_creators_error_or_asked_once(batch_svc: Services, files: Files) -> None:
    from api.app import create_app
    from shared.batches.expander import advance

    img = make_pair(64, 64)[0]
    files.files["/c/img.png"] = (200, png_bytes(img), {})
    files.hits.clear()
    gone, bad = files.url("/c/gone.png"), files.url("/c/bad.png")
    files.files["/c/bad.png"] = (200, b"not an image at all", {})
    with TestClient(create_app(batch_svc.settings)) as c:
        for url, status, code in ((gone, 400, "image_fetch_failed"), (bad, 400, "unsupported_image_format")):
            body = {"input_data": {"data": [{"prompt": "x"}]}, "parameters": {"image": url, "mask_image": url}}
            r = c.post("/v1/batches", headers=auth(), json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
            assert r.json()["error"]["param"] in ("parameters.image", "parameters.mask_image"), r.text
        # A row's own URL that fails: each row that names it is rejected, the URL asked once more.
        rows = [{"prompt": f"row {i}", "mask_image": gone} for i in range(5)]
        body = {"input_data": {"data": rows}, "parameters": {"image": files.url("/c/img.png")}}
        r = c.post("/v1/batches", headers=auth(), json=body)
        assert r.status_code == 202, r.text
    bid = r.json()["id"]
    while advance(batch_svc, bid) == "more":
        pass
    b = batch_svc.batches.get(bid)
    assert b is not None and b.rejected == 5, b.fields
    assert {e["code"] for e in batch_svc.batches.rejections(bid).values()} == {"image_fetch_failed"}
    assert Counter(files.hits) == {"/c/gone.png": 2, "/c/bad.png": 1, "/c/img.png": 1}, files.hits


# --- a huge batch body -------------------------------------------------------------------------------


@pytest.fixture
def api_port(settings: Settings, tmp_path: Any) -> Iterator[int]:
    """The API as a process of its own (its event loop is what is measured), rows capped at 1000."""
    s = isolated(settings, BODY_DB).model_copy(update={"max_batch_rows": 1000})
    port = free_port()
    proc = WorkerProcess(s, tmp_path / "api.log", "api", "--host", "127.0.0.1", "--port", str(port)).start()
    assert proc.proc is not None
    try:
        wait_port(port, 60, proc.proc)
        yield port
    finally:
        proc.stop()
        if proc.proc.returncode not in (0, -15, None):
            print(proc.log_tail())


def _healthz_times(c: httpx.Client, stop: threading.Event, seconds: float = 3600) -> list[float]:
    """How long each /healthz took, asked one after another until `stop` is set (or for `seconds`)."""
    took: list[float] = []
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        t0 = time.monotonic()
        assert c.get("/healthz").status_code == 200
        took.append(time.monotonic() - t0)
        time.sleep(0.02)
    return took


def test_a_huge_batch_body_is_refused_without_stalling_other_requests(api_port: int) -> None:
    base = f"http://127.0.0.1:{api_port}"
    # ~20 MB (just under the body cap, INPAINT_MAX_UPLOAD_BYTES): 76,000 rows, 76 times the row cap.
    row = {
        "prompt": "a cat on a bench",
        "image": "x" * 40,
        "mask_image": "y" * 20,
        "seed": 1,
        "strength": 0.9,
        "guidance_scale": 7.5,
        "num_inference_steps": 20,
        "negative_prompt": "blurry",
        "output_format": "png",
    }
    raw = json.dumps({"input_data": {"data": [row] * 76_000}}).encode()
    assert 19_000_000 < len(raw) < 20_000_000
    # Clients made beforehand: making one loads a CA bundle, and would stall this process, not the API's.
    probe_client = httpx.Client(base_url=base, timeout=60)
    clients = [httpx.Client(base_url=base, timeout=120) for _ in range(10)]
    baseline = max(_healthz_times(probe_client, threading.Event(), seconds=2.0))
    answers: list[tuple[int, str, float]] = []

    def post(c: httpx.Client) -> None:
        t0 = time.monotonic()
        r = c.post("/v1/batches", content=raw, headers={**auth(), "content-type": "application/json"})
        answers.append((r.status_code, r.json()["error"]["code"], time.monotonic() - t0))

    stop = threading.Event()
    took: list[float] = []
    probe = threading.Thread(target=lambda: took.extend(_healthz_times(probe_client, stop)))
    probe.start()
    posts = [threading.Thread(target=post, args=(c,)) for c in clients]
    for t in posts:
        t.start()
    for t in posts:
        t.join(120)
    stop.set()
    probe.join(60)
    for c in (probe_client, *clients):
        c.close()
    worst, stalled = max(took), sum(max(0.0, t - 0.1) for t in took)
    print(f"healthz: idle worst {baseline:.3f}s; under ten huge bodies worst {worst:.3f}s, "
          f"{stalled:.3f}s past 0.1s in all; posts {[(s, round(t, 2)) for s, _, t in answers]}")  # fmt: skip
    assert [a[:2] for a in answers] == [(413, "batch_too_large")] * 10, answers
    # Parsed on the event loop, each body held every other request for its whole parse, one after another
    # (measured: 2.3 s to 3.9 s of the probe's time past 0.1 s, here); in a thread, at most a little.
    assert stalled < max(1.2, 15 * baseline), (baseline, worst, stalled)
