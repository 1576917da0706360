"""The inference itself: a plain function of a pipeline and a request, ignorant of Celery and HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.imaging import composite_unmasked, pad_to_multiple
from shared.schemas import JobInput
from workers.pipelines import LoadedPipeline

# on_step(step, total) -> True to stop the job now
StepHook = Callable[[int, int], bool]


class Canceled(Exception):
    """The job was canceled between two denoising steps."""


class NonFiniteOutput(Exception):
    """The pipeline produced NaN or infinite pixels (fp16 overflow): never stored as a black image."""


@dataclass
class InpaintRequest:
    image: Image.Image  # RGB, upright
    mask: Image.Image  # L, 255 = repaint
    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    strength: float = 1.0
    seed: int = 0
    num_outputs: int = 1
    preserve_unmasked: bool = True

    @classmethod
    def from_input(cls, params: JobInput, image: Image.Image, mask: Image.Image) -> InpaintRequest:
        return cls(
            image=image,
            mask=mask,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            strength=params.strength,
            seed=params.seed or 0,
            num_outputs=params.num_outputs,
            preserve_unmasked=params.preserve_unmasked,
        )


@dataclass
class InpaintResult:
    images: list[Image.Image]
    nsfw_content_detected: list[bool] | None
    inference_s: float


def run_inpaint(pipeline: LoadedPipeline, req: InpaintRequest, on_step: StepHook | None = None) -> InpaintResult:
    """Inpaint `req.image` where `req.mask` is white; outputs keep the input's size."""
    if req.image.size != req.mask.size:
        raise ValueError("mask and image differ in size")
    width, height = req.image.size
    # Latents are 1/8 of the image: pad right/bottom to a multiple of 8 and crop the result back.
    image = pad_to_multiple(req.image, 8, fill_edge=True)
    mask = pad_to_multiple(req.mask, 8, fill_edge=False)
    started = time.perf_counter()
    if pipeline.kind == "classical":
        raw = _classical(image, mask, req.num_outputs, on_step)
    else:
        raw = _diffusers(pipeline, req, image, mask, on_step)
    inference_s = time.perf_counter() - started
    images = [im.crop((0, 0, width, height)) if im.size != (width, height) else im for im in raw]
    if req.preserve_unmasked:
        images = [composite_unmasked(im, req.image, req.mask) for im in images]
    return InpaintResult(images=images, nsfw_content_detected=None, inference_s=inference_s)


def _diffusers(
    pipeline: LoadedPipeline, req: InpaintRequest, image: Image.Image, mask: Image.Image, on_step: StepHook | None
) -> list[Image.Image]:
    import torch

    n = req.num_outputs
    # One CPU generator per output, seeded seed+i: the same job gives the same pixels on any device,
    # alone or batched with other jobs.
    generators = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(n)]

    def step_end(pipe: object, step: int, timestep: object, kwargs: dict[str, object]) -> dict[str, object]:
        total = int(getattr(pipe, "num_timesteps", 0) or req.num_inference_steps)
        if on_step is not None and on_step(step + 1, total):
            # Raising here stops at once and skips the VAE decode the pipeline's interrupt flag would
            # still run, so a canceled job frees the worker within one step.
            raise Canceled
        return kwargs

    with torch.inference_mode():
        out = pipeline.pipe(
            prompt=[req.prompt] * n,
            negative_prompt=[req.negative_prompt] * n if req.negative_prompt else None,
            image=[image] * n,
            mask_image=[mask] * n,
            height=image.height,
            width=image.width,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            strength=req.strength,
            generator=generators,
            output_type="np",
            callback_on_step_end=step_end,
        )
    arr = np.asarray(out.images, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise NonFiniteOutput("the pipeline produced non-finite pixels")
    pixels = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return [Image.fromarray(p, "RGB") for p in pixels]


def _classical(image: Image.Image, mask: Image.Image, n: int, on_step: StepHook | None) -> list[Image.Image]:
    import cv2

    if on_step is not None and on_step(0, 1):
        raise Canceled
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    out = cv2.inpaint(bgr, np.asarray(mask), 5, cv2.INPAINT_TELEA)
    result = Image.fromarray(cv2.cvtColor(out, cv2.COLOR_BGR2RGB), "RGB")
    if on_step is not None and on_step(1, 1):
        raise Canceled
    return [result.copy() for _ in range(n)]


def warm_up(pipeline: LoadedPipeline) -> float:
    """One small job through the whole path, so the first user job pays no first-call costs."""
    size = 512 if pipeline.name == "sd2-inpainting" else 64
    image = Image.new("RGB", (size, size), (127, 127, 127))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    req = InpaintRequest(image=image, mask=mask, prompt="warm-up", num_inference_steps=2)
    return run_inpaint(pipeline, req).inference_s
