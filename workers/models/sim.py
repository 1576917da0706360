"""`sim`: a stand-in for a GPU, so one machine can host many workers (the fleet benchmark and tests).

A pipeline call computes nothing: it holds its worker for a fixed time whatever its rows (a GPU's
micro-batch costs about one call's time until it is saturated), reports every denoising step through
the same hook as the real pipeline (so each step's Redis round trip and cancel check happen as in
service), and answers the input image as every output. Refused in production (`TOY_MODELS`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from PIL import Image

from workers.inpaint.request import Canceled, InpaintRequest, MicroBatchStepHook


class SimDevice:
    def __init__(self, call_s: float):
        self.call_s = call_s

    def __call__(
        self,
        reqs: Sequence[InpaintRequest],
        images: Sequence[Image.Image],
        on_step: MicroBatchStepHook | None,
        stopped: list[bool],
    ) -> list[list[Image.Image] | BaseException]:
        first = reqs[0]
        total = max(1, int(first.num_inference_steps * first.strength))
        started = time.perf_counter()
        for step in range(1, total + 1):
            time.sleep(max(0.0, started + self.call_s * step / total - time.perf_counter()))
            if on_step is not None:
                for i, flag in enumerate(on_step(step, total)):
                    if flag and i < len(stopped):
                        stopped[i] = True
                if all(stopped):
                    raise Canceled
        return [[img.copy() for _ in range(r.num_outputs)] for r, img in zip(reqs, images, strict=True)]
