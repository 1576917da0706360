"""`INPAINT_PRECISION`: `fp16` (the default, the model's own half precision on CUDA) or `fp8` (opt-in).

fp8 quantizes the UNet's large linear layers (attention projections, feed-forwards: most of its
matrix math) to float8 e4m3 with per-row scales, activations quantized on the fly (torchao's
`Float8DynamicActivationFloat8WeightConfig`); convolutions, norms, the VAE and the text encoder stay
fp16. It needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell) and
torchao. Its quality is measured by `benchmarks/quality.py` (candidate `fp8`) and its speed by
`benchmarks/gpu_throughput.py --precision fp8`; where neither has run on a GPU, the README says it
is unmeasured.
"""

from __future__ import annotations

from typing import Any

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
    if torch.cuda.get_device_capability() < (8, 9):
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        raise PrecisionUnavailable(f"INPAINT_PRECISION=fp8 needs compute capability 8.9 or newer; this GPU has {cap}")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise PrecisionUnavailable("INPAINT_PRECISION=fp8 needs torchao (pip install torchao)") from exc


def _large_linear(module: Any, _name: str) -> bool:
    import torch

    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features >= MIN_FEATURES
        and module.out_features >= MIN_FEATURES
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def apply_precision(pipe: Any, precision: str) -> str:
    """Switch `pipe` (on CUDA) to `precision`; what it now runs at, for the plan and /readyz."""
    device = str(next(pipe.unet.parameters()).device.type)
    check_precision(precision, device)
    if precision == "fp16":
        return "fp16"
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(pipe.unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_large_linear)
    return "fp8"
