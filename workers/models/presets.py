"""Pinned presets, and where their weights are: a worker never downloads (`inpaint model fetch` does).

`sd2-inpainting` is stabilityai/stable-diffusion-2-inpainting at a pinned commit, loaded only from a
local directory or the Hugging Face cache. `tiny-random` is the same diffusers pipeline class with
tiny seeded components built from config (`workers.models.tiny`). `classical` is OpenCV's
inpainting: offline, CPU, prompt ignored.

The SD2 weights are not under this project's licence: they come under the CreativeML Open RAIL++-M
License (`SD2_LICENSE`), whose use restrictions bind whoever serves them and their users.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared.config import Settings

log = logging.getLogger(__name__)

SD2_REPO = "stabilityai/stable-diffusion-2-inpainting"
SD2_REVISION = "81a84f49b15956b60b4272a405ad3daef3da4590"
SD2_LICENSE = "CreativeML Open RAIL++-M (https://huggingface.co/stabilityai/stable-diffusion-2-inpainting)"
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
SIM_NAME = "sim"  # a stand-in for a GPU that computes nothing (`workers.models.sim`)
PRESETS = ("sd2-inpainting", TINY_NAME, "classical", SIM_NAME)


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded from what is on this machine."""


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
    if settings.environment == "production":
        raise ModelUnavailable(
            f"INPAINT_MODEL=auto: the weights of {SD2_REPO}@{SD2_REVISION[:10]} are not here, and production "
            "never serves the classical fallback; run `inpaint model fetch`"
        )
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
