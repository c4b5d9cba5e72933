"""The playground page in a real browser: Playwright driving Debian's chromium (installed by
.ci/run with apt-get; never a downloaded browser) against a real `carousel serve`.

Every browser test fails on any console error (a CSP violation, a missing favicon, a script
error), any uncaught page error, and any failed or 4xx/5xx request (but for the 401s a
server with API keys answers before the key is typed in, which the last test expects).
What the page shows is checked against independent sources: the text it streamed against
carousel's own /generate with the same seed, the bar chart against PyTorch's
probabilities, the session's position and forks against the v1 API.

The README's screenshot is taken by `test_screenshot_of_a_generation`; it is written to
docs/playground.png only when CAROUSEL_UPDATE_SCREENSHOT=1 (otherwise to the test's
temporary folder), so a test run leaves the checkout as it was.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path

import httpx
import numpy as np
import pytest
from carousel.model.model import encode
from PIL import Image
from playwright.sync_api import sync_playwright

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it
DOCS = Path(__file__).resolve().parents[2] / "docs"
PROMPT = "Once upon a time "
VIEWPORT = {"width": 1280, "height": 900}
FINISHED = re.compile(r"Finished \((length|stop)\)")


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does it before the tests)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


class Page:
    """A browser tab on the playground that records everything that went wrong."""

    def __init__(self, browser, server):
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(
            f"console error: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(
            f"request failed: {r.method} {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(
            f"HTTP {r.status}: {r.request.method} {r.url}"))
        self.response = self.page.goto(server.url + "/")
        self.page.get_by_role("status").filter(has_text="Ready").wait_for()

    def control(self, label: str):
        return self.page.get_by_label(label, exact=True)

    def settings(self, **values) -> None:
        names = {"model": "Model", "version": "Version", "max_tokens": "Max tokens",
                 "temperature": "Temperature", "top_p": "Top-p", "seed": "Seed"}
        for key, value in values.items():
            control = self.control(names[key])
            if key in ("model", "version"):
                control.select_option(str(value))
            else:
                control.fill(str(value))

    def press(self, button: str, wait_for: re.Pattern | str = FINISHED) -> str:
        self.page.get_by_role("button", name=button, exact=True).click()
        return self.wait_status(wait_for)

    def wait_status(self, pattern) -> str:
        status = self.page.get_by_role("status")
        status.filter(has_text=pattern).wait_for(timeout=120_000)
        return status.text_content()

    def session_id(self) -> str:
        return self.page.locator("#session-id").text_content().split(" · ")[-1]

    def position(self) -> int:
        return int(self.page.locator("#position").text_content())

    def generated(self) -> str:
        return "".join(self.page.locator("#transcript .generated").all_text_contents())

    def transcript(self) -> str:
        return self.page.locator("#transcript").text_content()

    def bars(self) -> list[tuple[int, float]]:
        """(byte, percent shown) for each bar of the next-byte chart, top first."""
        bars = self.page.locator("#bars li")
        return [(int(bars.nth(i).get_attribute("data-token")),
                 float(bars.nth(i).locator(".pct").text_content().rstrip("%")))
                for i in range(bars.count())]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages: list[Page] = []

    def open_on(server) -> Page:
        pages.append(Page(browser, server))
        return pages[-1]

    yield open_on
    for page in pages:
        problems = page.problems
        page.close()
        assert not problems, problems


def utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def v1_generation(api, model: str, prompt: str, **sampling) -> dict:
    sid = api.create_session(model, text=prompt)["session_id"]
    return api.generate(sid, top_k=0, **sampling)


# --------------------------------------------------------------------------- over HTTP


def test_the_page_is_static_self_contained_and_has_security_headers(api):
    root = api.http.get("/", follow_redirects=False)
    assert root.status_code in (301, 302, 303, 307, 308)
    assert root.headers["location"] == "/playground"
    kinds = {"/playground": "text/html", "/playground/app.js": "text/javascript",
             "/playground/style.css": "text/css", "/favicon.ico": "image/x-icon"}
    for path, kind in kinds.items():
        resp = api.http.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["content-type"].startswith(kind), (path, resp.headers)
        csp = resp.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer"
        assert resp.headers["x-frame-options"] == "DENY"
    assert api.http.get("/favicon.ico").content[:4] == b"\x00\x00\x01\x00"  # an ICO file
    html = api.http.get("/playground").text
    # Nothing inline (the CSP would block it) and nothing from another origin.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son\w+=", html, re.I), "an inline event handler"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "a resource from outside"
    api.expect_error(api.http.get("/playground/secrets.txt"), 404)
    api.expect_error(api.http.get("/playground/..%2Fapp.py"), 404)


# --------------------------------------------------------------------------- in a browser


def test_generate_streams_text_that_grows_and_charts_the_next_byte(open_page, server, api,
                                                                    tiny, check):
    tab = open_page(server)
    tab.settings(model="tinylstm", max_tokens=3000, temperature=1, top_p=0.9, seed=31)
    tab.control("Text to send").fill(PROMPT)
    # Record the text's length at every change the browser makes to it.
    tab.page.evaluate("""() => {
        const transcript = document.getElementById("transcript");
        window.lengths = [];
        new MutationObserver(() => window.lengths.push(transcript.textContent.length))
            .observe(transcript, {childList: true, subtree: true, characterData: true});
    }""")
    tab.press("Generate")

    expected = v1_generation(api, "tinylstm", PROMPT, max_tokens=3000, temperature=1.0,
                             top_p=0.9, seed=31)
    assert tab.generated() == expected["text"]
    assert tab.transcript() == PROMPT + expected["text"]
    lengths = tab.page.evaluate("window.lengths")
    grown = [n for n in lengths if n > len(PROMPT)]
    assert grown == sorted(grown), "the text shrank while streaming"
    assert len(set(grown)) >= 3, f"the text did not arrive in pieces: {sorted(set(lengths))}"
    assert max(lengths) == utf16_length(PROMPT + expected["text"])  # JavaScript's lengths

    sid = tab.session_id()
    assert tab.position() == api.position(sid) == len(encode(PROMPT)) + 3000

    # The chart: the 10 likeliest bytes after the prompt, with PyTorch's probabilities.
    probs = np.exp(check.log_softmax(tiny["tinylstm"].last(PROMPT)))
    bars = tab.bars()
    assert [t for t, _ in bars] == np.argsort(probs)[::-1][:10].tolist()
    for token, shown in bars:
        assert math.isclose(shown, 100 * probs[token], rel_tol=0.05, abs_tol=0.051), (
            token, shown, 100 * probs[token])
    caption = tab.page.locator("#chart-caption").text_content()
    assert f"after position {len(encode(PROMPT))}" in caption


def test_fork_continues_apart_and_reset_deletes(open_page, server, api):
    tab = open_page(server)
    tab.settings(model="tinygru", max_tokens=20, seed=5)
    tab.control("Text to send").fill(PROMPT)
    tab.press("Generate")
    parent, position, story = tab.session_id(), tab.position(), tab.transcript()

    tab.press("Fork", wait_for="Forked")
    child = tab.session_id()
    assert child != parent
    assert api.position(child) == api.position(parent) == position == tab.position()
    assert tab.transcript() == story
    assert tab.control("Current session").locator("option").count() == 3  # new session, s1, s2

    tab.control("Text to send").fill(" more")
    tab.press("Step", wait_for="Stepped")
    assert api.position(child) == tab.position() == position + 5
    assert api.position(parent) == position  # the fork moved alone
    assert f"after position {position + 5}" in tab.page.locator("#chart-caption").text_content()

    tab.control("Current session").select_option(value=parent)
    assert tab.session_id() == parent and tab.transcript() == story
    assert tab.position() == position

    tab.press("Reset", wait_for="Reset")
    assert api.http.get(f"/v1/sessions/{parent}").status_code == 404
    assert tab.page.locator("#session-id").text_content() == "none yet"
    assert api.position(child) == position + 5  # its fork stays
    # The next Generate starts a fresh session.
    tab.control("Text to send").fill(PROMPT)
    tab.press("Generate")
    assert tab.session_id() not in (parent, child)
    assert tab.transcript().startswith(PROMPT)


def test_keyboard_alone_generates(open_page, server, api):
    tab = open_page(server)
    page = tab.page
    # Every control has a label (or, for a button, its text) a screen reader announces.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll(
            "input, select, textarea, button")]
        .filter(c => c.tagName === "BUTTON" ? !c.textContent.trim() : c.labels.length === 0)
        .map(c => c.id)""")
    assert unlabelled == []
    tab.settings(model="tinylstm", max_tokens=12, seed=2)
    tab.control("Text to send").focus()
    page.keyboard.type(PROMPT)
    page.keyboard.press("Control+Enter")
    tab.wait_status(FINISHED)
    first = tab.generated()
    assert len(first) > 0
    # Tab from the text to the Generate button, and Enter presses it.
    tab.control("Text to send").focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Generate"
    page.keyboard.press("Enter")
    tab.wait_status(FINISHED)
    assert len(tab.generated()) > len(first)
    assert tab.position() == api.position(tab.session_id()) == len(encode(PROMPT)) + 24


def test_the_api_key_goes_as_a_bearer_token(open_page, server):
    tab = open_page(server)
    sent = []
    tab.page.on("request", lambda r: "/v1/" in r.url and sent.append(
        r.headers.get("authorization")))
    tab.control("API key").fill("sekrit")
    tab.control("Text to send").fill("hello")
    tab.press("Step", wait_for="Stepped")
    assert sent and all(h == "Bearer sekrit" for h in sent), sent


def test_screenshot_of_a_generation(open_page, bundled_server, tmp_path):
    """The README's picture: bytelm writing Python, the chart after the prompt."""
    tab = open_page(bundled_server)
    tab.settings(model="bytelm", max_tokens=240, temperature=0.5, top_p=0.95, seed=7)
    tab.control("Text to send").fill("def fibonacci(n):\n")
    tab.press("Generate")
    assert len(tab.page.locator("#bars li").all()) == 10
    target = (DOCS if os.environ.get("CAROUSEL_UPDATE_SCREENSHOT") == "1" else tmp_path)
    path = target / "playground.png"
    tab.page.screenshot(path=str(path))
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (VIEWPORT["width"], VIEWPORT["height"])


# --------------------------------------------------------------------------- with API keys


@pytest.fixture(scope="module")
def keyed_server(start_server, tiny_repo, check):
    """A server that needs keys, with two tenants: the page's user and someone else."""
    keys = {"web": secrets.token_urlsafe(24), "other": secrets.token_urlsafe(24)}
    server = start_server("playground-keys", {
        "CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
        "CAROUSEL_API_KEYS": ",".join(f"{name}:{key}" for name, key in keys.items())})
    return server, keys


def test_on_a_server_with_keys_the_page_asks_for_one_then_works_as_its_tenant(browser,
                                                                             keyed_server):
    server, keys = keyed_server
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    refused, problems = [], []
    page.on("response", lambda r: r.status >= 400 and (
        refused if r.status == 401 else problems).append(f"{r.status} {r.url}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and "401" not in m.text and problems.append(
        f"console error: {m.text}"))
    try:
        page.goto(server.url + "/")  # the page itself needs no key
        status = page.get_by_role("status")
        status.filter(has_text="enter it above").wait_for(timeout=60_000)
        assert refused and all("/v1/models" in r for r in refused), refused
        assert page.evaluate("document.activeElement.id") == "api-key"  # where to type it

        page.get_by_label("API key", exact=True).fill(keys["web"])
        page.keyboard.press("Tab")  # a change of key reloads the models with it
        status.filter(has_text="Ready").wait_for(timeout=60_000)
        page.get_by_label("Text to send", exact=True).fill("hello")
        page.get_by_role("button", name="Step", exact=True).click()
        status.filter(has_text="Stepped").wait_for(timeout=60_000)
        sid = page.locator("#session-id").text_content().split(" · ")[-1]
        assert not problems, problems
    finally:
        context.close()

    def get(key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{server.url}/v1/sessions/{sid}", headers=headers,
                         trust_env=False).status_code

    # the page's session is its key's tenant's, and no one else's
    assert (get(keys["web"]), get(keys["other"]), get(None)) == (200, 404, 401)
