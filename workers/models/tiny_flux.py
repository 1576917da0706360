"""The `tiny-random-flux` pipeline: diffusers' FLUX.1 Fill class with tiny components from config.

Shaped like black-forest-labs/FLUX.1-Fill-dev: a flow-matching transformer whose input is the packed
noise latents, the packed latents of the masked image and the packed mask (16 + 16 latent channels
and 8×8 mask pixels per latent pixel, each packed 2×2: 64 + 64 + 256 = 384 channels), guidance
embedded, conditioned on CLIP (pooled) and T5 (sequence); a 16-channel 8× VAE without quant convs.
The T5 tokenizer is a Unigram over printable characters built here, model_max_length=32.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from shared import catalog
from workers.models.tiny import TINY_TEXT, TINY_VAE, build_tiny_tokenizer, save_once, tiny_text_config

TINY_FLUX_VERSION = "v1"  # bump when the configs change, so old saved copies are not reused
T5_MAX_LENGTH = 32  # the tiny T5 tokenizer's model_max_length: FLUX's max_sequence_length for it

_LATENT = 16  # FLUX's latent channels
_VAE_SCALE = 2 ** (len(TINY_VAE["block_out_channels"]) - 1)
TINY_FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=4 * (2 * _LATENT + _VAE_SCALE**2), out_channels=4 * _LATENT, num_layers=1,
    num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
    pooled_projection_dim=TINY_TEXT["hidden_size"], guidance_embeds=True, axes_dims_rope=[4, 4, 8],
)  # fmt: skip
TINY_T5: dict[str, Any] = dict(
    d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip


def build_t5_tokenizer() -> Any:
    """A T5 tokenizer (Unigram, as T5's own) whose pieces are printable characters, with and without
    the word-start marker: any text tokenizes, unknown characters to `<unk>`."""
    from transformers import T5Tokenizer  # transformers 5: the tokenizers-backed one, FLUX's T5TokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -3.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_tiny_flux() -> Any:
    """The tiny FLUX Fill pipeline, each component seeded as diffusers' tests do."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer_2 = build_t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
    torch.manual_seed(0)
    text = CLIPTextModel(tiny_text_config())
    torch.manual_seed(0)
    text_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **TINY_T5))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        **{**TINY_VAE, "latent_channels": _LATENT}, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )  # fmt: skip
    return FluxFillPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=build_tiny_tokenizer(), text_encoder_2=text_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip


def ensure_tiny_flux(models_dir: Path) -> Path:
    """The saved tiny FLUX Fill pipeline, built and saved once (race-safe, as `ensure_tiny_random`)."""
    return save_once(models_dir / f"{catalog.TINY_FLUX}-{TINY_FLUX_VERSION}", build_tiny_flux)
