"""LoRA adapters: the safetensors-only reader and its signatures, the store and `/v1/loras` on the real
API (Redis, S3), `resolve_for_job` and the worker's disk cache. (On the pipeline: test_lora_adapters.)"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import pickle
import secrets
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from shared import catalog
from shared.config import Settings
from shared.errors import Code, Problem
from shared.lora_format import adapters_key, misfit, parse_header, read
from shared.loras import Loras, checked, fetch_urls, object_key, refs_in, resolve_for_job
from shared.schemas import LoraRef
from shared.services import Services
from shared.storage import Storage
from tests.conftest import Files, auth, make_pair
from tests.lora_files import SDXL_KEY, safetensors_bytes, sdxl_adapter, tiny_adapter
from workers.inpaint.adapters import Adapter, AdapterFailed
from workers.inpaint.request import InpaintRequest
from workers.models.lora_cache import LoraCache
from workers.models.tiny import TINY_UNET

# the reader ------------------------------------------------------------------------------------------


def test_a_real_adapter_is_read_in_both_diffusers_formats(tiny_lora: bytes, other_lora: bytes) -> None:
    for data, fmt in ((tiny_lora, "peft"), (other_lora, "diffusers")):
        assert data[:8] != b"\x80" and parse_header(data)
        sig = read(data)
        assert (sig.component, sig.key_dim, sig.rank) == ("unet", 32, 4), fmt
        assert misfit(sig, catalog.MODELS[catalog.TINY].lora_fit, catalog.TINY, "sd2") is None
        assert "key width 1024" in (misfit(sig, catalog.MODELS[catalog.SD2].lora_fit, catalog.SD2, "sd2") or "")


def test_signatures_of_kohya_and_flux_adapters() -> None:
    kohya = safetensors_bytes({
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (8, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": (640, 8),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (8, 1280),
    })  # fmt: skip
    sig = read(kohya)
    assert (sig.component, sig.key_dim, sig.rank, sig.text_encoders, sig.format) == (
        "unet",
        2048,
        8,
        ("text_encoder_2",),
        "kohya",
    )
    assert sig.family == "sdxl"
    flux = safetensors_bytes({
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 16),
    })  # fmt: skip
    assert (read(flux).component, read(flux).key_dim, read(flux).family) == ("transformer", 3072, "flux")
    bfl = safetensors_bytes({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (4, 3072)})
    assert (read(bfl).component, read(bfl).key_dim) == ("transformer", 3072)
    fit = catalog.MODELS[catalog.FLUX].lora_fit
    assert misfit(read(flux), fit, catalog.FLUX, "flux") is None
    assert misfit(read(flux), catalog.MODELS[catalog.SDXL].lora_fit, catalog.SDXL, "sdxl")
    with pytest.raises(Problem) as got:
        read(safetensors_bytes({"model.embed.weight": (4, 4)}))  # safetensors, but no LoRA in it
    assert got.value.code == Code.lora_invalid


def test_the_catalog_fits_are_the_tiny_models_own_widths() -> None:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from workers.models.tiny_flux import TINY_FLUX_TRANSFORMER
    from workers.models.tiny_sdxl import TINY_SDXL_UNET

    for name, config in ((catalog.TINY, TINY_UNET), (catalog.TINY_SDXL, TINY_SDXL_UNET)):
        unet = UNet2DConditionModel(**config)
        key = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
        assert catalog.MODELS[name].lora_fit == ("unet", key.in_features)
    flux = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
    assert catalog.MODELS[catalog.TINY_FLUX].lora_fit == (
        "transformer",
        flux.transformer_blocks[0].attn.to_q.in_features,
    )
    assert catalog.MODELS[catalog.CLASSICAL].lora_fit is None and catalog.MODELS[catalog.SIM].lora_fit is None


class _Marker:
    """Unpickled, it creates its marker file: proof of whether anything was unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_pickles_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payloads = {"pickle": pickle.dumps({"w": _Marker(marker)}, protocol=4)}
    for name, zipped in (("torch zip", True), ("torch legacy", False)):
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(2), "m": _Marker(marker)}, buf, _use_new_zipfile_serialization=zipped)
        payloads[name] = buf.getvalue()
    assert payloads["torch zip"][:2] == b"PK" and payloads["torch legacy"][:1] == b"\x80"
    for name, data in payloads.items():
        with pytest.raises(Problem) as got:
            checked(data, Settings())
        assert got.value.code == Code.lora_not_safetensors and got.value.status == 422, name
        assert "pickle" in got.value.message or "zip" in got.value.message
    assert not marker.exists(), "a refused file was unpickled"
    pickle.loads(payloads["pickle"])  # the payload is live: unpickling it would have left the marker
    assert marker.exists()


def test_broken_headers_and_oversize_files_are_refused(tiny_lora: bytes) -> None:
    header_len = int.from_bytes(tiny_lora[:8], "little")
    broken = [
        b"", b"short", (10**9).to_bytes(8, "little") + b"{}", tiny_lora[:-1], tiny_lora + b"\0",
        (2).to_bytes(8, "little") + b"[]", tiny_lora[:8] + b"x" + tiny_lora[9:],
        tiny_lora[: 8 + header_len].replace(b'"F32"', b'"F99"', 1) + tiny_lora[8 + header_len :],
    ]  # fmt: skip
    for data in broken:
        with pytest.raises(Problem) as got:
            checked(data, Settings())
        assert got.value.code == Code.lora_not_safetensors, data[:40]
    small = Settings(lora_max_bytes=len(tiny_lora) - 1)
    with pytest.raises(Problem) as got:
        checked(tiny_lora, small)
    assert (got.value.status, got.value.code) == (413, Code.lora_too_large)


def test_compatibility_keys_part_jobs_with_other_adapters_or_scales() -> None:
    img, mask = make_pair(40, 24)
    a, b = "a" * 64, "b" * 64

    def req(*loras: Adapter) -> InpaintRequest:
        return InpaintRequest(image=img, mask=mask, prompt="x", num_inference_steps=3, loras=loras)

    assert req(Adapter(a, 0.8)).compat_key == req(Adapter(a, 0.8)).compat_key
    assert req(Adapter(a, 0.8), Adapter(b, 1.0)).compat_key == req(Adapter(b, 1.0), Adapter(a, 0.8)).compat_key
    keys = {req().compat_key, req(Adapter(a, 0.8)).compat_key, req(Adapter(a, 0.5)).compat_key,
            req(Adapter(b, 0.8)).compat_key, req(Adapter(a, 0.8), Adapter(b, 0.8)).compat_key}  # fmt: skip
    assert len(keys) == 5
    assert adapters_key([{"sha256": a, "scale": 1}]) == adapters_key([{"sha256": a, "scale": 1.0}])
    assert adapters_key([]) == ""


# the store, the API and the worker's cache ---------------------------------------------------------


def upload(client: TestClient, data: bytes, tenant: str = "alice", name: str = "style.safetensors") -> Any:
    return client.post("/v1/loras", headers=auth(tenant), files={"content": (name, data, "application/octet-stream")})


def test_upload_list_get_delete_per_tenant(client: TestClient, storage: Storage, tiny_lora: bytes) -> None:
    data = tiny_adapter(int.from_bytes(secrets.token_bytes(4), "big"))  # content no other test holds
    r = upload(client, data)
    assert r.status_code == 201, r.text
    lora = r.json()
    sha = hashlib.sha256(data).hexdigest()
    assert lora["id"] == f"lora_{sha[:24]}" and lora["sha256"] == sha and lora["size"] == len(data)
    assert (lora["component"], lora["key_dim"], lora["rank"], lora["name"]) == ("unet", 32, 4, "style.safetensors")
    assert storage.exists(object_key(sha))
    assert upload(client, data).status_code == 200  # the same content again: the same adapter
    assert client.get(f"/v1/loras/{lora['id']}", headers=auth()).json() == lora
    assert lora["id"] in [x["id"] for x in client.get("/v1/loras", headers=auth()).json()["data"]]

    for method in ("GET", "DELETE"):  # another tenant's id is theirs only
        r = client.request(method, f"/v1/loras/{lora['id']}", headers=auth("bob"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    raw = client.post("/v1/loras?name=mine", headers={**auth("bob"), "content-type": "application/octet-stream"},
                      content=data)  # fmt: skip
    assert raw.status_code == 201 and raw.json()["id"] == lora["id"] and raw.json()["name"] == "mine"
    assert client.delete(f"/v1/loras/{lora['id']}", headers=auth()).status_code == 204
    assert client.get(f"/v1/loras/{lora['id']}", headers=auth()).status_code == 404
    assert storage.exists(object_key(sha)), "bob still holds the bytes"
    assert client.delete(f"/v1/loras/{lora['id']}", headers=auth("bob")).status_code == 204
    assert not storage.exists(object_key(sha))


def test_bad_uploads_are_clear_4xx(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    r = upload(client, pickle.dumps(_Marker(marker)), name="evil.ckpt")
    assert r.status_code == 422 and r.json()["error"]["code"] == "lora_not_safetensors" and not marker.exists()
    r = client.post("/v1/loras", headers={**auth(), "content-type": "application/json"}, content=b"{}")
    assert r.status_code == 415
    from api.app import create_app

    small = settings.model_copy(update={"lora_max_bytes": 4096})
    with TestClient(create_app(small)) as c:
        big = safetensors_bytes({f"{SDXL_KEY}.lora_A.weight": (4, 2048)})  # 16 KiB
        r = upload(c, big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "lora_too_large"
        raw = c.post("/v1/loras", headers={**auth(), "content-type": "application/octet-stream"}, content=big)
        assert raw.status_code == 413 and raw.json()["error"]["code"] == "lora_too_large"
        r = c.post("/v1/loras", headers={**auth(), "content-type": "application/octet-stream"}, content=bytes(200_000))
        assert r.status_code == 413  # past the body limit: refused before the route reads it


def test_resolve_for_job(svc: Services, files: Files, tiny_lora: bytes) -> None:
    svc = dataclasses.replace(svc, settings=svc.settings.model_copy(update={"lora_max_bytes": len(tiny_lora) + 1024}))
    store = Loras(svc.r, svc.storage, svc.settings)
    mine, _ = store.add("alice", tiny_lora, "mine.safetensors")
    xl, _ = store.add("alice", sdxl_adapter())
    files.files["/style.safetensors"] = (200, tiny_lora, {})
    files.files["/big.safetensors"] = (200, bytes(svc.settings.lora_max_bytes + 1), {})
    tiny_model, sd2, sdxl = (catalog.MODELS[n] for n in (catalog.TINY, catalog.SD2, catalog.SDXL))

    refs = [LoraRef(id=mine.id, scale=0.7)]
    assert resolve_for_job(svc, "alice", refs, tiny_model) == [{"id": mine.id, "sha256": mine.sha256, "scale": 0.7}]
    by_url = resolve_for_job(svc, "bob", [LoraRef(url=files.url("/style.safetensors"))], tiny_model)
    assert by_url == [{"id": mine.id, "sha256": mine.sha256, "scale": 1.0}]
    assert store.get("bob", mine.id) is not None  # fetched once, kept as bob's own adapter
    assert resolve_for_job(svc, "alice", [LoraRef(id=xl.id)], sdxl)[0]["sha256"] == xl.sha256
    cases = [
        ("alice", [LoraRef(id=xl.id)], tiny_model, 422, Code.lora_incompatible),
        ("alice", [LoraRef(id=xl.id)], sd2, 422, Code.lora_incompatible),
        ("carol", [LoraRef(id=mine.id)], tiny_model, 422, Code.lora_not_found),
        ("alice", [LoraRef(id=mine.id)], catalog.MODELS[catalog.CLASSICAL], 422, Code.lora_incompatible),
        ("alice", [LoraRef(id=mine.id), LoraRef(id=mine.id, scale=0.5)], tiny_model, 422, Code.validation_error),
        ("alice", [LoraRef(url=files.url("/big.safetensors"))], tiny_model, 413, Code.lora_too_large),
    ]
    for tenant, refs, model, status, code in cases:
        with pytest.raises(Problem) as got:
            resolve_for_job(svc, tenant, refs, model)
        assert (got.value.status, got.value.code) == (status, code), got.value.message
    with pytest.raises(Problem) as got:
        resolve_for_job(svc, "alice", [LoraRef(id=xl.id)], tiny_model)
    assert "sdxl" in got.value.message and "tiny-random" in got.value.message

    # In the API: the URLs fetched first on the fetch pool (from the raw fields), then resolved.
    fields = {"input": {"prompt": "x", "loras": [{"url": files.url("/style.safetensors"), "scale": 0.5}]}}
    hits = len(files.hits)
    got_urls = asyncio.run(fetch_urls(refs_in(fields), "carol", svc.settings))
    resolved = resolve_for_job(svc, "carol", refs_in(fields), tiny_model, fetched=got_urls)
    assert resolved == [{"id": mine.id, "sha256": mine.sha256, "scale": 0.5}] and len(files.hits) == hits + 1
    with pytest.raises(Problem) as got:
        asyncio.run(fetch_urls([LoraRef(url=files.url("/big.safetensors"))], "carol", svc.settings))
    assert (got.value.status, got.value.code) == (413, Code.lora_too_large)
    assert refs_in({"loras": [{"url": "https://a.example/x"}, {"scale": 1}]}) == []  # the job's validation says it


def test_the_disk_cache_checks_fetches_and_evicts(storage: Storage, tmp_path: Path) -> None:
    datas = [tiny_adapter(10 + i) for i in range(3)]
    shas = [hashlib.sha256(d).hexdigest() for d in datas]
    for sha, data in zip(shas, datas, strict=True):
        storage.put(object_key(sha), data)
    cache = LoraCache(storage, tmp_path / "loras", max_bytes=len(datas[0]) + 10)
    for sha in shas:
        tensors = cache.load(sha)
        assert any(".lora_A." in k for k in tensors) and cache.path(sha).exists()
    kept = sorted(p.name for p in (tmp_path / "loras").glob("*.safetensors"))
    assert kept == sorted(f"{s}.safetensors" for s in shas[1:]), "the least recently used went first"

    storage.put(object_key("d" * 64), datas[0])  # bytes that are not their name's
    with pytest.raises(AdapterFailed) as got:
        cache.load("d" * 64)
    assert got.value.code == Code.lora_invalid
    with pytest.raises(AdapterFailed) as got:
        cache.load("e" * 64)
    assert got.value.code == Code.lora_not_found
    storage.delete([object_key(s) for s in [*shas, "d" * 64]])


def test_a_tenant_holds_at_most_its_cap_of_adapters(svc: Services) -> None:
    store = Loras(svc.r, svc.storage, svc.settings.model_copy(update={"max_loras_per_tenant": 2}))
    tenant = f"cap-{secrets.token_hex(4)}"
    first, _ = store.add(tenant, tiny_adapter(11))
    store.add(tenant, tiny_adapter(12))
    with pytest.raises(Problem) as err:
        store.add(tenant, tiny_adapter(13))
    assert err.value.status == 409 and err.value.code == Code.too_many_loras
    assert store.add(tenant, tiny_adapter(11))[0].id == first.id  # one it holds is answered as before
    assert store.delete(tenant, first.id)
    assert store.add(tenant, tiny_adapter(13))[1]  # room again
    for rec in store.list(tenant):
        store.delete(tenant, rec.id)
