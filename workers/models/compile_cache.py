"""Compiled kernels kept between worker starts (`INPAINT_COMPILE_CACHE_DIR`, e.g. on the models volume).

A CUDA worker compiles and warms every bucket before it says it is ready (minutes with
`reduce-overhead`). torch's portable cache artefacts (`torch.compiler.save_cache_artifacts` /
`load_cache_artifacts`: inductor's FX graph and autotuning results, AOT autograd's) are written
once after a warm-up and loaded before the next compile, so a restarted or added worker with the
same torch, GPU model, model and compile settings skips the code generation. One file per such
combination; a file that does not load (another torch, a torn write) is logged and ignored: the
worker compiles from scratch, as without a cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from workers.models.families import denoiser

log = logging.getLogger(__name__)


def cache_file(directory: str, pipe: Any, mode: str, sizes: list[tuple[int, int]], buckets: list[int],
               precision: str) -> Path | None:  # fmt: skip
    """Where this combination's artefacts live; None when no directory is set."""
    if not directory:
        return None
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = denoiser(pipe)
    params = sum(p.numel() for p in model.parameters())
    key = repr((torch.__version__, device, type(model).__name__, params, mode, sorted(sizes), sorted(buckets),
                precision))  # fmt: skip
    return Path(directory) / f"inductor-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"


def load(path: Path | None) -> bool:
    """Load the artefacts at `path` into this process's compile caches; True when they loaded."""
    if path is None or not path.is_file():
        return False
    import torch

    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception:
        log.warning("compile cache %s did not load; compiling from scratch", path, exc_info=True)
        return False
    log.info("compile cache loaded from %s", path)
    return True


def save(path: Path | None) -> bool:
    """Write what this process compiled to `path` (atomically: a reader never sees half a file)."""
    if path is None:
        return False
    import torch

    try:
        artefacts = torch.compiler.save_cache_artifacts()
        if artefacts is None:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(artefacts[0])
        tmp.replace(path)
    except OSError:
        log.warning("compile cache %s could not be written", path, exc_info=True)
        return False
    log.info("compile cache saved to %s (%d bytes)", path, path.stat().st_size)
    return True
