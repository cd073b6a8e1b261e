"""The "ipc:" URI a worker publishes for its CUDA IPC-exported KV pool (pdmesh.transfer.cuda_ipc):
compact JSON in urlsafe base64, every field checked on the way in. Plain Python, no torch,
so the registry's and the transfer route's readers (pdmesh.transfer.lazy) need no CUDA.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
from typing import Any

PREFIX = "ipc:"
VERSION = 1
# URI fields and their JSON types. SHARE: the 8 values of _share_cuda_() in order (the
# same in torch 2.11 and 2.13): device, block handle, storage bytes, storage offset in the
# block, ref counter file and slot, producer event handle, whether to wait on that event.
SHARE = ("share_device", "handle", "storage_size", "storage_offset", "ref_counter",
         "ref_counter_offset", "event_handle", "event_sync")
FIELDS: dict[str, type] = {  # offset, nbytes: the pool's bytes inside its storage
    "v": int, "proc": str, "export": str, "uuid": str, "share_device": int, "handle": bytes,
    "storage_size": int, "storage_offset": int, "ref_counter": bytes, "ref_counter_offset":
    int, "event_handle": bytes, "event_sync": bool, "offset": int, "nbytes": int}


def encode_uri(info: dict[str, Any]) -> str:
    """"ipc:" + urlsafe base64 (unpadded) of compact JSON; bytes fields as base64 text."""
    doc = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
           for k, v in info.items()}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_uri(uri: str) -> dict[str, Any]:
    """The fields of an "ipc:" URI, checked; ValueError for anything malformed."""
    if not isinstance(uri, str) or not uri.startswith(PREFIX):
        raise ValueError(f"not an {PREFIX} URI: {str(uri)[:40]!r}")
    body = uri[len(PREFIX):]
    try:
        doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError) as e:  # bad base64, UTF-8 or JSON
        raise ValueError(f"malformed {PREFIX} URI: {e}") from None
    if not isinstance(doc, dict) or set(doc) != set(FIELDS):
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"malformed {PREFIX} URI: fields {got}, expected {sorted(FIELDS)}")
    info: dict[str, Any] = {}
    for k, kind in FIELDS.items():
        v = doc[k]
        if kind is bytes:
            try:
                v = base64.b64decode(v, validate=True) if isinstance(v, str) else None
            except binascii.Error:
                v = None
        # bool is an int to isinstance, and no count or offset may be negative
        if (v is None or not isinstance(v, kind) or (kind is int and isinstance(v, bool))
                or (kind is int and v < 0)):
            raise ValueError(f"malformed {PREFIX} URI: field {k!r} is not a valid "
                             f"{kind.__name__}")
        info[k] = v
    if info["v"] != VERSION:
        raise ValueError(f"{PREFIX} URI version {info['v']}, this side reads {VERSION}")
    if info["nbytes"] == 0 or info["offset"] + info["nbytes"] > info["storage_size"]:
        raise ValueError(f"malformed {PREFIX} URI: pool bytes [{info['offset']}, "
                         f"+{info['nbytes']}) outside a storage of {info['storage_size']}")
    return info


@functools.lru_cache(maxsize=256)
def pool_gpu(uri: str) -> str | None:
    """The GPU uuid an "ipc:" URI's pool lives on; None for a malformed URI. Cached: a
    decode asks for its own and its prefills' (a few fixed strings) on every Transfer."""
    try:
        return decode_uri(uri)["uuid"]
    except ValueError:
        return None
