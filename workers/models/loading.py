"""Loading the configured model once per worker process; the caller prepares it for serving."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import Settings
from workers.models import serving
from workers.models.presets import (
    PRESETS,
    SD2_REPO,
    SD2_REVISION,
    SIM_NAME,
    TINY_NAME,
    ModelUnavailable,
    resolve_model,
    sd2_local_dir,
)
from workers.models.serving import ServingPlan
from workers.models.sim import SimDevice
from workers.models.tiny import TINY_VERSION, ensure_tiny_random


@dataclass
class LoadedPipeline:
    """A ready pipeline, what identifies it in every job it produces, and how it is served."""

    name: str
    revision: str
    kind: str  # "diffusers", "classical" or "sim"
    device: str
    pipe: Any = None
    dtype: str = "float32"
    plan: ServingPlan = field(default_factory=ServingPlan)


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(settings: Settings) -> LoadedPipeline:
    """Load the configured model once; `prepare_for_serving` then plans batches and compiles."""
    name = resolve_model(settings)
    device = pick_device(settings.device)
    if name == "classical":
        import cv2

        return LoadedPipeline("classical", f"opencv-{cv2.__version__}", "classical", "cpu")
    if name == SIM_NAME:
        return LoadedPipeline(
            SIM_NAME, f"sim-{settings.sim_call_ms}ms", "sim", "cpu", SimDevice(settings.sim_call_ms / 1000)
        )
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


def prepare_for_serving(loaded: LoadedPipeline, settings: Settings, warm_buckets: list[int] | None = None) -> None:
    """The batch budget, the CUDA fast path and every compiled bucket, warmed (`workers.models.serving`)."""
    loaded.plan = serving.prepare(loaded.pipe, loaded.kind, loaded.device, settings, warm_buckets)


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
