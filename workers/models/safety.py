"""The safety checker's weights: diffusers' StableDiffusionSafetyChecker and its image processor.

`INPAINT_SAFETY_CHECKER` says where they are: a local directory holding a saved
`StableDiffusionSafetyChecker` and its `CLIPImageProcessor` (subfolders `safety_checker/` and
`feature_extractor/`, as in a diffusers pipeline, or both at its top level), a Hugging Face repo id
found in the local cache (never downloaded by a worker), or `tiny-random` (tests: built from config).
What the policy does with the checker's flags is `workers.inpaint.safety`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from shared.config import Settings


class SafetyUnavailable(RuntimeError):
    """A safety policy is set but its checker cannot be loaded: the worker refuses to start."""


@dataclass
class Checker:
    model: Any
    processor: Any
    device: str

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """One flag per image: True where the checker sees a concept over its threshold."""
        import numpy as np
        import torch

        clip_input = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        with torch.inference_mode():
            # The checker blacks out flagged images in the array we hand it: a copy, thrown away.
            _, has_nsfw = self.model(
                clip_input=clip_input.to(self.device, dtype=self.model.dtype), images=arrays.copy()
            )
        return [bool(x) for x in has_nsfw]


def tiny_checker(threshold: float = 0.0) -> tuple[Any, Any]:
    """A tiny random StableDiffusionSafetyChecker built from config, and its image processor.

    Every concept's threshold is `threshold`: -1.5 flags everything, 1.5 nothing (cosines lie in [-1, 1]).
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
        vision_config={
            "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
            "image_size": 32, "patch_size": 8,
        },
        projection_dim=16,
    )  # fmt: skip
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(threshold)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor


def save_tiny_checker(target: Path, threshold: float = 0.0) -> Path:
    model, processor = tiny_checker(threshold)
    model.save_pretrained(str(target / "safety_checker"), safe_serialization=True)
    processor.save_pretrained(str(target / "feature_extractor"))
    return target


def load_checker(settings: Settings, device: str) -> Checker | None:
    """The configured checker, or None when the policy is `none`."""
    if settings.safety == "none":
        return None
    source = settings.safety_checker
    try:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        if source == "tiny-random":
            path = settings.data_dir / "models" / "tiny-safety-checker"
            if not (path / "safety_checker").is_dir():
                save_tiny_checker(path)
        elif Path(source).is_dir():
            path = Path(source)
        else:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True, cache_dir=settings.hf_cache_dir))
        model_dir = path / "safety_checker" if (path / "safety_checker").is_dir() else path
        proc_dir = path / "feature_extractor" if (path / "feature_extractor").is_dir() else path
        model = StableDiffusionSafetyChecker.from_pretrained(str(model_dir), local_files_only=True).eval().to(device)
        processor = CLIPImageProcessor.from_pretrained(str(proc_dir), local_files_only=True)
    except Exception as exc:
        raise SafetyUnavailable(
            f"INPAINT_SAFETY={settings.safety} but the checker {source!r} cannot be loaded from this machine: {exc}"
        ) from exc
    return Checker(model, processor, device)
