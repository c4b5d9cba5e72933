"""The memory store's snapshot: every live session written at shutdown, read back at start.

`CAROUSEL_SNAPSHOT_PATH` names the file. On SIGTERM, once in-flight work has drained, the
service writes every live session there atomically: to a temporary file in the same folder,
fsynced, renamed over the old one, and the folder fsynced, so a crash mid-write leaves the
previous file or the new one, never half of one. At start it loads the file, drops what has
expired meanwhile or belongs to a model version (or build: the manifest's sha256) it does
not serve, and removes the file: a later crash must start empty rather than bring back
sessions older than what clients were told (a snapshot is only as current as the last
shutdown). A file that is corrupt, cut short, or not a carousel snapshot is set aside
(renamed to `<name>.bad-<time>`) with a warning, and the service starts empty.

File layout: the magic line `carousel-snapshot 1\\n`, then per session `u16 id length, id,
u32 record length, record` (recordcodec.py's bytes, as Redis holds them), then a u32 zero
length, then the sha256 of everything before it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from pathlib import Path

from . import recordcodec
from .store import MemoryStore, SessionRecord

log = logging.getLogger("carousel.service")

MAGIC = b"carousel-snapshot 1\n"
U16, U32 = struct.Struct("<H"), struct.Struct("<I")


class BadSnapshot(ValueError):
    pass


def save(path: Path, store: MemoryStore, builds: dict[tuple[str, int], str]) -> int:
    """Write every live session to `path` atomically; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    count = 0
    try:
        with open(tmp, "wb") as f:
            def write(data: bytes) -> None:
                digest.update(data)
                f.write(data)

            write(MAGIC)
            for record in store.live():
                sha = bytes.fromhex(builds.get((record.model, record.version), "00" * 32))
                data = recordcodec.encode(record, sha, record.revision)
                sid = record.session_id.encode()
                write(U16.pack(len(sid)) + sid + U32.pack(len(data)))
                write(data)
                count += 1
            write(U32.pack(0))
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself must reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


def read(path: Path) -> list[tuple[SessionRecord, bytes]]:
    """Every record in a snapshot file with its manifest sha256; BadSnapshot if the file
    is not a whole, intact snapshot."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise BadSnapshot("not a carousel snapshot (its first line is not "
                          f"{MAGIC.decode().strip()!r})")
    body, checksum = data[:-32], data[-32:]
    if len(data) < len(MAGIC) + 4 + 32 or hashlib.sha256(body).digest() != checksum:
        raise BadSnapshot("its checksum does not match: the file is cut short or corrupt")
    out, at = [], len(MAGIC)
    try:
        while True:
            (n,) = U16.unpack_from(body, at)
            if n == 0:  # the end: a zero length (ids are never empty), then the checksum
                if body[at:] != U32.pack(0):
                    raise BadSnapshot("bytes after the last session")
                return out
            sid = body[at + 2: at + 2 + n].decode()
            at += 2 + n
            (size,) = U32.unpack_from(body, at)
            at += 4
            out.append(recordcodec.decode(sid, body[at: at + size]))
            at += size
    except (struct.error, UnicodeDecodeError, recordcodec.CorruptRecord) as e:
        raise BadSnapshot(f"unreadable ({e})") from None


def load(path: Path, store: MemoryStore, builds: dict[tuple[str, int], str]) -> int:
    """Load a snapshot into an empty store at start-up, then remove the file; returns how
    many sessions came back. Never raises for what the file holds."""
    path = Path(path)
    if not path.exists():
        return 0
    try:
        found = read(path)
    except (OSError, BadSnapshot) as e:
        aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
        log.warning("snapshot %s cannot be loaded (%s); set aside as %s, starting empty",
                    path, e, aside.name)
        try:
            os.replace(path, aside)
        except OSError as err:
            log.warning("could not set the snapshot aside: %s", err)
        return 0
    now = time.time()
    kept, expired, foreign = [], 0, 0
    for record, sha in found:
        served = builds.get((record.model, record.version))
        if served is None or bytes.fromhex(served) != sha:
            foreign += 1
        elif record.expired(now):
            expired += 1
        else:
            kept.append(record)
    store.restore(kept)
    path.unlink()
    log.info("snapshot %s: %d sessions restored, %d expired, %d of model versions not "
             "served here dropped", path, len(kept), expired, foreign)
    return len(kept)
