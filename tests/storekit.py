"""Helpers for the store's end-to-end tests (tests/service/test_e2e_store_*.py): the
machine's Redis with a database of the tests' own, a `redis-server` of a test's own on a
free port (for faults: the machine's Redis on 6379 is never stopped), and a client that
steps with positions and retries the way the API says is safe.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import redis

MACHINE_REDIS = ("127.0.0.1", 6379)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOCK = "carousel-tests:lock"  # the one key of a test database that is not the store's
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


def clean(r: redis.Redis) -> None:
    """Every key of the database but the lock."""
    keys = [k for k in r.scan_iter(count=1000) if k != LOCK.encode()]
    for i in range(0, len(keys), 500):
        r.delete(*keys[i: i + 500])


@contextlib.contextmanager
def machine_db(db: int, wait_s: float = 900.0):
    """The machine's Redis, database `db`, cleaned before and after. Held under a lock in
    that database: other checkouts of this project on the machine may run the same tests
    at the same time, and one run's cleaning must not empty another's sessions."""
    r = redis.Redis(*MACHINE_REDIS, db=db)
    token = secrets.token_hex(8)
    deadline = time.monotonic() + wait_s
    while not r.set(LOCK, token, nx=True, px=int(wait_s * 1000)):
        assert time.monotonic() < deadline, f"database {db} stayed locked by another run"
        time.sleep(0.2)
    try:
        clean(r)
        yield r
    finally:
        clean(r)
        r.eval(RELEASE, 1, LOCK, token)
        r.close()


class RedisServer:
    """A `redis-server` of the test's own on a free port: nothing saved, stopped at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.binary = shutil.which("redis-server")
        assert self.binary, "redis-server is not installed (apt-get install redis-server)"
        self.port = free_port()
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str, password: str | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", *extra], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                with redis.Redis("127.0.0.1", self.port, password=password) as r:
                    if r.ping():
                        return
            time.sleep(0.05)
        raise AssertionError(f"redis-server on {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def step_with_retries(urls: list[str], sid: str, text: str, position: int, *,
                      deadline_s: float = 60.0, start: int = 0) -> tuple[dict, int]:
    """Send one step at `position` until some replica answers it, trying the replicas in
    turn from `start` after a lost answer, a 503 (Retry-After) or a dead replica, always
    resending the very same step. Returns (answer, replica that answered). A 409 whose
    real position is ours plus the step's length means an earlier try applied it; it is
    reported as {"applied_earlier": True, "position": ...}."""
    body = {"text": text, "position": position, "top_k": 3, "return_logits": True}
    length = len(text.encode())
    tried = False
    end = time.monotonic() + deadline_s
    i = start
    while time.monotonic() < end:
        url = urls[i % len(urls)]
        try:
            r = httpx.post(f"{url}/v1/sessions/{sid}/step", json=body, timeout=10,
                           trust_env=False)
        except httpx.TransportError:
            tried = True
            i += 1
            continue
        if r.status_code == 200:
            return r.json(), i % len(urls)
        if r.status_code == 409 and r.json()["error"]["code"] == "position_mismatch":
            real = r.json()["error"]["position"]
            if tried and real == position + length:
                return {"applied_earlier": True, "position": real}, i % len(urls)
            raise AssertionError(f"step at {position} refused: {r.text}")
        assert r.status_code == 503, f"{r.status_code} {r.text}"  # never a 500
        assert "retry-after" in r.headers, r.headers
        tried = True
        i += 1
        time.sleep(0.05)
    raise AssertionError(f"no replica applied the step at {position} in {deadline_s}s")
