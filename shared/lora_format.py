"""A LoRA adapter file read without loading it: the safetensors header, checked, and the adapter's shape.

Only safetensors is taken: an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes. Nothing here imports torch or unpickles anything, so
a pickle (`.ckpt`, `.pt`, `.bin`, a zip torch checkpoint) is refused by what it is not, never opened.

From the tensor names and shapes comes the adapter's signature: the denoiser it adapts and its key
width, which must match the model's (`shared.catalog.Model.lora_fit`). The formats met in the wild:

- diffusers / peft: `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight`
  (or `.lora.down.weight`, or the older `attn2.processor.to_k_lora.down.weight`);
  FLUX: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`;
- kohya: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight`,
  `lora_te1_…` / `lora_te2_…`; FLUX: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`;
- BFL / ComfyUI FLUX: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`.

A down (A) matrix is [rank, in_features]: the key width is the in_features of the UNet's
cross-attention key projection (`attn2.to_k`, the text encoder's width: 1024 for SD2, 2048 for SDXL),
or of FLUX's query projection (its inner width, 3072).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from shared.errors import Code, Problem

MAX_HEADER_BYTES = 16 * 1024 * 1024  # an adapter's header is kilobytes; safetensors itself allows 100 MB
MAX_TENSORS = 100_000
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip

# The matrix that takes the layer's input, in each format: [rank, in_features, (kernel…)].
_DOWN = re.compile(r"(?:\.lora_A(?:\.[\w-]+)?\.weight|\.lora\.down\.weight|\.lora_down\.weight|_lora\.down\.weight)$")
_UNET_KEY = re.compile(r"attn2[._](?:processor\.)?to_k(?:[._]|$)")  # the cross-attention key projection
_FLUX_KEY = re.compile(r"(?:^|[._])attn[._](?:to_q|qkv)(?:[._]|$)|img_attn[._]qkv")
_UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks", "input_blocks", "middle_block", "output_blocks")
_FLUX_BLOCKS = ("transformer_blocks", "single_transformer_blocks", "double_blocks", "single_blocks")
# The families a (component, key width) is known as, for messages.
KNOWN = {("unet", 768): "sd1", ("unet", 1024): "sd2", ("unet", 2048): "sdxl", ("transformer", 3072): "flux"}


def refuse(message: str) -> Problem:
    return Problem(422, Code.lora_not_safetensors, message, "content")


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]


def parse_header(data: bytes | memoryview) -> dict[str, Tensor]:
    """The tensors a safetensors file names, its header checked against its length; else 422
    `lora_not_safetensors` (a pickle or a zip checkpoint is named as such, and never opened)."""
    view = memoryview(data)
    if len(view) < 8:
        raise refuse("the file is too short to be safetensors")
    size = int.from_bytes(view[:8], "little")
    if size < 2 or size > MAX_HEADER_BYTES or 8 + size > len(view) or view[8:9] != b"{":
        raise refuse(_not_safetensors(bytes(view[:4])))
    try:
        header = json.loads(bytes(view[8 : 8 + size]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise refuse(_not_safetensors(bytes(view[:4]))) from None
    if not isinstance(header, dict):
        raise refuse("the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise refuse("the safetensors `__metadata__` is not a map of strings")
    if len(header) > MAX_TENSORS:
        raise refuse(f"the file names more than {MAX_TENSORS} tensors")
    tensors: dict[str, Tensor] = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        tensor, span = _entry(name, info)
        tensors[name] = tensor
        spans.append(span)
    spans.sort()
    at = 0
    for begin, end in spans:  # the byte ranges tile the data exactly, as safetensors itself requires
        if begin != at:
            raise refuse("the tensors' byte ranges overlap or leave gaps")
        at = end
    if at != len(view) - 8 - size:
        raise refuse("the tensors' byte ranges do not match the file's length")
    return tensors


def _entry(name: str, info: Any) -> tuple[Tensor, tuple[int, int]]:
    if not isinstance(info, dict):
        raise refuse(f"tensor {name[:80]!r}: not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise refuse(f"tensor {name[:80]!r}: unknown dtype {str(dtype)[:16]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise refuse(f"tensor {name[:80]!r}: a bad shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise refuse(f"tensor {name[:80]!r}: a bad byte range")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise refuse(f"tensor {name[:80]!r}: its byte range does not hold its shape")
    return Tensor(dtype, tuple(shape)), (begin, end)


def _not_safetensors(head: bytes) -> str:
    if head[:1] == b"\x80":
        what = "a Python pickle (.ckpt/.pt/.bin)"
    elif head[:2] == b"PK":
        what = "a zip archive (a torch checkpoint)"
    else:
        return "not a safetensors file"
    return f"{what}, not safetensors: pickles are never loaded here; convert it to .safetensors"


@dataclass(frozen=True)
class Signature:
    """What an adapter adapts: its denoiser ('unet', 'transformer', or '' for text encoders only), the
    key width (None when no key projection is adapted), its largest rank, its text encoders, its format."""

    component: str
    key_dim: int | None
    rank: int
    text_encoders: tuple[str, ...] = ()
    format: str = "diffusers"

    @property
    def family(self) -> str:
        """The family it was made for ('sd2', 'sdxl', …), when its width says it."""
        return KNOWN.get((self.component, self.key_dim or 0), "")

    def describe(self) -> str:
        what = self.component or "text encoders only"
        return f"{self.family or 'unknown'} ({what}{f', key width {self.key_dim}' if self.key_dim else ''})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text_encoders": list(self.text_encoders)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Signature:
        return cls(**{**doc, "text_encoders": tuple(doc.get("text_encoders", ()))})


def _place(name: str) -> tuple[str, str, str]:
    """(component, the module path without the component's prefix, format) of a tensor name."""
    for prefix, comp, fmt in (
        ("unet.", "unet", "diffusers"), ("transformer.", "transformer", "diffusers"),
        ("text_encoder_2.", "text_encoder_2", "diffusers"), ("text_encoder.", "text_encoder", "diffusers"),
        ("lora_te2_", "text_encoder_2", "kohya"), ("lora_te1_", "text_encoder", "kohya"),
        ("lora_te_", "text_encoder", "kohya"), ("lora_unet_", "", "kohya"), ("lora_transformer_", "", "kohya"),
        ("diffusion_model.", "", "bfl"),
        ("base_model.model.", "", "peft"),
    ):  # fmt: skip
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            return comp or _denoiser_of(rest), rest, fmt
    return _denoiser_of(name), name, "peft"


def _denoiser_of(path: str) -> str:
    """The denoiser a path without a component prefix is in, from its first block's name."""
    if path.startswith(_FLUX_BLOCKS):
        return "transformer"
    if path.startswith(_UNET_BLOCKS):
        return "unet"
    if path.startswith("text_model"):
        return "text_encoder"
    return ""


def signature(tensors: dict[str, Tensor]) -> Signature:
    """The adapter's signature; 422 `lora_invalid` when no tensor is a LoRA down matrix of a known part."""
    comps: Counter[str] = Counter()
    widths: Counter[int] = Counter()
    formats: Counter[str] = Counter()
    encoders: set[str] = set()
    rank = 0
    denoiser = ""
    for name, t in tensors.items():
        if not _DOWN.search(name) or len(t.shape) < 2:
            continue
        comp, path, fmt = _place(name)
        if not comp:
            continue
        formats[fmt] += 1
        rank = max(rank, t.shape[0])
        if comp.startswith("text_encoder"):
            encoders.add(comp)
            continue
        comps[comp] += 1
        key = _UNET_KEY if comp == "unet" else _FLUX_KEY
        if key.search(path):
            widths[t.shape[1]] += 1
    if not comps and not encoders:
        raise Problem(
            422, Code.lora_invalid,
            "no LoRA weights found (expected diffusers/peft `…lora_A.weight`, `…lora.down.weight` or kohya "
            "`lora_unet_…lora_down.weight` tensors)", "content",
        )  # fmt: skip
    if len(comps) > 1:
        raise Problem(422, Code.lora_invalid, f"the adapter adapts two denoisers ({', '.join(comps)})", "content")
    if comps:
        denoiser = next(iter(comps))
    if len(widths) > 1:
        raise Problem(422, Code.lora_invalid, f"the adapter's key projections disagree on width: {sorted(widths)}")
    key_dim = next(iter(widths)) if widths else None
    fmt = formats.most_common(1)[0][0]
    return Signature(denoiser, key_dim, rank, tuple(sorted(encoders)), fmt)


def read(data: bytes | memoryview) -> Signature:
    """The signature of an adapter file's bytes, checked whole (`parse_header`, `signature`)."""
    return signature(parse_header(data))


def misfit(sig: Signature, fit: tuple[str, int] | None, model_name: str, family: str) -> str | None:
    """Why an adapter does not fit a model (None: it fits). A width the adapter does not show is left to
    the worker, whose loader checks every shape."""
    takes = f"model {model_name!r} ({family})"
    if fit is None:
        return f"{takes} takes no LoRA adapters"
    if not sig.component:
        return f"the adapter adapts only text encoders; {takes} takes adapters of its {fit[0]}"
    if sig.component != fit[0] or (sig.key_dim is not None and sig.key_dim != fit[1]):
        want = KNOWN.get(fit, family)
        return (
            f"the adapter is a {sig.describe()} adapter; {takes} takes {want} adapters ({fit[0]}, key width {fit[1]})"
        )
    return None


def adapters_key(adapters: Iterable[Mapping[str, Any]]) -> str:
    """The adapters part of a micro-batch's compatibility key: a short digest of the sorted
    (sha256, scale) pairs ('' for none), so only jobs with the same adapters at the same scales meet."""
    items = sorted(f"{a['sha256']}*{float(a['scale'])!r}" for a in adapters)
    return hashlib.sha256("|".join(items).encode()).hexdigest()[:16] if items else ""
