"""A micro-batch's LoRA adapters on a diffusers pipeline: on for its one call, off after it.

The adapters are loaded with diffusers' LoRA loader (peft backend), each under a name of its content,
set to the micro-batch's scales, and turned off (`disable_lora`) when the call ends, however it ends:
a job without adapters that runs next computes exactly what it computes alone. The last
`lora_memory_slots` adapters stay loaded (turned off) for the next job that wants them; past that the
least recently used is deleted. An adapter that does not load (peft's shape checks) fails its jobs
`lora_incompatible`; the pipeline is left as it was and the worker goes on.

Injecting an adapter marks the model's own weights `requires_grad=False`, which changes the CPU
kernels some linear layers take (the last bits of their results): the flags are put back after every
load, so the base path stays bit for bit the same.

A compiled denoiser (`workers.models.serving`): its graphs were traced on the plain modules, and peft's
wrappers would fail their guards and recompile them (tens of seconds per shape, again when the
wrappers go). Adapters therefore run on its eager forward and are unloaded after the call, which
gives back the very modules the graphs were traced on. diffusers' `enable_lora_hotswap` would keep
adapters inside the compiled graph instead, but it must be set up before compiling with the largest
rank to come, and a swap still recompiles when an adapter targets other layers. Fused QKV projections
(the CUDA fast path) bypass `to_q/to_k/to_v`, which adapters wrap: the unfused attention processors
serve the call and the fused ones come back after it.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from shared.config import Settings
from shared.errors import Code
from workers.models.failures import AdapterFailed
from workers.models.families import denoiser

if TYPE_CHECKING:  # the worker's cache reads storage; the inference code needs only its loader
    from workers.models.lora_cache import LoraCache

log = logging.getLogger(__name__)
DEFAULT_SLOTS = Settings.model_fields["lora_memory_slots"].default


@dataclass(frozen=True)
class Adapter:
    """One adapter of a request: its content hash, its scale and how to read its tensors."""

    sha256: str
    scale: float = 1.0
    load: Callable[[], Mapping[str, Any]] = field(default=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The adapter's name in the pipeline (peft's key: no dots)."""
        return f"lora_{self.sha256[:24]}"


def adapters_of(stored: Sequence[Mapping[str, Any]], cache: LoraCache) -> tuple[Adapter, ...]:
    """A job's adapters from what it keeps (`shared.loras.resolve_for_job`: sha256 and scale each)."""
    return tuple(Adapter(str(a["sha256"]), float(a["scale"]), cache.loader(str(a["sha256"]))) for a in stored)


@dataclass
class _Slots:
    """What one pipeline holds: its loaded adapters, least recently used first, and its weights' own
    `requires_grad` flags from before the first load."""

    capacity: int = DEFAULT_SLOTS
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)
    flags: list[tuple[Any, bool]] | None = None


_held: WeakKeyDictionary[Any, _Slots] = WeakKeyDictionary()


def _slots(pipe: Any) -> _Slots:
    if pipe not in _held:
        _held[pipe] = _Slots()
    return _held[pipe]


def configure(pipe: Any, slots: int) -> None:
    """Keep at most `slots` adapters loaded in this pipeline (INPAINT_LORA_MEMORY_SLOTS)."""
    _slots(pipe).capacity = max(1, slots)


def loaded(pipe: Any) -> list[str]:
    """The names of the adapters the pipeline holds, least recently used first."""
    return list(_slots(pipe).loaded)


@contextmanager
def applied(pipeline: Any, adapters: Sequence[Adapter]) -> Iterator[None]:
    """The adapters on, at their scales, for the block; all off after it. AdapterFailed (before the
    block) when one cannot be read or does not fit the pipeline."""
    if not adapters:
        yield  # every earlier call turned its adapters off when it ended
        return
    if pipeline.kind != "diffusers":
        raise AdapterFailed(Code.lora_incompatible, f"model {pipeline.name!r} takes no LoRA adapters")
    pipe, state = pipeline.pipe, _slots(pipeline.pipe)
    wanted = sorted(adapters, key=lambda a: a.sha256)  # one order whatever the jobs' order: the same sums
    net = denoiser(pipe)
    router = net.forward if callable(getattr(net.forward, "eager", None)) else None
    try:
        _load(pipeline, state, wanted)
        pipe.enable_lora()
        pipe.set_adapters([a.name for a in wanted], [a.scale for a in wanted])
    except BaseException:
        _off(pipe, state, unload=router is not None)
        raise
    fused = _unfuse(net)
    if router is not None:
        net.forward = router.eager
    try:
        yield
    finally:
        if router is not None:
            net.forward = router
        if fused is not None:
            net.set_attn_processor(fused)
        _off(pipe, state, unload=router is not None)


def _load(pipeline: Any, state: _Slots, wanted: list[Adapter]) -> None:
    pipe = pipeline.pipe
    if state.flags is None:
        state.flags = [(p, p.requires_grad) for p in _parameters(pipe)]
    keep = {a.name for a in wanted}
    for a in wanted:
        if a.name in state.loaded:
            state.loaded.move_to_end(a.name)
            continue
        while len(state.loaded) >= max(state.capacity, len(wanted)):
            _delete(pipe, state, next(n for n in state.loaded if n not in keep))
        tensors = dict(a.load())  # AdapterFailed when missing or unreadable; diffusers pops from its copy
        try:
            with _quiet():
                pipe.load_lora_weights(tensors, adapter_name=a.name)
            if not any(a.name in names for names in pipe.get_list_adapters().values()):
                raise ValueError("none of its layers is in this model")  # diffusers skips keys it does not know
        except Exception as exc:
            if _is_oom(exc):
                raise
            _delete(pipe, state, a.name)
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            msg = f"adapter {a.sha256[:12]} does not fit model {pipeline.name!r}: {reason}"
            raise AdapterFailed(Code.lora_incompatible, msg) from exc
        finally:
            _restore_flags(state)
        state.loaded[a.name] = None
    while len(state.loaded) > max(state.capacity, len(wanted)):  # the capacity may have shrunk
        _delete(pipe, state, next(n for n in state.loaded if n not in keep))


def _off(pipe: Any, state: _Slots, unload: bool) -> None:
    """Every adapter off; with `unload`, out of the modules too (the pipeline's own modules back)."""
    if unload:
        pipe.unload_lora_weights()
        state.loaded.clear()
    elif state.loaded:
        pipe.disable_lora()
    _restore_flags(state)


def _delete(pipe: Any, state: _Slots, name: str) -> None:
    """Delete an adapter from every component (what a failed load left of it too)."""
    state.loaded.pop(name, None)
    try:
        with _quiet():
            pipe.delete_adapters([name])
    except (ValueError, KeyError, AttributeError):  # a load that failed before the adapter was named
        log.debug("adapter %s: nothing to delete", name)


@contextmanager
def _quiet() -> Iterator[None]:
    """peft's warnings of what the slots do on purpose: several adapters in a model, and another made
    active when one is deleted (every call sets its own, and turns them all off after)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
        warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted", UserWarning)
        yield


def _restore_flags(state: _Slots) -> None:
    for p, flag in state.flags or ():
        p.requires_grad_(flag)


def _parameters(pipe: Any) -> Iterator[Any]:
    for name in getattr(pipe, "_lora_loadable_modules", ()):
        module = getattr(pipe, name, None)
        if module is not None:
            yield from module.parameters()


def _unfuse(net: Any) -> Any:
    """The fused attention processors, swapped for the unfused ones (None: not fused)."""
    original = getattr(net, "original_attn_processors", None)
    if original is None or not any(getattr(m, "fused_projections", False) for m in net.modules()):
        return None
    fused = net.attn_processors
    net.set_attn_processor(original)
    return fused


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
