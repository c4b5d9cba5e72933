"""The README's "Python client" examples run, as written, against a real server on the
bundled models (only the address is changed to the test server's), and every option its
`carousel chat` section names is one `carousel chat --help` has."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_URL = "http://127.0.0.1:8000"


def section(title: str) -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", section("Python client"), re.S)


@pytest.fixture(scope="module")
def bundled(start_server):
    """`carousel serve` on the bundled models (bytelm, bytegru), as the README's examples
    expect."""
    return start_server("bundled", {})


def test_the_section_has_the_sync_async_streaming_and_websocket_examples():
    examples = python_examples()
    assert len(examples) >= 3
    code = "\n".join(examples)
    for used in ("Client(", "AsyncClient(", ".stream(", ".websocket()", "CarouselError"):
        assert used in code, used


@pytest.mark.parametrize("index", range(len(python_examples())))
def test_each_example_runs(bundled, index):
    code = python_examples()[index]
    assert README_URL in code, "an example that talks to no server"
    result = subprocess.run([sys.executable, "-c", code.replace(README_URL, bundled.url)],
                            capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, f"example {index} failed:\n{code}\n{result.stderr}"
    assert result.stdout.strip(), f"example {index} printed nothing"
    assert "Traceback" not in result.stderr


def test_the_chat_options_the_readme_names_exist():
    text = section("`carousel chat`")
    named = set(re.findall(r"(--[a-z][a-z-]+)", text))
    assert {"--model", "--url", "--api-key", "--temperature"} <= named
    help_text = subprocess.run([str(Path(sys.executable).with_name("carousel")), "chat",
                                "--help"], capture_output=True, text=True, check=True).stdout
    for option in named:
        assert option in help_text, option
    for command in re.findall(r"`/(\w+)", text):
        assert f"/{command}" in help_commands(), command


def help_commands() -> str:
    from carousel_client.chat import HELP

    return HELP
