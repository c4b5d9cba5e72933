"""Readings of a process from /proc: CPU time (whole process and per thread) and resident
memory. Exact kernel accounting, cheap enough to read at the edges of a measured phase."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_of_stat(text: str) -> float:
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process, all its threads."""
    return _cpu_of_stat(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread, keyed "main" for the main thread and by thread name
    otherwise, threads of one name added up. Python does not name OS threads, so its
    threads (an inference worker, onnxruntime's pool) show as one "workers" line."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu = _cpu_of_stat((task / "stat").read_text())
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            name = "workers" if name.startswith("python") else name
        except OSError:  # the thread ended meanwhile
            continue
        out[name] = out.get(name, 0.0) + cpu
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
