"""The image and the compose file follow the rule "no accidental open server": the runtime
image listens on 0.0.0.0, so its own command, with nothing added, refuses to start without
API keys or the explicit opt-out; and compose passes the keys settings through and still
publishes on loopback by default.

The refusal comes before anything binds, so the command runs here exactly as the image's
ENV has it (0.0.0.0 included); the model repository is the checkout's models/, which the
image copies to /models."""

from __future__ import annotations

import shutil
import subprocess
import sys

from deploy_files import exec_form, interpolate_tree


def image_command(dockerfile, repo, **extra) -> subprocess.CompletedProcess:
    env = dict(dockerfile.env("runtime"))
    assert env["CAROUSEL_HOST"] == "0.0.0.0"
    env["CAROUSEL_MODEL_REPOSITORY"] = str(repo / "models")
    env["PATH"] = env["PATH"].replace("/opt/venv", sys.prefix)
    env.update(extra)
    argv = exec_form(dockerfile.inherited_last("runtime", "ENTRYPOINT").args)
    argv += exec_form(dockerfile.inherited_last("runtime", "CMD").args)
    executable = shutil.which(argv[0], path=env["PATH"])
    return subprocess.run([executable, *argv[1:]], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_image_refuses_to_serve_without_keys_or_the_opt_out(dockerfile, repo):
    result = image_command(dockerfile, repo)
    assert result.returncode == 2, result.stderr
    assert "refusing to serve on 0.0.0.0" in result.stderr
    for way_out in ("CAROUSEL_API_KEYS_FILE=", "CAROUSEL_API_KEYS=",
                    "CAROUSEL_ALLOW_UNAUTHENTICATED=true"):
        assert way_out in result.stderr, way_out
    assert "Uvicorn running" not in result.stderr + result.stdout


def test_a_bad_keys_setting_stops_the_image_with_status_2_and_never_shows_the_key(
        dockerfile, repo, tmp_path):
    result = image_command(dockerfile, repo, CAROUSEL_API_KEYS="alice:tooshortkey")
    assert result.returncode == 2 and "at least 16 characters" in result.stderr
    assert "tooshortkey" not in result.stderr + result.stdout
    missing = tmp_path / "keys.toml"
    result = image_command(dockerfile, repo, CAROUSEL_API_KEYS_FILE=str(missing))
    assert result.returncode == 2 and f"keys file {missing}: cannot read it" in result.stderr


def test_compose_publishes_on_loopback_and_passes_the_keys_through(compose_raw):
    env = {"CAROUSEL_BIND": "0.0.0.0"}
    plain = interpolate_tree(compose_raw, {})["services"]["carousel"]
    assert plain["ports"] == ["127.0.0.1:8000:8000"]
    environment = plain["environment"]
    for name in ("CAROUSEL_API_KEYS", "CAROUSEL_API_KEYS_FILE",
                 "CAROUSEL_ALLOW_UNAUTHENTICATED"):
        assert name in environment and environment[name] is None  # from the shell or .env
    exposed = interpolate_tree(compose_raw, env)["services"]["carousel"]
    assert exposed["ports"] == ["0.0.0.0:8000:8000"]
