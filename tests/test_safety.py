"""The safety policy: a tiny random StableDiffusionSafetyChecker built from config, then the worker's path."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from shared import keys
from shared.config import Settings
from shared.jobs.record import new_job_id
from shared.jobs.view import to_job
from shared.schemas import JobInput, compatibility_key
from shared.services import build_services
from shared.storage import job_prefix
from tests.conftest import auth, b64, isolated, make_pair, png_bytes
from workers.gpu.context import WorkerContext
from workers.gpu.runner import process_job
from workers.inpaint.safety import ContentBlocked, apply_policy
from workers.models.loading import load_pipeline
from workers.models.safety import Checker, SafetyUnavailable, load_checker, save_tiny_checker

FLAG_ALL, FLAG_NONE = -1.5, 1.5  # thresholds outside the cosine's [-1, 1]


def noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def sharpness(img: Image.Image) -> float:
    a = np.asarray(img.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


@pytest.fixture(scope="module")
def checkers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkers")
    return {"all": save_tiny_checker(root / "all", FLAG_ALL), "none": save_tiny_checker(root / "none", FLAG_NONE)}


def checker(path: Path, policy: str = "flag") -> Checker:
    c = load_checker(Settings(safety=policy, safety_checker=str(path), _env_file=None), "cpu")  # type: ignore[call-arg]
    assert c is not None
    return c


def test_thresholds_decide_and_the_checker_never_blackens_our_images(checkers):
    imgs = [noise(1), noise(2), noise(3)]
    before = [np.asarray(im).copy() for im in imgs]
    assert checker(checkers["all"]).flags(imgs) == [True, True, True]
    assert checker(checkers["none"]).flags(imgs) == [False, False, False]
    assert all(np.array_equal(np.asarray(im), b) for im, b in zip(imgs, before, strict=True))


def test_policies(checkers):
    imgs = [noise(4), noise(5)]
    assert apply_policy("none", None, imgs) == (imgs, None)
    out, flags = apply_policy("flag", checker(checkers["all"]), imgs)
    assert flags == [True, True] and out == imgs
    out, flags = apply_policy("blur", checker(checkers["all"]), imgs)
    assert flags == [True, True]
    assert all(sharpness(o) < sharpness(i) / 4 and o.size == i.size for o, i in zip(out, imgs, strict=True))
    assert np.asarray(out[0]).max() > 0  # blurred, not black
    with pytest.raises(ContentBlocked):
        apply_policy("block", checker(checkers["all"]), imgs)
    out, flags = apply_policy("block", checker(checkers["none"]), imgs)
    assert flags == [False, False] and out == imgs


def test_a_policy_without_its_checker_refuses_to_start(tmp_path):
    s = Settings(safety="flag", safety_checker=str(tmp_path / "missing"), hf_cache_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(SafetyUnavailable, match="cannot be loaded"):
        load_checker(s, "cpu")
    assert load_checker(Settings(safety="none", _env_file=None), "cpu") is None  # type: ignore[call-arg]
    tiny = load_checker(Settings(safety="flag", safety_checker="tiny-random", data_dir=tmp_path, _env_file=None), "cpu")  # type: ignore[call-arg]
    assert tiny is not None and len(tiny.flags([noise(1)])) == 1


@pytest.mark.parametrize(
    ("policy", "which", "status", "nsfw"),
    [
        ("block", "all", "failed", None),
        ("blur", "all", "succeeded", [True, True]),
        ("flag", "none", "succeeded", [False, False]),
        ("none", "all", "succeeded", None),
    ],
)
def test_the_worker_applies_the_policy_and_records_it(policy, which, status, nsfw, settings, storage, checkers):
    """process_job itself, in this process, on a job queued without a turn in a Redis database no
    worker serves (no worker races it)."""
    s = isolated(settings, 11).model_copy(update={"safety": policy, "safety_checker": str(checkers[which])})
    svc = build_services(s)
    store = svc.jobs
    ctx = WorkerContext(svc, load_pipeline(s), "test:1", checker=load_checker(s, "cpu"))
    img, mask = make_pair(64, 64)
    job_id = new_job_id()
    prefix = job_prefix("alice", job_id)
    storage.put(prefix + "input/image", png_bytes(img), "image/png")
    storage.put(prefix + "input/mask", png_bytes(mask), "image/png")
    params = JobInput(prompt="a red apple", num_inference_steps=2, num_outputs=2, seed=1)
    compat = compatibility_key(64, 64, 2, 7.5, 1.0)
    store.create(job_id, "alice", params, prefix + "input/image", prefix + "input/mask", compat)
    process_job(ctx, job_id)
    rec = store.get(job_id)
    assert rec is not None
    job = to_job(rec, storage).model_dump(mode="json")
    assert job["status"] == status and job["safety"] == policy and job["nsfw_content_detected"] == nsfw
    stored = storage.list_keys(prefix + "outputs/")
    if status == "failed":
        assert job["error"]["code"] == "content_blocked" and stored == [] and job["outputs"] == []
    else:
        assert len(stored) == 2


def test_score_rows_blocked_by_the_policy_are_a_400_content_blocked(settings, storage, checkers):
    """/score end to end on a Redis database no worker consumes: this test is the worker (block policy)."""
    s = settings.model_copy(
        update={
            "redis_url": settings.redis_url.rsplit("/", 1)[0] + "/4",
            "score_timeout_s": 60.0,
            "safety": "block",
            "safety_checker": str(checkers["all"]),
        }
    )
    svc = build_services(s)
    svc.r.flushdb()
    ctx = WorkerContext(svc, load_pipeline(s), "test:1", checker=load_checker(s, "cpu"))
    img, mask = make_pair(32, 32)
    row = {"image": b64(png_bytes(img)), "mask_image": b64(png_bytes(mask)), "num_inference_steps": 2}
    body = {"input_data": {"data": [{"prompt": "a cat", **row}, {"prompt": "a dog", **row}]}}
    with TestClient(create_app(s)) as c, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(c.post, "/score", headers=auth(), json=body)
        deadline = time.monotonic() + 30
        while len(ids := svc.r.zrange(keys.waiting(), 0, -1)) < 2:
            assert time.monotonic() < deadline and not answer.done()
            time.sleep(0.05)
        for job_id in ids:  # type: ignore[union-attr]
            process_job(ctx, str(job_id))
        r = answer.result(timeout=60)
    doc = r.json()
    assert r.status_code == 400 and doc["error"]["code"] == "content_blocked" and "Retry-After" not in r.headers
    assert sorted(doc["jobs"]) == sorted(ids) and {f["error"]["code"] for f in doc["failures"]} == {"content_blocked"}
