"""`carousel chat` in a pseudo-terminal (pexpect) against a real server: what a person sees
as they type, and what the server holds afterwards.

The utf8cycle model continues any text with é€😀 repeated (built by hand in
tests/service/conftest.py), so the expected screen is known without the client's help; the
positions the chat shows are checked against the server's own GET /v1/sessions/{id}.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

CAROUSEL = str(Path(sys.executable).with_name("carousel"))
PROMPT = "> "


def spawn(*args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CAROUSEL_")}
    full_env.update({"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb",
                     "NO_PROXY": "127.0.0.1", **(env or {})})
    child = pexpect.spawn(CAROUSEL, ["chat", *args], env=full_env, encoding="utf-8",
                          timeout=60, dimensions=(40, 200))
    return child


@pytest.fixture
def chat(server):
    child = spawn("--url", server.url, "--model", "utf8cycle", "--temperature", "0",
                  "--max-tokens", "9")
    yield child
    if child.isalive():
        child.terminate(force=True)


def session_id(child: pexpect.spawn, model: str) -> str:
    child.expect(rf"\[session (\S+) on {model}\]")
    return child.match[1]


def line(child: pexpect.spawn, text: str) -> None:
    child.expect_exact(PROMPT)
    child.sendline(text)


def test_typing_streams_the_continuation(chat, api, check):
    sid = session_id(chat, "utf8cycle")
    line(chat, "x")
    chat.expect_exact(check.CYCLE_TEXT)  # é€😀: 9 bytes, streamed as whole characters
    chat.expect_exact("[length · position 10]")
    assert api.position(sid) == 10
    line(chat, "/max_tokens 18")
    chat.expect_exact("[max_tokens 18]")
    line(chat, "y")
    chat.expect_exact(check.CYCLE_TEXT * 2)
    chat.expect_exact("[length · position 29]")
    assert api.position(sid) == 29


# A generation too long to finish while the chat is still on screen: the server writes ahead
# of the terminal into the socket buffers (megabytes on loopback), so with a short one a fast
# machine can finish it before Ctrl-C is read.
LONG_GENERATION = 10_000_000


@pytest.fixture
def long_chat(start_server, tiny_repo, api_factory, check):
    server = start_server("chat-long", {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]),
                                        **check.LIMITS,
                                        "CAROUSEL_MAX_GENERATE_TOKENS": str(LONG_GENERATION)})
    child = spawn("--url", server.url, "--model", "utf8cycle", "--temperature", "0",
                  "--max-tokens", "9")
    yield child, api_factory(server)
    if child.isalive():
        child.terminate(force=True)
    server.stop()


def test_ctrl_c_stops_the_generation_and_keeps_the_session(long_chat, check):
    chat, api = long_chat
    sid = session_id(chat, "utf8cycle")
    line(chat, f"/max_tokens {LONG_GENERATION}")
    line(chat, "x")
    chat.expect_exact(check.CYCLE_TEXT * 3)  # it is streaming
    chat.sendintr()
    chat.expect(r"\[stopped · position (\d+)\]")
    stopped = int(chat.match[1])
    assert 1 + 27 <= stopped < 1 + LONG_GENERATION
    assert api.position(sid) == stopped  # the session is there, where the chat says
    line(chat, "/max_tokens 9")
    line(chat, "z")
    chat.expect_exact(f"[length · position {stopped + 10}]")
    assert api.position(sid) == stopped + 10
    chat.expect_exact(PROMPT)
    chat.sendintr()  # at the prompt: only a hint, the chat goes on
    chat.expect_exact("(/quit or Ctrl-D to leave)")
    chat.sendline("/settings")
    chat.expect_exact(f"session {sid} on utf8cycle at position {stopped + 10}")


def test_fork_back_reset_and_model(chat, api):
    sid = session_id(chat, "utf8cycle")
    line(chat, "x")
    chat.expect_exact("[length · position 10]")
    line(chat, "/fork")
    chat.expect(r"\[forked: session (\S+) at position 10\]")
    fork = chat.match[1]
    line(chat, "more")
    chat.expect_exact("[length · position 23]")
    assert (api.position(fork), api.position(sid)) == (23, 10)  # the parent did not move
    line(chat, "/back")
    chat.expect_exact(f"[back to session {sid} at position 10]")
    api.expect_error(api.http.get(f"/v1/sessions/{fork}"), 404, code="unknown_session")
    line(chat, "/reset")
    fresh = session_id(chat, "utf8cycle")
    assert fresh != sid and api.position(fresh) == 0
    api.expect_error(api.http.get(f"/v1/sessions/{sid}"), 404, code="unknown_session")
    line(chat, "/model tinygru")
    gru = session_id(chat, "tinygru")
    assert api.session(gru)["model"] == "tinygru"
    line(chat, "/model nosuch")
    chat.expect_exact("error unknown_model:")
    line(chat, "/settings")
    chat.expect_exact(f"session {gru} on tinygru")  # still there after the refusal
    chat.expect_exact(PROMPT)
    chat.sendeof()  # Ctrl-D leaves and deletes the chat's sessions
    chat.expect(pexpect.EOF)
    chat.wait()
    assert chat.exitstatus == 0
    api.expect_error(api.http.get(f"/v1/sessions/{gru}"), 404, code="unknown_session")


def test_bad_input_is_answered_not_crashed_on(chat, api):
    sid = session_id(chat, "utf8cycle")
    line(chat, "/temperature warm")
    chat.expect_exact("/temperature: 'warm' is not a valid value")
    line(chat, "/temperature -1")  # the server checks the range
    line(chat, "x")
    chat.expect(r"error invalid_input: temperature: [^\r\n]+")
    line(chat, "/temperature 0")
    line(chat, "/nonsense")
    chat.expect_exact("unknown command /nonsense")
    line(chat, "y")
    chat.expect(r"\[length · position (\d+)\]")
    assert int(chat.match[1]) == api.position(sid)  # the refused generation changed nothing
    line(chat, "/quit")
    chat.expect(pexpect.EOF)
    assert "Traceback" not in chat.before


def test_the_api_key_from_the_environment_goes_on_every_request(server, proxy):
    child = spawn("--url", proxy.url, "--model", "utf8cycle", "--max-tokens", "3",
                  env={"CAROUSEL_API_KEY": "sk-chat"})
    session_id(child, "utf8cycle")
    line(child, "x")
    child.expect(r"\[length · position 4\]")
    line(child, "/quit")
    child.expect(pexpect.EOF)
    assert {r.headers.get("authorization") for r in proxy.requests} == {"Bearer sk-chat"}
    assert len(proxy.requests) >= 4  # create, step, generate, delete


def test_a_server_that_is_down_is_a_message_and_exit_status_1():
    child = spawn("--url", "http://127.0.0.1:9", "--timeout", "2")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 1
    assert re.search(r"connection_error", child.before), child.before
    assert "Traceback" not in child.before
