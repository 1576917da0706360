"""Loading the configured model once per worker process; the caller prepares it for serving.

Each catalog model loads with its own diffusers class (`shared.catalog.Model.pipeline`): SD2's
StableDiffusionInpaintPipeline, SDXL's StableDiffusionXLInpaintPipeline, FLUX.1's FluxFillPipeline;
the tiny fixtures with the class of the model they stand for.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import catalog
from shared.config import Settings
from workers.models import serving
from workers.models.families import FAMILIES
from workers.models.fixtures import FIXTURES, ensure_fixture
from workers.models.presets import FILES, PRESETS, SIM_NAME, ModelUnavailable, check_licence, locate, resolve_model
from workers.models.serving import ServingPlan
from workers.models.sim import SimDevice


@dataclass
class LoadedPipeline:
    """A ready pipeline, what identifies it in every job it produces, and how it is served."""

    name: str  # the catalog's short name (a diffusers directory: its folder's name)
    revision: str
    kind: str  # "diffusers", "classical" or "sim"
    device: str
    pipe: Any = None
    dtype: str = "float32"
    plan: ServingPlan = field(default_factory=ServingPlan)
    family: str = "sd2"  # sd2, sdxl, flux (how it is called), classical or sim


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(settings: Settings) -> LoadedPipeline:
    """Load the configured model once; `prepare_for_serving` then plans batches and compiles.

    INPAINT_MODEL is a catalog name or id, `auto`, or a diffusers directory. Real models load only
    from what is on this machine (`workers.models.presets.locate`); a restricted licence is checked
    before anything is looked up."""
    word = resolve_model(settings)
    model = catalog.find(word)
    device = pick_device(settings.device)
    if model is not None and model.family == "classical":
        import cv2

        return LoadedPipeline(model.name, f"opencv-{cv2.__version__}", "classical", "cpu", family="classical")
    if model is not None and model.name == SIM_NAME:
        return LoadedPipeline(
            SIM_NAME,
            f"sim-{settings.sim_call_ms}ms",
            "sim",
            "cpu",
            SimDevice(settings.sim_call_ms / 1000),
            family="sim",
        )
    if model is not None:
        check_licence(settings, model)
        if model.name in FIXTURES:
            path, revision = ensure_fixture(model.name, settings.data_dir / "models")
            return _load_diffusers(path, model.name, revision, device, model.pipeline, model.family)
        if model.name in FILES:
            path, revision = locate(settings, model)
            return _load_diffusers(
                path, model.name, revision, device, model.pipeline, model.family, FILES[model.name].variant
            )
    local = Path(word)
    if (local / "model_index.json").is_file():
        index = (local / "model_index.json").read_bytes()
        digest = hashlib.sha256(index).hexdigest()[:12]
        cls = str(json.loads(index).get("_class_name", ""))
        if cls not in FAMILIES:  # what a directory of another class was always loaded as
            cls = catalog.MODELS[catalog.SD2].pipeline
        return _load_diffusers(local, local.name, f"local-{digest}", device, cls, FAMILIES[cls])
    raise ModelUnavailable(
        f"INPAINT_MODEL={word!r} is neither a preset ({', '.join(PRESETS)}) nor a diffusers directory"
    )


def prepare_for_serving(loaded: LoadedPipeline, settings: Settings, warm_buckets: list[int] | None = None) -> None:
    """The batch budget, the CUDA fast path and every compiled bucket, warmed (`workers.models.serving`)."""
    loaded.plan = serving.prepare(loaded.pipe, loaded.kind, loaded.device, settings, warm_buckets)


def _load_diffusers(
    path: Path, name: str, revision: str, device: str, cls_name: str, family: str, variant: str | None = None
) -> LoadedPipeline:
    import diffusers
    import torch
    import transformers
    from diffusers.utils import logging as diffusers_logging

    # Progress bars are for terminals; in a worker's log they are noise.
    diffusers_logging.disable_progress_bar()
    diffusers_logging.get_logger("diffusers.models.modeling_utils").addFilter(_no_empty_fp32_warning)
    transformers.utils.logging.disable_progress_bar()
    dtype = torch.float32
    if device == "cuda":
        # FLUX was trained and is shipped in bf16, whose range its activations need (fp16 overflows).
        dtype = torch.bfloat16 if family == "flux" else torch.float16
    extra: dict[str, Any] = {}
    if cls_name == "StableDiffusionInpaintPipeline":
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if variant:
        extra["variant"] = variant
    cls = getattr(diffusers, cls_name)
    pipe = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True, **extra)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # diffusers uses PyTorch SDPA (AttnProcessor2_0) by default on torch 2; nothing else to switch on here.
    return LoadedPipeline(name, revision, "diffusers", device, pipe, str(dtype).removeprefix("torch."), family=family)


def _no_empty_fp32_warning(record: logging.LogRecord) -> bool:
    """SDXL's pipeline moves its VAE to fp32 and back around every encode (`force_upcast`), and diffusers
    warns each time that modules "should be kept in float32", listing none: twice a job, saying nothing."""
    return "should be kept in float32: []" not in record.getMessage()
