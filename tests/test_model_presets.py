"""Each catalog model through its own diffusers class: the tiny fixtures end to end on CPU, and the real
presets' refusals, licence and lock files against a Hugging Face cache laid out here (no download)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image

from shared import catalog
from shared.config import Settings
from tests.conftest import make_pair
from workers.inpaint.request import InpaintRequest, InpaintResult
from workers.inpaint.run import run_batch, run_inpaint, warm_up
from workers.models import locks
from workers.models.loading import LoadedPipeline, load_pipeline
from workers.models.presets import (
    SD2_REVISION,
    LicenceNotAccepted,
    ModelUnavailable,
    fetch_model,
    resolve_model,
)
from workers.models.serving import ServingPlan, ShapeRouter, compile_modules, uncompile
from workers.models.tiny_sdxl import build_tiny_sdxl

TINIES = [catalog.TINY, catalog.TINY_SDXL, catalog.TINY_FLUX]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def loaded(models: Path) -> dict[str, LoadedPipeline]:
    return {n: load_pipeline(Settings(model=n, device="cpu", data_dir=models)) for n in TINIES}


def req(seed: int, w: int = 64, h: int = 64, **kw: Any) -> InpaintRequest:
    img, mask = make_pair(w, h)
    return InpaintRequest(image=img, mask=mask, prompt="a red apple", seed=seed, num_inference_steps=2, **kw)


def pixels(res: InpaintResult | BaseException) -> np.ndarray:
    assert isinstance(res, InpaintResult), res
    return np.asarray(res.images[0], dtype=np.int16)


class Spy:
    """A pipeline wrapper that records the arguments of every call."""

    def __init__(self, pipe: Any):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kw: Any) -> Any:
        self.calls.append(kw)
        return self.pipe(**kw)

    def __getattr__(self, name: str) -> Any:  # the pipeline's components (FLUX's T5 tokenizer)
        return getattr(self.pipe, name)


@pytest.mark.parametrize("name", TINIES)
def test_each_tiny_preset_loads_with_its_class_and_batches_like_it_runs_alone(loaded, models, name):
    model = catalog.find(name)
    assert model is not None
    lp = loaded[name]
    assert isinstance(lp.pipe, getattr(diffusers, model.pipeline))
    assert (lp.name, lp.family, lp.kind) == (name, model.family, "diffusers")
    assert lp.revision.startswith(f"{name}-v") and (models / "models" / lp.revision / "model_index.json").is_file()
    a, b = run_batch(lp, [req(5), req(6)])
    solo = pixels(run_inpaint(lp, req(5)))
    assert pixels(a).shape == pixels(b).shape == (64, 64, 3)
    # float rounding of batched kernels at most (as tests/test_batching.py): a wrong row differs everywhere
    diff = np.abs(pixels(a) - solo)
    assert diff.max() <= 8 and (diff > 2).mean() < 0.001, (diff.max(), (diff > 2).sum())
    assert not np.array_equal(pixels(a), pixels(b))  # its own generator per row


def test_flux_gets_no_negative_prompt_a_short_t5_length_and_sizes_in_sixteens(loaded):
    flux = loaded[catalog.TINY_FLUX]
    spy = Spy(flux.pipe)
    lp = LoadedPipeline(flux.name, flux.revision, "diffusers", "cpu", spy, family="flux")
    out = run_inpaint(lp, req(1, w=40, h=24, negative_prompt="blurry", guidance_scale=30.0))
    (kw,) = spy.calls
    assert "negative_prompt" not in kw and kw["max_sequence_length"] == 32 and kw["guidance_scale"] == 30.0
    assert [im.size for im in kw["image"]] == [(48, 32)]  # packed 2×2 latents: multiples of 16
    assert out.images[0].size == (40, 24)
    sdxl = loaded[catalog.TINY_SDXL]
    spy = Spy(sdxl.pipe)
    run_batch(LoadedPipeline(sdxl.name, sdxl.revision, "diffusers", "cpu", spy, family="sdxl"), [req(1), req(2)])
    assert spy.calls[0]["negative_prompt"] == ["", ""] and spy.calls[0]["image"][0].size == (64, 64)


def test_warm_up_runs_at_the_catalog_size(loaded):
    tiny = loaded[catalog.TINY_SDXL]
    spy = Spy(tiny.pipe)
    warm_up(LoadedPipeline(tiny.name, tiny.revision, "diffusers", "cpu", spy, family="sdxl"))
    assert [im.size for im in spy.calls[0]["image"]] == [(64, 64)]


def test_flux_is_refused_until_its_licence_is_accepted_then_wants_a_fetch(tmp_path: Path):
    s = Settings(model=catalog.FLUX, device="cpu", data_dir=tmp_path, hf_cache_dir=tmp_path / "hf")
    with pytest.raises(LicenceNotAccepted, match="INPAINT_ACCEPT_LICENSES=flux-fill") as err:
        load_pipeline(s)
    assert "Non-Commercial" in str(err.value)
    for accepted in ("flux-fill", "black-forest-labs/FLUX.1-Fill-dev"):
        with pytest.raises(ModelUnavailable, match="inpaint model fetch flux-fill") as err:
            load_pipeline(s.model_copy(update={"accept_licenses": f"other, {accepted}"}))
        assert not isinstance(err.value, LicenceNotAccepted)
    with pytest.raises(LicenceNotAccepted):
        fetch_model(s, catalog.FLUX)  # not even downloaded before it is accepted


def test_sdxl_without_a_lock_is_refused_naming_the_fetch(tmp_path: Path):
    s = Settings(model=catalog.SDXL, device="cpu", data_dir=tmp_path, hf_cache_dir=tmp_path / "hf")
    with pytest.raises(ModelUnavailable, match=r"no lock file.*inpaint model fetch sdxl-inpainting"):
        load_pipeline(s)


def cache_snapshot(cache: Path, repo: str, commit: str) -> Path:
    """Where the HF cache keeps `repo` at `commit`, with `main` pointing at it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_fetch_locks_the_snapshot_and_a_worker_serves_only_what_is_locked(tmp_path: Path, monkeypatch):
    cache = tmp_path / "hf"
    snapshot = cache_snapshot(cache, "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", COMMIT)
    build_tiny_sdxl().save_pretrained(str(snapshot), variant="fp16")  # the layout fetched: fp16 weights
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # served from the cache
    s = Settings(model=catalog.SDXL, device="cpu", data_dir=tmp_path / "data", hf_cache_dir=cache)

    path, lock = fetch_model(s, catalog.SDXL)
    assert path == snapshot and lock.revision == COMMIT and lock.variant == "fp16"
    saved = json.loads(locks.lock_path(s, catalog.SDXL).read_text())
    assert saved["revision"] == COMMIT and "unet/diffusion_pytorch_model.fp16.safetensors" in saved["files"]
    assert locks.read_lock(s, catalog.SDXL) == lock

    lp = load_pipeline(s)
    assert isinstance(lp.pipe, diffusers.StableDiffusionXLInpaintPipeline)
    assert (lp.name, lp.revision, lp.family) == (catalog.SDXL, COMMIT, "sdxl")

    index = snapshot / "model_index.json"
    index.write_text(index.read_text().replace("true", "false"))  # the snapshot changed under the lock
    with pytest.raises(ModelUnavailable, match="not the one locked"):
        load_pipeline(s)
    (snapshot / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(ModelUnavailable, match=r"incomplete here .*vae"):
        load_pipeline(s)
    with pytest.raises(ModelUnavailable, match="incomplete"):
        fetch_model(s, catalog.SDXL)  # and a fetch does not lock a half snapshot
    locks.lock_path(s, catalog.SDXL).write_text("{not json")
    with pytest.raises(ModelUnavailable, match="unreadable"):
        load_pipeline(s)
    locks.write_lock(s, locks.Lock(catalog.SDXL, lock.repo, "f" * 40, lock.model_index_sha256))
    with pytest.raises(ModelUnavailable, match=f"@{'f' * 40} is not in the local Hugging Face cache"):
        load_pipeline(s)


def test_sd2_serves_its_pinned_commit_without_a_lock(loaded, models: Path, tmp_path: Path):
    cache = tmp_path / "hf"
    snapshot = cache_snapshot(cache, "stabilityai/stable-diffusion-2-inpainting", SD2_REVISION)
    shutil.copytree(models / "models" / loaded[catalog.TINY].revision, snapshot)
    s = Settings(model="auto", device="cpu", data_dir=tmp_path / "data", hf_cache_dir=cache)
    assert resolve_model(s) == catalog.SD2
    lp = load_pipeline(s)
    assert isinstance(lp.pipe, diffusers.StableDiffusionInpaintPipeline)
    assert (lp.name, lp.revision, lp.family) == (catalog.SD2, SD2_REVISION, "sd2")
    assert not locks.lock_path(s, catalog.SD2).exists()


def test_missing_parts_names_what_a_snapshot_lacks(tmp_path: Path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    index = {
        "_class_name": "X",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert locks.missing_parts(tmp_path) == ["unet/*.safetensors", "vae/"]
    (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert locks.missing_parts(tmp_path, "fp16", frozenset({"vae"})) == []
    assert locks.missing_parts(tmp_path, None, frozenset({"vae"})) == ["unet/*.safetensors"]


def test_a_diffusers_directory_loads_with_the_class_it_names(loaded):
    sdxl = loaded[catalog.TINY_SDXL]
    local = load_pipeline(Settings(model=str(sdxl.pipe.config._name_or_path), device="cpu"))
    assert isinstance(local.pipe, diffusers.StableDiffusionXLInpaintPipeline) and local.family == "sdxl"
    assert local.revision.startswith("local-")
    assert isinstance(run_inpaint(local, req(1)).images[0], Image.Image)


def test_flux_compiles_its_transformer_and_pads_rows_without_cfg(loaded):
    flux = loaded[catalog.TINY_FLUX]
    transformer = flux.pipe.transformer
    compile_modules(flux.pipe, "default", False, 1)
    try:
        router = transformer.forward
        assert isinstance(router, ShapeRouter)
        # FLUX calls its transformer with keywords only; no shape was warmed, so it runs eagerly
        assert pixels(run_inpaint(flux, req(5))).shape == (64, 64, 3) and not router.shapes
    finally:
        uncompile(flux.pipe)
    assert not isinstance(transformer.forward, ShapeRouter)
    # guidance is embedded, not a doubled batch: the rows are padded to a bucket whatever the guidance
    assert ServingPlan(buckets=[1, 2, 4], compiled_sizes=[(64, 64)], cfg=False).padded_rows(3, 64, 64, 1.0) == 4
    assert ServingPlan(buckets=[1, 2, 4], compiled_sizes=[(64, 64)]).padded_rows(3, 64, 64, 1.0) == 3
