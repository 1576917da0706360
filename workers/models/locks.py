"""Lock files: the exact snapshot `inpaint model fetch` downloaded and checked, which workers then serve.

A catalog model whose revision is not pinned in code (SDXL-inpainting, FLUX.1 Fill) is pinned when
fetched: `<hf_cache_dir>/inpaint-locks/<name>.json` (beside the weights; without a cache dir,
`<data_dir>/models/locks/`) records its repository, the snapshot's commit, every
file in it and the SHA-256 of its model_index.json. A worker serves that commit only, and only once
the snapshot in the cache still holds every locked file, so a later `main` upstream never changes
what a running fleet serves, and a half-copied cache is refused rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.config import Settings


@dataclass(frozen=True)
class Lock:
    name: str
    repo: str
    revision: str  # the snapshot's commit hash
    model_index_sha256: str
    files: list[str] = field(default_factory=list)  # relative to the snapshot, sorted
    variant: str | None = None  # the weights' variant (`fp16`) the snapshot holds
    fetched_at: float = 0.0


class LockError(ValueError):
    """A lock file that cannot be read, or a snapshot that no longer matches its lock."""


def lock_path(settings: Settings, name: str) -> Path:
    """Beside the weights it pins: in the Hugging Face cache (INPAINT_HF_CACHE_DIR) when one is set, so
    a volume of weights carries its locks to every worker that mounts it; else under the data dir."""
    root = settings.hf_cache_dir / "inpaint-locks" if settings.hf_cache_dir else settings.data_dir / "models" / "locks"
    return root / f"{name}.json"


def read_lock(settings: Settings, name: str) -> Lock | None:
    """The model's lock, or None when it was never fetched here; a damaged lock is a LockError."""
    path = lock_path(settings, name)
    if not path.is_file():
        return None
    try:
        lock = Lock(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise LockError(f"lock file {path} is unreadable ({exc}); run `inpaint model fetch {name}` again") from exc
    if len(lock.revision) != 40 or lock.name != name:
        raise LockError(f"lock file {path} does not lock {name} at a commit; run `inpaint model fetch {name}` again")
    return lock


def write_lock(settings: Settings, lock: Lock) -> Path:
    """Write the lock whole (a temporary file renamed into place): a reader never sees half of it."""
    path = lock_path(settings, lock.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(lock), fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def lock_snapshot(name: str, repo: str, snapshot: Path, variant: str | None = None) -> Lock:
    """The lock of a complete snapshot (its directory is named after its commit, as in the HF cache)."""
    return Lock(
        name=name,
        repo=repo,
        revision=snapshot.name,
        model_index_sha256=_sha256(snapshot / "model_index.json"),
        files=snapshot_files(snapshot),
        variant=variant,
        fetched_at=round(time.time(), 3),
    )


def snapshot_files(snapshot: Path) -> list[str]:
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


def check_against(lock: Lock, snapshot: Path) -> None:
    """LockError unless `snapshot` still holds every locked file and the locked model_index.json."""
    missing = [f for f in lock.files if not (snapshot / f).is_file()]
    if missing:
        raise LockError(f"the snapshot {lock.repo}@{lock.revision} lacks {len(missing)} locked files ({missing[0]}, …)")
    if _sha256(snapshot / "model_index.json") != lock.model_index_sha256:
        raise LockError(f"the model_index.json of {lock.repo}@{lock.revision} is not the one locked")


def missing_parts(snapshot: Path, variant: str | None = None, skip: frozenset[str] = frozenset()) -> list[str]:
    """What a diffusers snapshot lacks to load: each component model_index.json names needs its
    folder; a model its config and weights (every shard its index lists). Empty when complete."""
    index = snapshot / "model_index.json"
    if not index.is_file():
        return ["model_index.json"]
    try:
        components = json.loads(index.read_text())
    except ValueError:
        return ["model_index.json (unreadable)"]
    missing: list[str] = []
    for part, spec in components.items():
        if part.startswith("_") or part in skip or not isinstance(spec, list) or None in spec:
            continue
        folder = snapshot / part
        if not folder.is_dir() or not any(folder.iterdir()):
            missing.append(f"{part}/")
        elif not _is_model(spec[1]):
            continue
        elif not (folder / "config.json").is_file():
            missing.append(f"{part}/config.json")
        else:
            missing += [f"{part}/{w}" for w in _missing_weights(folder, variant)]
    return missing


def _is_model(class_name: str) -> bool:
    """Tokenizers, schedulers and processors have no weights."""
    return not any(k in class_name for k in ("Tokenizer", "Scheduler", "Processor", "FeatureExtractor"))


def _missing_weights(folder: Path, variant: str | None) -> list[str]:
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for index in folder.glob("*.safetensors.index*.json"):
        if (f".{variant}." not in index.name) if variant else not index.name.endswith(".safetensors.index.json"):
            continue
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            return [index.name]
        return sorted(s for s in shards if not (folder / s).is_file())
    found = [p for p in folder.glob("*.safetensors") if p.name.endswith(suffix)]
    if variant is None:
        found = [p for p in found if p.name.count(".") == 1]  # `model.safetensors`, not `model.fp16.safetensors`
    return [] if found else [f"*{suffix}"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
