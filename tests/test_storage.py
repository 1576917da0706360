"""shared/storage.py on boto3: what it sends over the wire (a recording S3 stand-in on loopback) and
what it does against the suite's real SeaweedFS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from shared.config import Settings
from shared.storage import Storage, StorageError
from tests.conftest import Receiver


@pytest.fixture()
def recorder() -> Iterator[Receiver]:
    """An S3 stand-in that records every request and answers 200 unless a path's script says otherwise."""
    rec = Receiver()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


def storage_for(url: str, interactive: bool = False, **kw: Any) -> Storage:
    return Storage(
        Settings(s3_endpoint_url=url, s3_access_key_id="k", s3_secret_access_key="s" * 20, **kw), interactive
    )


@pytest.mark.parametrize(
    ("sse", "kms", "want"),
    [
        ("none", "", {}),
        ("AES256", "", {"x-amz-server-side-encryption": "AES256"}),
        ("aws:kms", "alias/inpaint", {"x-amz-server-side-encryption": "aws:kms",
                                      "x-amz-server-side-encryption-aws-kms-key-id": "alias/inpaint"}),
    ],
)  # fmt: skip
def test_every_put_asks_for_the_configured_encryption(
    recorder: Receiver, sse: str, kms: str, want: dict[str, str]
) -> None:
    storage_for(recorder.url(""), s3_sse=sse, s3_sse_kms_key_id=kms).put("a/b.png", b"png", "image/png")
    (seen,) = recorder.requests
    method, path, headers = seen["method"], seen["path"], {k.lower(): v for k, v in seen["headers"].items()}
    assert (method, path) == ("PUT", "/inpaint/a/b.png")
    assert {k: v for k, v in headers.items() if k.startswith("x-amz-server-side")} == want
    assert headers["content-type"] == "image/png"
    # no checksum trailers or aws-chunked bodies that S3-compatible servers refuse
    assert "x-amz-trailer" not in headers and "aws-chunked" not in headers.get("content-encoding", "")


def test_workers_retry_a_throttled_put_and_the_api_answers_at_once(recorder: Receiver) -> None:
    recorder.scripts["/inpaint/k"] = [503, 503, 200]
    storage_for(recorder.url("")).put("k", b"x")
    assert len(recorder.requests) == 3  # two refusals, then the put that landed

    recorder.requests.clear()
    recorder.scripts["/inpaint/k"] = [503]
    with pytest.raises(StorageError, match="put k"):
        storage_for(recorder.url(""), interactive=True).put("k", b"x")
    assert len(recorder.requests) == 1  # someone waits: an error now (the API answers 503), not a retry


def test_deleting_many_objects_is_one_request_per_thousand(recorder: Receiver) -> None:
    keys = [f"tenants/t/jobs/j/outputs/1/{i}.png" for i in range(1001)]
    storage_for(recorder.url("")).delete(keys)
    assert [(r["method"], r["path"].split("?")[1]) for r in recorder.requests] == [
        ("POST", "delete"),
        ("POST", "delete"),
    ]
    assert recorder.requests[0]["body"].count(b"<Key>") == 1000 and recorder.requests[1]["body"].count(b"<Key>") == 1
    storage_for(recorder.url("")).delete([])
    assert len(recorder.requests) == 2  # nothing to delete: no request


@pytest.mark.parametrize(("style", "netloc", "path"), [("path", "localhost:9", "/inpaint/o.png"),
                                                        ("virtual", "inpaint.localhost:9", "/o.png")])  # fmt: skip
def test_addressing_style_and_presigning_on_the_public_endpoint(style: str, netloc: str, path: str) -> None:
    storage = Storage(Settings(s3_endpoint_url="http://s3.internal:8333", s3_public_endpoint_url="http://localhost:9",
                               s3_addressing_style=style, presign_expires_s=600))  # fmt: skip
    url = urlsplit(storage.presign("o.png", download_as="o.png"))
    assert (url.netloc, url.path) == (netloc, path)
    assert "X-Amz-Expires=600" in url.query and "X-Amz-Signature=" in url.query
    assert "response-content-disposition=attachment" in url.query


def test_no_static_key_takes_the_aws_credential_chain(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = settings.model_copy(update={"s3_access_key_id": "", "s3_secret_access_key": ""})
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", settings.s3_access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", settings.s3_secret_access_key)
    storage = Storage(chain)
    storage.put("chain/probe.txt", b"from the environment's credentials", "text/plain")
    assert storage.get("chain/probe.txt") == b"from the environment's credentials"
    assert httpx.get(storage.presign("chain/probe.txt")).content == b"from the environment's credentials"

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    with pytest.raises(StorageError, match=r"SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        Storage(chain).put("chain/probe.txt", b"x")


def test_objects_round_trip_on_seaweedfs(settings: Settings) -> None:
    storage = Storage(settings)
    storage.put_many([(f"rt/{i}.txt", f"line {i}\nnext\n".encode(), "text/plain") for i in range(3)])
    assert storage.get_many([f"rt/{i}.txt" for i in range(3)]) == [f"line {i}\nnext\n".encode() for i in range(3)]
    assert sorted(storage.list_keys("rt/")) == [f"rt/{i}.txt" for i in range(3)]
    assert set(storage.modified("rt/")) == {f"rt/{i}.txt" for i in range(3)}
    assert list(storage.lines("rt/1.txt", offset=2)) == [b"ne 1\n", b"next\n"]
    assert list(storage.lines("rt/1.txt", offset=len(b"line 1\nnext\n"))) == []  # at the end: nothing
    assert storage.get_json("rt/none.json") is None and not storage.exists("rt/none.json")
    storage.delete(["rt/0.txt"])
    assert not storage.exists("rt/0.txt") and storage.exists("rt/1.txt")


def test_inputs_pack_into_one_object_and_anything_else_is_refused() -> None:
    from shared.jobs.inputs import pack, unpack

    image, mask = b"\x89PNG image bytes", b"\x89PNG mask"
    assert unpack(pack(image, mask)) == (image, mask)
    packed = pack(image, mask)
    for bad in (b"", b"garbage", packed[:10], packed[: len(packed) - len(mask) - 1], b"\x89PNG" + packed[5:]):
        with pytest.raises(ValueError):
            unpack(bad)
