"""The catalog's models, and where their weights are: a worker never downloads (`inpaint model fetch` does).

`sd2-inpainting` is stabilityai/stable-diffusion-2-inpainting at a commit pinned in code.
`sdxl-inpainting` and `flux-fill` are pinned when fetched: `inpaint model fetch NAME` downloads the
snapshot, checks it is complete and writes a lock (`workers.models.locks`); a worker serves the
locked commit only, from a local directory or the Hugging Face cache (`local_files_only`, so
HF_HUB_OFFLINE changes nothing for it). The tiny fixtures are built from config
(`workers.models.fixtures`); `classical` is OpenCV's inpainting: offline, CPU, prompt ignored.

Weights are not under this project's licence but their own (`shared.catalog.Model.licence`), whose
use restrictions bind whoever serves them and their users. FLUX.1 Fill [dev]'s forbids commercial
use: it is served (and fetched) only once INPAINT_ACCEPT_LICENSES names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from shared import catalog
from shared.config import Settings
from workers.models import locks

log = logging.getLogger(__name__)

SD2_REPO = "stabilityai/stable-diffusion-2-inpainting"
SD2_REVISION = "81a84f49b15956b60b4272a405ad3daef3da4590"
SD2_LICENSE = "CreativeML Open RAIL++-M (https://huggingface.co/stabilityai/stable-diffusion-2-inpainting)"
TINY_NAME = catalog.TINY
SIM_NAME = catalog.SIM  # a stand-in for a GPU that computes nothing (`workers.models.sim`)
PRESETS = tuple(catalog.MODELS)
# Components a worker never loads (the safety policy has its own checker: workers.models.safety).
UNLOADED = frozenset({"safety_checker", "feature_extractor", "image_encoder"})
_NEVER = ("*.ckpt", "*.bin", "*.onnx", "*.msgpack", "*.pt", "*.pth", "*.gguf")


@dataclass(frozen=True)
class Files:
    """What of a repository is fetched: only the diffusers layout's safetensors, never pickles."""

    allow: tuple[str, ...]
    ignore: tuple[str, ...] = _NEVER
    variant: str | None = None  # load `*.<variant>.safetensors` (diffusers' `variant=`)


_LAYOUT = ("model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "*/config.json")
FILES: dict[str, Files] = {
    # full-precision safetensors, as served since the first release
    catalog.SD2: Files((*_LAYOUT, "feature_extractor/*", "*/*.safetensors"), (*_NEVER, "*.fp16.safetensors")),
    # the fp16 variant only: what a GPU serves anyway, half the download (a CPU upcasts it to fp32)
    catalog.SDXL: Files((*_LAYOUT, "*/*.fp16.safetensors"), variant="fp16"),
    # FLUX.1 Fill [dev] ships bf16 weights only; its root-level single-file checkpoints
    # (flux1-fill-dev.safetensors, ae.safetensors) duplicate the folders and are not fetched.
    catalog.FLUX: Files((*_LAYOUT, "*/*.safetensors", "*/*.safetensors.index.json")),
}


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded from what is on this machine."""


class LicenceNotAccepted(ModelUnavailable):
    """The model's licence restricts its use and the operator has not accepted it."""


def check_licence(settings: Settings, model: catalog.Model) -> None:
    """LicenceNotAccepted unless the model needs no acceptance or INPAINT_ACCEPT_LICENSES names it."""
    if not model.needs_acceptance or set(model.aliases) & settings.accepted_licenses():
        return
    raise LicenceNotAccepted(
        f"{model.ref} comes under the {model.licence} ({model.licence_url}); it is served only once the "
        f"operator accepts that licence: set INPAINT_ACCEPT_LICENSES={model.name}"
    )


def locate(settings: Settings, model: catalog.Model) -> tuple[Path, str]:
    """(the complete local snapshot, its commit) of a real catalog model, or ModelUnavailable saying
    what to run. Checks the licence first, before anything is looked up."""
    check_licence(settings, model)
    files = FILES[model.name]
    fetch = f"run `inpaint model fetch {model.name}`"
    revision = model.revision
    lock = None
    if not revision:  # pinned at fetch time: serve what the lock says, nothing else
        try:
            lock = locks.read_lock(settings, model.name)
        except locks.LockError as exc:
            raise ModelUnavailable(str(exc)) from exc
        if lock is None:
            raise ModelUnavailable(f"{model.ref} has not been fetched here (no lock file); {fetch}")
        if lock.repo != model.repo:
            raise ModelUnavailable(f"the lock of {model.name} is for {lock.repo}, not {model.repo}; {fetch}")
        revision = lock.revision
    snapshot = _cached(settings, model, revision)
    if snapshot is None:
        raise ModelUnavailable(f"{model.repo}@{revision} is not in the local Hugging Face cache; {fetch}")
    missing = locks.missing_parts(snapshot, files.variant, UNLOADED)
    if missing:
        raise ModelUnavailable(f"{model.repo}@{revision} is incomplete here (no {', '.join(missing[:3])}); {fetch}")
    if lock is not None:
        try:
            locks.check_against(lock, snapshot)
        except locks.LockError as exc:
            raise ModelUnavailable(f"{exc}; {fetch}") from exc
    return snapshot, revision


def _cached(settings: Settings, model: catalog.Model, revision: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    files = FILES[model.name]
    try:
        path = snapshot_download(
            model.repo,
            revision=revision,
            local_files_only=True,
            cache_dir=settings.hf_cache_dir,
            allow_patterns=list(files.allow),
            ignore_patterns=list(files.ignore),
        )
    except IncompleteSnapshotError as exc:  # an interrupted download, by the cache's own listing
        raise ModelUnavailable(
            f"{model.repo}@{revision} is only partly in the cache ({exc}); run `inpaint model fetch {model.name}`"
        ) from exc
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return Path(path)


def sd2_local_dir(settings: Settings) -> Path | None:
    """The cached snapshot of the pinned revision, or None when it is not on this machine."""
    try:
        return locate(settings, catalog.MODELS[catalog.SD2])[0]
    except ModelUnavailable:
        return None


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


def check_available(settings: Settings) -> str:
    """The worker's model (`auto` resolved), or ModelUnavailable unless it can load here: what
    `inpaint worker` checks in its parent, so a missing model is one clear line, not children Celery
    respawns forever."""
    name = resolve_model(settings)
    model = catalog.find(name)
    if model is not None:
        check_licence(settings, model)
        if model.name in FILES:
            locate(settings, model)
    return name


def fetch_model(settings: Settings, name: str = catalog.SD2) -> tuple[Path, locks.Lock]:
    """Download a real catalog model into the cache (honours HF_HUB_OFFLINE), check the snapshot is
    complete (and the pinned commit, where the catalog pins one) and lock it."""
    from huggingface_hub import snapshot_download

    model = catalog.find(name)
    if model is None or model.name not in FILES:
        raise ModelUnavailable(f"{name!r} has no weights to fetch; real models: {', '.join(FILES)}")
    check_licence(settings, model)
    files = FILES[model.name]
    path = Path(
        snapshot_download(
            model.repo,
            revision=model.revision or None,
            cache_dir=settings.hf_cache_dir,
            allow_patterns=list(files.allow),
            ignore_patterns=list(files.ignore),
        )
    )
    if model.revision and path.name != model.revision:
        raise ModelUnavailable(f"downloaded snapshot {path.name} is not the pinned revision {model.revision}")
    missing = locks.missing_parts(path, files.variant, UNLOADED)
    if missing:
        raise ModelUnavailable(f"snapshot at {path} is incomplete (no {', '.join(missing[:3])})")
    lock = locks.lock_snapshot(model.name, model.repo, path, files.variant)
    locks.write_lock(settings, lock)
    return path, lock
