"""What the pure inference takes and gives back, and the ways one request can fail alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from shared.lora_format import adapters_key
from shared.schemas import JobInput, compatibility_key
from workers.inpaint.adapters import Adapter

# on_step(step, total) -> True to stop the request now
StepHook = Callable[[int, int], bool]
# on_step(step, total) -> one flag per request of a micro-batch: True stops that request
MicroBatchStepHook = Callable[[int, int], Sequence[bool]]


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
    # The job's own defaults (one source: a request built by hand behaves as a job submitted without them)
    mask_blur: int = JobInput.model_fields["mask_blur"].default
    crop_size: int = 0  # > 0: inpaint only a square around the mask, at this size (`workers.inpaint.crop`)
    crop_padding: int = JobInput.model_fields["crop_padding"].default
    # The job's LoRA adapters (`workers.inpaint.adapters.adapters_of`), on for its pipeline call only.
    loras: tuple[Adapter, ...] = ()

    @classmethod
    def from_input(
        cls,
        params: JobInput,
        image: Image.Image,
        mask: Image.Image,
        crop_size: int = 512,
        loras: tuple[Adapter, ...] = (),
    ) -> InpaintRequest:
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
            mask_blur=params.mask_blur,
            crop_size=crop_size if params.crop_to_mask else 0,
            crop_padding=params.crop_padding,
            loras=loras,
        )

    @property
    def work_size(self) -> tuple[int, int]:
        """The size the pipeline sees (before padding to a multiple of 8)."""
        return (self.crop_size, self.crop_size) if self.crop_size else self.image.size

    @property
    def compat_key(self) -> str:
        """What another request must share to run in the same pipeline call."""
        w, h = self.work_size
        lora = adapters_key({"sha256": a.sha256, "scale": a.scale} for a in self.loras)
        return compatibility_key(w, h, self.num_inference_steps, self.guidance_scale, self.strength, adapters=lora)


@dataclass
class InpaintResult:
    images: list[Image.Image]
    nsfw_content_detected: list[bool] | None
    inference_s: float
