"""The GPU benchmark for each served architecture: `gpu_throughput.py --model` end to end on the tiny
fixtures (CPU), and the full-size random-weight configs checked against the published models
without allocating them (built on the meta device, where only shapes exist)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.full_model import build_full, full_parts
from benchmarks.gpu_throughput import main
from shared import catalog

# Published parameter counts: SDXL base's UNet (the inpainting UNet adds 5 input channels to its
# first convolution) and FLUX.1 [dev]'s transformer (Fill's input is 384 channels, not 64).
SDXL_BASE_UNET = 2_567_463_684
FLUX_DEV_TRANSFORMER = 11_901_408_320
SD_VAE = 83_653_863  # SD2's and SDXL's VAE (one architecture)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("model", "tiny"), [(catalog.SDXL, catalog.TINY_SDXL), (catalog.FLUX, catalog.TINY_FLUX)])
def test_tiny_benchmark_runs_each_family(model: str, tiny: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = main(["--tiny", "--model", model, "--jobs", "4", "--steps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["model"] == res["model"] == model and saved["pipeline"] == tiny
    assert saved["size"] == 64 and saved["guidance_scale"] == catalog.MODELS[model].limits.default_guidance
    assert res["throughput_images_per_s"] > 0 and res["baseline_images_per_s"] > 0
    assert res["saturated"]["batch_sizes"] == [4]  # one micro-batch of the four jobs
    assert res["nan_outputs"] == 0 and res["distinct_outputs"] == 4
    assert res["max_rel_error"] < 1e-2  # the worker's call and plain diffusers' agree on the same inputs


def test_full_size_configs_are_the_published_architectures() -> None:
    sdxl = full_parts(catalog.SDXL, "meta", torch.float16)
    assert {k: type(v).__name__ for k, v in sdxl.items()} == {
        "unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
    }  # fmt: skip
    assert all(p.device.type == "meta" for m in sdxl.values() for p in m.parameters())  # nothing allocated
    assert count(sdxl["unet"]) == SDXL_BASE_UNET + 5 * 320 * 3 * 3
    assert count(sdxl["unet"]) == pytest.approx(2.57e9, rel=0.01)
    assert count(sdxl["vae"]) == SD_VAE
    te1, te2 = sdxl["text_encoder"].config, sdxl["text_encoder_2"].config
    assert (te1.hidden_size, te1.num_hidden_layers, te2.hidden_size, te2.num_hidden_layers, te2.projection_dim) == (
        768, 12, 1280, 32, 1280,
    )  # fmt: skip

    flux = full_parts(catalog.FLUX, "meta", torch.bfloat16)
    assert {k: type(v).__name__ for k, v in flux.items()} == {
        "transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
    }  # fmt: skip
    assert all(p.dtype == torch.bfloat16 for m in flux.values() for p in m.parameters())
    assert count(flux["transformer"]) == FLUX_DEV_TRANSFORMER + (384 - 64) * 3072
    assert count(flux["transformer"]) == pytest.approx(11.9e9, rel=0.01)
    t5 = flux["text_encoder_2"]
    # T5-XXL's encoder is 4.76 B parameters with its 32128-row embedding; here the rows are the tokenizer's
    assert count(t5) + (32128 - t5.config.vocab_size) * 4096 == pytest.approx(4.762e9, rel=0.001)
    assert count(flux["vae"]) == pytest.approx(83.8e6, rel=0.01) and flux["vae"].config.latent_channels == 16


def test_full_size_denoisers_take_their_encoders_outputs() -> None:
    """One forward of each full-size model at its own size, shapes only (meta): the encoders' widths,
    the `text_time` ids, the packed FLUX input and the VAE's latents all fit together."""
    sdxl = full_parts(catalog.SDXL, "meta", torch.float16)
    flux = full_parts(catalog.FLUX, "meta", torch.bfloat16)
    with torch.device("meta"), torch.no_grad():
        ids = torch.zeros(2, 77, dtype=torch.long)
        one, two = sdxl["text_encoder"](ids, output_hidden_states=True), sdxl["text_encoder_2"](ids)
        two_h = sdxl["text_encoder_2"](ids, output_hidden_states=True).hidden_states[-2]
        context = torch.cat([one.hidden_states[-2], two_h], dim=-1)
        latents = sdxl["vae"].encode(torch.zeros(2, 3, 1024, 1024, dtype=torch.float16)).latent_dist.mean
        sample = torch.cat([latents, latents[:, :1], latents], dim=1)  # noise, mask, masked image: 9
        out = sdxl["unet"](sample, torch.tensor([500, 500]), encoder_hidden_states=context,
                           added_cond_kwargs={"text_embeds": two.text_embeds, "time_ids": torch.zeros(2, 6)}).sample  # fmt: skip
        assert out.shape == (2, 4, 128, 128)

        t5 = flux["text_encoder_2"](torch.zeros(1, 512, dtype=torch.long)).last_hidden_state
        pooled = flux["text_encoder"](ids[:1]).pooler_output
        assert flux["vae"].encode(torch.zeros(1, 3, 1024, 1024, dtype=torch.bfloat16)).latent_dist.mean.shape == (
            1, 16, 128, 128,
        )  # fmt: skip
        packed = torch.zeros(1, 64 * 64, 384, dtype=torch.bfloat16)  # 128² latents packed 2×2
        out = flux["transformer"](hidden_states=packed, timestep=torch.tensor([1.0]), guidance=torch.tensor([30.0]),
                                  pooled_projections=pooled, encoder_hidden_states=t5, txt_ids=torch.zeros(512, 3),
                                  img_ids=torch.zeros(64 * 64, 3)).sample  # fmt: skip
        assert out.shape == (1, 4096, 64)


def test_build_full_gives_the_catalog_class_with_the_real_sequence_lengths() -> None:
    for name in (catalog.SD2, catalog.SDXL, catalog.FLUX):
        pipe = build_full("meta", torch.bfloat16, name)
        assert type(pipe).__name__ == catalog.MODELS[name].pipeline
        assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer_2.model_max_length == 512  # FLUX: prompts padded to 512 T5 tokens, as served
