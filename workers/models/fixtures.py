"""The tiny fixtures: each catalog toy with weights, built from config and saved once under the data dir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shared import catalog
from workers.models.tiny import TINY_VERSION, ensure_tiny_random
from workers.models.tiny_flux import TINY_FLUX_VERSION, ensure_tiny_flux
from workers.models.tiny_sdxl import TINY_SDXL_VERSION, ensure_tiny_sdxl

FIXTURES: dict[str, tuple[Callable[[Path], Path], str]] = {
    catalog.TINY: (ensure_tiny_random, TINY_VERSION),
    catalog.TINY_SDXL: (ensure_tiny_sdxl, TINY_SDXL_VERSION),
    catalog.TINY_FLUX: (ensure_tiny_flux, TINY_FLUX_VERSION),
}


def ensure_fixture(name: str, models_dir: Path) -> tuple[Path, str]:
    """(the saved pipeline, its revision: `<name>-<version>`), built and saved on first use."""
    ensure, version = FIXTURES[name]
    return ensure(models_dir), f"{name}-{version}"
