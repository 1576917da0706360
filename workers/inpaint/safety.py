"""The safety policy (`INPAINT_SAFETY=none|flag|blur|block`) over the checker's flags.

`none` (the model card's behaviour): no checker runs and `nsfw_content_detected` is null. Otherwise
the checker scores every output and: `flag` reports true/false per output; `blur` also blurs the
flagged outputs heavily; `block` fails the job with `content_blocked` and stores nothing. The
checker's own habit of replacing flagged images with black ones is never used: a black image is
never stored or returned.
"""

from __future__ import annotations

from PIL import Image, ImageFilter

from workers.models.safety import Checker


def apply_policy(
    policy: str, checker: Checker | None, images: list[Image.Image]
) -> tuple[list[Image.Image], list[bool] | None]:
    """(images to store, nsfw flags); raises ContentBlocked under `block` when any output is flagged."""
    if policy == "none" or checker is None:
        return images, None
    flags = checker.flags(images)
    if policy == "block" and any(flags):
        raise ContentBlocked(f"{sum(flags)} of {len(flags)} outputs were flagged by the safety checker")
    if policy == "blur":
        images = [blur(im) if f else im for im, f in zip(images, flags, strict=True)]
    return images, flags


def blur(img: Image.Image) -> Image.Image:
    """Heavy enough that nothing is recognisable, at any size."""
    return img.filter(ImageFilter.GaussianBlur(radius=max(8, max(img.size) // 16)))


class ContentBlocked(Exception):
    """The policy is `block` and the checker flagged an output."""
