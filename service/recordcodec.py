"""A session record as bytes: how the shared store (Redis) and the snapshot keep sessions.

Layout, little-endian throughout:

    revision      u64     changes with every write; first, so a store script can compare
                          the 8 bytes without reading the rest (compare-and-set, cache checks)
    magic         b"CSR1" format and its version
    position      i64     steps consumed
    last_start    i64     position before the last applied step (-1: none), for retries
    created_at    f64     seconds since the epoch
    last_used_at  f64
    ttl_s         f64     idle time to live
    version       u32     model version
    digest_len    u8      length of the last step's digest (0: none)
    flags         u8      bit 0: an owner follows
    model_len     u16
    owner_len     u16     reserved for authentication (tenants); 0 today
    sha256        32 B    the model version's manifest.json sha256 (raw)
    model, owner, digest  UTF-8, UTF-8, raw
    row_len       u32     float32 values in the row
    row           f32 × row_len   the state tensors, then the adapter's extras (state.py)
    results       u16     1 + named tensors in the last step's kept result (0: None)
    each: name_len u16, name, dtype_len u8, dtype (numpy's str, e.g. "<f4"), ndim u8,
          shape u64 × ndim, the tensor's bytes (C order)

A tensor model's last result is kept so that a retried step is answered from the store on
any replica (the byte LM recomputes its answer from the row's logits, and keeps none).
"""

from __future__ import annotations

import struct

import numpy as np

from .store import Change, SessionRecord

MAGIC = b"CSR1"
REVISION = struct.Struct("<Q")
HEAD = struct.Struct("<4sqqdddIBBHH32s")
U16, U32, U8 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<B")


class CorruptRecord(ValueError):
    """Bytes that are not a record this build can read."""


def revision_bytes(revision: int) -> bytes:
    return REVISION.pack(revision)


def encode(record: SessionRecord, sha256: bytes, revision: int,
           change: Change | None = None) -> bytes:
    """The record's bytes with `revision`, and with `change` applied if given (the record
    itself is left as it is: it changes only once the store has taken the write)."""
    c = change if change is not None else Change(
        record.row, record.position, record.last_start, record.last_digest,
        record.last_result, record.last_used_at)
    model = record.model.encode()
    owner = (record.owner or "").encode()
    digest = c.last_digest or b""
    row = np.ascontiguousarray(c.row, dtype="<f4")
    head = HEAD.pack(MAGIC, c.position, c.last_start, record.created_at, c.used_at,
                     record.ttl_s, record.version, len(digest),
                     1 if record.owner is not None else 0, len(model), len(owner), sha256)
    parts = [REVISION.pack(revision), head, model, owner, digest, U32.pack(row.size),
             row.tobytes(), *_results(c.last_result)]
    return b"".join(parts)


def _results(result) -> list[bytes]:
    if result is None:
        return [U16.pack(0)]
    parts = [U16.pack(1 + len(result))]
    for name, value in result.items():
        x = np.ascontiguousarray(value)
        name_b, dtype_b = name.encode(), x.dtype.str.encode()
        parts += [U16.pack(len(name_b)), name_b, U8.pack(len(dtype_b)), dtype_b,
                  U8.pack(x.ndim), struct.pack(f"<{x.ndim}Q", *x.shape), x.tobytes()]
    return parts


def decode(session_id: str, data: bytes) -> tuple[SessionRecord, bytes]:
    """A record from its bytes, and the sha256 of the manifest it was made with. Raises
    CorruptRecord for anything else."""
    try:
        return _decode(session_id, memoryview(data), data)
    except (struct.error, ValueError, UnicodeDecodeError, TypeError) as e:
        raise CorruptRecord(f"session {session_id!r}: unreadable record ({e})") from None


def _decode(session_id: str, view: memoryview, data: bytes) -> tuple[SessionRecord, bytes]:
    (revision,) = REVISION.unpack_from(view, 0)
    (magic, position, last_start, created, used, ttl, version, digest_len, flags, model_len,
     owner_len, sha) = HEAD.unpack_from(view, REVISION.size)
    if magic != MAGIC:
        raise ValueError(f"format {bytes(magic)!r}, not {MAGIC!r}")
    at = REVISION.size + HEAD.size
    model = bytes(view[at: at + model_len]).decode()
    at += model_len
    owner = bytes(view[at: at + owner_len]).decode() if flags & 1 else None
    at += owner_len
    digest = bytes(view[at: at + digest_len]) if digest_len else None
    at += digest_len
    (n,) = U32.unpack_from(view, at)
    at += U32.size
    if at + 4 * n > len(view):
        raise ValueError("the row is cut short")
    # A read-only view on the bytes: rows are never changed in place (sessions.py).
    row = np.frombuffer(data, dtype="<f4", count=n, offset=at)
    at += 4 * n
    result, at = _read_results(view, at)
    if at != len(view):
        raise ValueError(f"{len(view) - at} bytes after the record")
    record = SessionRecord(session_id, model, version, row, ttl, now=created,
                           position=position)
    record.last_used_at = used
    record.last_start, record.last_digest, record.last_result = last_start, digest, result
    record.owner, record.revision = owner, revision
    return record, bytes(sha)


def _read_results(view: memoryview, at: int) -> tuple[dict | None, int]:
    (count,) = U16.unpack_from(view, at)
    at += U16.size
    if count == 0:
        return None, at
    result = {}
    for _ in range(count - 1):
        (n,) = U16.unpack_from(view, at)
        name = bytes(view[at + 2: at + 2 + n]).decode()
        at += 2 + n
        (n,) = U8.unpack_from(view, at)
        dtype = np.dtype(bytes(view[at + 1: at + 1 + n]).decode())
        if dtype.hasobject:
            raise ValueError("object arrays are not state")
        at += 1 + n
        (ndim,) = U8.unpack_from(view, at)
        shape = struct.unpack_from(f"<{ndim}Q", view, at + 1)
        at += 1 + 8 * ndim
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if at + size > len(view):
            raise ValueError("a result tensor is cut short")
        result[name] = np.frombuffer(view[at: at + size], dtype=dtype).reshape(shape).copy()
        at += size
    return result, at
