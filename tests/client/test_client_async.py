"""`AsyncClient` has the blocking client's surface, awaited, and many of its sessions run
concurrently on one connection pool with answers that match PyTorch."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from carousel_client import (
    AsyncClient,
    AsyncSession,
    AsyncSessionSocket,
    AsyncTextStream,
    Client,
    InvalidRequest,
    Session,
    SessionSocket,
    TextStream,
    UnknownModel,
)

PAIRS = [(Client, AsyncClient), (Session, AsyncSession), (SessionSocket, AsyncSessionSocket),
         (TextStream, AsyncTextStream)]
SPELLED_TWICE = {"__enter__": "__aenter__", "__exit__": "__aexit__", "__iter__": "__aiter__",
                 "close": "aclose"}


def public(cls) -> dict[str, object]:
    twice = set(SPELLED_TWICE) | set(SPELLED_TWICE.values())
    names = [n for n in dir(cls) if not n.startswith("_") or n in twice]
    return {n: getattr(cls, n) for n in names}


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_the_async_classes_have_the_sync_surface(sync, async_):
    sync_api, async_api = public(sync), public(async_)
    renamed = {SPELLED_TWICE.get(n, n) for n in sync_api}
    assert renamed == set(public(async_)), renamed ^ set(async_api)
    for name, member in sync_api.items():
        if callable(member) and name not in SPELLED_TWICE:
            assert inspect.signature(member) == inspect.signature(async_api[name]), name


def test_concurrent_sessions_match_pytorch(server, tiny, check):
    ref = tiny["tinylstm"]
    texts = [[f"session {i}: ", "ünï", "code ", str(i * 7919), "\n"] for i in range(12)]

    async def one(client: AsyncClient, pieces: list[str]) -> None:
        async with client.session("tinylstm", pieces[0]) as s:
            text = pieces[0]
            for piece in pieces[1:]:
                r = await s.step(piece, return_logits=True)
                text += piece
                assert r.position == s.position == len(text.encode())
                check.logits(r.logits, ref.last(text))
            async with s.fork() as f:
                assert f.position == s.position
                assert (await f.info()).position == s.position

    async def main() -> None:
        async with AsyncClient(server.url, trust_env=False) as client:
            await asyncio.gather(*(one(client, t) for t in texts))

    asyncio.run(main())


def test_async_streams_and_errors(server, api):
    async def main() -> None:
        async with AsyncClient(server.url, trust_env=False) as client:
            assert {m.name for m in await client.models()} == {"tinylstm", "tinygru", "utf8cycle"}
            s = await client.session("utf8cycle", "x")  # awaited: deleted by hand below
            async with s.stream(max_tokens=9, temperature=0) as stream:
                pieces = [p async for p in stream]
            assert pieces == ["é", "€", "😀"] and stream.position == s.position == 10
            whole = await s.generate(max_tokens=2, temperature=0)
            assert whole.text == "é" and s.position == 12 == api.position(s.id)
            with pytest.raises(InvalidRequest) as e:
                await s.step(tokens=[])
            assert e.value.code == "empty_input" and s.position == 12
            async with s.stream(max_tokens=5000, temperature=0) as stream:
                async for _ in stream:
                    break  # leaving early stops the generation; the position is read back
            assert s.position == api.position(s.id) > 12
            await s.delete()
            with pytest.raises(UnknownModel):
                await client.session("nosuch")

    asyncio.run(main())


def test_a_cancelled_task_stops_its_stream_and_keeps_the_session_consistent(server, api):
    async def main() -> None:
        async with AsyncClient(server.url, trust_env=False) as client:
            async with client.session("utf8cycle", "x") as s:
                pieces: list[str] = []

                async def consume() -> None:
                    async for piece in s.stream(max_tokens=5000, temperature=0):
                        pieces.append(piece)

                task = asyncio.create_task(consume())
                while len(pieces) < 3:
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert s.position == api.position(s.id) >= 1 + 9
                assert (await s.step("y")).position == s.position

    asyncio.run(main())
