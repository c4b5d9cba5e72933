"""Abandoned work: a request whose client has gone is cancelled, not run to its end.

While a request waits for its answer (its session's earlier requests, the model's queue, a
generation), nothing reads its connection, so a client that hung up would only be noticed
when the answer is written into a closed socket: a thousand steps queued on one session by
clients long gone would each still run, and a non-streamed generation would decode every
token for nobody. `unless_disconnected(work, receive)` awaits `work` while a watcher waits
for the ASGI `http.disconnect` message; if that comes first, the task serving the request is
cancelled, and so is whatever it awaits:

- a wait for the session's lock: the lock forgets the waiter (locks.py);
- work in the model's queue: its future is cancelled, the scheduler skips it, it never runs
  and is never applied;
- a step whose batch is running: its result is dropped and the session is not changed (its
  row is only replaced by the step that holds the lock, after the scheduler answers);
- a generation: api.py cancels it, and it stops at the next iteration (what it generated
  so far stays in the session, as when a stream's client leaves).

A step the scheduler has answered is recorded before anything else is awaited
(sessions.py), so a cancellation lands either before it applied or after it is recorded,
and a retry of it is answered from the record. The cancellation becomes ClientDisconnected
(499): the request ends like a refused one, counted in the metrics, with no traceback.

Call it only once the request's body has been read (until then receive() returns the body).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .errors import ClientDisconnected


async def unless_disconnected(work: Awaitable, receive: Callable[[], Awaitable[dict]]):
    task = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled for another reason (shutdown): not ours to absorb
        task.uncancel()
        raise ClientDisconnected("the client disconnected before its answer") from None
    finally:
        watcher.cancel()
