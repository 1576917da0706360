"""The model catalog: the pinned models this service knows, what each takes, and which queue serves it.

A model has a short name (INPAINT_MODEL's word: `sd2-inpainting`) and an `owner/name` id (Replicate's
and Hugging Face's: `stabilityai/stable-diffusion-2-inpainting`); a job may name either. A deployment
serves the models of `INPAINT_MODELS` (the first is its default), or only INPAINT_MODEL's. Each served
model has a lane: its own Celery queue, fair queue and ready workers, so a job only ever reaches a
worker of its model (`shared.queue.lane_queue`). The default model's lane keeps the names of
single-model releases (queue `inpaint`), so a deployment that names no model is unchanged.

Nothing here loads weights: the workers do (`workers.models`). The API validates a job against its
model's limits at submit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import Settings

SD2 = "sd2-inpainting"
SDXL = "sdxl-inpainting"
FLUX = "flux-fill"
TINY = "tiny-random"
TINY_SDXL = "tiny-random-sdxl"
TINY_FLUX = "tiny-random-flux"
CLASSICAL = "classical"
SIM = "sim"
OWNER = "inpaint"  # the owner of the models this service names itself (`inpaint/tiny-random`)


@dataclass(frozen=True)
class Limits:
    """What a job of a model may ask for: checked at submit, shown in `GET /v1/models`."""

    max_side: int | None = None  # the longest side it takes (None: only INPAINT_MAX_PIXELS bounds it)
    max_steps: int = 150
    default_steps: int = 50
    default_guidance: float = 7.5
    ignores: frozenset[str] = frozenset()  # fields the model has no use for: a job that sets one is a 422


@dataclass(frozen=True)
class Model:
    """One catalog entry. `revision` None: pinned when fetched (`inpaint model fetch` writes a lock)."""

    name: str
    ref: str
    family: str  # sd2, sdxl, flux (a LoRA fits a family), classical or sim
    pipeline: str  # the diffusers class that runs it ('' for classical and sim)
    size: int  # the square it was trained at
    repo: str = ""  # the Hugging Face repository of its weights ('' when built here)
    revision: str | None = ""
    licence: str = ""
    licence_url: str = ""
    # Its licence restricts use (non-commercial): served only once INPAINT_ACCEPT_LICENSES names it.
    needs_acceptance: bool = False
    toy: bool = False  # random or no weights: for tests, refused in production
    limits: Limits = field(default_factory=Limits)
    # The LoRA adapters it takes (`shared.loras`): the denoiser they adapt and its key width (the
    # UNet's cross-attention `attn2.to_k` input = the text encoder width; FLUX's `attn.to_q` input).
    # None: no adapters (a job with `loras` is a 422).
    lora_fit: tuple[str, int] | None = None

    @property
    def aliases(self) -> tuple[str, str]:
        return (self.name, self.ref)


_SD_LIMITS = Limits()
_XL_LIMITS = Limits(max_side=2048)
_FLUX_LIMITS = Limits(
    max_side=2048, max_steps=100, default_steps=50, default_guidance=30.0, ignores=frozenset({"negative_prompt"})
)
_TINY_LIMITS = Limits(max_side=1024)

MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model(
            SD2, "stabilityai/stable-diffusion-2-inpainting", "sd2", "StableDiffusionInpaintPipeline", 512,
            repo="stabilityai/stable-diffusion-2-inpainting", revision="81a84f49b15956b60b4272a405ad3daef3da4590",
            licence="CreativeML Open RAIL++-M",
            licence_url="https://huggingface.co/stabilityai/stable-diffusion-2-inpainting",
            limits=_SD_LIMITS, lora_fit=("unet", 1024),
        ),
        Model(
            SDXL, "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "sdxl", "StableDiffusionXLInpaintPipeline", 1024,
            repo="diffusers/stable-diffusion-xl-1.0-inpainting-0.1", revision=None,
            licence="CreativeML Open RAIL++-M",
            licence_url="https://huggingface.co/diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
            limits=_XL_LIMITS, lora_fit=("unet", 2048),
        ),
        Model(
            FLUX, "black-forest-labs/FLUX.1-Fill-dev", "flux", "FluxFillPipeline", 1024,
            repo="black-forest-labs/FLUX.1-Fill-dev", revision=None,
            licence="FLUX.1 [dev] Non-Commercial License: no commercial use of the model or its outputs",
            licence_url="https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev/blob/main/LICENSE.md",
            needs_acceptance=True, limits=_FLUX_LIMITS, lora_fit=("transformer", 3072),
        ),
        Model(TINY, f"{OWNER}/{TINY}", "sd2", "StableDiffusionInpaintPipeline", 64, toy=True, limits=_TINY_LIMITS,
              lora_fit=("unet", 32)),
        Model(
            TINY_SDXL, f"{OWNER}/{TINY_SDXL}", "sdxl", "StableDiffusionXLInpaintPipeline", 64, toy=True,
            limits=_TINY_LIMITS, lora_fit=("unet", 64),
        ),
        Model(
            TINY_FLUX, f"{OWNER}/{TINY_FLUX}", "flux", "FluxFillPipeline", 64, toy=True,
            limits=Limits(max_side=1024, default_guidance=30.0, ignores=frozenset({"negative_prompt"})),
            lora_fit=("transformer", 32),
        ),
        Model(CLASSICAL, f"{OWNER}/{CLASSICAL}", "classical", "", 512, toy=True, limits=Limits(max_steps=150)),
        Model(SIM, f"{OWNER}/{SIM}", "sim", "", 512, toy=True),
    )
}  # fmt: skip
TOY_MODELS = tuple(m.name for m in MODELS.values() if m.toy)


class UnknownModel(ValueError):
    """A model this deployment does not serve: the message lists the ones it does."""


def find(word: str) -> Model | None:
    """The catalog model a short name or an `owner/name` id names, or None."""
    return next((m for m in MODELS.values() if word in m.aliases), None)


def ref_of(name: str, default: str | None = "") -> str | None:
    """The `owner/name` id of a model by its short name ('' — a record of a single-model release —
    gives `default`)."""
    if not name:
        return default
    found = find(name)
    return found.ref if found else f"{OWNER}/{name}"


def crop_size(model: Model, settings: Settings) -> int:
    """The square a `crop_to_mask` job is inpainted at: INPAINT_CROP_SIZE, or the model's own size
    where it was trained larger (SDXL, FLUX: 1024)."""
    return max(settings.crop_size, model.size) if model.size > 512 and not model.toy else settings.crop_size


def local_model(path: str) -> Model:
    """A diffusers directory given as INPAINT_MODEL: an SD-inpainting pipeline named after its folder."""
    name = Path(path).name or "local"
    return Model(name, f"{OWNER}/{name}", "sd2", "StableDiffusionInpaintPipeline", 512, revision="", toy=False)


def _model_of(word: str) -> Model:
    word = SD2 if word == "auto" else word  # `auto` serves SD2's lane whether it found the weights or not
    return find(word) or local_model(word)


def served(settings: Settings) -> list[Model]:
    """The deployment's models, its default first: INPAINT_MODELS, else INPAINT_MODEL's alone."""
    words = settings.model_list() or [settings.model]
    out: list[Model] = []
    for w in words:
        m = _model_of(w)
        if m not in out:
            out.append(m)
    return out


def default(settings: Settings) -> Model:
    return served(settings)[0]


def worker_model(settings: Settings) -> Model:
    """The model a worker started with these settings serves (INPAINT_MODEL)."""
    return _model_of(settings.model)


def check_deployment(settings: Settings) -> list[Model]:
    """The deployment's models, or UnknownModel for a word of INPAINT_MODELS that names no catalog model
    and no directory (a typo would queue jobs no worker ever serves), or for a model whose licence the
    operator has not accepted (its workers refuse to start: its jobs would wait for ever)."""
    for word in settings.model_list():
        if find(word) is None and word != "auto" and not (word.startswith((".", "/")) or Path(word).is_dir()):
            known = ", ".join(m.name for m in MODELS.values())
            raise UnknownModel(
                f"INPAINT_MODELS names {word!r}, which is neither a catalog model ({known}) nor a directory"
            )
    models = served(settings)
    accepted = settings.accepted_licenses()
    for m in models:
        if m.needs_acceptance and not accepted & set(m.aliases):
            raise UnknownModel(
                f"{m.ref} is served but its licence ({m.licence}) is not accepted: name it in INPAINT_ACCEPT_LICENSES"
            )
    return models


def check_worker(settings: Settings) -> Model:
    """The model a worker serves, or UnknownModel when the deployment's INPAINT_MODELS leaves it out:
    no job would ever be routed to it (its lane is nobody's)."""
    model, models = worker_model(settings), served(settings)
    if model not in models:
        names = ", ".join(m.name for m in models)
        raise UnknownModel(
            f"INPAINT_MODEL={settings.model} is not one of INPAINT_MODELS ({names}): no job would reach it"
        )
    return model


def resolve(word: str | None, settings: Settings) -> Model:
    """The served model a job names (None: the default), or UnknownModel."""
    models = served(settings)
    if word is None or word == "":
        return models[0]
    found = next((m for m in models if word in m.aliases), None)
    if found is None and not settings.model_list() and settings.model == "auto" and word in MODELS[CLASSICAL].aliases:
        found = models[0]  # what `auto` serves where SD2's weights are not: its workers report `classical`
    if found is None:
        names = ", ".join(m.ref for m in models)
        raise UnknownModel(f"model {word!r} is not served here; this deployment serves: {names}")
    return found


def lane(model: Model, settings: Settings) -> str:
    """The model's lane: '' for the deployment's default (the names of single-model releases), else
    its short name. Without INPAINT_MODELS a deployment has one lane, whatever its workers load."""
    if not settings.model_list() or model == default(settings):
        return ""
    return slug(model.name)


def slug(name: str) -> str:
    """A name as a Redis key part and a queue name (lower-case letters, digits, dots, dashes)."""
    return re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-") or "model"
