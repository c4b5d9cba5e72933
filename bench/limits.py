"""Measure the connection and session limits (docs/SECURITY.md, "Limits and hardening").

`python -m carousel.bench.limits [--out DIR]` starts `carousel serve` on the bundled models on
a free loopback port (default settings but a longer generation limit), runs each abuse
against it, and writes limits.json and limits.md to DIR (bench/results by default). Every
attack is bounded in count and time and talks to 127.0.0.1 only. What it measures:

- headers: eight concurrent 10 MB request headers; the server's resident memory before and
  after, and the answer;
- slowloris: a request whose headers arrive one byte every 0.5 s; how long until the server
  answers and closes;
- idle: 2,000 connections that send nothing; how many are accepted, how many refused, and
  when the accepted ones are closed;
- session flood: 1,000 concurrent steps with 1 MB bodies on one session that a generation
  holds; how many wait, how many are refused, resident memory before and at the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def read_all(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def status_of(raw: bytes) -> int | None:
    return int(raw.split()[1]) if raw.startswith(b"HTTP/1.1") else None


def big_headers(port: int, pid: int) -> dict:
    before = rss_mb(pid)
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 10_000_000
    statuses, peak = [], [before]

    def one() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        reader = threading.Thread(target=lambda: statuses.append(status_of(read_all(sock, 30))))
        reader.start()
        try:
            sock.sendall(request + b"\r\n\r\n")
        except OSError:
            pass
        reader.join(60)
        sock.close()

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak.append(rss_mb(pid))
        time.sleep(0.01)
    return {"statuses": sorted(statuses, key=str), "rss_before_mb": round(before, 1),
            "rss_peak_mb": round(max(peak), 1), "rss_after_mb": round(rss_mb(pid), 1)}


def slowloris(port: int) -> dict:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    answer = []
    reader = threading.Thread(target=lambda: answer.append(read_all(sock, 120)))
    reader.start()
    while reader.is_alive() and time.monotonic() - started < 120:
        try:
            sock.send(b"x")
        except OSError:
            break
        reader.join(0.5)
    reader.join(5)
    return {"status": status_of(answer[0]) if answer else None,
            "closed_after_s": round(time.monotonic() - started, 2)}


def idle(port: int, count: int = 2000) -> dict:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(count)]
    started = time.monotonic()
    answers: list[tuple[bytes, float]] = [None] * count

    def read(i: int) -> None:
        answers[i] = (read_all(socks[i], 60), time.monotonic() - started)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for s in socks:
        s.close()
    refused = [t for raw, t in answers if status_of(raw) == 503]
    held = [t for raw, t in answers if raw == b""]
    return {"connections": count, "refused_503": len(refused), "accepted_idle": len(held),
            "refused_within_s": round(max(refused, default=0), 2),
            "idle_closed_after_s": round(max(held, default=0), 2)}


def session_flood(url: str, pid: int, count: int = 1000) -> dict:
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        sid = c.post("/v1/sessions", json={"model": "bytegru", "text": "flood"}).json()[
            "session_id"]
        body = json.dumps({"text": "a"}).encode()[:-1] + b" " * 1_000_000 + b"}"
        before = rss_mb(pid)
        statuses: list[int] = []
        peak = [before]
        # A generation holds the session for the whole flood (the server allows a long one).
        with c.stream("POST", f"/v1/sessions/{sid}/generate",
                      json={"max_tokens": 1_000_000, "seed": 1, "stream": True}) as gen:
            next(gen.iter_lines())

            def step() -> None:
                with httpx.Client(base_url=url, timeout=120, trust_env=False) as s:
                    try:
                        r = s.post(f"/v1/sessions/{sid}/step", content=body,
                                   headers={"content-type": "application/json"})
                        statuses.append(r.status_code)
                    except httpx.HTTPError:
                        statuses.append(0)

            threads = [threading.Thread(target=step) for _ in range(count)]
            started = time.monotonic()
            for t in threads:
                t.start()
            while sum(1 for s in statuses if s == 429) < count - 8 and \
                    time.monotonic() - started < 120:
                peak.append(rss_mb(pid))
                time.sleep(0.05)
            refused_s = time.monotonic() - started
        for t in threads:
            t.join(120)
        return {"steps": count, "ok": statuses.count(200), "refused_429": statuses.count(429),
                "other": len(statuses) - statuses.count(200) - statuses.count(429),
                "refusals_within_s": round(refused_s, 2), "rss_before_mb": round(before, 1),
                "rss_peak_mb": round(max(peak), 1)}


def markdown(r: dict) -> str:
    h, s, i, f = r["headers"], r["slowloris"], r["idle"], r["session_flood"]
    rows = [
        "| attack | carousel answers | measured |",
        "|---|---|---|",
        f"| 8 concurrent 10 MB headers | {', '.join(map(str, h['statuses']))} | RSS "
        f"{h['rss_before_mb']} → peak {h['rss_peak_mb']} MB |",
        f"| slowloris, 1 header byte every 0.5 s | {s['status']} | closed after "
        f"{s['closed_after_s']} s |",
        f"| {i['connections']:,} idle connections | {i['refused_503']:,} × 503 at once, "
        f"{i['accepted_idle']:,} accepted | refusals within {i['refused_within_s']} s; accepted "
        f"ones closed after {i['idle_closed_after_s']} s |",
        f"| {f['steps']:,} concurrent 1 MB steps on one busy session | {f['refused_429']:,} × "
        f"429, {f['ok']} × 200, {f['other']} other | refusals within "
        f"{f['refusals_within_s']} s; RSS {f['rss_before_mb']} → peak {f['rss_peak_mb']} MB |",
    ]
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAROUSEL_")}
    carousel = Path(sys.executable).with_name("carousel")
    proc = subprocess.Popen([str(carousel), "serve", "--port", str(port),
                             "--max-generate-tokens", "1000000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        results = {"headers": big_headers(port, proc.pid), "slowloris": slowloris(port),
                   "idle": idle(port), "session_flood": session_flood(url, proc.pid)}
    finally:
        proc.terminate()
        proc.wait(60)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "limits.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "limits.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
