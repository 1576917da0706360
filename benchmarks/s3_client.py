"""CPU and wall time per S3 call: our `Storage` (boto3) against the bare boto3 client and, when it is
installed (`pip install minio`), the `minio` SDK the service used before. A 100 KB object, 300 puts
then 300 gets each, against SeaweedFS on loopback, twice (the second round is reported).

    python benchmarks/s3_client.py
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import Settings
from shared.storage import Storage
from stack.services import SeaweedS3, wait_s3

KEY, SECRET, BUCKET = "bench", "bench-secret-0123456789", "bench"
DATA = b"x" * 100_000


def measure(name: str, put: Callable[[str], object], get: Callable[[str], object], n: int = 300) -> str:
    for i in range(20):  # connections open, code paths warm
        put(f"warm{i}")
        get(f"warm{i}")
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        put(f"k{i}")
    c1, w1 = time.process_time(), time.perf_counter()
    for i in range(n):
        get(f"k{i}")
    c2, w2 = time.process_time(), time.perf_counter()
    return (f"{name:16s} put: cpu {1000 * (c1 - c0) / n:.2f} ms, wall {1000 * (w1 - w0) / n:.2f} ms | "
            f"get: cpu {1000 * (c2 - c1) / n:.2f} ms, wall {1000 * (w2 - w1) / n:.2f} ms")  # fmt: skip


def main() -> int:
    server = SeaweedS3(Path(tempfile.mkdtemp()), KEY, SECRET).start()
    try:
        settings = Settings(s3_endpoint_url=server.endpoint, s3_access_key_id=KEY, s3_secret_access_key=SECRET,
                            s3_bucket=BUCKET, _env_file=None)  # type: ignore[call-arg]  # fmt: skip
        storage = Storage(settings)
        wait_s3(storage, 60)
        runs: list[tuple[str, Callable[[str], object], Callable[[str], object]]] = [
            ("Storage (boto3)", lambda k: storage.put(k, DATA, "image/png"), storage.get),
            ("boto3 client", lambda k: storage.client.put_object(Bucket=BUCKET, Key=k, Body=DATA, ContentType="image/png"),
             lambda k: storage.client.get_object(Bucket=BUCKET, Key=k)["Body"].read()),
        ]  # fmt: skip
        try:
            import urllib3
            from minio import Minio

            m = Minio(server.endpoint.split("//")[1], access_key=KEY, secret_key=SECRET, region="us-east-1",
                      secure=False, http_client=urllib3.PoolManager(maxsize=8))  # fmt: skip
            runs.append(("minio", lambda k: m.put_object(BUCKET, k, io.BytesIO(DATA), len(DATA), content_type="image/png"),
                         lambda k: m.get_object(BUCKET, k).read()))  # fmt: skip
        except ImportError:
            print("minio is not installed: boto3 only")
        for round_ in (1, 2):
            for name, put, get in runs:
                line = measure(name, put, get)
                if round_ == 2:
                    print(line)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
