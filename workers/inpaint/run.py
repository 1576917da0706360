"""Running requests through the pipeline: compatible requests share one call, each keeps its own result.

Requests are compatible when they agree on everything a diffusers call shares across its rows: the
(padded) size, steps, guidance, strength and the worker's scheduler (`InpaintRequest.compat_key`).
Prompts, negative prompts, seeds, images and masks differ per row. Every row has its own CPU
`torch.Generator` seeded `seed + i`, so a seeded job gives the same image alone or in a micro-batch
(up to float rounding of the batched kernels). One request is a micro-batch of one: the same path.

On a compiled pipeline the rows are padded up to a warmed bucket (1, 2, 4, 8, …) with throw-away
copies of the last row, so no call after warm-up triggers a recompile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from shared import catalog
from shared.imaging import composite_unmasked, pad_to_multiple
from workers.inpaint import crop
from workers.inpaint.adapters import applied
from workers.inpaint.classical import classical_inpaint
from workers.inpaint.request import (
    Canceled,
    InpaintRequest,
    InpaintResult,
    MicroBatchStepHook,
    NonFiniteOutput,
    StepHook,
)
from workers.models.failures import AdapterFailed
from workers.models.families import pad_multiple, text_args
from workers.models.loading import LoadedPipeline
from workers.models.serving import probe_pair


def run_inpaint(pipeline: LoadedPipeline, req: InpaintRequest, on_step: StepHook | None = None) -> InpaintResult:
    """Inpaint `req.image` where `req.mask` is white; outputs keep the input's size."""
    hook = None if on_step is None else (lambda step, total: [on_step(step, total)])
    (result,) = run_batch(pipeline, [req], hook)
    if isinstance(result, BaseException):
        raise result
    return result


def run_batch(
    pipeline: LoadedPipeline, reqs: Sequence[InpaintRequest], on_step: MicroBatchStepHook | None = None
) -> list[InpaintResult | BaseException]:
    """Run compatible requests as one pipeline call; one result or one per-request error each.

    Errors of the whole call (out of memory, a broken pipeline) propagate: the caller decides
    whether to retry the requests one by one.
    """
    if not reqs:
        return []
    keys = {r.compat_key for r in reqs}
    if len(keys) != 1:
        raise ValueError(f"requests of one micro-batch must be compatible, got {sorted(keys)}")
    for r in reqs:
        if r.image.size != r.mask.size:
            raise ValueError("mask and image differ in size")
    started = time.perf_counter()
    boxes = [crop.square_box(r.mask, r.crop_padding) if r.crop_size else None for r in reqs]
    work = [
        crop.cut(r.image, r.mask, b, r.crop_size) if b else (r.image, r.mask) for r, b in zip(reqs, boxes, strict=True)
    ]
    n = pad_multiple(pipeline.family)
    padded = [(pad_to_multiple(img, n, fill_edge=True), pad_to_multiple(msk, n, fill_edge=False)) for img, msk in work]
    stopped = [False] * len(reqs)
    raw: list[list[Image.Image] | BaseException]
    try:
        if pipeline.kind == "classical":
            raw = [
                classical_inpaint(img, msk, r.num_outputs, _single(on_step, i))
                for i, (r, (img, msk)) in enumerate(zip(reqs, padded, strict=True))
            ]
        elif pipeline.kind == "sim":
            raw = pipeline.pipe(reqs, [img for img, _ in padded], on_step, stopped)
        else:
            with applied(pipeline, reqs[0].loras):  # every request's: the adapters are part of compat_key
                raw = _diffusers_call(pipeline, reqs, padded, on_step, stopped)
    except Canceled:
        return [Canceled() for _ in reqs]
    except AdapterFailed as exc:  # none of them ran: each fails with the adapter's code
        return [exc for _ in reqs]
    inference_s = time.perf_counter() - started
    results: list[InpaintResult | BaseException] = []
    for r, images, stop, box, (img, _) in zip(reqs, raw, stopped, boxes, work, strict=True):
        if stop:
            results.append(Canceled())
        elif isinstance(images, BaseException):
            results.append(images)
        else:
            results.append(_finish(r, images, box, img.size, inference_s))
    return results


def warm_up(pipeline: LoadedPipeline) -> float:
    """One small job through the whole path, so the first user job pays no first-call costs."""
    if pipeline.kind == "sim":
        return 0.0  # nothing to warm
    # A model at the square it was trained at (SD2: 512, SDXL and FLUX: 1024, the tiny fixtures: 64);
    # the classical inpainter and a diffusers directory on a small one.
    model = catalog.find(pipeline.name)
    size = model.size if model is not None and pipeline.kind == "diffusers" else 64
    image, mask = probe_pair(size, size)
    req = InpaintRequest(image=image, mask=mask, prompt="warm-up", num_inference_steps=2)
    return run_inpaint(pipeline, req).inference_s


def _single(on_step: MicroBatchStepHook | None, index: int) -> Callable[[int, int], bool] | None:
    """The micro-batch hook as seen by one request run on its own (the classical inpainter)."""
    if on_step is None:
        return None
    return lambda step, total: bool(on_step(step, total)[index])


def _finish(
    req: InpaintRequest, images: list[Image.Image], box: crop.Box | None, size: tuple[int, int], inference_s: float
) -> InpaintResult:
    """The outputs at the input's size: padding cropped away, a crop pasted back, kept pixels restored."""
    out = [im.crop((0, 0, *size)) if im.size != size else im for im in images]
    if box is not None:  # only the mask's square was inpainted: back into the whole image, mask only
        out = [crop.paste(req.image, req.mask, im, box, req.mask_blur) for im in out]
    elif req.preserve_unmasked:
        out = [composite_unmasked(im, req.image, crop.feathered(req.mask, req.mask_blur)) for im in out]
    return InpaintResult(images=out, nsfw_content_detected=None, inference_s=inference_s)


def _diffusers_call(
    pipeline: LoadedPipeline,
    reqs: Sequence[InpaintRequest],
    padded: list[tuple[Image.Image, Image.Image]],
    on_step: MicroBatchStepHook | None,
    stopped: list[bool],
) -> list[list[Image.Image] | BaseException]:
    import torch

    prompts: list[str] = []
    negatives: list[str] = []
    images: list[Image.Image] = []
    masks: list[Image.Image] = []
    generators: list[torch.Generator] = []
    owner: list[int] = []  # request index of each row
    for i, (r, (img, msk)) in enumerate(zip(reqs, padded, strict=True)):
        for k in range(r.num_outputs):
            prompts.append(r.prompt)
            # A missing negative prompt is "" in every row, whatever its batch-mates ask: SDXL would
            # zero the embedding for `None`, but only for a whole call, so a row's image would then
            # depend on its mates. (FLUX takes none: `text_args` leaves them out.)
            negatives.append(r.negative_prompt or "")
            images.append(img)
            masks.append(msk)
            generators.append(torch.Generator("cpu").manual_seed(r.seed + k))
            owner.append(i)
    rows = len(prompts)
    first = reqs[0]
    target = pipeline.plan.padded_rows(rows, images[0].width, images[0].height, first.guidance_scale)
    for _ in range(target - rows):  # throw-away rows so a compiled pipeline sees a warmed-up shape
        prompts.append(prompts[-1])
        negatives.append(negatives[-1])
        images.append(images[-1])
        masks.append(masks[-1])
        generators.append(torch.Generator("cpu").manual_seed(0))

    def step_end(pipe: object, step: int, timestep: object, kwargs: dict[str, object]) -> dict[str, object]:
        if on_step is not None:
            total = int(getattr(pipe, "num_timesteps", 0) or first.num_inference_steps)
            for i, flag in enumerate(on_step(step + 1, total)):
                if flag and i < len(stopped):
                    stopped[i] = True
            if all(stopped):
                # Raising here stops at once and skips the VAE decode the interrupt flag would still
                # run, so a canceled micro-batch frees the worker within one step.
                raise Canceled
        return kwargs

    with torch.inference_mode():
        out = pipeline.pipe(
            **text_args(pipeline.family, pipeline.pipe, prompts, negatives),
            image=images,
            mask_image=masks,
            height=images[0].height,
            width=images[0].width,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            strength=first.strength,
            generator=generators,
            output_type="np",
            callback_on_step_end=step_end,
        )
    arr = np.asarray(out.images[:rows], dtype=np.float32)
    per_request: list[list[Image.Image]] = [[] for _ in reqs]
    bad: set[int] = set()
    for row, i in enumerate(owner):
        if not np.isfinite(arr[row]).all():
            bad.add(i)  # fp16 overflow: this request fails; its mates keep their images
            continue
        pixels = (np.clip(arr[row], 0.0, 1.0) * 255.0).round().astype(np.uint8)
        per_request[i].append(Image.fromarray(pixels, "RGB"))
    return [
        NonFiniteOutput("the pipeline produced non-finite pixels") if i in bad else imgs
        for i, imgs in enumerate(per_request)
    ]
