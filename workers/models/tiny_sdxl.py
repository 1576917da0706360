"""The `tiny-random-sdxl` pipeline: diffusers' SDXL inpainting class with tiny components from config.

Shaped like diffusers/stable-diffusion-xl-1.0-inpainting-0.1: a 9-channel UNet conditioned on two
CLIP text encoders (the second with a projection, whose pooled output and the six size/crop ids feed
the `text_time` embedding), an 8× VAE and Euler. Saved once and read back like `tiny-random`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared import catalog
from workers.models.tiny import TINY_TEXT, TINY_VAE, build_tiny_tokenizer, save_once, tiny_text_config

TINY_SDXL_VERSION = "v1"  # bump when the configs change, so old saved copies are not reused

_TIME_DIM = 8  # per id; SDXL-inpainting embeds 6 ids (original size, crop corner, target size)
TINY_SDXL_UNET: dict[str, Any] = dict(
    act_fn="silu", attention_head_dim=[2, 4, 4], block_out_channels=[32, 64, 64],
    cross_attention_dim=2 * TINY_TEXT["hidden_size"],  # both encoders' hidden states, side by side
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], flip_sin_to_cos=True,
    in_channels=9, layers_per_block=1, norm_num_groups=32, out_channels=4, sample_size=8,
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=_TIME_DIM,
    projection_class_embeddings_input_dim=6 * _TIME_DIM + TINY_TEXT["projection_dim"],
    transformer_layers_per_block=[1, 1, 1],
)  # fmt: skip


def build_tiny_sdxl() -> Any:
    """The tiny SDXL inpainting pipeline, each component seeded as diffusers' tests do."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(0)
    text = CLIPTextModel(tiny_text_config())
    torch.manual_seed(0)
    text_2 = CLIPTextModelWithProjection(tiny_text_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=build_tiny_tokenizer(),
        tokenizer_2=build_tiny_tokenizer(), unet=unet, scheduler=scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )  # fmt: skip


def ensure_tiny_sdxl(models_dir: Path) -> Path:
    """The saved tiny SDXL pipeline, built and saved once (race-safe, as `ensure_tiny_random`)."""
    return save_once(models_dir / f"{catalog.TINY_SDXL}-{TINY_SDXL_VERSION}", build_tiny_sdxl)
