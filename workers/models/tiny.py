"""The `tiny-random` pipeline: the real diffusers class with tiny components built from config.

Shaped like SD2-inpainting (9-channel UNet, linear projections, 8× VAE) but small enough to run in
milliseconds on a CPU. Saved once with `save_pretrained` and read back through the same loader as
the real model (`from_pretrained(local_files_only=True)`), so tests exercise the real loading path.
The CLIP tokenizer is written from files made here (a byte-level vocabulary, model_max_length=77).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.models.presets import TINY_NAME

TINY_VERSION = "v1"  # bump when the tiny configs change, so old saved copies are not reused

TINY_UNET: dict[str, Any] = dict(
    act_fn="silu", attention_head_dim=[2, 4, 4, 4], block_out_channels=[32, 64, 64, 64], cross_attention_dim=32,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, in_channels=9, layers_per_block=1, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
    out_channels=4, sample_size=8, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    use_linear_projection=True,
)  # fmt: skip
TINY_VAE: dict[str, Any] = dict(
    act_fn="silu", block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3,
    latent_channels=4, layers_per_block=1, norm_num_groups=8, out_channels=3, sample_size=64,
    up_block_types=["UpDecoderBlock2D"] * 4,
)  # fmt: skip
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
    hidden_act="gelu", max_position_embeddings=77, vocab_size=1000, bos_token_id=0, eos_token_id=2,
    layer_norm_eps=1e-5, pad_token_id=1,
)  # fmt: skip


def _byte_vocab() -> list[str]:
    """CLIP's byte-level alphabet, so any text tokenizes without a merges table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(dirpath: Path) -> None:
    """The files of a CLIP tokenizer with a byte-level vocabulary and model_max_length=77."""
    chars = _byte_vocab()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (dirpath / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_tokenizer() -> Any:
    """A CLIP tokenizer over the byte-level vocabulary, from files written here (no download)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        write_tiny_tokenizer(Path(tok_dir))
        return CLIPTokenizer(
            f"{tok_dir}/vocab.json",
            f"{tok_dir}/merges.txt",
            pad_token="!",  # noqa: S106 - a token, not a password
            model_max_length=77,
        )


def tiny_text_config(**overrides: Any) -> Any:
    """The tiny CLIP text encoder's config, its vocabulary the tokenizer's."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**TINY_TEXT, "vocab_size": len(_byte_vocab()) * 2 + 2, **overrides})


def build_tiny_random() -> Any:
    """The tiny pipeline from config, each component seeded as diffusers' tests do."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(0)
    text = CLIPTextModel(tiny_text_config())
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    diffusers_logging.disable_progress_bar()
    return StableDiffusionInpaintPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=build_tiny_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def ensure_tiny_random(models_dir: Path) -> Path:
    """The saved tiny pipeline, built and saved once; concurrent workers race safely by rename."""
    return save_once(models_dir / f"{TINY_NAME}-{TINY_VERSION}", build_tiny_random)


def save_once(target: Path, build: Callable[[], Any]) -> Path:
    """`build()`'s pipeline saved at `target` unless already there: saved aside, then renamed into
    place, so concurrent workers never see half a pipeline and the first rename wins."""
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build().save_pretrained(str(tmp), safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
