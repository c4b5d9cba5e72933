"""The client installs and runs without the server's dependencies: its distribution needs
httpx and websockets only, importing it loads no numpy / onnxruntime / torch, and it talks
to a real server with the server's packages made unimportable. `carousel chat` without the
client says how to install it."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
SERVER_PACKAGES = ("numpy", "onnxruntime", "torch", "onnx", "fastapi", "starlette", "uvicorn",
                   "pydantic", "prometheus_client", "carousel")

BLOCKER = textwrap.dedent(
    """
    import sys

    class _NotInstalled:
        def __init__(self, blocked):
            self.blocked = blocked

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled(BLOCKED))
    """
)


def run_python(code: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    prelude = BLOCKER.replace("BLOCKED", repr(blocked)) if blocked else ""
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_the_distribution_depends_on_httpx_and_websockets_only():
    project = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    assert project["name"] == "carousel-client"
    declared = {Requirement(r).name for r in project["dependencies"]}
    assert declared == {"httpx", "websockets"}
    installed = {Requirement(r).name for r in md.requires("carousel-client") or []}
    assert installed == {"httpx", "websockets"}  # the installed metadata says the same


def test_importing_the_client_loads_none_of_the_servers_packages():
    result = run_python(f"""
        import sys
        import carousel_client
        from carousel_client import chat  # the terminal client too
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({SERVER_PACKAGES!r}))
        print(",".join(loaded))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing carousel_client loaded {result.stdout}"


def test_the_client_works_with_the_servers_packages_unimportable(server):
    result = run_python(f"""
        from carousel_client import Client, UnknownModel
        with Client({server.url!r}, trust_env=False) as client:
            names = sorted({{m.name for m in client.models()}})
            with client.session("tinylstm", "hello") as session:
                step = session.step(" world")
                stream = session.stream(max_tokens=5, seed=1)
                text = "".join(stream)
            try:
                client.session("nosuch")
            except UnknownModel as e:
                code = e.code
        print(names, step.position, stream.position, code)
    """, blocked=SERVER_PACKAGES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['tinygru',", "'tinylstm',", "'utf8cycle']", "11", "16",
                                     "unknown_model"]


def test_carousel_chat_without_the_client_says_how_to_install_it():
    result = run_python("""
        import sys
        from carousel.cli import main
        sys.argv[0] = "carousel"
        main(["chat", "--help"])
    """, blocked=("carousel_client",))
    assert result.returncode != 0
    assert "pip install ./client" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
