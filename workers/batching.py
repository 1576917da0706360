"""Cross-job micro-batching: compatible jobs share one pipeline call, each keeps its own result.

Jobs are compatible when they agree on everything a diffusers call shares across its rows: the
(padded) size, steps, guidance, strength and the worker's scheduler. Prompts, negative prompts,
seeds, images and masks differ per row. Every row has its own CPU `torch.Generator` seeded
`seed + i`, so a seeded job gives the same image alone or batched (up to float rounding of the
batched kernels).

`gather` collects a batch from any `take` function (the job store's queue in a worker, an
in-memory queue in the benchmark); `run_batch` runs it and hands back one result or one error per
job, so a job that is canceled or produces NaN pixels fails alone.

On a compiled pipeline the rows are padded up to a fixed bucket (1, 2, 4, 8, …) with throw-away
copies of the last row, so no batch size seen after warm-up triggers a recompile.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from shared.imaging import composite_unmasked, pad_to_multiple
from shared.schemas import batch_key
from workers.inference import Canceled, InpaintRequest, InpaintResult, NonFiniteOutput, classical_inpaint
from workers.pipelines import LoadedPipeline

# on_step(step, total) -> one flag per request: True stops that request (canceled, or no longer ours)
BatchStepHook = Callable[[int, int], Sequence[bool]]

T = TypeVar("T")


def request_key(req: InpaintRequest) -> str:
    w, h = req.image.size
    return batch_key(w, h, req.num_inference_steps, req.guidance_scale, req.strength)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= rows), rows)


@dataclass
class Item(Generic[T]):
    """A job waiting for a batch: its request and whatever the caller needs to finish it."""

    request: InpaintRequest
    ref: T

    @property
    def rows(self) -> int:
        return self.request.num_outputs

    @property
    def key(self) -> str:
        return request_key(self.request)


# take(key, max_rows) -> items of that key, together at most max_rows rows, possibly none
Take = Callable[[str, int], list[Item[T]]]


def gather(first: Item[T], take: Take[T], max_rows: int, window_s: float) -> list[Item[T]]:
    """`first` plus compatible items, until `max_rows` rows or `window_s` seconds have passed."""
    batch, rows = [first], first.rows
    deadline = time.monotonic() + window_s
    while rows < max_rows:
        got = take(first.key, max_rows - rows)
        batch += got
        rows += sum(i.rows for i in got)
        left = deadline - time.monotonic()
        if rows >= max_rows or left <= 0:
            break
        if not got:
            time.sleep(min(0.005, left))
    return batch


class MemoryQueue(Generic[T]):
    """An in-process queue with the job store's `take` semantics (oldest first, one key at a time)."""

    def __init__(self) -> None:
        self.items: deque[Item[T]] = deque()

    def put(self, item: Item[T]) -> None:
        self.items.append(item)

    def pop(self) -> Item[T] | None:
        return self.items.popleft() if self.items else None

    def take(self, key: str, max_rows: int) -> list[Item[T]]:
        out: list[Item[T]] = []
        rows = 0
        for it in list(self.items):
            if it.key == key and rows + it.rows <= max_rows:
                out.append(it)
                rows += it.rows
                self.items.remove(it)
            if rows >= max_rows:
                break
        return out


def run_batch(
    pipeline: LoadedPipeline, reqs: Sequence[InpaintRequest], on_step: BatchStepHook | None = None
) -> list[InpaintResult | BaseException]:
    """Run compatible requests as one pipeline call; one result or one per-job error each.

    Errors of the whole call (out of memory, a broken pipeline) propagate: the caller decides
    whether to retry the jobs one by one.
    """
    if not reqs:
        return []
    keys = {request_key(r) for r in reqs}
    if len(keys) != 1:
        raise ValueError(f"requests of one batch must be compatible, got {sorted(keys)}")
    for r in reqs:
        if r.image.size != r.mask.size:
            raise ValueError("mask and image differ in size")
    started = time.perf_counter()
    padded = [(pad_to_multiple(r.image, 8, fill_edge=True), pad_to_multiple(r.mask, 8, fill_edge=False)) for r in reqs]
    stopped = [False] * len(reqs)
    raw: list[list[Image.Image]]
    try:
        if pipeline.kind == "classical":
            raw = []
            for i, (r, (img, msk)) in enumerate(zip(reqs, padded, strict=True)):
                raw.append(classical_inpaint(img, msk, r.num_outputs, _single(on_step, i)))
        else:
            raw = _diffusers_batch(pipeline, reqs, padded, on_step, stopped)
    except Canceled:
        return [Canceled() for _ in reqs]
    inference_s = time.perf_counter() - started
    results: list[InpaintResult | BaseException] = []
    for r, images, stop in zip(reqs, raw, stopped, strict=True):
        if stop:
            results.append(Canceled())
        elif isinstance(images, BaseException):
            results.append(images)
        else:
            results.append(_finish(r, images, inference_s))
    return results


def _single(on_step: BatchStepHook | None, index: int) -> Callable[[int, int], bool] | None:
    """The batch hook seen by one request run on its own (the classical inpainter)."""
    if on_step is None:
        return None
    return lambda step, total: bool(on_step(step, total)[index])


def _finish(req: InpaintRequest, images: list[Image.Image], inference_s: float) -> InpaintResult:
    width, height = req.image.size
    out = [im.crop((0, 0, width, height)) if im.size != (width, height) else im for im in images]
    if req.preserve_unmasked:
        out = [composite_unmasked(im, req.image, req.mask) for im in out]
    return InpaintResult(images=out, nsfw_content_detected=None, inference_s=inference_s)


def _diffusers_batch(
    pipeline: LoadedPipeline,
    reqs: Sequence[InpaintRequest],
    padded: list[tuple[Image.Image, Image.Image]],
    on_step: BatchStepHook | None,
    stopped: list[bool],
) -> list[list[Image.Image]]:
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
            # diffusers encodes a missing negative prompt as "": the same embedding, row by row.
            negatives.append(r.negative_prompt or "")
            images.append(img)
            masks.append(msk)
            generators.append(torch.Generator("cpu").manual_seed(r.seed + k))
            owner.append(i)
    rows = len(prompts)
    first = reqs[0]
    # Pad to a warmed-up bucket only where the compiled graphs would see this shape (CFG doubles
    # the rows; without it, or at another size, the pipeline runs eagerly and padding buys nothing).
    buckets: list[int] = pipeline.extra.get("buckets") or []
    warm_sizes = {tuple(s) for s in pipeline.extra.get("compiled_sizes") or []}
    compiled = buckets and first.guidance_scale > 1 and (images[0].width, images[0].height) in warm_sizes
    target = bucket_for(rows, buckets) if compiled else rows
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
                # run, so a canceled batch frees the worker within one step.
                raise Canceled
        return kwargs

    with torch.inference_mode():
        out = pipeline.pipe(
            prompt=prompts,
            negative_prompt=negatives,
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
            bad.add(i)  # fp16 overflow: this job fails; its batch-mates keep their images
            continue
        pixels = (np.clip(arr[row], 0.0, 1.0) * 255.0).round().astype(np.uint8)
        per_request[i].append(Image.fromarray(pixels, "RGB"))
    return [
        NonFiniteOutput("the pipeline produced non-finite pixels") if i in bad else imgs  # type: ignore[misc]
        for i, imgs in enumerate(per_request)
    ]
