"""`/v1/files`: Replicate's file API, tenant-scoped, size-capped and expiring; and Replicate's own Python
client against it."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import replicate
from fastapi.testclient import TestClient
from replicate.exceptions import ReplicateError

from shared import keys
from shared.config import Settings
from shared.db import connect
from shared.errors import Problem
from shared.files import Files, file_id_in_url, file_key
from shared.storage import Storage
from tests.conftest import KEYS, at, auth, isolated, serve

CAROL = {"Authorization": "Bearer key-carol-0123456789"}


def upload(client: TestClient, data: bytes, name: str = "a.txt", ctype: str = "text/plain", tenant: str = "alice",
           headers: dict[str, str] | None = None, **form: str) -> httpx.Response:  # fmt: skip
    return client.post("/v1/files", headers=headers or auth(tenant), files={"content": (name, data, ctype)}, data=form)


@pytest.fixture(scope="module")
def capped(settings: Settings) -> Iterator[TestClient]:
    """An API on a Redis database of its own whose tenants hold 2 files each, of at most 4 KiB bodies;
    tenant carol has only this module's files."""
    from api.app import create_app

    s = isolated(settings, 1).model_copy(
        update={"max_files_per_tenant": 2, "max_upload_bytes": 4096, "api_keys": f"{settings.api_keys},carol:key-carol-0123456789"}
    )  # fmt: skip
    with TestClient(create_app(s)) as c:
        yield c


def test_upload_get_list_download_delete(client: TestClient, storage: Storage) -> None:
    data = b"hello, files\n"
    r = upload(client, data, "notes.txt", metadata=json.dumps({"purpose": "test"}))
    assert r.status_code == 201, r.text
    f = r.json()
    assert f["name"] == "notes.txt" and f["content_type"] == "text/plain" and f["size"] == len(data)
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    assert f["checksums"] == {"sha256": hashlib.sha256(data).hexdigest(), "md5": md5} and f["etag"] == md5
    assert f["metadata"] == {"purpose": "test"}
    assert at(f["expires_at"]) - at(f["created_at"]) == pytest.approx(86400, abs=0.01)
    assert f["urls"]["get"] == f"http://testserver/v1/files/{f['id']}/download"
    assert storage.exists(file_key("alice", f["id"]))

    assert client.get(f"/v1/files/{f['id']}", headers=auth()).json() == f
    later = upload(client, b"second").json()
    listed = client.get("/v1/files", headers=auth()).json()
    ids = [x["id"] for x in listed["results"]]
    assert ids.index(later["id"]) < ids.index(f["id"]), "newest first"
    assert listed["next"] is None

    got = client.get(f"/v1/files/{f['id']}/download", headers=auth())
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"].startswith("text/plain") and got.headers["etag"] == f'"{md5}"'
    assert got.headers["x-content-type-options"] == "nosniff" and got.headers["content-security-policy"].startswith(
        "sandbox"
    )
    assert got.headers["content-disposition"] == "attachment; filename*=utf-8''notes.txt"

    assert client.delete(f"/v1/files/{f['id']}", headers=auth()).status_code == 204
    for path in (f"/v1/files/{f['id']}", f"/v1/files/{f['id']}/download"):
        r = client.get(path, headers=auth())
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.delete(f"/v1/files/{f['id']}", headers=auth()).status_code == 404
    assert not storage.exists(file_key("alice", f["id"]))
    assert f["id"] not in [x["id"] for x in client.get("/v1/files", headers=auth()).json()["results"]]


def test_another_tenants_file_is_404(client: TestClient) -> None:
    f = upload(client, b"alice's").json()
    for method, path in [("GET", ""), ("GET", "/download"), ("DELETE", "")]:
        r = client.request(method, f"/v1/files/{f['id']}{path}", headers=auth("bob"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path)
        assert r.headers["content-type"] == "application/problem+json" and r.json()["status"] == 404  # Replicate's
    assert f["id"] not in [x["id"] for x in client.get("/v1/files", headers=auth("bob")).json()["results"]]
    assert client.get(f"/v1/files/{f['id']}/download", headers=auth()).content == b"alice's"


def test_bad_uploads_are_clear_4xx(client: TestClient) -> None:
    r = client.post("/v1/files", headers=auth(), json={"content": "x"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = client.post("/v1/files", headers=auth(), data={"filename": "a.txt"}, files={"other": ("b", b"x", "text/plain")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "content"
    for metadata in ("{not json", "[1, 2]", json.dumps({"k": "v" * 5000})):
        r = upload(client, b"x", metadata=metadata)
        assert r.status_code == 422 and r.json()["error"]["param"] == "metadata", metadata
    for ctype in ("not a type", "text/plain\r\nX-Injected: 1", "tëxt/plain"):  # it is sent back as a header
        r = upload(client, b"x", content_type=ctype)
        assert r.status_code == 422 and r.json()["error"]["param"] == "content_type", ctype
    nameless = b"--x\r\nContent-Type: text/plain\r\n\r\nabc\r\n--x--\r\n"  # a part without Content-Disposition
    r = client.post(
        "/v1/files", headers={**auth(), "Content-Type": "multipart/form-data; boundary=x"}, content=nameless
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart"
    # The form's own name and type win over the part's; a client's folders are dropped from the name.
    f = upload(client, b"x", "../../etc/passwd", filename="C:\\up\\photo.png", content_type="image/png").json()
    assert (f["name"], f["content_type"]) == ("photo.png", "image/png")


def test_over_max_upload_bytes_is_413(capped: TestClient) -> None:
    r = upload(capped, b"x" * 5000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_the_per_tenant_cap_is_a_429_with_retry_after(capped: TestClient, storage: Storage) -> None:
    first = upload(capped, b"1", headers=CAROL).json()
    upload(capped, b"2", headers=CAROL)
    r = upload(capped, b"3", headers=CAROL)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_files"
    assert 86000 < int(r.headers["Retry-After"]) <= 86400  # when carol's oldest file expires
    assert len(storage.list_keys("tenants/carol/files/")) == 2  # the refused upload left no bytes
    assert upload(capped, b"bob's", tenant="bob").status_code == 201  # another tenant's cap is its own
    assert capped.delete(f"/v1/files/{first['id']}", headers=CAROL).status_code == 204
    assert upload(capped, b"3", headers=CAROL).status_code == 201


def test_a_file_refused_at_the_cap_after_its_upload_leaves_no_bytes(
    settings: Settings, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = isolated(settings, 1).model_copy(update={"max_files_per_tenant": 1})
    files = Files(connect(s), storage, s)
    files.create("dave", b"one")
    monkeypatch.setattr(files.r, "zcount", lambda *_, **__: 0)  # another upload raced past the first check
    with pytest.raises(Problem) as refused:
        files.create("dave", b"two")
    assert refused.value.status == 429 and refused.value.headers and "Retry-After" in refused.value.headers
    assert len(storage.list_keys("tenants/dave/files/")) == 1
    assert files.r.zcard(keys.files_expiring()) == 1


def test_files_expire_and_the_sweep_deletes_their_bytes(settings: Settings, storage: Storage) -> None:
    s = isolated(settings, 1).model_copy(update={"file_ttl_s": 1})
    files = Files(connect(s), storage, s)
    rec = files.create("alice", b"short-lived", "a.bin")
    assert files.get("alice", rec.id) == rec and files.read("alice", rec.id) == b"short-lived"
    assert files.expire_due() == 0
    time.sleep(1.5)
    assert files.get("alice", rec.id) is None and files.list("alice") == []
    with pytest.raises(Problem) as missing:
        files.read("alice", rec.id)
    assert missing.value.status == 404
    assert storage.exists(rec.key), "the bytes stay until the sweep"
    assert files.expire_due() == 1
    assert not storage.exists(rec.key)
    assert not files.r.exists(keys.file(rec.id), keys.tenant_files("alice"))
    assert files.r.zcard(keys.files_expiring()) == 0


def test_file_id_in_url() -> None:
    assert file_id_in_url("https://api.example.com/v1/files/0123abcd/download") == "0123abcd"
    assert file_id_in_url("http://127.0.0.1:8000/inpaint/v1/files/0123abcd/download?x=1") == "0123abcd"
    for url in ("https://x/v1/files/0123abcd", "https://x/v1/files//download", "https://x/v1/jobs/1/download", "::"):
        assert file_id_in_url(url) is None, url


def test_the_replicate_client_uploads_reads_lists_and_deletes(settings: Settings, tmp_path: Path) -> None:
    from api.app import create_app

    path = tmp_path / "mask.png"
    path.write_bytes(b"\x89PNG not really")
    with serve(create_app(settings)) as base:
        rc = replicate.Client(api_token=KEYS["alice"], base_url=base)
        f = rc.files.create(path, metadata={"role": "mask"})
        assert (f.name, f.content_type, f.size) == ("mask.png", "image/png", path.stat().st_size)
        assert f.metadata == {"role": "mask"}
        assert f.urls["get"] == f"{base}/v1/files/{f.id}/download" and file_id_in_url(f.urls["get"]) == f.id
        assert rc.files.get(f.id) == f
        assert f.id in [x.id for x in rc.files.list()]
        got = httpx.get(f.urls["get"], headers={"Authorization": f"Bearer {KEYS['alice']}"})
        assert got.content == path.read_bytes()
        assert rc.files.delete(f.id) is True
        with pytest.raises(ReplicateError) as missing:
            rc.files.get(f.id)
        assert missing.value.status == 404
