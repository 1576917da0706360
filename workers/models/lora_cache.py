"""The worker's disk cache of LoRA adapters: `loras/<sha256>.safetensors` from the bucket into
`<data dir>/loras/`, checked against its hash, the least recently used evicted past a byte budget.

Files are named by their content and written whole (a temporary file renamed into place), so worker
processes sharing a data dir share the cache: each sees a file complete or not at all, and one that
another process evicted is fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.errors import Code
from shared.loras import object_key
from shared.storage import ObjectMissing, Storage
from workers.models.failures import AdapterFailed

log = logging.getLogger(__name__)
_SHA = re.compile(r"[0-9a-f]{64}")


class LoraCache:
    """Adapters on local disk, at most `max_bytes` of them besides the one in use."""

    def __init__(self, storage: Storage, root: Path, max_bytes: int):
        self.storage, self.root, self.max_bytes = storage, root, max_bytes

    def path(self, sha256: str) -> Path:
        """The adapter's local file, fetched and checked when missing, and marked as just used."""
        if not _SHA.fullmatch(sha256):
            raise AdapterFailed(Code.lora_not_found, f"no adapter {sha256[:16]!r}")
        path = self.root / f"{sha256}.safetensors"
        try:
            os.utime(path)  # its use, for the eviction order
            return path
        except FileNotFoundError:
            pass
        try:
            data = self.storage.get(object_key(sha256))
        except ObjectMissing:
            msg = f"adapter {sha256[:12]} was deleted before the job ran"
            raise AdapterFailed(Code.lora_not_found, msg) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise AdapterFailed(Code.lora_invalid, f"adapter {sha256[:12]}: the stored bytes do not match their hash")
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lora-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._evict(keep=path)
        return path

    def load(self, sha256: str) -> dict[str, Any]:
        """The adapter's tensors (on the CPU), read with safetensors: nothing is unpickled."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for _ in range(2):  # another process may evict the file between `path` and the read
            path = self.path(sha256)
            try:
                return load_file(str(path), device="cpu")
            except FileNotFoundError:
                continue
            except SafetensorError as exc:
                raise AdapterFailed(Code.lora_invalid, f"adapter {sha256[:12]}: {exc}") from None
        raise AdapterFailed(Code.lora_not_found, f"adapter {sha256[:12]} could not be kept on disk")

    def loader(self, sha256: str) -> Callable[[], dict[str, Any]]:
        """A loader for `workers.inpaint.adapters.Adapter`: reads the adapter only when a pipeline needs it."""
        return lambda: self.load(sha256)

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used files until the rest fit in `max_bytes` (never `keep`)."""
        files = []
        for p in self.root.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, p in files if p != keep)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            log.info("LoRA cache: evicted %s", p.name)
