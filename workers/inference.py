"""The inference itself: a plain function of a pipeline and a request, ignorant of Celery and HTTP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.schemas import JobInput
from workers.pipelines import LoadedPipeline, probe_pair

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
    """Inpaint `req.image` where `req.mask` is white; outputs keep the input's size.

    One job is a batch of one: the same code path as a batched job (`workers.batching.run_batch`).
    """
    from workers.batching import run_batch

    hook = None if on_step is None else (lambda step, total: [on_step(step, total)])
    (result,) = run_batch(pipeline, [req], hook)
    if isinstance(result, BaseException):
        raise result
    return result


def classical_inpaint(image: Image.Image, mask: Image.Image, n: int, on_step: StepHook | None) -> list[Image.Image]:
    """OpenCV's Telea inpainting: no model, no prompt; the CPU fallback."""
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
    image, mask = probe_pair(size, size)
    req = InpaintRequest(image=image, mask=mask, prompt="warm-up", num_inference_steps=2)
    return run_inpaint(pipeline, req).inference_s
