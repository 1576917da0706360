"""What differs between the pipeline families a worker serves: their denoiser, their text arguments,
the multiple their sizes come in, and what a row of a batch costs.

SD2 and SDXL denoise with a UNet and take a negative prompt; FLUX.1 Fill denoises with a transformer,
has no negative prompt (the catalog's `ignores`; the API refuses one at submit) and packs its latents
2×2, so its sizes are multiples of 16 rather than 8.
"""

from __future__ import annotations

from typing import Any

from shared import catalog

# Each pipeline class a catalog model runs with, and its family.
FAMILIES = {m.pipeline: m.family for m in catalog.MODELS.values() if m.pipeline}
FLUX_MAX_SEQUENCE = 512  # FLUX's T5 prompt length (its pipeline's ceiling)
# GPU memory and compute of one row relative to SD2 at the same size: SDXL's UNet (2.6 B parameters
# against 0.87 B, attention at more resolutions) and FLUX's 12 B transformer both cost at least about
# 4× as much, so a card is saturated by a quarter of SD2's rows.
ROW_COST = {"sd2": 1, "sdxl": 4, "flux": 4}


def family_of(pipe: Any) -> str:
    """A pipeline object's family, from its class (a wrapper or an unknown class: sd2's)."""
    return FAMILIES.get(type(pipe).__name__, "sd2")


def denoiser(pipe: Any) -> Any:
    """The module that runs every step: the UNet, or FLUX's transformer."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def pad_multiple(family: str) -> int:
    """Sizes a family's pipeline takes as they are: 8× VAE latents, packed 2×2 for FLUX."""
    return 16 if family == "flux" else 8


def text_args(family: str, pipe: Any, prompts: list[str], negatives: list[str]) -> dict[str, Any]:
    """The prompt arguments of one call, one entry per row."""
    if family != "flux":
        return {"prompt": prompts, "negative_prompt": negatives}
    # T5 pads every prompt to this length: the tokenizer's own where shorter (the tiny fixture's)
    tokenizer = getattr(pipe, "tokenizer_2", None)
    length = min(FLUX_MAX_SEQUENCE, int(getattr(tokenizer, "model_max_length", FLUX_MAX_SEQUENCE)))
    return {"prompt": prompts, "max_sequence_length": length}
