"""Pinned pipeline presets, each loaded once per worker process.

`sd2-inpainting` is stabilityai/stable-diffusion-2-inpainting at a pinned commit, loaded only from a
local directory or the Hugging Face cache (a worker never downloads: `inpaint model fetch` does).
`tiny-random` is the same diffusers pipeline class with tiny seeded components built from config,
saved once with `save_pretrained` and read back with `from_pretrained(local_files_only=True)` so the
real loader runs. `classical` is OpenCV's inpainting: offline, CPU, prompt ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import Settings

log = logging.getLogger(__name__)

SD2_REPO = "stabilityai/stable-diffusion-2-inpainting"
SD2_REVISION = "81a84f49b15956b60b4272a405ad3daef3da4590"
SD2_FILES = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "feature_extractor/*",
    "*/config.json",
    "*/*.safetensors",
]
SD2_SKIP = ["*.fp16.safetensors", "*.ckpt", "*.bin", "*.onnx", "*.msgpack"]
TINY_NAME = "tiny-random"
TINY_VERSION = "v1"  # bump when the tiny configs change, so old saved copies are not reused
PRESETS = ("sd2-inpainting", TINY_NAME, "classical")


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded from what is on this machine."""


@dataclass
class LoadedPipeline:
    """A ready pipeline and what identifies it in every job it produces."""

    name: str
    revision: str
    kind: str  # "diffusers" or "classical"
    device: str
    pipe: Any = None
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sd2_local_dir(settings: Settings) -> Path | None:
    """The cached snapshot of the pinned revision, or None when it is not on this machine."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(
                SD2_REPO,
                revision=SD2_REVISION,
                local_files_only=True,
                cache_dir=settings.hf_cache_dir,
                allow_patterns=SD2_FILES,
                ignore_patterns=SD2_SKIP,
            )
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "model_index.json").exists() and (path / "unet").is_dir() else None


def resolve_model(settings: Settings) -> str:
    """`auto` becomes sd2-inpainting where its weights are here, else classical (said loudly)."""
    if settings.model != "auto":
        return settings.model
    if sd2_local_dir(settings) is not None:
        return "sd2-inpainting"
    log.warning(
        "INPAINT_MODEL=auto: the weights of %s@%s are not on this machine, so this worker serves the "
        "CLASSICAL OpenCV inpainter, which ignores prompts. Run `inpaint model fetch` to get the real model.",
        SD2_REPO,
        SD2_REVISION[:10],
    )
    return "classical"


def fetch_model(settings: Settings) -> Path:
    """Download the pinned weights into the cache (honours HF_HUB_OFFLINE) and check the revision."""
    from huggingface_hub import snapshot_download

    path = Path(
        snapshot_download(
            SD2_REPO,
            revision=SD2_REVISION,
            cache_dir=settings.hf_cache_dir,
            allow_patterns=SD2_FILES,
            ignore_patterns=SD2_SKIP,
        )
    )
    if path.name != SD2_REVISION:
        raise ModelUnavailable(f"downloaded snapshot {path.name} is not the pinned revision {SD2_REVISION}")
    if sd2_local_dir(settings) != path:
        raise ModelUnavailable(f"snapshot at {path} is incomplete")
    return path


def load_pipeline(settings: Settings) -> LoadedPipeline:
    """Load the configured model once; the caller warms it up."""
    name = resolve_model(settings)
    device = pick_device(settings.device)
    if name == "classical":
        import cv2

        return LoadedPipeline("classical", f"opencv-{cv2.__version__}", "classical", "cpu")
    if name == TINY_NAME:
        path = ensure_tiny_random(settings.data_dir / "models")
        return _load_diffusers(path, TINY_NAME, f"{TINY_NAME}-{TINY_VERSION}", device)
    if name == "sd2-inpainting":
        snapshot = sd2_local_dir(settings)
        if snapshot is None:
            raise ModelUnavailable(
                f"{SD2_REPO}@{SD2_REVISION} is not in the local Hugging Face cache; run `inpaint model fetch`"
            )
        return _load_diffusers(snapshot, "sd2-inpainting", SD2_REVISION, device)
    local = Path(name)
    if (local / "model_index.json").is_file():
        digest = hashlib.sha256((local / "model_index.json").read_bytes()).hexdigest()[:12]
        return _load_diffusers(local, local.name, f"local-{digest}", device)
    raise ModelUnavailable(
        f"INPAINT_MODEL={name!r} is neither a preset ({', '.join(PRESETS)}) nor a diffusers directory"
    )


def _load_diffusers(path: Path, name: str, revision: str, device: str) -> LoadedPipeline:
    import torch
    import transformers
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as diffusers_logging

    # Progress bars are for terminals; in a worker's log they are noise.
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(path),
        dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # diffusers uses PyTorch SDPA (AttnProcessor2_0) by default on torch 2; nothing else to switch on here.
    return LoadedPipeline(name, revision, "diffusers", device, pipe, str(dtype).removeprefix("torch."))


# tiny-random: components after diffusers' own get_dummy_components, shaped like SD2-inpainting
# (9-channel UNet, linear projections, 8× VAE) but small enough to run in milliseconds on a CPU.
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


def build_tiny_random() -> Any:
    """The tiny pipeline from config, each component seeded as diffusers' tests do."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**dict(TINY_TEXT, vocab_size=len(_byte_vocab()) * 2 + 2)))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tiny_tokenizer(Path(tok_dir))
        tokenizer = CLIPTokenizer(
            f"{tok_dir}/vocab.json",
            f"{tok_dir}/merges.txt",
            pad_token="!",  # noqa: S106 - a token, not a password
            model_max_length=77,
        )
    return StableDiffusionInpaintPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def ensure_tiny_random(models_dir: Path) -> Path:
    """The saved tiny pipeline, built and saved once; concurrent workers race safely by rename."""
    target = models_dir / f"{TINY_NAME}-{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=models_dir))
    try:
        build_tiny_random().save_pretrained(str(tmp), safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
