"""The full-size architectures of the catalog's models with random weights: the real configs, since
no weights can be downloaded where benchmarks run; and the plain diffusers call every benchmark
compares against.

Each config below is the published one (the model repository's `<component>/config.json`), written
out here; values that matter only to training or tiling (dropout, the VAE's sample_size) are copied
as published too. The UNet's and the transformer's parameter counts match the published models'
(tests/test_model_benchmarks.py). Tokenizers are the offline ones the tiny fixtures build, and the
text encoders' vocabularies are sized to them (SD2's keeps its published 49408 rows, which its
tokenizer never reaches): a random-weight benchmark measures the denoiser, not the tokenizer, and
the sequence lengths (77 CLIP tokens, 512 T5 tokens for FLUX) are the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from shared import catalog
from workers.inpaint.request import InpaintRequest
from workers.models.families import FLUX_MAX_SEQUENCE, family_of, text_args
from workers.models.tiny import build_tiny_tokenizer, tiny_text_config

# stabilityai/stable-diffusion-2-inpainting (unet, vae, OpenCLIP ViT-H text encoder).
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

# diffusers/stable-diffusion-xl-1.0-inpainting-0.1: SDXL base's UNet with 9 input channels; its
# `text_time` embedding takes 6 size/crop ids × 256 + bigG's 1280-wide pooled output = 2816.
SDXL_UNET: dict[str, Any] = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=9, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)  # fmt: skip
SDXL_VAE: dict[str, Any] = {**FULL_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_L: dict[str, Any] = dict(  # OpenAI CLIP ViT-L/14's text tower: SDXL's first encoder, FLUX's CLIP
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
    hidden_act="quick_gelu", max_position_embeddings=77,
)  # fmt: skip
CLIP_BIG_G: dict[str, Any] = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection: SDXL's second
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
    hidden_act="gelu", max_position_embeddings=77,
)  # fmt: skip

# black-forest-labs/FLUX.1-Fill-dev: FLUX.1-dev's transformer whose input also carries the masked
# image's latents and the mask (64 + 64 + 256 = 384 packed channels); google/t5-v1_1-xxl's encoder.
FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)  # fmt: skip
T5_XXL: dict[str, Any] = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
    dropout_rate=0.1,  # published; no effect at inference
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
FLUX_VAE: dict[str, Any] = {
    **FULL_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True, "mid_block_add_attention": True,
}  # fmt: skip


def bench_dtype(model: str, device: str) -> torch.dtype:
    """A worker's dtype: fp16 on CUDA, FLUX in bf16 (its activations need the range); fp32 on a CPU."""
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if catalog.MODELS[model].family == "flux" else torch.float16


@contextmanager
def made_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made in this block are allocated and initialised on `device` in `dtype`: a random
    12 B-parameter transformer is built in seconds on the GPU, not minutes on the CPU, and never
    twice its size in fp32. On `meta`, nothing is allocated (shapes only)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def full_parts(model: str, device: str | torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The model's full-size modules (by their pipeline's component names), random weights, seeded."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if model == catalog.SD2:
        torch.manual_seed(0)
        # fp32 then cast, in this order: the weights (and so the error figures) of earlier SD2 runs
        with torch.device(device):
            return {
                "unet": UNet2DConditionModel(**FULL_UNET),
                "vae": AutoencoderKL(**FULL_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**FULL_TEXT)),
            }
    builders: dict[str, Any]
    if model == catalog.SDXL:
        builders = {
            "unet": lambda: UNet2DConditionModel(**SDXL_UNET),
            "vae": lambda: AutoencoderKL(**SDXL_VAE),
            "text_encoder": lambda: CLIPTextModel(tiny_text_config(**CLIP_L)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(tiny_text_config(**CLIP_BIG_G)),
        }
    elif model == catalog.FLUX:
        vocab = len(_t5_tokenizer())
        builders = {
            "transformer": lambda: FluxTransformer2DModel(**FLUX_TRANSFORMER),
            "vae": lambda: AutoencoderKL(**FLUX_VAE),
            "text_encoder": lambda: CLIPTextModel(tiny_text_config(**CLIP_L)),
            "text_encoder_2": lambda: T5EncoderModel(T5Config(vocab_size=vocab, **T5_XXL)),
        }
    else:
        raise ValueError(f"no full-size architecture for {model!r}")
    parts = {}
    for name, build in builders.items():
        torch.manual_seed(0)  # each component's weights independent of the others
        with made_on(device, dtype):
            parts[name] = build()
    return parts


def _t5_tokenizer() -> Any:
    from workers.models.tiny_flux import build_t5_tokenizer

    tok = build_t5_tokenizer()
    tok.model_max_length = FLUX_MAX_SEQUENCE  # FLUX pads every prompt to 512 T5 tokens: the real length
    return tok


def build_full(device: str, dtype: torch.dtype, model: str = catalog.SD2) -> Any:
    """The catalog model's pipeline class around its full-size random-weight modules, on `device`."""
    import diffusers

    parts = full_parts(model, device, dtype)
    cls = getattr(diffusers, catalog.MODELS[model].pipeline)
    sched: Any
    if model == catalog.SD2:
        sched = diffusers.PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
            set_alpha_to_one=False, steps_offset=1,
        )  # fmt: skip
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        pipe = cls(**parts, tokenizer=build_tiny_tokenizer(), scheduler=sched, **extra)
    elif model == catalog.SDXL:
        sched = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        )  # fmt: skip
        pipe = cls(**parts, tokenizer=build_tiny_tokenizer(), tokenizer_2=build_tiny_tokenizer(), scheduler=sched,
                   requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)  # fmt: skip
    else:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
            use_dynamic_shifting=True,
        )  # fmt: skip
        pipe = cls(**parts, tokenizer=build_tiny_tokenizer(), tokenizer_2=_t5_tokenizer(), scheduler=sched)
    if model == catalog.SD2:  # the others were made on the device in their dtype
        pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_of(model: str) -> str:
    """The tiny fixture standing for a catalog model on a CPU (the toy of its family)."""
    family = catalog.MODELS[model].family
    return next(m.name for m in catalog.MODELS.values() if m.toy and m.pipeline and m.family == family)


def build_tiny(name: str) -> Any:
    """A tiny fixture's pipeline, built in memory from config."""
    from workers.models.tiny import build_tiny_random
    from workers.models.tiny_flux import build_tiny_flux
    from workers.models.tiny_sdxl import build_tiny_sdxl

    builders = {catalog.TINY: build_tiny_random, catalog.TINY_SDXL: build_tiny_sdxl, catalog.TINY_FLUX: build_tiny_flux}
    return builders[name]()


def plain_call(pipe: Any, reqs: list[InpaintRequest], on_step_end: Any = None) -> np.ndarray:
    """Stock diffusers as a user would call it: one call, CPU generators seeded like ours, the
    family's text arguments as the worker passes them (no negative prompt: "", FLUX none)."""
    prompts, negatives = [r.prompt for r in reqs], [r.negative_prompt or "" for r in reqs]
    out = pipe(
        **text_args(family_of(pipe), pipe, prompts, negatives), image=[r.image for r in reqs],
        mask_image=[r.mask for r in reqs], num_inference_steps=reqs[0].num_inference_steps,
        guidance_scale=reqs[0].guidance_scale, strength=reqs[0].strength,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in reqs], output_type="np",
        height=reqs[0].image.height, width=reqs[0].image.width, callback_on_step_end=on_step_end,
    )  # fmt: skip
    return np.asarray(out.images, dtype=np.float32)
