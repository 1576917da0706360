"""Pinned pipeline presets, each loaded once per worker process.

`sd2-inpainting` is stabilityai/stable-diffusion-2-inpainting at a pinned commit, loaded only from a
local directory or the Hugging Face cache (a worker never downloads: `inpaint model fetch` does).
`tiny-random` is the same diffusers pipeline class with tiny seeded components built from config,
saved once with `save_pretrained` and read back with `from_pretrained(local_files_only=True)` so the
real loader runs. `classical` is OpenCV's inpainting: offline, CPU, prompt ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import Settings

log = logging.getLogger(__name__)

SD2_REPO = "stabilityai/stable-diffusion-2-inpainting"
SD2_REVISION = "81a84f49b15956b60b4272a405ad3daef3da4590"
SD2_FILES = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "feature_extractor/*",
    "*/config.json",
    "*/*.safetensors",
]
SD2_SKIP = ["*.fp16.safetensors", "*.ckpt", "*.bin", "*.onnx", "*.msgpack"]
TINY_NAME = "tiny-random"
TINY_VERSION = "v1"  # bump when the tiny configs change, so old saved copies are not reused
PRESETS = ("sd2-inpainting", TINY_NAME, "classical")


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded from what is on this machine."""


@dataclass
class LoadedPipeline:
    """A ready pipeline and what identifies it in every job it produces."""

    name: str
    revision: str
    kind: str  # "diffusers" or "classical"
    device: str
    pipe: Any = None
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sd2_local_dir(settings: Settings) -> Path | None:
    """The cached snapshot of the pinned revision, or None when it is not on this machine."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(
                SD2_REPO,
                revision=SD2_REVISION,
                local_files_only=True,
                cache_dir=settings.hf_cache_dir,
                allow_patterns=SD2_FILES,
                ignore_patterns=SD2_SKIP,
            )
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "model_index.json").exists() and (path / "unet").is_dir() else None


def resolve_model(settings: Settings) -> str:
    """`auto` becomes sd2-inpainting where its weights are here, else classical (said loudly)."""
    if settings.model != "auto":
        return settings.model
    if sd2_local_dir(settings) is not None:
        return "sd2-inpainting"
    log.warning(
        "INPAINT_MODEL=auto: the weights of %s@%s are not on this machine, so this worker serves the "
        "CLASSICAL OpenCV inpainter, which ignores prompts. Run `inpaint model fetch` to get the real model.",
        SD2_REPO,
        SD2_REVISION[:10],
    )
    return "classical"


def fetch_model(settings: Settings) -> Path:
    """Download the pinned weights into the cache (honours HF_HUB_OFFLINE) and check the revision."""
    from huggingface_hub import snapshot_download

    path = Path(
        snapshot_download(
            SD2_REPO,
            revision=SD2_REVISION,
            cache_dir=settings.hf_cache_dir,
            allow_patterns=SD2_FILES,
            ignore_patterns=SD2_SKIP,
        )
    )
    if path.name != SD2_REVISION:
        raise ModelUnavailable(f"downloaded snapshot {path.name} is not the pinned revision {SD2_REVISION}")
    if sd2_local_dir(settings) != path:
        raise ModelUnavailable(f"snapshot at {path} is incomplete")
    return path


def load_pipeline(settings: Settings) -> LoadedPipeline:
    """Load the configured model once; the caller warms it up."""
    name = resolve_model(settings)
    device = pick_device(settings.device)
    if name == "classical":
        import cv2

        return LoadedPipeline("classical", f"opencv-{cv2.__version__}", "classical", "cpu")
    if name == TINY_NAME:
        path = ensure_tiny_random(settings.data_dir / "models")
        return _load_diffusers(path, TINY_NAME, f"{TINY_NAME}-{TINY_VERSION}", device)
    if name == "sd2-inpainting":
        snapshot = sd2_local_dir(settings)
        if snapshot is None:
            raise ModelUnavailable(
                f"{SD2_REPO}@{SD2_REVISION} is not in the local Hugging Face cache; run `inpaint model fetch`"
            )
        return _load_diffusers(snapshot, "sd2-inpainting", SD2_REVISION, device)
    local = Path(name)
    if (local / "model_index.json").is_file():
        digest = hashlib.sha256((local / "model_index.json").read_bytes()).hexdigest()[:12]
        return _load_diffusers(local, local.name, f"local-{digest}", device)
    raise ModelUnavailable(
        f"INPAINT_MODEL={name!r} is neither a preset ({', '.join(PRESETS)}) nor a diffusers directory"
    )


def _load_diffusers(path: Path, name: str, revision: str, device: str) -> LoadedPipeline:
    import torch
    import transformers
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as diffusers_logging

    # Progress bars are for terminals; in a worker's log they are noise.
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(path),
        dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # diffusers uses PyTorch SDPA (AttnProcessor2_0) by default on torch 2; nothing else to switch on here.
    return LoadedPipeline(name, revision, "diffusers", device, pipe, str(dtype).removeprefix("torch."))


# tiny-random: components after diffusers' own get_dummy_components, shaped like SD2-inpainting
# (9-channel UNet, linear projections, 8× VAE) but small enough to run in milliseconds on a CPU.
TINY_UNET: dict[str, Any] = dict(
    act_fn="silu", attention_head_dim=[2, 4, 4, 4], block_out_channels=[32, 64, 64, 64], cross_attention_dim=32,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, in_channels=9, layers_per_block=1, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
    out_channels=4, sample_size=8, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    use_linear_projection=True,
)  # fmt: skip
TINY_VAE: dict[str, Any] = dict(
    act_fn="silu", block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3,
    latent_channels=4, layers_per_block=1, norm_num_groups=8, out_channels=3, sample_size=64,
    up_block_types=["UpDecoderBlock2D"] * 4,
)  # fmt: skip
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
    hidden_act="gelu", max_position_embeddings=77, vocab_size=1000, bos_token_id=0, eos_token_id=2,
    layer_norm_eps=1e-5, pad_token_id=1,
)  # fmt: skip


def _byte_vocab() -> list[str]:
    """CLIP's byte-level alphabet, so any text tokenizes without a merges table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(dirpath: Path) -> None:
    """The files of a CLIP tokenizer with a byte-level vocabulary and model_max_length=77."""
    chars = _byte_vocab()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (dirpath / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_random() -> Any:
    """The tiny pipeline from config, each component seeded as diffusers' tests do."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**dict(TINY_TEXT, vocab_size=len(_byte_vocab()) * 2 + 2)))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tiny_tokenizer(Path(tok_dir))
        tokenizer = CLIPTokenizer(
            f"{tok_dir}/vocab.json",
            f"{tok_dir}/merges.txt",
            pad_token="!",  # noqa: S106 - a token, not a password
            model_max_length=77,
        )
    return StableDiffusionInpaintPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def ensure_tiny_random(models_dir: Path) -> Path:
    """The saved tiny pipeline, built and saved once; concurrent workers race safely by rename."""
    target = models_dir / f"{TINY_NAME}-{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=models_dir))
    try:
        build_tiny_random().save_pretrained(str(tmp), safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# Serving: batch budget, CUDA fast path, compiled shapes. Everything here is optional per setting;
# with it all off the plain diffusers pipeline runs, which is what a small card or a CPU gets.

REFERENCE_PIXELS = 512 * 512  # the batch budget is counted in rows of this many pixels
AUTO_MAX_ROWS_CUDA = 32  # past this a batch only adds latency: the GPU is already saturated
AUTO_MAX_ROWS_CPU = 4


def rows_for_size(max_rows: int, width: int, height: int) -> int:
    """Rows per call at `width`×`height`: activations grow with pixels, so larger images batch fewer."""
    return max(1, min(max_rows, (max_rows * REFERENCE_PIXELS) // max(1, width * height)))


def prepare_for_serving(loaded: LoadedPipeline, settings: Settings, warm_buckets: list[int] | None = None) -> None:
    """Choose the batch budget, switch on the CUDA fast path and compile/warm every bucket.

    Fills `loaded.extra`: max_rows, buckets, compiled_sizes, compile (mode in effect), warmup_s,
    row_bytes. A compile that fails to warm up falls back to the eager pipeline, loudly.
    """
    import time

    extra = loaded.extra
    extra.update(compile="off", buckets=[], compiled_sizes=[], warmup_s=0.0)
    if loaded.kind != "diffusers":
        extra["max_rows"] = 1
        return
    if loaded.device != "cuda":
        extra["max_rows"] = settings.batch_max_size or AUTO_MAX_ROWS_CPU
        return
    import torch

    pipe = loaded.pipe
    if settings.cuda_fast:
        torch.backends.cudnn.benchmark = True
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.fuse_qkv_projections()
    extra["max_rows"] = settings.batch_max_size or _rows_from_memory(loaded, extra)
    if settings.compile == "off":
        return
    started = time.perf_counter()
    buckets = warm_buckets or buckets_up_to(extra["max_rows"])
    sizes = settings.compiled_sizes()
    try:
        _compile(pipe, settings.compile, settings.compile_vae, len(sizes) * len(buckets))
        for w, h in sizes:
            for b in buckets:
                if b <= rows_for_size(extra["max_rows"], w, h):
                    _warm_shape(pipe, w, h, b)
    except Exception:
        log.exception("compiling the pipeline (%s) failed; serving it eagerly", settings.compile)
        _uncompile(pipe)
        extra.update(compile=f"off (compile {settings.compile} failed)", buckets=[], compiled_sizes=[])
        return
    extra.update(compile=settings.compile, buckets=buckets, compiled_sizes=sizes)
    extra["warmup_s"] = round(time.perf_counter() - started, 2)
    log.info("compiled %s for %s, buckets %s, in %.1fs", settings.compile, sizes, buckets, extra["warmup_s"])


def buckets_up_to(max_rows: int) -> list[int]:
    """Powers of two below `max_rows`, then `max_rows` itself: the batch sizes a compiled pipeline sees."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return [*out, max_rows]


def _rows_from_memory(loaded: LoadedPipeline, extra: dict[str, Any]) -> int:
    """Rows at 512×512 that fit in 60% of the card's free memory, measured: peak of 2 rows − peak of 1."""
    import torch

    torch.cuda.empty_cache()  # memory the caching allocator holds counts as used in mem_get_info
    peaks = []
    for rows in (1, 2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run_shape(loaded.pipe, 512, 512, rows, steps=2)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    row_bytes = max(peaks[1] - peaks[0], 1)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    fit = int((0.6 * free - peaks[0]) // row_bytes)
    extra["row_bytes"] = row_bytes
    return max(1, min(AUTO_MAX_ROWS_CUDA, fit))


def probe_pair(width: int, height: int) -> tuple[Any, Any]:
    """A grey image and a mask over its centre: what warm-ups and memory probes run."""
    from PIL import Image

    image = Image.new("RGB", (width, height), (127, 127, 127))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image, mask


def _run_shape(pipe: Any, width: int, height: int, rows: int, steps: int) -> None:
    import torch

    image, mask = probe_pair(width, height)

    with torch.inference_mode():
        pipe(
            prompt=["warm-up"] * rows,
            negative_prompt=[""] * rows,
            image=[image] * rows,
            mask_image=[mask] * rows,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(i) for i in range(rows)],
            output_type="np",
        )


def _warm_shape(pipe: Any, width: int, height: int, rows: int) -> None:
    """Compile, record and replay this shape (three calls: CUDA graphs record on the second)."""
    router = pipe.unet.forward
    vae_router = pipe.vae.decoder.forward
    for r in (router, vae_router):
        if isinstance(r, _ShapeRouter):
            r.learning = True
    try:
        for _ in range(3):
            _run_shape(pipe, width, height, rows, steps=2)
    finally:
        for r in (router, vae_router):
            if isinstance(r, _ShapeRouter):
                r.learning = False


class _ShapeRouter:
    """A module's forward that sends warmed-up input shapes to the compiled graph, others eagerly.

    With `dynamic=False` every new shape would recompile (tens of seconds on a user's job); the
    router makes "no recompile after warm-up" a guarantee instead of a hope.
    """

    def __init__(self, eager: Any, compiled: Any):
        self.eager, self.compiled = eager, compiled
        self.shapes: set[tuple[int, ...]] = set()
        self.learning = False

    def __call__(self, sample: Any, *args: Any, **kwargs: Any) -> Any:
        shape = tuple(sample.shape)
        if self.learning:
            self.shapes.add(shape)
        if shape in self.shapes:
            return self.compiled(sample, *args, **kwargs)
        return self.eager(sample, *args, **kwargs)


def _compile(pipe: Any, mode: str, with_vae: bool, shapes: int) -> None:
    import torch
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # Every warmed shape keeps its own specialised graph; raise the cache so none is evicted.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * shapes + 8))
    inductor_config.conv_1x1_as_mm = True  # SD's many 1×1 convolutions as matrix products
    modules = [pipe.unet] + ([pipe.vae.decoder] if with_vae else [])
    for m in modules:
        eager = m.forward
        compiled = torch.compile(eager, mode=mode, fullgraph=True, dynamic=False)
        m.forward = _ShapeRouter(eager, compiled)


def _uncompile(pipe: Any) -> None:
    for m in (pipe.unet, pipe.vae.decoder):
        if isinstance(m.forward, _ShapeRouter):
            m.forward = m.forward.eager
