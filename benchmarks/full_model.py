"""The full-size stable-diffusion-2-inpainting architecture with random weights: the real configs
(UNet, VAE, OpenCLIP ViT-H text encoder), since no weights can be downloaded where benchmarks run;
and the plain diffusers call every benchmark compares against."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.inpaint.request import InpaintRequest
from workers.models.tiny import write_tiny_tokenizer

# The real stabilityai/stable-diffusion-2-inpainting configs (unet, vae, OpenCLIP ViT-H text encoder).
FULL_UNET: dict[str, Any] = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=9, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    use_linear_projection=True,
)  # fmt: skip
FULL_VAE: dict[str, Any] = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4,
)  # fmt: skip
FULL_TEXT: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
    hidden_act="gelu", max_position_embeddings=77, vocab_size=49408, bos_token_id=0, eos_token_id=2,
)  # fmt: skip


def build_full(device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**FULL_UNET)
        vae = AutoencoderKL(**FULL_VAE)
        text = CLIPTextModel(CLIPTextConfig(**FULL_TEXT))
    sched = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    tok_dir = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tok_dir)
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!", model_max_length=77)
    pipe = StableDiffusionInpaintPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_call(pipe: Any, reqs: list[InpaintRequest], on_step_end: Any = None) -> np.ndarray:
    """Stock diffusers as a user would call it: one call, CPU generators seeded like ours."""
    out = pipe(
        prompt=[r.prompt for r in reqs], image=[r.image for r in reqs], mask_image=[r.mask for r in reqs],
        num_inference_steps=reqs[0].num_inference_steps, guidance_scale=reqs[0].guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in reqs], output_type="np",
        height=reqs[0].image.height, width=reqs[0].image.width, callback_on_step_end=on_step_end,
    )  # fmt: skip
    return np.asarray(out.images, dtype=np.float32)
