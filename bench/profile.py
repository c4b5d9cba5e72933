"""Sample a server with py-spy while a load runs, and say where its time goes.

py-spy records collapsed stacks (`--format raw`, one line per distinct stack with its sample
count) from outside the process, so the server runs unmodified. The summary attributes each
sample to the innermost frame that belongs to a known layer (onnxruntime, JSON and
validation, the HTTP stack, the event loop, numpy, carousel's own code) and lists the
hottest functions per thread, inclusive and self."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

RATE = 200  # samples per second
# Frames every sample of a thread passes through (process start, uvicorn's loop, a worker
# thread's loop): left out of the inclusive list, which is about the branches.
TRUNK = ("<module> ", "_run_code ", "_run_module_as_main ", "main ", "run ", "Runner.run ",
         "asyncio_run ", "Server.run ", "run_server ", "Thread.run ", "Thread._bootstrap",
         "_worker ", "_WorkItem.run ")

# Innermost match wins, so a numpy call made by carousel counts as numpy.
LAYERS = [
    ("onnxruntime", ("onnxruntime",)),
    ("json / pydantic / encoding", ("json", "pydantic", "encoders", "serialize_response",
                                    "_prepare_response_content", "model_dump")),
    ("numpy", ("numpy",)),
    ("prometheus metrics", ("prometheus_client",)),
    ("carousel service", ("service/", "carousel/service", "carousel.service")),
    ("websockets protocol", ("websockets/", "wsproto")),
    ("HTTP stack (uvicorn/starlette/fastapi)", ("uvicorn", "starlette", "fastapi", "httptools",
                                                "h11", "anyio")),
    ("asyncio / event loop", ("asyncio", "uvloop", "selectors", "threading.py",
                              "concurrent/futures")),
]


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


class Recording:
    """`with Recording(pid, path):` samples the process for the duration of the block."""

    def __init__(self, pid: int, path: Path):
        self.pid, self.path = pid, path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Recording:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--format", "raw", "--output",
             str(self.path), "--rate", str(RATE), "--threads", "--nolineno", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for layer, needles in LAYERS:
            if any(n in frame for n in needles):
                return layer
    return "other"


def cpu_of(thread: str, thread_cpu_pct: dict[str, float]) -> float | None:
    """py-spy's "thread (tid): Name" → the /proc figure. Python does not name OS threads,
    so every thread but the main one is "python" there: they are added up (in practice the
    inference worker, plus onnxruntime's own threads when intra_op_threads > 1)."""
    if thread.split(": ", 1)[-1] == "MainThread":
        return thread_cpu_pct.get("main")
    others = [v for k, v in thread_cpu_pct.items() if k != "main"]
    return sum(others) if others else None


def summarize(path: Path, thread_cpu_pct: dict[str, float] | None = None, top: int = 15
              ) -> dict:
    """Per thread: CPU share of the recording's wall time, samples by layer, hottest
    functions (the inclusive list leaves out the TRUNK frames)."""
    threads: dict[str, dict] = defaultdict(lambda: {
        "samples": 0, "layers": Counter(), "inclusive": Counter(), "self": Counter()})
    # Runner.run's own samples are uvloop's C code (epoll, socket reads and writes, callback
    # dispatch): py-spy sees no Python frame below it.
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]  # --threads puts the thread first
        t = threads[thread]
        n = int(count)
        t["samples"] += n
        t["layers"][layer_of(frames)] += n
        for frame in set(frames):
            t["inclusive"][frame] += n
        if frames:
            t["self"][frames[-1]] += n
    out = {}
    for thread, t in sorted(threads.items(), key=lambda kv: -kv[1]["samples"]):
        total = t["samples"]
        branches = [(k, v) for k, v in t["inclusive"].most_common() if not k.startswith(TRUNK)]
        out[thread] = {
            "samples": total,
            # Exact, from the kernel over the measured phase (py-spy's idle test is a guess).
            "cpu_pct_of_wall": cpu_of(thread, thread_cpu_pct or {}),
            "layers_pct": {k: round(100 * v / total, 1) for k, v in t["layers"].most_common()},
            "inclusive_pct": {k: round(100 * v / total, 1) for k, v in branches[:top]},
            "self_pct": {k: round(100 * v / total, 1) for k, v in t["self"].most_common(top)},
        }
    return out


def markdown(name: str, summary: dict, figures: dict) -> str:
    lines = [f"### Profile: {name}", "",
             f"Under load: {figures}. Sampled {RATE}/s with py-spy from outside the server.", ""]
    for thread, t in summary.items():
        cpu = t.get("cpu_pct_of_wall")
        lines += [f"**{thread}**: {t['samples']} samples"
                  + (f", CPU {cpu:.0f}% of the measured phase (from /proc)" if cpu is not None
                     else ""), "",
                  "| layer (innermost) | % of thread |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in t["layers_pct"].items()]
        lines += ["", "| hottest (self) | % |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in list(t["self_pct"].items())[:10]]
        lines += ["", "| hottest (inclusive) | % |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in list(t["inclusive_pct"].items())[:12]]
        lines.append("")
    return "\n".join(lines)
