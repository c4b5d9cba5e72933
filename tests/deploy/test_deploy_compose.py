"""docker-compose.yml (and the release overlay) against the Compose specification's JSON
schema, after interpolating variables as compose does; and the Prometheus config."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from deploy_files import MissingVariable, exec_form, healthcheck, interpolate, interpolate_tree

SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text())


def validate(document: dict) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(document)


def test_interpolation_follows_the_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert (
        interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET", env)
        == "x d  d x $SET"
    )
    assert interpolate("${SET:+alt}|${EMPTY:+alt}|${EMPTY+alt}", env) == "alt||alt"
    with pytest.raises(MissingVariable, match="EMPTY is missing a value: say so"):
        interpolate("${EMPTY:?say so}", env)
    assert interpolate("${EMPTY?say so}", env) == ""


def test_schema_rejects_what_compose_rejects():
    """The validation below can fail: misspelled keys and a wrong shape are refused."""
    bad_services = [
        {"image": "x", "restart_policy": "always"},
        {
            "image": "x",
            "volumes": [{"type": "bind", "source": ".", "target": "/m", "readonly": True}],
        },
        {"image": "x", "environment": {"A": ["not", "a", "scalar"]}},
    ]
    for service in bad_services:
        with pytest.raises(jsonschema.ValidationError):
            validate({"services": {"a": service}})


def test_plain_up_needs_no_variables(compose_raw):
    """`docker compose up` on a fresh clone: nothing set, everything interpolates (compose
    interpolates every service, profiles or not) and the result is a valid Compose file."""
    document = interpolate_tree(compose_raw, {})
    validate(document)
    service = document["services"]["carousel"]
    assert service["volumes"][0]["source"] == "./models"
    assert service["ports"] == ["127.0.0.1:8000:8000"]


def test_variables_reach_the_file(compose_raw):
    env = {
        "CAROUSEL_MODELS": "/srv/models",
        "CAROUSEL_PUBLISH_PORT": "9000",
        "CAROUSEL_BIND": "0.0.0.0",
        "CAROUSEL_MEMORY": "4g",
        "PROMETHEUS_PORT": "9091",
    }
    document = interpolate_tree(compose_raw, env)
    validate(document)
    service = document["services"]["carousel"]
    assert service["volumes"][0]["source"] == "/srv/models"
    assert service["ports"] == ["0.0.0.0:9000:8000"]
    assert service["deploy"]["resources"]["limits"]["memory"] == "4g"
    assert document["services"]["prometheus"]["ports"] == ["127.0.0.1:9091:9090"]


@pytest.mark.parametrize("missing", ["CAROUSEL_IMAGE", "CAROUSEL_MODELS"])
def test_release_overlay_requires_image_and_models(release_raw, missing):
    env = {"CAROUSEL_IMAGE": "registry.example.com/carousel:0.1.0", "CAROUSEL_MODELS": "/srv/m"}
    del env[missing]
    with pytest.raises(MissingVariable, match=f"{missing} is missing a value: set {missing}"):
        interpolate_tree(release_raw, env)
    with pytest.raises(MissingVariable):
        interpolate_tree(release_raw, {**env, missing: ""})


def test_release_overlay_is_valid_with_both_set(release_raw, compose_raw):
    env = {"CAROUSEL_IMAGE": "registry.example.com/carousel:0.1.0", "CAROUSEL_MODELS": "/srv/m"}
    overlay = interpolate_tree(release_raw, env)
    validate(overlay)
    service = overlay["services"]["carousel"]
    assert service["image"] == env["CAROUSEL_IMAGE"]
    # compose merges volumes by target: the overlay's mount replaces the base file's
    base_mount = compose_raw["services"]["carousel"]["volumes"][0]
    assert service["volumes"][0]["target"] == base_mount["target"]
    assert service["volumes"][0]["read_only"] is True


def test_service_matches_the_image(compose_raw, dockerfile):
    service = interpolate_tree(compose_raw, {})["services"]["carousel"]
    image_env = dockerfile.env("runtime")
    assert service["build"]["target"] == "runtime"
    assert "profiles" not in service  # plain `docker compose up` starts it
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    env = service["environment"]
    for key in ("CAROUSEL_HOST", "CAROUSEL_PORT", "CAROUSEL_MODEL_REPOSITORY"):
        assert str(env[key]) == image_env[key], key
    assert service["ports"][0].rsplit(":", 1)[1] == image_env["CAROUSEL_PORT"]
    mount = service["volumes"][0]
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert mount["target"] == image_env["CAROUSEL_MODEL_REPOSITORY"]
    assert mount["bind"]["create_host_path"] is False
    _, image_probe = healthcheck(dockerfile.inherited_last("runtime", "HEALTHCHECK"))
    assert service["healthcheck"]["test"] == ["CMD", *image_probe]
    limits = service["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and limits["memory"]
    # compose stops with SIGTERM and kills after stop_grace_period: leave the drain its time
    grace = float(service["stop_grace_period"].rstrip("s"))
    from carousel.service.settings import Settings

    assert grace > Settings.model_fields["shutdown_grace_s"].default
    assert exec_form(dockerfile.inherited_last("runtime", "ENTRYPOINT").args) == ["carousel"]


def test_every_setting_can_be_passed_through(compose_raw, settings_fields):
    env = compose_raw["services"]["carousel"]["environment"]
    expected = {f"CAROUSEL_{name.upper()}" for name in settings_fields}
    assert set(env) == expected, {"missing": expected - set(env), "unknown": set(env) - expected}
    fixed = {k for k, v in env.items() if v is not None}
    # only the image's layout is fixed; everything else keeps the service's default unless set
    assert fixed == {"CAROUSEL_HOST", "CAROUSEL_PORT", "CAROUSEL_MODEL_REPOSITORY"}


def test_prometheus_is_opt_in_and_scrapes_the_service(compose_raw, repo):
    document = interpolate_tree(compose_raw, {})
    prometheus = document["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert prometheus["depends_on"]["carousel"]["condition"] == "service_healthy"
    config_mount = next(
        v for v in prometheus["volumes"] if v["target"] == "/etc/prometheus/prometheus.yml"
    )
    assert config_mount["read_only"] is True
    config_path = repo / config_mount["source"]
    assert config_path.resolve() == (repo / "deploy" / "prometheus.yml").resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]

    config = yaml.safe_load(config_path.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "carousel"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    container_port = document["services"]["carousel"]["environment"]["CAROUSEL_PORT"]
    assert targets == [f"carousel:{container_port}"]  # the compose service, its own port
    assert "carousel" in document["services"]
    interval = int(config["global"]["scrape_interval"].rstrip("s"))
    assert int(config["global"]["scrape_timeout"].rstrip("s")) < interval
