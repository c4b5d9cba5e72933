"""Start the servers under test as child processes on 127.0.0.1, and read their /proc.

carousel runs as `carousel serve` (as a user runs it), the floor and the naive baseline as
their bench modules. Each gets a free port, is waited on until `/readyz` answers 200, and is
stopped with SIGTERM (SIGKILL after a grace period) when the scenario is done."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .graph import ModelVersion

PACKAGE = __package__  # "carousel.bench" installed, "bench" under `python -m bench`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    kind: str  # "carousel", "naive", "floor" (or "floor-starlette", "floor-asgi")
    port: int
    process: subprocess.Popen
    log_path: Path
    env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def metrics_path(self) -> str | None:
        return "/metrics" if self.kind in ("carousel", "baseline") else None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} server not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(kind: str, model: ModelVersion, log_dir: Path, carousel_env: dict | None = None,
          baseline: Path | None = None) -> Server:
    """carousel_env: extra CAROUSEL_* settings for carousel (ignored by the others).
    kind "baseline": carousel from another checkout, `baseline` (its own code, this
    environment's packages), with the same settings."""
    port = free_port()
    env = dict(os.environ)
    cwd = Path(__file__).resolve().parent.parent
    if kind in ("carousel", "baseline"):
        command = [sys.executable, "-m", "carousel", "serve"]
        extra = {"CAROUSEL_MODEL_REPOSITORY": str(model.repository), "CAROUSEL_HOST": "127.0.0.1",
                 "CAROUSEL_PORT": str(port), **(carousel_env or {})}
        env.update(extra)
        if kind == "baseline":
            if baseline is None:
                raise ValueError("the baseline server needs a checkout")
            # Not `-m carousel` from the checkout: an installed carousel's subpackages would
            # still be this checkout's (checkout.py says why).
            command = [sys.executable, "-m", f"{PACKAGE}.checkout", str(baseline.resolve()),
                       "serve"]
    elif kind == "naive":
        command = [sys.executable, "-m", f"{PACKAGE}.naive_server", "--model-repository",
                   str(model.repository), "--model", model.name, "--version",
                   str(model.version), "--port", str(port)]
        extra = {}
    elif kind.startswith("floor"):  # "floor", "floor-starlette", "floor-asgi"
        flavour = kind.partition("-")[2] or "fastapi"
        command = [sys.executable, "-m", f"{PACKAGE}.floor_server", "--port", str(port),
                   "--flavour", flavour]
        extra = {}
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{kind}.log"
    with open(log_path, "ab") as log:
        # cwd: the repository root, so `-m bench...` resolves when the bench runs from a checkout.
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=cwd)
    server = Server(kind, port, process, log_path, extra)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
