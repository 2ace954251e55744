"""Block hash functions for prefix caching: ``(parent hash, token ids, extra keys) -> bytes``."""

from __future__ import annotations

import hashlib
import struct
from typing import Any


def _encode_key(key: Any, out: bytearray) -> None:
    """Append a type-tagged, length-prefixed encoding of ``key``, so that different keys never
    encode alike (``"1"`` vs ``1``, ``("a", "b")`` vs ``("ab",)``)."""
    if key is None:
        out += b"N"
    elif isinstance(key, bool):
        out += b"B1" if key else b"B0"
    elif isinstance(key, int):
        data = str(key).encode()
        out += b"I" + struct.pack("<I", len(data)) + data
    elif isinstance(key, str):
        data = key.encode()
        out += b"S" + struct.pack("<I", len(data)) + data
    elif isinstance(key, tuple):
        out += b"T" + struct.pack("<I", len(key))
        for item in key:
            _encode_key(item, out)
    else:
        raise TypeError(
            f"a prefix-cache extra key must be None, str, int or a tuple; got {type(key).__name__}"
        )


def sha256_block_hash(parent: bytes | None, token_ids: tuple[int, ...], extra_keys: Any) -> bytes:
    """SHA-256 of a deterministic encoding: stable across processes and collision resistant."""
    out = bytearray()
    if parent is None:
        out += b"\x00"
    else:
        out += b"\x01" + struct.pack("<I", len(parent)) + parent
    out += struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids)
    _encode_key(extra_keys, out)
    return hashlib.sha256(out).digest()


def builtin_block_hash(parent: bytes | None, token_ids: tuple[int, ...], extra_keys: Any) -> bytes:
    """Python's ``hash``: faster, but only meaningful within one process (string hashing is
    salted per process) and with a higher collision risk than ``sha256``."""
    return hash((parent, tuple(token_ids), extra_keys)).to_bytes(8, "little", signed=True)
