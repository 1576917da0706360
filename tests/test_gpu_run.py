"""The one GPU run, rehearsed on the CPU: results land where the GPU machine sends files back
(`$OUT`), nothing overwrites an earlier result, and every phase writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_quality_out_lands_under_OUT_and_never_overwrites(tmp_path: Path) -> None:
    out_dir = tmp_path / "OUT"
    out_dir.mkdir()
    env = {**os.environ, "OUT": str(out_dir)}
    elsewhere = tmp_path / "tree" / "q.json"  # where the GPU machine's copy of the tree would keep it
    for _ in range(2):
        proc = subprocess.run([sys.executable, "benchmarks/quality.py", "--tiny", "--steps", "2", "--candidates",
                               "", "--out", str(elsewhere)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    got = sorted(out_dir.glob("q*.json"))
    assert len(got) == 2, (got, list(tmp_path.rglob("*.json")))
    assert all(json.loads(p.read_text())["cases"] == 4 for p in got)


def test_result_path_is_under_OUT_with_a_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.outpaths import result_path

    monkeypatch.setenv("OUT", str(tmp_path))
    first = result_path(None, "gpu")
    first.write_text("{}")
    second = result_path(None, "gpu")
    assert first.parent == second.parent == tmp_path and first != second
    assert result_path("/somewhere/else/x.json", "gpu").parent == tmp_path
    monkeypatch.delenv("OUT")
    assert result_path(str(tmp_path / "y.json"), "gpu") == tmp_path / "y.json"


PHASE_FIELDS = {
    "p1-plain.json": {"batches", "best_batch", "best_images_per_s", "device", "torch"},
    "p2-service.json": {"throughput_images_per_s", "single_job_latency_s", "baseline_batch1_latency_s", "mix",
                        "ours", "warmup_s", "max_rel_error", "nan_outputs", "peak_memory_gb"},
    "p3-warm-start.json": {"warmup_s", "compile_cache", "buckets", "fxgraph_cache_hits", "fxgraph_cache_misses",
                           "single_job_latency_s"},
    "p4-fp8.json": {"smoke", "throughput_images_per_s", "single_job_latency_s", "max_rel_error", "precision"},
    "p5-quality.json": {"quality"},
}  # fmt: skip


def gpu_run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "OUT": str(out)}
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "benchmarks/gpu_run.py", "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc, time.monotonic() - t


def test_tiny_rehearsal_writes_every_phase(tmp_path: Path) -> None:
    """Every phase's file with every field the GPU run fills: CPU figures, or `skipped: no CUDA`."""
    proc, took = gpu_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu_run estimate" in proc.stdout  # said before anything ran
    assert took < 500, took  # 34-65 s alone on 2 cores; 120-400 s seen with other suites running beside it
    for name, fields in PHASE_FIELDS.items():
        got = json.loads((tmp_path / name).read_text())
        assert fields <= set(got), (name, fields - set(got))
        assert got["status"] in ("ok", "skipped: no CUDA"), (name, got["status"])
    plain = json.loads((tmp_path / "p1-plain.json").read_text())["batches"]
    assert all(b["warmups"] >= 2 and b["reps"] >= 5 and b["images_per_s"] > 0 for b in plain)
    service = json.loads((tmp_path / "p2-service.json").read_text())
    assert service["mix"] and all(
        m["errors"] == 0 and sum(m["batch_sizes"]) == int(n) for n, m in service["mix"].items()
    )
    summary = json.loads((tmp_path / "run.json").read_text())
    assert {p["file"] for p in summary["phases"].values()} == set(PHASE_FIELDS)
    assert summary["headline"]["ours_saturated_images_per_s"] > 0 and summary["left_out"] == {}
    assert len(list(tmp_path.iterdir())) <= 8  # what the GPU machine sends back: at most 8 files


def test_a_phase_past_its_limit_is_recorded_and_earlier_files_stay(tmp_path: Path) -> None:
    proc, _ = gpu_run(tmp_path, "--phases", "plain,quality", "--limit", "quality=2")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert json.loads((tmp_path / "p1-plain.json").read_text())["status"] == "ok"
    assert json.loads((tmp_path / "p5-quality.json").read_text())["status"].startswith("timeout")
    assert json.loads((tmp_path / "run.json").read_text())["phases"]["quality"]["status"].startswith("timeout")


def test_an_estimate_over_the_budget_is_refused_before_anything_runs(tmp_path: Path) -> None:
    proc, _ = gpu_run(tmp_path, "--phases", "plain,service", "--budget", "10")
    assert proc.returncode != 0 and "over the 10 s budget" in proc.stderr
    assert not list(tmp_path.iterdir())


# The GPU machine's own packages (its image, as listed for it on 2026-11-17): nothing of these travels.
GPU_MACHINE_HAS = set(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numpy onnx onnxruntime opencv-python-headless optax opt-einsum packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pytest
python-dateutil pytorch-lightning pyyaml regex requests rich safetensors scikit-image scikit-learn scipy seaborn
sentencepiece setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchmetrics torchvision tqdm transformers triton typer
typing-extensions typing-inspect urllib3 wheel wrapt xarray xxhash yarl zipp
""".split()
)
NOT_IMPORTED_HERE = {
    "torchao": "fp8 only, on CUDA",
    "typing-extensions": "a newer one than the GPU machine's",
    "importlib-metadata": "diffusers declares it (seen missing there)",
    "lazy-importer": "importlib-metadata declares it",
}

_IMPORTS = """
import builtins, json, sys, importlib.metadata as md
sys.argv = ["x"]
edges, real = set(), builtins.__import__
def hook(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and globals:
        edges.add((str(globals.get("__name__", "")).split(".")[0], name.split(".")[0]))
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = hook
import benchmarks.gpu_run, benchmarks.gpu_phases, benchmarks.quality, benchmarks.profiling
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
dists = md.packages_distributions()
print(json.dumps({"edges": sorted(edges), "dists": {t: dists.get(t, []) for _, t in edges}}))
"""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_the_wheelhouse_list_is_what_the_gpu_scripts_import_beyond_the_gpu_machine() -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # From our modules, through every package the GPU machine lacks (its own packages bring their own).
    needed, seen, todo = set(), set(), ["benchmarks", "workers", "shared", "__main__"]  # __main__: build_full's
    while todo:
        top = todo.pop()
        for _, dep in (e for e in got["edges"] if e[0] == top):
            names = {_norm(d) for d in got["dists"][dep]} - {"inpaint-service"}
            if dep in seen or not names or names & GPU_MACHINE_HAS:
                continue
            seen.add(dep)
            needed |= names
            todo.append(dep)
    listed = {_norm(line.split("==")[0]) for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}  # fmt: skip
    assert needed <= listed, f"imported on the GPU path, not in the wheelhouse: {sorted(needed - listed)}"
    assert listed - needed <= set(NOT_IMPORTED_HERE), f"in the wheelhouse, imported by nothing: {listed - needed}"
    assert all("==" in line for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#"))  # fmt: skip  # one version each: two stop the install
