"""LoRA adapters on the tiny-random pipeline: on for their own call, off bit for bit after it, kept in
memory slots; one that does not fit fails its jobs, not the worker; a compiled, fused denoiser runs
them eagerly and gets its own modules back."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from shared.config import Settings
from shared.errors import Code
from tests.conftest import make_pair
from tests.lora_files import safetensors_bytes, sdxl_adapter
from workers.inpaint import adapters
from workers.inpaint.adapters import Adapter, AdapterFailed
from workers.inpaint.request import InpaintRequest
from workers.inpaint.run import run_batch, run_inpaint
from workers.models.loading import LoadedPipeline, load_pipeline
from workers.models.serving import ShapeRouter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    return load_pipeline(Settings(model="tiny-random", device="cpu", data_dir=tmp_path_factory.mktemp("models")))


def adapter(data: bytes, scale: float = 1.0) -> Adapter:
    return Adapter(hashlib.sha256(data).hexdigest(), scale, lambda: load_safetensors(data))


def plain(seed: int = 3, *loras: Adapter) -> InpaintRequest:
    img, mask = make_pair(40, 24)
    return InpaintRequest(image=img, mask=mask, prompt="a cat", num_inference_steps=3, seed=seed, loras=loras)


def pixels(pipeline: LoadedPipeline, req: InpaintRequest) -> np.ndarray:
    return np.asarray(run_inpaint(pipeline, req).images[0])


def test_an_adapter_changes_the_output_and_leaves_nothing_behind(
    tiny: LoadedPipeline, tiny_lora: bytes, other_lora: bytes
) -> None:
    solo = pixels(tiny, plain())
    with_lora = pixels(tiny, plain(3, adapter(tiny_lora)))
    assert not np.array_equal(with_lora, solo)
    assert np.array_equal(pixels(tiny, plain()), solo), "a job after an adapter's differs from its solo run"
    assert np.array_equal(pixels(tiny, plain(3, adapter(tiny_lora))), with_lora)  # loaded once, same again
    half = pixels(tiny, plain(3, adapter(tiny_lora, 0.5)))
    both = pixels(tiny, plain(3, adapter(tiny_lora), adapter(other_lora)))
    assert not np.array_equal(half, with_lora) and not np.array_equal(both, with_lora)
    assert np.array_equal(pixels(tiny, plain()), solo)
    # A micro-batch of two jobs with the same adapters: each as it is alone.
    results = run_batch(tiny, [plain(3, adapter(tiny_lora)), plain(3, adapter(tiny_lora))])
    for r in results:
        assert not isinstance(r, BaseException)
        assert np.abs(np.asarray(r.images[0]).astype(int) - with_lora).max() <= 2  # batched kernels round apart


def test_memory_slots_keep_the_most_recent_adapters(tiny: LoadedPipeline, tiny_lora: bytes, other_lora: bytes) -> None:
    adapters.configure(tiny.pipe, 1)
    try:
        for data in (tiny_lora, other_lora):
            run_inpaint(tiny, plain(3, adapter(data)))
            assert adapters.loaded(tiny.pipe) == [adapter(data).name]
        assert tiny.pipe.get_list_adapters()["unet"] == [adapter(other_lora).name]
    finally:
        adapters.configure(tiny.pipe, adapters.DEFAULT_SLOTS)


def test_an_adapter_that_does_not_fit_fails_its_jobs_and_not_the_worker(tiny: LoadedPipeline, tiny_lora: bytes) -> None:
    solo = pixels(tiny, plain())
    wide = dict(load_safetensors(tiny_lora))  # right names, but a key projection 64 wide: peft refuses it
    key = next(k for k in wide if "attn2.to_k.lora_A" in k)
    wide[key] = torch.randn(4, 64)
    misfits = [Adapter("c" * 64, 1.0, lambda: wide), adapter(sdxl_adapter()),
               adapter(safetensors_bytes({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 32)}))]  # fmt: skip
    for bad in misfits:
        (result,) = run_batch(tiny, [plain(3, bad)])
        assert isinstance(result, AdapterFailed) and result.code == Code.lora_incompatible, result
        assert bad.name not in adapters.loaded(tiny.pipe)
    assert np.array_equal(pixels(tiny, plain()), solo)
    assert not np.array_equal(pixels(tiny, plain(3, adapter(tiny_lora))), solo)  # good adapters still load


def test_a_compiled_fused_denoiser_runs_adapters_eagerly_and_gets_its_modules_back(
    tmp_path: Path, tiny: LoadedPipeline, tiny_lora: bytes
) -> None:
    """The CUDA serving shape on a CPU: fused QKV projections, and the UNet's forward behind a
    `ShapeRouter` (its compiled side counted here instead of compiled)."""
    pipeline = load_pipeline(Settings(model="tiny-random", device="cpu", data_dir=tmp_path))
    unet = pipeline.pipe.unet
    unet.fuse_qkv_projections()
    compiled_calls: list[int] = []
    eager = unet.forward

    def compiled(*args: object, **kwargs: object) -> object:
        compiled_calls.append(1)
        return eager(*args, **kwargs)

    router = ShapeRouter(eager, compiled)
    unet.forward = router
    router.learning = True
    solo = pixels(pipeline, plain())
    router.learning = False
    modules = [(name, id(m)) for name, m in unet.named_modules()]
    processors = unet.attn_processors

    seen = len(compiled_calls)
    with_lora = pixels(pipeline, plain(3, adapter(tiny_lora)))
    assert len(compiled_calls) == seen, "an adapter's call reached the compiled graph"
    # The fused projections would bypass the adapter on to_q/to_k/to_v: as on a plain pipeline instead.
    assert np.array_equal(with_lora, pixels(tiny, plain(3, adapter(tiny_lora))))
    assert unet.forward is router and adapters.loaded(pipeline.pipe) == []
    assert [(name, id(m)) for name, m in unet.named_modules()] == modules, "the graphs' own modules are back"
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert np.array_equal(pixels(pipeline, plain()), solo) and len(compiled_calls) > seen
