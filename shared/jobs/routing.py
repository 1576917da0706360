"""Which model a job runs on, and whether that model can take it: checked at submit, before anything
is stored (`shared.catalog` has the models, their limits and lanes)."""

from __future__ import annotations

from dataclasses import dataclass

from shared import catalog
from shared.config import Settings
from shared.errors import Code, Problem
from shared.schemas import JobInput


@dataclass(frozen=True)
class Route:
    """A job's model, that model's lane, and its parameters with the model's defaults filled in."""

    model: catalog.Model
    lane: str
    params: JobInput


def route(params: JobInput, settings: Settings) -> Route:
    """The served model `params.model` names (none: the default), or a 422 that lists the served ones;
    a field the model ignores, or steps past its limit, are 422s naming the field."""
    try:
        model = catalog.resolve(params.model, settings)
    except catalog.UnknownModel as exc:
        raise Problem(422, Code.model_not_served, str(exc), "model") from None
    limits, given = model.limits, params.model_fields_set
    for name in sorted(limits.ignores & given):
        if getattr(params, name) not in (None, ""):
            raise Problem(422, Code.unsupported_field, f"{model.ref} takes no {name}; leave it out", name)
    defaults: dict[str, object] = {}
    if "num_inference_steps" not in given:
        defaults["num_inference_steps"] = limits.default_steps
    if "guidance_scale" not in given:
        defaults["guidance_scale"] = limits.default_guidance
    if defaults:
        params = params.model_copy(update=defaults)
    if params.num_inference_steps > limits.max_steps:
        raise Problem(
            422,
            Code.validation_error,
            f"num_inference_steps: {model.ref} takes at most {limits.max_steps}",
            "num_inference_steps",
        )
    return Route(model, catalog.lane(model, settings), params)


def check_size(model: catalog.Model, width: int, height: int) -> None:
    """The image as the pipeline sees it fits the model's largest side."""
    side = model.limits.max_side
    if side is not None and max(width, height) > side:
        raise Problem(
            413,
            Code.image_too_large,
            f"the image is {width}×{height}; {model.ref} takes at most {side} pixels a side",
            "image",
        )
