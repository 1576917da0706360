"""The GPU work's CPU side, on tiny-random: the quality harness, the profile split and the fp8 switch
(which must refuse, clearly, where it cannot run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.gpu_throughput import make_request
from benchmarks.profiling import profile_batch
from benchmarks.quality import evaluate
from shared.config import Settings
from tests.conftest import ROOT, settings_env
from workers.models.loading import LoadedPipeline
from workers.models.precision import PrecisionUnavailable, check_precision
from workers.models.serving import prepare
from workers.models.tiny import build_tiny_random


@pytest.fixture(scope="module")
def tiny() -> LoadedPipeline:
    pipe = build_tiny_random()
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline("tiny-random", "test", "diffusers", "cpu", pipe, "float32")


def test_quality_harness_passes_its_floor_and_rejects_another_path(tiny: LoadedPipeline) -> None:
    report = evaluate(tiny.pipe, 64, 6, ["control-fewer-steps", "fp8"], ["batched"])
    got = report["candidates"]
    assert report["cases"] == 4 and len(got["batched"]["cases"]) == 4
    assert got["batched"]["verdict"]["fp16_level"]  # the floor: the reference at another batch size
    assert report["floor_mean_masked_psnr_db"] == got["batched"]["mean_masked_psnr_db"] > 40
    control = got["control-fewer-steps"]
    assert not control["verdict"]["fp16_level"]  # one step fewer is another picture: the harness says so
    assert control["mean_masked_psnr_db"] < report["floor_mean_masked_psnr_db"] - 1
    assert control["max_latent_rel_l2"] > got["batched"]["max_latent_rel_l2"]
    assert "needs a CUDA GPU" in got["fp8"]["unavailable"]  # reported, not fatal, on a CPU


def test_profile_splits_one_micro_batch_by_kind_and_part(tiny: LoadedPipeline) -> None:
    prof = profile_batch(tiny, [make_request(i, 64, 4, seed=i) for i in range(4)])
    assert prof["rows"] == 4 and prof["total_ms"] > 0
    kinds = prof["by_kind_ms"]
    assert kinds["convolution"] > 0 and kinds["matmul"] > 0 and kinds["attention"] > 0
    assert sum(kinds.values()) == pytest.approx(prof["total_ms"], rel=0.01)
    assert {"unet", "vae.encode", "vae.decode", "text_encoder"} <= set(prof["by_part_ms"])
    assert prof["top_ops_ms"] and prof["top_ops_ms"][0][1] >= prof["top_ops_ms"][-1][1]


def test_fp8_is_refused_where_it_cannot_run(tiny: LoadedPipeline, settings: Settings) -> None:
    check_precision("fp16", "cpu")  # the default always runs
    with pytest.raises(PrecisionUnavailable, match="needs a CUDA GPU"):
        check_precision("fp8", "cpu")
    with pytest.raises(PrecisionUnavailable, match="needs a CUDA GPU"):  # not silently served at fp32
        prepare(tiny.pipe, "diffusers", "cpu", Settings(precision="fp8", _env_file=None))  # type: ignore[call-arg]
    env = settings_env(settings.model_copy(update={"precision": "fp8"}))
    proc = subprocess.run([sys.executable, "-m", "stack.cli", "worker"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "inpaint worker: INPAINT_PRECISION=fp8 needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]


def test_quality_cli_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, "benchmarks/quality.py", "--tiny", "--steps", "3", "--candidates",
                           "control-fewer-steps", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fp16-level False" in proc.stdout and out.exists()


_START = """
import json, sys
from torch._dynamo.utils import counters
from workers.models import compile_cache
from workers.models.serving import compile_modules, warm_shape
from workers.models.tiny import build_tiny_random

pipe = build_tiny_random()
pipe.set_progress_bar_config(disable=True)
path = compile_cache.cache_file(sys.argv[1], pipe, "default", [(64, 64)], [1], "fp32")
loaded = compile_cache.load(path)
compile_modules(pipe, "default", False, 1)
warm_shape(pipe, 64, 64, 1)
saved = False if loaded else compile_cache.save(path)
print(json.dumps({"loaded": loaded, "saved": saved, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@pytest.mark.slow
def test_compile_cache_lets_a_second_start_skip_code_generation(tmp_path: Path) -> None:
    """Two worker starts, each with an empty inductor cache of its own: only the artefact file in
    INPAINT_COMPILE_CACHE_DIR can spare the second its code generation."""

    def start(n: int) -> dict[str, int | bool]:
        env = {**settings_env(Settings(_env_file=None)), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{n}")}  # type: ignore[call-arg]
        proc = subprocess.run([sys.executable, "-c", _START, str(tmp_path / "cache")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=400)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    cold = start(1)
    assert cold["loaded"] is False and cold["saved"] is True and cold["misses"] > 0
    assert list((tmp_path / "cache").glob("inductor-*.bin"))
    warm = start(2)
    assert warm["loaded"] is True and warm["hits"] > 0 and warm["misses"] == 0, warm


class _FakeTorchao:
    """torchao's entry points as a stand-in: records the config asked for, optionally fails like torchao
    does when per-row scaling meets fp16 weights."""

    def __init__(self, fail: BaseException | None) -> None:
        self.fail, self.asked = fail, []  # type: list[Any]

    def module(self) -> Any:
        import types

        mod = types.ModuleType("torchao.quantization")
        mod.PerRow = type("PerRow", (), {})  # type: ignore[attr-defined]
        mod.PerTensor = type("PerTensor", (), {})  # type: ignore[attr-defined]
        mod.Float8DynamicActivationFloat8WeightConfig = lambda granularity: granularity  # type: ignore[attr-defined]

        def quantize_(model: Any, config: Any, filter_fn: Any = None) -> None:
            self.asked.append((type(config).__name__, next(model.parameters()).dtype))
            if self.fail is not None:
                raise self.fail

        mod.quantize_ = quantize_  # type: ignore[attr-defined]
        return mod


def _fake_torchao_only(monkeypatch: pytest.MonkeyPatch, fail: BaseException | None) -> _FakeTorchao:
    import types

    fake = _FakeTorchao(fail)
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake.module())
    return fake


def _fake_fp8_gpu(monkeypatch: pytest.MonkeyPatch, fail: BaseException | None) -> _FakeTorchao:
    """A machine that passes every fp8 precondition, with torchao replaced by the fake."""
    from workers.models import precision, serving

    fake = _fake_torchao_only(monkeypatch, fail)
    for mod in (precision, serving):
        monkeypatch.setattr(mod, "check_precision", lambda p, d: None)
    return fake


def test_fp8_transform_failure_is_a_refusal_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao asserting inside the transform (per-row scaling on fp16 weights) must reach the worker
    as PrecisionUnavailable, which it reports and refuses to start with, not as an AssertionError."""
    pipe = build_tiny_random()
    fake = _fake_fp8_gpu(monkeypatch, AssertionError("PerRow quantization only works for bfloat16 precision"))
    settings = Settings(precision="fp8", compile="off", batch_max_size=2, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(PrecisionUnavailable, match="INPAINT_PRECISION=fp8: torchao could not quantize"):
        prepare(pipe, "diffusers", "cuda", settings)
    assert fake.asked


def test_fp8_is_per_tensor_on_the_fp16_unet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The served fp8 keeps the fp16 UNet and asks for per-tensor scales (what torchao supports there)."""
    import torch

    from workers.models.precision import apply_precision

    pipe = build_tiny_random().to(dtype=torch.float16)
    fake = _fake_fp8_gpu(monkeypatch, None)
    assert apply_precision(pipe, "fp8") == "fp8"
    assert fake.asked == [("PerTensor", torch.float16)]


def test_fp8_check_leaves_cuda_uninitialised_in_a_forking_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's parent checks fp8 before Celery forks its children; had it initialised CUDA, no
    child could use the GPU. A child process reads the capability and quantizes one linear instead."""
    import torch

    from workers.models import precision

    def in_process() -> tuple[int, int]:
        raise AssertionError("CUDA initialised in the parent")

    _fake_torchao_only(monkeypatch, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", in_process)
    monkeypatch.setattr(precision, "_probe_in_child", lambda: ((9, 0), None))
    precision.check_precision("fp8", "cuda")
    refused = "INPAINT_PRECISION=fp8: torchao could not quantize the UNet (tensor scaling, AssertionError: x)"
    monkeypatch.setattr(precision, "_probe_in_child", lambda: ((9, 0), refused))
    with pytest.raises(PrecisionUnavailable, match=r"torchao could not quantize the UNet \(tensor scaling"):
        precision.check_precision("fp8", "cuda")
    monkeypatch.setattr(precision, "_probe_in_child", lambda: ((8, 6), None))
    with pytest.raises(PrecisionUnavailable, match=r"compute capability 8\.9 or newer; this GPU has 8\.6"):
        precision.check_precision("fp8", "cuda")
