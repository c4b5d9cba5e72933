"""Fixtures for the deployment tests: the repository's own Dockerfile, compose files,
Prometheus config and README, read as the tools that use them would read them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from deploy_files import Dockerfile, parse_dockerfile, read_text

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(read_text(REPO / "Dockerfile"))


@pytest.fixture(scope="session")
def compose_raw() -> dict:
    return yaml.safe_load(read_text(REPO / "docker-compose.yml"))


@pytest.fixture(scope="session")
def release_raw() -> dict:
    return yaml.safe_load(read_text(REPO / "deploy" / "compose.release.yml"))


@pytest.fixture(scope="session")
def settings_fields() -> dict:
    """Every field of the service's Settings, by name (the configuration's one source)."""
    from carousel.service.settings import Settings

    assert Settings.model_config["env_prefix"] == "CAROUSEL_"
    return dict(Settings.model_fields)
