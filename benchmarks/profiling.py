"""Where one micro-batch's time goes: `torch.profiler` over one `run_batch` call, split by kind of
work (convolutions, matrix products, attention, fused/elementwise kernels, …), by model part (UNet,
VAE, text encoder; what is left is CPU work in the pipeline and ours) and counted host syncs.

On a GPU the split is of device time (what the card spent in kernels); on a CPU, of CPU time.
Compiled graphs run fused Triton kernels (`fused`), and call cuDNN/cuBLAS for convolutions and
matrix products, which keep their names.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from workers.inpaint.request import InpaintRequest
from workers.inpaint.run import run_batch
from workers.models.loading import LoadedPipeline

KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "fmha", "_attention")),
    ("convolution", ("conv", "cudnn")),
    ("matmul", ("addmm", "aten::mm", "bmm", "linear", "gemm", "cublas", "matmul", "sm90_xmma", "cutlass")),
    ("norm", ("group_norm", "layer_norm", "native_layer_norm", "native_group_norm")),
    ("fused", ("triton", "fused")),
    ("copy/convert", ("copy_", "to_copy", "contiguous", "memcpy", "clone", "cat", "pad")),
]  # fmt: skip
PARTS = {"unet": ("unet", "forward"), "vae.encode": ("vae", "encode"), "vae.decode": ("vae", "decode"),
         "text_encoder": ("text_encoder", "forward")}  # fmt: skip
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense", "aten::item")


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n.lower() in low for n in needles):
            return kind
    return "other"


@contextmanager
def labelled(pipe: Any) -> Iterator[None]:
    """Each model part's calls inside a profiler range named after it."""
    saved: list[tuple[Any, str, Any]] = []
    for label, (attr, method) in PARTS.items():
        owner = getattr(pipe, attr, None)
        if owner is None:
            continue
        original = getattr(owner, method)

        def wrapped(*args: Any, __f: Any = original, __label: str = label, **kwargs: Any) -> Any:
            with torch.profiler.record_function(f"part:{__label}"):
                return __f(*args, **kwargs)

        setattr(owner, method, functools.wraps(original)(wrapped))
        saved.append((owner, method, original))
    try:
        yield
    finally:
        for owner, method, original in saved:
            setattr(owner, method, original)


def profile_batch(loaded: LoadedPipeline, reqs: list[InpaintRequest]) -> dict[str, Any]:
    """Profile one micro-batch of `reqs` through the worker's own `run_batch`."""
    cuda = loaded.device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with labelled(loaded.pipe), torch.profiler.profile(activities=activities) as prof:
        run_batch(loaded, reqs)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()

    def self_us(e: Any) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    def total_us(e: Any) -> float:
        if cuda:
            return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))
        return float(e.cpu_time_total)

    ops = [e for e in events if not e.key.startswith("part:") and self_us(e) > 0]
    total = sum(self_us(e) for e in ops)
    by_kind: dict[str, float] = {}
    for e in ops:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + self_us(e)
    parts = {e.key.removeprefix("part:"): total_us(e) / 1000 for e in events if e.key.startswith("part:")}
    return {
        "clock": "device time (kernels)" if cuda else "CPU time",
        "rows": sum(r.num_outputs for r in reqs),
        "total_ms": round(total / 1000, 2),
        "by_kind_ms": {k: round(v / 1000, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "by_kind_share": {k: round(v / total, 4) for k, v in by_kind.items()} if total else {},
        "by_part_ms": {k: round(v, 2) for k, v in parts.items()},
        # on a GPU, kernels launched outside the model parts (the pipeline's own tensor work, ours);
        # on a CPU the parts' times are inclusive and overlap threads: not comparable with the total
        "outside_parts_ms": round(max(0.0, total / 1000 - sum(parts.values())), 2) if cuda else None,
        "host_syncs": int(sum(e.count for e in events if any(s in e.key for s in SYNC_OPS))),
        "top_ops_ms": [(e.key, round(self_us(e) / 1000, 2)) for e in sorted(ops, key=self_us, reverse=True)[:12]],
    }
