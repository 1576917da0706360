"""OpenCV's Telea inpainting: no model, no prompt; the offline CPU fallback."""

from __future__ import annotations

import numpy as np
from PIL import Image

from workers.inpaint.request import Canceled, StepHook


def classical_inpaint(image: Image.Image, mask: Image.Image, n: int, on_step: StepHook | None) -> list[Image.Image]:
    import cv2

    if on_step is not None and on_step(0, 1):
        raise Canceled
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    out = cv2.inpaint(bgr, np.asarray(mask), 5, cv2.INPAINT_TELEA)
    result = Image.fromarray(cv2.cvtColor(out, cv2.COLOR_BGR2RGB), "RGB")
    if on_step is not None and on_step(1, 1):
        raise Canceled
    return [result.copy() for _ in range(n)]
