"""LoRA adapter files for the tests: synthetic safetensors headers and real adapters of tiny-random."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from workers.models.tiny import TINY_UNET

SDXL_KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def safetensors_bytes(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """A safetensors file of F16 zeros: a header naming each tensor, then its bytes."""
    header, at = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(at)


def sdxl_adapter() -> bytes:
    """Shaped like an SDXL adapter: its cross-attention keys take 2048 features (both text encoders)."""
    return safetensors_bytes({
        f"{SDXL_KEY}.lora_A.weight": (4, 2048), f"{SDXL_KEY}.lora_B.weight": (640, 4),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 640),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": (640, 4),
    })  # fmt: skip


def tiny_adapter(seed: int, fmt: str = "peft") -> bytes:
    """A real adapter for tiny-random's UNet (rank 4 on every attention projection, B not zero), saved in
    diffusers' LoRA format (`peft`: `lora_A/B`; `diffusers`: `lora.down/up`)."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    state = get_peft_model_state_dict(unet)
    if fmt == "diffusers":
        state = convert_state_dict_to_diffusers(state)
    with tempfile.TemporaryDirectory() as d:
        StableDiffusionInpaintPipeline.save_lora_weights(d, unet_lora_layers=state, safe_serialization=True)
        return (Path(d) / "pytorch_lora_weights.safetensors").read_bytes()
