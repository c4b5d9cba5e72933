"""Drivers: perform an operation's actions (ops.py) on a transport, sync or async.

These loops are the only code written twice, once blocking and once with `await`; what the
operations decide (retries, positions) is shared. A transport (transport.py) performs one
action and raises a `CarouselError` when it fails; the driver sends that error back into the
operation instead of raising it, so the operation can retry.

If the caller goes away mid-operation (Ctrl-C, a cancelled task, a `break` out of a stream),
the driver throws `Abandoned` into the operation and performs the clean-up actions it still
yields (closing its stream, reading back the position), then lets the interruption go on.
"""

from __future__ import annotations

import asyncio
import time

from .errors import CarouselError
from .ops import Abandoned, Emit, Op, Sleep


class SyncDriver:
    def __init__(self, transport) -> None:
        self.transport = transport

    def run(self, op: Op):
        """Run an operation to its end; returns its result (emitted pieces are dropped)."""
        outcome = None
        while True:
            try:
                action = op.send(outcome)
            except StopIteration as stop:
                return stop.value
            outcome = self._step(op, action)

    def iterate(self, op: Op):
        """Run an operation, yielding what it emits (a stream's text pieces)."""
        outcome = None
        while True:
            try:
                action = op.send(outcome)
            except StopIteration:
                return
            if isinstance(action, Emit):
                try:
                    yield action.value
                except GeneratorExit:  # the consumer stopped iterating
                    self._abandon(op)
                    raise
                outcome = None
            else:
                outcome = self._step(op, action)

    def _step(self, op: Op, action):
        try:
            return self._perform(action)
        except BaseException:  # KeyboardInterrupt and the like: let the operation clean up
            self._abandon(op)
            raise

    def _perform(self, action):
        if isinstance(action, Emit):
            return None
        if isinstance(action, Sleep):
            time.sleep(action.seconds)
            return None
        try:
            return self.transport.perform(action)
        except CarouselError as e:
            return e

    def _abandon(self, op: Op) -> None:
        try:
            action = op.throw(Abandoned())
            while True:
                action = op.send(self._perform(action))
        except (Abandoned, StopIteration, CarouselError):
            return


class AsyncDriver:
    def __init__(self, transport, lock: asyncio.Lock | None = None) -> None:
        self.transport = transport
        self.lock = lock  # a WebSocket carries one exchange at a time

    async def run(self, op: Op):
        if self.lock is None:
            return await self._run(op)
        async with self.lock:
            return await self._run(op)

    async def _run(self, op: Op):
        outcome = None
        while True:
            try:
                action = op.send(outcome)
            except StopIteration as stop:
                return stop.value
            outcome = await self._step(op, action)

    async def iterate(self, op: Op):
        if self.lock is not None:
            await self.lock.acquire()
        try:
            outcome = None
            while True:
                try:
                    action = op.send(outcome)
                except StopIteration:
                    return
                if isinstance(action, Emit):
                    try:
                        yield action.value
                    except GeneratorExit:  # aclose(): the consumer stopped iterating
                        await self._abandon(op)
                        raise
                    outcome = None
                else:
                    outcome = await self._step(op, action)
        finally:
            if self.lock is not None:
                self.lock.release()

    async def _step(self, op: Op, action):
        try:
            return await self._perform(action)
        except BaseException:  # a cancelled task: let the operation clean up
            await self._abandon(op)
            raise

    async def _perform(self, action):
        if isinstance(action, Emit):
            return None
        if isinstance(action, Sleep):
            await asyncio.sleep(action.seconds)
            return None
        try:
            return await self.transport.perform(action)
        except CarouselError as e:
            return e

    async def _abandon(self, op: Op) -> None:
        try:
            action = op.throw(Abandoned())
            while True:
                action = op.send(await self._perform(action))
        except (Abandoned, StopIteration, CarouselError):
            return
