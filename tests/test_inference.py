"""`run_inpaint` on the tiny-random pipeline: the real diffusers code path, on CPU, in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import Settings
from tests.conftest import make_pair
from workers.inpaint.request import Canceled, InpaintRequest
from workers.inpaint.run import run_inpaint
from workers.models.loading import LoadedPipeline, load_pipeline
from workers.models.presets import ModelUnavailable, resolve_model
from workers.models.tiny import build_tiny_random, ensure_tiny_random


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    s = Settings(model="tiny-random", device="cpu", data_dir=tmp_path_factory.mktemp("models"))
    return load_pipeline(s)


def request(seed: int = 3, **kw: object) -> InpaintRequest:
    img, mask = make_pair(40, 24)
    return InpaintRequest(image=img, mask=mask, prompt="a cat", num_inference_steps=3, seed=seed, **kw)  # type: ignore[arg-type]


def test_shape_range_and_preserved_pixels(tiny):
    req = request(num_outputs=2)
    res = run_inpaint(tiny, req)
    assert len(res.images) == 2 and res.nsfw_content_detected is None and res.inference_s > 0
    for im in res.images:
        arr = np.asarray(im)
        assert im.size == (40, 24) and im.mode == "RGB" and arr.dtype == np.uint8
        keep = np.asarray(req.mask) < 128
        assert np.array_equal(arr[keep], np.asarray(req.image)[keep])


def test_same_seed_same_image_other_seed_other_image(tiny):
    a, b, c = (np.asarray(run_inpaint(tiny, request(seed=s)).images[0]) for s in (11, 11, 12))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_without_preserve_unmasked_the_pipeline_output_is_returned(tiny):
    req = request(preserve_unmasked=False)
    arr = np.asarray(run_inpaint(tiny, req).images[0])
    keep = np.asarray(req.mask) < 128
    assert not np.array_equal(arr[keep], np.asarray(req.image)[keep])


def test_progress_hook_sees_every_step_and_can_cancel(tiny):
    seen: list[tuple[int, int]] = []
    run_inpaint(tiny, request(), lambda s, t: seen.append((s, t)) is not None)
    assert [s for s, _ in seen] == list(range(1, len(seen) + 1)) and seen[-1][0] == seen[-1][1]
    calls: list[int] = []
    with pytest.raises(Canceled):
        run_inpaint(tiny, request(), lambda s, t: calls.append(s) or s >= 2)
    assert calls == [1, 2]


def test_loader_round_trip_gives_the_built_pipeline(tmp_path: Path):
    saved = ensure_tiny_random(tmp_path)
    assert (saved / "model_index.json").exists() and (saved / "unet" / "config.json").exists()
    assert ensure_tiny_random(tmp_path) == saved  # built once
    loaded = load_pipeline(Settings(model="tiny-random", device="cpu", data_dir=tmp_path.parent / tmp_path.name))
    built = build_tiny_random()
    for name in ("unet", "vae", "text_encoder"):
        a = dict(getattr(loaded.pipe, name).state_dict())
        b = dict(getattr(built, name).state_dict())
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.pipe.tokenizer.model_max_length == 77
    # A local diffusers directory is a model too, with a content-derived revision.
    local = load_pipeline(Settings(model=str(saved), device="cpu"))
    assert local.revision.startswith("local-") and local.kind == "diffusers"


def test_classical_ignores_the_prompt_and_fills_the_hole():
    img = Image.new("RGB", (32, 32), (0, 128, 0))
    img.paste((255, 0, 0), (12, 12, 20, 20))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (10, 10, 22, 22))
    pipe = load_pipeline(Settings(model="classical"))
    out = run_inpaint(pipe, InpaintRequest(image=img, mask=mask, prompt="ignored", num_outputs=2))
    r, g, _ = out.images[0].getpixel((16, 16))
    assert g > r  # the red square is painted over with the surrounding green
    assert pipe.revision.startswith("opencv-")


def test_auto_without_weights_falls_back_to_classical_loudly(tmp_path: Path, caplog):
    s = Settings(model="auto", hf_cache_dir=tmp_path)
    with caplog.at_level("WARNING"):
        assert resolve_model(s) == "classical"
    assert "CLASSICAL" in caplog.text


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelUnavailable, match="neither a preset"):
        load_pipeline(Settings(model="no-such-model", device="cpu"))
    with pytest.raises(ModelUnavailable, match="inpaint model fetch"):
        load_pipeline(Settings(model="sd2-inpainting", device="cpu", hf_cache_dir=Path("/nonexistent")))


def test_mask_blur_feathers_inward_and_keeps_every_unmasked_pixel(tiny):
    img, mask = make_pair(64, 64, box=(16, 16, 48, 48))
    hard = np.asarray(
        run_inpaint(tiny, InpaintRequest(image=img, mask=mask, prompt="x", num_inference_steps=3, mask_blur=0)).images[
            0
        ]
    )
    soft_req = InpaintRequest(image=img, mask=mask, prompt="x", num_inference_steps=3, mask_blur=4)
    soft = np.asarray(run_inpaint(tiny, soft_req).images[0]).astype(int)
    keep = np.asarray(mask) < 128
    assert np.array_equal(soft[keep], np.asarray(img)[keep])  # outside the mask: the input's own, exactly
    assert np.abs(soft[32, 32] - hard[32, 32]).max() <= 1  # deep inside: the model's pixels
    edge = soft[16, 20:44], hard[16, 20:44], np.asarray(img).astype(int)[16, 20:44]
    assert (edge[0] != edge[1]).any() and (edge[0] != edge[2]).any()  # at the edge, a blend of both


class SizeSpy:
    """A pipeline wrapper that records the size of every image it is called with."""

    def __init__(self, pipe: object):
        self.pipe, self.sizes = pipe, []

    def __call__(self, **kw: object) -> object:
        self.sizes += [im.size for im in kw["image"]]  # type: ignore[attr-defined]
        return self.pipe(**kw)  # type: ignore[operator]


def test_crop_to_mask_inpaints_the_masks_square_at_the_model_size_and_pastes_it_back(tiny):
    img, mask = make_pair(256, 192, box=(180, 20, 220, 60))  # a small mask near the right edge
    spy = SizeSpy(tiny.pipe)
    pipeline = LoadedPipeline(tiny.name, tiny.revision, "diffusers", "cpu", spy)
    req = InpaintRequest(image=img, mask=mask, prompt="x", num_inference_steps=3, crop_size=64, crop_padding=8)
    out = run_inpaint(pipeline, req).images[0]
    assert spy.sizes == [(64, 64)]  # the model saw the mask's square, not 256×192
    assert out.size == (256, 192)
    got, before = np.asarray(out), np.asarray(img)
    keep = np.asarray(mask) < 128
    assert np.array_equal(got[keep], before[keep])  # every unmasked pixel is the input's own
    assert not np.array_equal(got[~keep], before[~keep])  # the masked area was inpainted
    full = InpaintRequest(image=img, mask=mask, prompt="x", num_inference_steps=3)
    assert full.compat_key != req.compat_key  # a cropped job batches with others cropped to 64×64
    assert req.compat_key == InpaintRequest(image=img.resize((512, 512)), mask=mask.resize((512, 512)), prompt="y",
                                            num_inference_steps=3, crop_size=64).compat_key  # fmt: skip
