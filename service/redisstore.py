"""Sessions in Redis (`CAROUSEL_STORE_URL=redis://HOST:PORT/DB`), shared by every replica.

Keys (one database per deployment; `carousel:` prefix):
- `carousel:s:<id>`: the record (recordcodec.py: an 8-byte revision, a small header, the
  row as float32 bytes), with the session's idle TTL kept by Redis (PX) and set again by
  every write;
- `carousel:l:<id>`: a generation's lease: its token, expiring by itself (a dead replica's
  lease ends within `lease_s`);
- `carousel:live`: every session as `"<model> <id>"` scored by when it expires (ms): the
  session cap counts it across replicas (ZCOUNT from now), the sweeper finds expired
  sessions in it for the metrics.

Every write is one Lua script, so each is atomic, and compare-and-set on the record's
revision (its first 8 bytes): a writer whose record is stale gets the current one back in
the same reply (CONFLICT), and one that meets another writer's lease gets BUSY. The new
record's bytes do not pass through Lua (a 9 KB argument costs a script ~30 µs of Redis' CPU,
measured: five times the rest of it): they are staged by a plain SET to a key of their own
just before, in the same pipeline, and the script RENAMEs that key over the record (O(1))
or deletes it. Reads are plain GET / GETRANGE.
Nothing is ever resent after a lost reply (redis-py's retries are off): a write whose reply
was lost may have applied, so the caller answers 503 store_unavailable and the client's
retry, with its position, is answered from whatever the store holds.

Batches stay batches: every script call made in one event-loop tick (the reads of the steps
that just arrived, the writes of a batch the scheduler just answered) goes to Redis as one
pipeline, one round trip. A replica keeps the records it used last (`cache_size`): a step
may be computed on its cached row without reading the store, because the write compares
revisions, so a stale row's step is discarded, never applied, and computed again from the
record the store sent back. With session-affine routing that makes a step one write and no
read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import recordcodec
from .errors import ModelMismatch, ServiceError, StoreUnavailable
from .store import Change, Commit, Expired, SessionRecord, Status, StoreFull, new_token

log = logging.getLogger("carousel.service")

PREFIX = "carousel:"
INDEX = PREFIX + "live"
DOWN = (RedisConnectionError, RedisTimeoutError, OSError)  # the store cannot be reached

# The commits of one tick, in one call. KEYS: the index, then per session its record, lease
# and staged bytes. ARGV per session: expected revision, ttl ms, index member, expiry score,
# lease token ('' for a step), '1' to release the lease.
# -> per session: 1 applied; 0 gone; {2, bytes} conflict; {3, ms left} busy; 4 fenced.
COMMIT = """
local out = {}
for i = 1, (#KEYS - 1) / 3 do
  local rec, lease, staged = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local a = 6 * (i - 1)
  local head = redis.call('GETRANGE', rec, 0, 7)
  local refused
  if head == '' then
    refused = 0
  elseif head ~= ARGV[a + 1] then
    refused = {2, redis.call('GET', rec)}
  else
    local holder = redis.call('GET', lease)
    if ARGV[a + 5] == '' then
      if holder then refused = {3, redis.call('PTTL', lease)} end
    elseif holder ~= ARGV[a + 5] then
      refused = 4
    end
  end
  if refused then
    redis.call('DEL', staged)
    out[i] = refused
  else
    redis.call('RENAME', staged, rec)
    redis.call('PEXPIRE', rec, ARGV[a + 2])
    redis.call('ZADD', KEYS[1], ARGV[a + 4], ARGV[a + 3])
    if ARGV[a + 6] == '1' then redis.call('DEL', lease) end
    out[i] = 1
  end
end
return out
"""

# KEYS: record, index, staged bytes. ARGV: ttl ms, index member, expiry score, now ms, limit
# (0: none), 'c' create (only if absent, within the limit) or 'u' update (only if present).
# -> 1 written; 0 exists (create) / absent (update); 2 at the limit.
PUT = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
local refused
if ARGV[6] == 'c' then
  local limit = tonumber(ARGV[5])
  if exists then
    refused = 0
  elseif limit > 0 and redis.call('ZCOUNT', KEYS[2], ARGV[4], '+inf') >= limit then
    refused = 2
  end
elseif not exists then
  refused = 0
end
if refused then
  redis.call('DEL', KEYS[3])
  return refused
end
redis.call('RENAME', KEYS[3], KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
"""

# KEYS[1] record, KEYS[2] lease, KEYS[3] index. ARGV: expected revision, token, lease ms,
# ttl ms, member, score. -> 1 taken; 0 gone; {2, bytes} conflict; {3, ms left} busy.
LEASE = """
local head = redis.call('GETRANGE', KEYS[1], 0, 7)
if head == '' then return 0 end
if head ~= ARGV[1] then return {2, redis.call('GET', KEYS[1])} end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {3, redis.call('PTTL', KEYS[2])}
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
return 1
"""

# KEYS[1] lease; ARGV: token, lease ms ('0': release). -> 1 ours (renewed / released); 0 not.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS[1] record, KEYS[2] lease, KEYS[3] index; ARGV[1] member. -> 1 deleted; 0 none.
DELETE = """
local n = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return n
"""

# KEYS[1] index; ARGV: member, now ms. -> 1 if this call removed an expired member.
SWEEP = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

SCRIPTS = {name: (source, hashlib.sha1(source.encode()).hexdigest()) for name, source in
           {"commit": COMMIT, "put": PUT, "lease": LEASE, "renew": RENEW, "delete": DELETE,
            "sweep": SWEEP}.items()}
STAGE_S = 30  # a staged record's bytes outlive a lost script call by this much at most


@dataclass(slots=True)
class _Call:
    command: tuple  # ("EVALSHA", sha, n, keys..., args...) or a plain command
    future: asyncio.Future | None  # None: nobody waits (a staging SET; its script reports)


def _share(future: asyncio.Future, futures: list[asyncio.Future]) -> None:
    """One script call's answer, one element per caller (or its error for all)."""
    error = future.exception()
    results = future.result() if error is None else [None] * len(futures)
    if error is None and len(results) != len(futures):
        error = ServiceError(f"the store answered {len(results)} commits of {len(futures)}")
    for f, result in zip(futures, results, strict=False):
        if f.done():
            continue
        if error is not None:
            f.set_exception(error)
        else:
            f.set_result(result)


def record_key(session_id: str) -> str:
    return f"{PREFIX}s:{session_id}"


def lease_key(session_id: str) -> str:
    return f"{PREFIX}l:{session_id}"


def staged_key(session_id: str, revision: int) -> str:
    return f"{PREFIX}w:{session_id}:{revision}"


def member(record: SessionRecord) -> str:
    return f"{record.model} {record.session_id}"  # model names have no spaces


class RedisStore:
    shared = True
    SWEEP_BATCH = 1000

    def __init__(self, url: str, *, password: str | None = None, timeout_s: float = 2.0,
                 cache_size: int = 4096, builds: dict[tuple[str, int], str] | None = None,
                 ) -> None:
        kwargs = {"password": password} if password else {}
        # No retries inside redis-py: a resent write may apply twice as far as the caller
        # can tell; a failed call answers 503 and the client retries with its position.
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=1, **kwargs)
        self._builds = {k: bytes.fromhex(v) for k, v in (builds or {}).items()}
        self._cache: OrderedDict[str, SessionRecord] = OrderedDict()
        self._cache_size = cache_size
        self._pending: list[_Call] = []
        self._commits: list[tuple[tuple, tuple, asyncio.Future]] = []  # this tick's commits
        self._sends: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- batching

    def _call(self, *command, wait: bool = True) -> asyncio.Future | None:
        """Queue a command for this tick's pipeline."""
        loop = asyncio.get_running_loop()
        future = loop.create_future() if wait else None
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append(_Call(command, future))
        return future

    def _commit_call(self, keys: tuple, args: tuple) -> asyncio.Future:
        """Queue one session's commit; the tick's commits go as one script call."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending and not self._commits:
            loop.call_soon(self._flush)
        self._commits.append((keys, args, future))
        return future

    def _script(self, name: str, keys: tuple, args: tuple) -> asyncio.Future:
        return self._call("EVALSHA", SCRIPTS[name][1], len(keys), *keys, *args)

    def _stage(self, session_id: str, revision: int, data: bytes) -> str:
        """Queue the SET of a record's new bytes under a key of their own (the script that
        follows in the same pipeline moves them over the record, or drops them)."""
        key = staged_key(session_id, revision)
        self._call("SET", key, data, "PX", 1000 * STAGE_S, wait=False)
        return key

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if self._commits:  # after the staging SETs they follow
            commits, self._commits = self._commits, []
            keys = [k for c in commits for k in c[0]]
            args = [a for c in commits for a in c[1]]
            future = asyncio.get_running_loop().create_future()
            batch.append(_Call(("EVALSHA", SCRIPTS["commit"][1], 1 + len(keys), INDEX, *keys,
                                *args), future))
            future.add_done_callback(lambda f, cs=commits: _share(f, [c[2] for c in cs]))
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._pipeline(batch)
        except DOWN as e:
            error = StoreUnavailable(f"the session store cannot be reached ({e}); retry shortly")
            for call in batch:
                if call.future is not None and not call.future.done():
                    call.future.set_exception(error)
            return
        except BaseException as e:  # a bug: every caller fails with it
            for call in batch:
                if call.future is not None and not call.future.done():
                    call.future.set_exception(e)
            raise
        for call, result in zip(batch, results, strict=True):
            if call.future is None or call.future.done():
                continue
            if isinstance(result, Exception):
                log.error("store command %s failed: %s", call.command[0], result)
                call.future.set_exception(ServiceError(f"the session store failed: {result}"))
            else:
                call.future.set_result(result)

    async def _pipeline(self, batch: list[_Call]) -> list:
        results = await self._execute(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # Redis restarted (its script cache is empty): load them, send again
            for source, _ in SCRIPTS.values():
                await self._redis.script_load(source)
            again = await self._execute([batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _execute(self, batch: list[_Call]) -> list:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in batch:
                pipe.execute_command(*call.command)
            return await pipe.execute(raise_on_error=False)

    # ---------------------------------------------------------------- records

    def _sha(self, record: SessionRecord) -> bytes:
        sha = self._builds.get((record.model, record.version))
        return sha if sha is not None else bytes(32)

    def _decode(self, session_id: str, data: bytes) -> SessionRecord:
        try:
            record, sha = recordcodec.decode(session_id, data)
        except recordcodec.CorruptRecord as e:
            log.error("%s", e)
            raise ServiceError(f"the stored session {session_id!r} cannot be read") from None
        served = self._builds.get((record.model, record.version))
        if served is not None and served != sha:
            self._forget(session_id)
            raise ModelMismatch(
                f"session {session_id!r} was made by another build of {record.model} version "
                f"{record.version} (manifest sha256 {sha.hex()[:12]}…, this server has "
                f"{served.hex()[:12]}…); it cannot be continued here")
        return self._remember(record)

    def _remember(self, record: SessionRecord) -> SessionRecord:
        if self._cache_size:
            self._cache[record.session_id] = record
            self._cache.move_to_end(record.session_id)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return record

    def _forget(self, session_id: str) -> None:
        self._cache.pop(session_id, None)

    @staticmethod
    def _ttl_ms(record: SessionRecord) -> int:
        return max(1, int(record.ttl_s * 1000))

    # ---------------------------------------------------------------- the interface

    def cached(self, session_id: str) -> SessionRecord | None:
        record = self._cache.get(session_id)
        if record is None or record.expired(time.time()):
            return None
        self._cache.move_to_end(session_id)
        return record

    async def get(self, session_id: str) -> SessionRecord | None:
        key = record_key(session_id)
        held = self._cache.get(session_id)
        try:
            if held is not None:  # 8 bytes say whether the copy held here is current
                head = await self._call("GETRANGE", key, 0, 7)
                if head == recordcodec.revision_bytes(held.revision):
                    return self._remember(held)
                if not head:
                    self._forget(session_id)
                    return None
            data = await self._call("GET", key)
        except BaseException:
            self._forget(session_id)
            raise
        if data is None:
            self._forget(session_id)
            return None
        return self._decode(session_id, data)

    async def put(self, record: SessionRecord, *, create: bool = False,
                  limit: int | None = None) -> bool:
        sid = record.session_id
        revision = new_token()
        data = recordcodec.encode(record, self._sha(record), revision)
        staged = self._stage(sid, revision, data)
        result = await self._script("put", (record_key(sid), INDEX, staged), (
            self._ttl_ms(record), member(record), int(record.expires_at * 1000),
            int(time.time() * 1000), limit or 0, "c" if create else "u"))
        if result == 2:
            raise StoreFull
        if result != 1:
            return False
        record.revision = revision
        self._remember(record)
        return True

    async def commit(self, record: SessionRecord, change: Change, *, lease: int | None = None,
                     release: bool = False) -> Commit:
        sid = record.session_id
        revision = new_token()
        data = recordcodec.encode(record, self._sha(record), revision, change)
        try:
            staged = self._stage(sid, revision, data)
            result = await self._commit_call((record_key(sid), lease_key(sid), staged), (
                recordcodec.revision_bytes(record.revision), self._ttl_ms(record), member(record),
                int((change.used_at + record.ttl_s) * 1000), str(lease) if lease else "",
                "1" if release else ""))
        except BaseException:
            self._forget(sid)  # applied or not, nobody knows: read it again next time
            raise
        if result == 1:
            record.apply(change, revision)
            self._remember(record)
            return Commit(Status.APPLIED)
        return self._refusal(sid, result)

    def _refusal(self, session_id: str, result) -> Commit:
        if result == 0:
            self._forget(session_id)
            return Commit(Status.GONE)
        if result == 4:
            return Commit(Status.FENCED)
        kind, value = result
        if kind == 2:
            return Commit(Status.CONFLICT, self._decode(session_id, value))
        return Commit(Status.BUSY, retry_after=max(0.1, int(value) / 1000))

    async def lease(self, record: SessionRecord, ttl_s: float) -> Commit | int:
        sid = record.session_id
        token = new_token()
        used = time.time()
        result = await self._script("lease", (record_key(sid), lease_key(sid), INDEX), (
            recordcodec.revision_bytes(record.revision), str(token), max(1, int(ttl_s * 1000)),
            self._ttl_ms(record), member(record), int((used + record.ttl_s) * 1000)))
        if result == 1:
            record.last_used_at = used  # as the store's TTL now counts it
            return token
        return self._refusal(sid, result)

    async def renew(self, leases: dict[str, int], ttl_s: float) -> set[str]:
        ms = max(1, int(ttl_s * 1000))
        ids = list(leases)
        results = await asyncio.gather(*(
            self._script("renew", (lease_key(sid),), (str(leases[sid]), ms)) for sid in ids))
        return {sid for sid, ok in zip(ids, results, strict=True) if ok != 1}

    async def release(self, session_id: str, token: int) -> None:
        await self._script("renew", (lease_key(session_id),), (str(token), 0))

    async def delete(self, session_id: str) -> SessionRecord | None:
        record = await self.get(session_id)
        if record is None:
            return None
        self._forget(session_id)
        done = await self._script("delete", (record_key(session_id), lease_key(session_id),
                                             INDEX), (member(record),))
        return record if done == 1 else None

    async def expire(self, now: float | None = None) -> list[Expired]:
        now_ms = int((time.time() if now is None else now) * 1000)
        try:
            members = await self._redis.zrangebyscore(INDEX, "-inf", now_ms, start=0,
                                                      num=self.SWEEP_BATCH)
        except DOWN as e:
            raise StoreUnavailable(f"the session store cannot be reached ({e})") from None
        removed = await asyncio.gather(*(self._script("sweep", (INDEX,), (m, now_ms))
                                         for m in members))
        out = []
        for m, gone in zip(members, removed, strict=True):
            if gone == 1:
                model, _, sid = m.decode().partition(" ")
                self._forget(sid)
                out.append(Expired(sid, model))
        return out

    async def count(self) -> int:
        try:
            return await self._redis.zcount(INDEX, int(time.time() * 1000), "+inf")
        except DOWN as e:
            raise StoreUnavailable(f"the session store cannot be reached ({e})") from None

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except DOWN:
            return False

    async def close(self) -> None:
        if self._sends:
            await asyncio.wait(list(self._sends), timeout=5)
        await self._redis.aclose()
