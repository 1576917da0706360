"""A job's image and mask as one stored object: one put at submit, one get in the worker (each S3
request costs a round trip and ~1 ms of client CPU, and its server's CPU too).

The framing: a magic line, the image's length (8 bytes, big-endian), the image's bytes, the mask's.
"""

from __future__ import annotations

import struct

MAGIC = b"inpaint-inputs/1\n"
CONTENT_TYPE = "application/vnd.inpaint.inputs"
_LENGTH = struct.Struct(">Q")
_HEAD = len(MAGIC) + _LENGTH.size


def pack(image: bytes, mask: bytes) -> bytes:
    return b"".join((MAGIC, _LENGTH.pack(len(image)), image, mask))


def unpack(data: bytes) -> tuple[bytes, bytes]:
    """The image's and the mask's bytes; ValueError when `data` is not a packed pair."""
    if len(data) < _HEAD or not data.startswith(MAGIC):
        raise ValueError("not a job's packed inputs")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > len(data) - _HEAD:
        raise ValueError("packed inputs cut short")
    view = memoryview(data)
    return bytes(view[_HEAD : _HEAD + length]), bytes(view[_HEAD + length :])
