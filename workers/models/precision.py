"""`INPAINT_PRECISION`: `fp16` (the default, the model's own half precision on CUDA) or `fp8` (opt-in).

fp8 quantizes the UNet's large linear layers (attention projections, feed-forwards: most of its
matrix math) to float8 e4m3 with one scale per tensor, activations quantized on the fly (torchao's
`Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())`); convolutions, norms, the VAE
and the text encoder stay fp16. Per-tensor, not per-row: torchao asserts that per-row scaling has
bfloat16 weights, and the served UNet is fp16 (`scaling="row"` casts the pipeline to bf16 first,
for measuring the alternative). Any failure of the transform is a `PrecisionUnavailable`. It needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell) and
torchao. Its quality is measured by `benchmarks/quality.py` (candidate `fp8`) and its speed by
`benchmarks/gpu_throughput.py --precision fp8`; where neither has run on a GPU, the README says it
is unmeasured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from workers.models.families import denoiser

Scaling = Literal["tensor", "row"]

MIN_FEATURES = 320  # smaller linears gain nothing from fp8 (scaling costs more than the matmul saves)


class PrecisionUnavailable(RuntimeError):
    """This machine cannot run the precision asked for (the worker refuses to start, saying why)."""


def check_precision(precision: str, device: str) -> None:
    """Raise PrecisionUnavailable unless `precision` can run on `device` here."""
    if precision == "fp16":
        return
    if precision != "fp8":
        raise PrecisionUnavailable(f"INPAINT_PRECISION={precision!r}: fp16 or fp8")
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        raise PrecisionUnavailable("INPAINT_PRECISION=fp8 needs a CUDA GPU with FP8 tensor cores; this worker has none")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise PrecisionUnavailable("INPAINT_PRECISION=fp8 needs torchao (pip install torchao)") from exc
    # In-process where CUDA is already up (the worker's child); else a child process, which also
    # quantizes one linear, so the parent refuses before forking rather than every child crashing.
    capability, failed = (
        (torch.cuda.get_device_capability(), None) if torch.cuda.is_initialized() else _probe_in_child()
    )
    if capability < (8, 9):
        cap = ".".join(map(str, capability))
        raise PrecisionUnavailable(f"INPAINT_PRECISION=fp8 needs compute capability 8.9 or newer; this GPU has {cap}")
    if failed:
        raise PrecisionUnavailable(failed.removeprefix("workers.models.precision.PrecisionUnavailable: "))


_PROBE = """
import torch
print(*torch.cuda.get_device_capability(), flush=True)
if torch.cuda.get_device_capability() >= (8, 9):
    from workers.models.precision import quantize_fp8
    lin = torch.nn.Sequential(torch.nn.Linear(1280, 1280)).to("cuda", torch.float16)
    quantize_fp8(lin)
    lin(torch.randn(64, 1280, device="cuda", dtype=torch.float16))
"""


def _probe_in_child() -> tuple[tuple[int, int], str | None]:
    """(compute capability, why one quantized linear failed or None), asked of a child process: the
    worker's parent checks before Celery forks, and a parent that initialised CUDA leaves its forked
    children unable to use it."""
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
        major, minor = out.stdout.split()[:2]
    except (subprocess.SubprocessError, ValueError) as exc:
        raise PrecisionUnavailable(f"INPAINT_PRECISION=fp8: the GPU could not be probed ({exc})") from exc
    failed = out.stderr.strip().splitlines()[-1] if out.returncode != 0 and out.stderr.strip() else None
    return (int(major), int(minor)), failed


def _large_linear(module: Any, _name: str) -> bool:
    import torch

    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features >= MIN_FEATURES
        and module.out_features >= MIN_FEATURES
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


@contextmanager
def _inductor_config_kept() -> Iterator[None]:
    """torchao's fp8 path switches inductor options (coordinate-descent tuning) for the whole process;
    the compile settings stay the worker's own, so what follows in the process is measured as before."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.save_config()
    try:
        yield
    finally:
        inductor_config.load_config(saved)


def quantize_fp8(module: Any, scaling: Scaling = "tensor") -> None:
    """torchao's dynamic float8 on `module`'s large linears; any failure is a PrecisionUnavailable."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

        granularity = PerRow() if scaling == "row" else PerTensor()
        with _inductor_config_kept():
            quantize_(
                module, Float8DynamicActivationFloat8WeightConfig(granularity=granularity), filter_fn=_large_linear
            )
    except Exception as exc:  # torchao reports unsupported combinations with asserts
        raise PrecisionUnavailable(
            f"INPAINT_PRECISION=fp8: torchao could not quantize the UNet ({scaling} scaling, "
            f"{type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def apply_precision(pipe: Any, precision: str, scaling: Scaling = "tensor") -> str:
    """Switch `pipe` (on CUDA) to `precision`; what it now runs at, for the plan and /readyz."""
    first = next(denoiser(pipe).parameters())
    check_precision(precision, str(first.device.type))
    if precision == "fp16":  # the model's own half precision: bf16 for FLUX (workers.models.loading)
        return "bf16" if str(first.dtype) == "torch.bfloat16" else "fp16"
    if scaling == "row":  # torchao's per-row scales need bf16 weights: the whole pipeline, so dtypes agree
        import torch

        pipe.to(dtype=torch.bfloat16)
    quantize_fp8(denoiser(pipe), scaling)
    return "fp8" if scaling == "tensor" else "fp8-row-bf16"
