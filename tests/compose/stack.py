"""The replicated compose stack, driven through the `docker` command line.

A stack is one compose project (its own name, network and volumes, so it never touches
another stack on the machine) of docker-compose.yml with deploy/compose.replicas.yml and the
monitoring profile, published on free loopback ports. Works with Docker, or with the
podman lab (../shared/lab/containers) through its Docker-compatible socket.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

FILES = ("docker-compose.yml", "deploy/compose.replicas.yml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Container:
    name: str
    service: str
    state: str  # running, exited, ...
    health: str  # healthy, starting, unhealthy, "" without a health check
    address: str  # on the project's network, "" when it has none


class Stack:
    def __init__(self, repo: Path, project: str, *, image: str, replicas: int,
                 extra_env: dict[str, str], extra_files: tuple[str, ...] = ()) -> None:
        self.repo = repo
        self.project = project
        self.files = (*FILES, *extra_files)
        self.replicas = replicas
        self.lb_port, self.stats_port, self.prometheus_port = (free_port() for _ in range(3))
        self.env = {
            **os.environ,
            "CAROUSEL_IMAGE": image,
            "CAROUSEL_REPLICAS": str(replicas),
            "CAROUSEL_BIND": "127.0.0.1",
            "CAROUSEL_PUBLISH_PORT": str(self.lb_port),
            "LB_STATS_PORT": str(self.stats_port),
            "PROMETHEUS_PORT": str(self.prometheus_port),
            **extra_env,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    # ------------------------------------------------------------------ commands

    def docker(self, *args: str, capture: bool = True, timeout: float = 600) -> str:
        done = subprocess.run(["docker", *args], cwd=self.repo, env=self.env, text=True,
                              capture_output=capture, timeout=timeout)
        if done.returncode != 0:
            detail = (done.stderr or "").strip()[-2000:] if capture else ""
            raise RuntimeError(f"docker {' '.join(args)} exited {done.returncode}: {detail}")
        return done.stdout if capture else ""

    def compose(self, *args: str, capture: bool = True, timeout: float = 600) -> str:
        files = [a for f in self.files for a in ("-f", f)]
        return self.docker("compose", "-p", self.project, *files, "--profile", "monitoring",
                           *args, capture=capture, timeout=timeout)

    def up(self) -> None:
        """Start everything and wait until every container is running and healthy."""
        self.compose("up", "--detach", "--wait", "--wait-timeout", "300", "--no-build",
                     capture=False)

    def down(self) -> None:
        """Stop and remove the project's containers, network and volumes."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")

    def containers(self, service: str | None = None) -> list[Container]:
        names = self.docker("ps", "--all", "--filter", f"label=com.docker.compose.project="
                            f"{self.project}", "--format", "{{.Names}}").split()
        found = []
        for info in json.loads(self.docker("inspect", *names)) if names else []:
            labels = info["Config"]["Labels"] or {}
            networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
            address = next((n.get("IPAddress", "") for n in networks.values()
                            if n.get("IPAddress")), "")
            health = ((info["State"].get("Health") or {}).get("Status")) or ""
            found.append(Container(info["Name"].lstrip("/"),
                                   labels.get("com.docker.compose.service", ""),
                                   info["State"]["Status"], health, address))
        found.sort(key=lambda c: c.name)
        return [c for c in found if service is None or c.service == service]

    def kill(self, name: str) -> None:
        self.docker("kill", name)

    def restart(self, *services: str) -> None:
        self.compose("restart", "--timeout", "30", *services)

    def logs(self, tail: int = 40) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", str(tail), timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return f"(no logs: {e})"

    # ------------------------------------------------------------------ the load balancer

    def lb_servers(self) -> dict[str, tuple[str, str]]:
        """HAProxy's replica slots in use: server name -> (status, address:port), from its
        stats page (CSV)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv",
                                    timeout=5) as r:
            lines = r.read().decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: (row["status"], row.get("addr", ""))
                for row in rows if row["pxname"] == "replicas"
                and row["svname"] not in ("BACKEND", "FRONTEND") and row.get("addr")}


def log(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()
