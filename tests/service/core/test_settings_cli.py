"""Settings: defaults, environment, flags; every setting is a `carousel serve` flag."""

from __future__ import annotations

import argparse

import pytest
from carousel.service.cli import add_arguments, settings_from
from carousel.service.settings import Settings
from pydantic import ValidationError

from carousel.paths import bundled_model_repository


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_defaults_and_bundled_repository(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(f"CAROUSEL_{name.upper()}", raising=False)
    s = Settings()
    assert s.model_repository == bundled_model_repository()
    assert (s.host, s.port, s.max_batch_size, s.max_batch_delay_ms) == ("127.0.0.1", 8000, 64, 2.0)
    assert (s.session_ttl_s, s.max_session_ttl_s, s.max_sessions) == (3600, 86400, 100_000)


def test_every_setting_is_a_flag_with_its_description():
    help_text = parser().format_help()
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in help_text
        assert field.description.split()[0] in help_text


def test_flags_override_environment_which_overrides_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("CAROUSEL_PORT", "9001")
    monkeypatch.setenv("CAROUSEL_MAX_BATCH_SIZE", "8")
    args = parser().parse_args(["--port", "9002", "--model-repository", str(tmp_path),
                                "--no-access-log"])
    s = settings_from(args)
    assert (s.port, s.max_batch_size, s.model_repository, s.access_log) == (
        9002, 8, tmp_path, False)


def test_bad_values_are_refused():
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)
    with pytest.raises(ValidationError):
        Settings(store_url="redis://localhost")
