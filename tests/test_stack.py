"""The local stack's own services (`inpaint up`, the suite): SeaweedFS on any port a user picks."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from shared.config import Settings
from shared.storage import Storage
from stack.services import SeaweedS3, ServiceError, wait_s3


def free_high_port() -> int:
    """A free loopback port above 55535, where SeaweedFS's own gRPC twin (port + 10000) cannot exist."""
    for port in range(65500, 55535, -7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port above 55535")


def test_s3_serves_on_a_port_above_55535(tmp_path: Path) -> None:
    port = free_high_port()
    server = SeaweedS3(tmp_path / "s3", "highaccess", "highsecret-0123456789", s3_port=port).start()
    try:
        storage = Storage(Settings(s3_endpoint_url=server.endpoint, s3_access_key_id=server.access_key,
                                   s3_secret_access_key=server.secret_key, s3_bucket="high"))  # fmt: skip
        wait_s3(storage, 60)
        storage.put("a/b.txt", b"up high", "text/plain")
        assert storage.get("a/b.txt") == b"up high"
        assert server.endpoint.endswith(f":{port}")
    finally:
        server.stop()


@pytest.mark.parametrize("port", [0x10000, 70000])
def test_a_port_that_cannot_exist_is_refused_at_once(tmp_path: Path, port: int) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceError, match=f"S3 port {port} is not a TCP port"):
        SeaweedS3(tmp_path / "s3", "a", "b" * 20, s3_port=port).start()
    assert time.monotonic() - started < 1


def test_inpaint_up_names_an_impossible_port_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stack.up import run_up

    started = time.monotonic()
    assert run_up(Settings(data_dir=tmp_path, s3_endpoint_url="http://127.0.0.1:70000")) == 2
    assert "INPAINT_S3_ENDPOINT_URL" in capsys.readouterr().out
    assert time.monotonic() - started < 1


def test_redis_start_returns_once_its_append_only_file_is_loaded(tmp_path: Path) -> None:
    """Redis opens its port before it has read its AOF back, and answers every command with LOADING until
    then: a Redis that `start()` returns must already serve (a restarted stack would answer 503)."""
    import redis

    from stack.services import Redis, free_port

    server = Redis(free_port(), tmp_path / "redis", appendfsync="always").start()
    try:
        client = redis.Redis.from_url(server.url)
        with client.pipeline(transaction=False) as pipe:
            for i in range(400_000):
                pipe.set(f"k{i}", "v" * 64)
            pipe.execute()
        server.kill()
        server.start()
        assert client.get("k399999") == b"v" * 64  # raised BusyLoadingError before
        client.close()
    finally:
        server.stop()
