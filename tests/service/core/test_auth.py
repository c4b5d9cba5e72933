"""API keys and tenants (service/auth.py) without HTTP: the two ways keys are configured,
what each path needs, where a request's key is found, reloads, and the start-up refusal.
Requests are ASGI scopes as uvicorn builds them."""

from __future__ import annotations

import hashlib
import hmac
import logging

import pytest
from carousel.service import auth
from carousel.service.auth import (
    AuthConfigError,
    Authenticator,
    Limits,
    parse_api_keys,
    parse_keys_file,
    refusal,
)
from carousel.service.errors import Forbidden, RateLimited, Unauthorized
from carousel.service.settings import Settings

ALICE = "alice-key-0123456789abcdef"
ALICE_NEW = "alice-key-rotated-9876543210"
BOB = "bob-key-0123456789abcdefgh"
OPS = "ops-key-0123456789abcdefghij"


@pytest.fixture(autouse=True)
def _no_carousel_environment(monkeypatch):
    """Settings() reads CAROUSEL_* variables: these tests name every setting they use."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"CAROUSEL_{name.upper()}", raising=False)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(tmp_path, text: str):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


FILE = f"""
[tenants.alice]
sha256 = ["{sha(ALICE)}", "{sha(ALICE_NEW).upper()}"]
requests_per_s = 2
burst_requests = 3
tokens_per_s = 100
max_sessions = 5
max_generations = 1

[tenants.ops]
sha256 = ["{sha(OPS)}"]
admin = true
"""


def scope(path: str = "/v1/models", *, kind: str = "http", headers=(), query: bytes = b"",
          subprotocols=()) -> dict:
    s = {"type": kind, "path": path, "query_string": query,
         "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
    if kind == "websocket":
        s["subprotocols"] = list(subprotocols)
    return s


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def authenticator(tmp_path, text: str = FILE, clock=None, **settings) -> Authenticator:
    s = Settings(api_keys_file=keys_file(tmp_path, text), **settings)
    return Authenticator(s, clock=clock or Clock())


# ------------------------------------------------------------------- configuration


def test_development_keys_are_tenant_key_pairs():
    specs = parse_api_keys(f" alice:{ALICE}, bob:{BOB} ,ops:{OPS}:admin,alice:{ALICE_NEW},")
    assert set(specs) == {"alice", "bob", "ops"}
    assert specs["alice"].digests == {hashlib.sha256(k.encode()).digest()
                                      for k in (ALICE, ALICE_NEW)}
    assert (specs["ops"].admin, specs["bob"].admin) == (True, False)


@pytest.mark.parametrize("text, words", [
    (f"al ice:{ALICE}", "tenant name"),
    (f"~seq:{ALICE}", "tenant name"),
    (f":{ALICE}", "tenant name"),
    ("alice:short-key", "at least 16"),
    ("alice", "at least 16"),
    (f"alice:{ALICE}:root", "only ':admin'"),
    (f"alice:{ALICE[:10]} {ALICE[10:]}", "at least 16"),
])
def test_a_bad_development_key_is_refused_without_quoting_it(text, words):
    with pytest.raises(AuthConfigError, match=words) as e:
        parse_api_keys(text)
    assert ALICE[:12] not in str(e.value) and "short-key" not in str(e.value)


def test_the_keys_file_holds_digests_admin_marks_and_limits(tmp_path):
    specs = parse_keys_file(keys_file(tmp_path, FILE))
    assert specs["alice"].digests == {bytes.fromhex(sha(ALICE)), bytes.fromhex(sha(ALICE_NEW))}
    assert specs["alice"].limits == {"requests_per_s": 2, "burst_requests": 3,
                                     "tokens_per_s": 100, "max_sessions": 5,
                                     "max_generations": 1}
    assert (specs["ops"].admin, specs["ops"].limits, specs["alice"].admin) == (True, {}, False)


@pytest.mark.parametrize("text, words", [
    ("[tenants.alice\n", "not valid TOML"),
    ("[tenant.alice]\n", "unknown top-level"),
    ("tenants = 3\n", "table of tenants"),
    ('[tenants."al ice"]\n', "tenant name"),
    ('[tenants.alice]\nsha256 = "ab"\n', "list of hex digests"),
    ('[tenants.alice]\nsha256 = ["abc"]\n', r"sha256\[0\] is not a SHA-256"),
    (f'[tenants.alice]\nsha256 = ["{sha(ALICE)}", 7]\n', r"sha256\[1\]"),
    ('[tenants.alice]\nkeys = []\n', "unknown fields"),
    ('[tenants.alice]\nmax_session = 3\n', "unknown fields"),
    ('[tenants.alice]\nadmin = "yes"\n', "admin must be true or false"),
    ('[tenants.alice]\nrequests_per_s = -1\n', "requests_per_s must be a number"),
    ('[tenants.alice]\nrequests_per_s = true\n', "requests_per_s must be a number"),
    ('[tenants.alice]\nmax_sessions = 2.5\n', "whole number"),
    (f'[tenants.alice]\nsha256 = ["{sha(ALICE)}"]\n[tenants.bob]\nsha256 = ["{sha(ALICE)}"]\n',
     "also a key of tenant 'alice'"),
])
def test_a_keys_file_that_cannot_be_used_is_refused_with_what_is_wrong(tmp_path, text, words):
    with pytest.raises(AuthConfigError, match=words):
        parse_keys_file(keys_file(tmp_path, text))


def test_a_key_in_the_environment_and_the_file_belongs_to_one_tenant(tmp_path):
    with pytest.raises(AuthConfigError, match="also tenant 'bob'"):
        authenticator(tmp_path, api_keys=f"bob:{ALICE}")
    assert authenticator(tmp_path, api_keys=f"alice:{ALICE}").ring.tenants["alice"]


def test_a_missing_keys_file_stops_the_service_from_starting(tmp_path):
    with pytest.raises(AuthConfigError, match="cannot read it"):
        Authenticator(Settings(api_keys_file=tmp_path / "nope.toml"))


def test_file_and_environment_keys_merge_and_limits_default_to_the_settings(tmp_path):
    a = authenticator(tmp_path, api_keys=f"bob:{BOB},alice:{'x' * 20}",
                      tenant_requests_per_s=7, tenant_max_sessions=9, tenant_max_generations=0)
    tenants = a.ring.tenants
    assert set(tenants) == {"alice", "bob", "ops"} and len(a.ring) == 5
    assert tenants["bob"].limits == Limits(requests_per_s=7, max_sessions=9)
    assert tenants["alice"].limits == Limits(2, 100, 3, 0, 5, 1)  # the file's, burst_tokens 0
    assert tenants["ops"].limits == Limits(requests_per_s=7, max_sessions=9)
    assert a.authenticate(scope(headers=bearer("x" * 20))).name == "alice"
    assert tenants["alice"].tokens.burst == 100  # a second's worth


def test_no_keys_means_no_authentication():
    a = Authenticator(Settings())
    assert not a.enabled
    assert a.authenticate(scope()) is None and a.current(scope()) is None
    assert not Authenticator(Settings(api_keys=" ")).enabled
    assert not Authenticator(Settings(api_keys="", api_keys_file="")).enabled  # empty: unset


def test_settings_never_show_the_development_keys():
    s = Settings(api_keys=f"alice:{ALICE}")
    assert ALICE not in repr(s) and ALICE not in str(s.model_dump())


# ------------------------------------------------------------------- requests


@pytest.mark.parametrize("path, access", [
    ("/v1/models", "key"), ("/v1/sessions/abc/step", "key"), ("/v1", "key"),
    ("/v2", "key"), ("/v2/health/live", "key"), ("/v2/models/m/infer", "key"),
    ("/openai/v1/completions", "key"), ("/openai/anything", "key"),
    ("/metrics", "admin"), ("/metrics/", "admin"), ("/docs", "none"), ("/openapi.json", "none"),
    ("/healthz", "none"), ("/readyz", "none"), ("/", "none"), ("/playground/app.js", "none"),
    ("/v1x/models", "none"), ("/favicon.ico", "none"),
])
def test_what_each_path_needs(tmp_path, path, access):
    assert authenticator(tmp_path).access(path) == access


def test_metrics_and_docs_access_are_settings(tmp_path):
    a = authenticator(tmp_path, metrics_auth="key", docs_auth="admin")
    assert (a.access("/metrics"), a.access("/docs"), a.access("/redoc")) == ("key", "admin",
                                                                             "admin")
    assert authenticator(tmp_path, metrics_auth="none").access("/metrics") == "none"


@pytest.mark.parametrize("request_scope", [
    scope(headers=bearer(ALICE)),
    scope(headers=[("authorization", f"bearer   {ALICE} ")]),
    scope(headers=[("X-API-Key", ALICE)]),
    scope("/v1/sessions/s/ws", kind="websocket", headers=bearer(ALICE)),
    scope("/v1/sessions/s/ws", kind="websocket", headers=[("x-api-key", ALICE)]),
    scope("/v1/sessions/s/ws", kind="websocket",
          subprotocols=["carousel", f"carousel.key.{ALICE}"]),
    scope("/v1/sessions/s/ws", kind="websocket", query=f"api_key={ALICE}".encode()),
])
def test_a_key_is_found_in_every_place_it_may_travel(tmp_path, request_scope):
    tenant = authenticator(tmp_path).authenticate(request_scope)
    assert tenant.name == "alice" and request_scope[auth.TENANT] is tenant


def test_the_query_parameter_counts_only_for_websockets_and_is_always_stripped(tmp_path):
    a = authenticator(tmp_path)
    http = scope(query=f"version=2&api_key={ALICE}&x=%20y".encode())
    with pytest.raises(Unauthorized):
        a.authenticate(http)
    assert http["query_string"] == b"version=2&x=+y"  # what uvicorn's log lines print
    ws = scope("/v1/sessions/s/ws", kind="websocket", query=f"api_key={ALICE}".encode())
    a.authenticate(ws)
    assert ws["query_string"] == b""
    open_path = scope("/healthz", query=f"api_key={ALICE}".encode())
    assert a.authenticate(open_path) is None and open_path["query_string"] == b""


def test_without_a_key_401_with_the_bare_challenge(tmp_path):
    a = authenticator(tmp_path)
    with pytest.raises(Unauthorized) as e:
        a.authenticate(scope())
    assert e.value.status == 401 and e.value.code == "unauthorized"
    assert e.value.headers() == {"WWW-Authenticate": 'Bearer realm="carousel"'}
    assert "Authorization: Bearer KEY" in e.value.message
    with pytest.raises(Unauthorized, match=r"subprotocol carousel\.key\.KEY.*api_key"):
        a.authenticate(scope("/v1/sessions/s/ws", kind="websocket"))


@pytest.mark.parametrize("headers", [
    bearer("not-a-key-of-anyone-at-all"), bearer(ALICE + "x"), bearer(ALICE.upper()),
    [("x-api-key", BOB)],
])
def test_a_wrong_key_is_401_invalid_token(tmp_path, headers):
    with pytest.raises(Unauthorized) as e:
        authenticator(tmp_path).authenticate(scope(headers=headers))
    assert e.value.headers()["WWW-Authenticate"] == \
        'Bearer realm="carousel", error="invalid_token"'
    assert ALICE not in e.value.message and BOB not in e.value.message


@pytest.mark.parametrize("value", [f"Basic {ALICE}", "Bearer", "Bearer  ", ALICE])
def test_an_authorization_header_that_is_not_bearer_is_refused(tmp_path, value):
    a = authenticator(tmp_path)
    with pytest.raises(Unauthorized, match="Authorization: Bearer KEY"):
        a.authenticate(scope(headers=[("Authorization", value), ("X-API-Key", ALICE)]))
    assert a.authenticate(scope("/healthz", headers=[("Authorization", value)])) is None


def test_metrics_need_an_admin_key(tmp_path):
    a = authenticator(tmp_path)
    with pytest.raises(Forbidden) as e:
        a.authenticate(scope("/metrics", headers=bearer(ALICE)))
    assert e.value.status == 403
    with pytest.raises(Unauthorized):
        a.authenticate(scope("/metrics"))
    assert a.authenticate(scope("/metrics", headers=bearer(OPS))).name == "ops"


def test_every_digest_is_compared_whichever_matches(tmp_path, monkeypatch):
    a = authenticator(tmp_path, api_keys=",".join(f"t{i}:{'k' * 16}{i:04d}" for i in range(20)))
    calls, real = [], hmac.compare_digest

    def compare(x, y):
        calls.append(1)
        return real(x, y)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    for key in (ALICE, f"{'k' * 16}0019", "nobody-has-this-key-at-all"):
        calls.clear()
        a.ring.tenant(auth.digest(key))
        assert len(calls) == len(a.ring) == 23


def test_each_request_spends_one_from_the_tenants_bucket(tmp_path):
    clock = Clock()
    a = authenticator(tmp_path, clock=clock)
    for _ in range(3):  # the burst
        a.authenticate(scope(headers=bearer(ALICE)))
    with pytest.raises(RateLimited) as e:
        a.authenticate(scope(headers=bearer(ALICE_NEW)))  # the same tenant, another key
    assert e.value.status == 429 and e.value.code == "rate_limited"
    assert e.value.retry_after == pytest.approx(0.5)
    assert e.value.headers() == {"Retry-After": "1"}
    assert a.authenticate(scope(headers=bearer(OPS))).name == "ops"  # others unaffected
    clock.now += 0.5
    a.authenticate(scope(headers=bearer(ALICE)))


def test_tokens_are_spent_and_given_back(tmp_path):
    clock = Clock()
    alice = authenticator(tmp_path, clock=clock).ring.tenants["alice"]
    assert alice.take_tokens(60) == 60
    with pytest.raises(RateLimited, match="100 tokens/s; 50 tokens") as e:
        alice.take_tokens(50)
    assert e.value.retry_after == pytest.approx(0.1)
    alice.give_tokens(60)
    assert alice.take_tokens(100) == 100


# ------------------------------------------------------------------- reloads


def test_a_reload_adds_and_revokes_keys_and_keeps_the_buckets(tmp_path):
    clock = Clock()
    a = authenticator(tmp_path, clock=clock)
    for _ in range(3):
        a.authenticate(scope(headers=bearer(ALICE)))
    keys_file(tmp_path, f"""
[tenants.alice]
sha256 = ["{sha(ALICE_NEW)}"]
requests_per_s = 2
burst_requests = 3

[tenants.bob]
sha256 = ["{sha(BOB)}"]
""")
    assert a.reload()
    with pytest.raises(Unauthorized):
        a.authenticate(scope(headers=bearer(ALICE)))  # revoked
    with pytest.raises(RateLimited):
        a.authenticate(scope(headers=bearer(ALICE_NEW)))  # still the same empty bucket
    assert a.authenticate(scope(headers=bearer(BOB))).name == "bob"
    with pytest.raises(Unauthorized):
        a.authenticate(scope(headers=bearer(OPS)))  # a tenant removed


def test_an_open_websocket_is_checked_again_after_a_reload(tmp_path):
    a = authenticator(tmp_path)
    ws = scope("/v1/sessions/s/ws", kind="websocket", headers=bearer(OPS))
    a.authenticate(ws)
    assert a.current(ws).name == "ops"
    keys_file(tmp_path, FILE.replace("[tenants.ops]", "[tenants.ops]\nmax_sessions = 2"))
    assert a.reload()
    assert a.current(ws).limits.max_sessions == 2  # the reloaded tenant
    keys_file(tmp_path, f'[tenants.alice]\nsha256 = ["{sha(ALICE)}"]\n')
    assert a.reload()
    with pytest.raises(Unauthorized, match="revoked"):
        a.current(ws)


def test_a_broken_file_on_reload_keeps_the_keys_and_says_why(tmp_path, caplog):
    a = authenticator(tmp_path)
    keys_file(tmp_path, FILE + "\n[tenants.bob\n")
    with caplog.at_level(logging.WARNING, logger="carousel.service"):
        assert not a.reload()
    assert "keys file not reloaded" in caplog.text and "not valid TOML" in caplog.text
    assert a.authenticate(scope(headers=bearer(ALICE))).name == "alice"
    (tmp_path / "keys.toml").unlink()
    assert not a.reload()
    assert a.authenticate(scope(headers=bearer(OPS))).name == "ops"


def test_reload_without_a_keys_file_changes_nothing(caplog):
    a = Authenticator(Settings(api_keys=f"alice:{ALICE}"))
    with caplog.at_level(logging.INFO, logger="carousel.service"):
        assert not a.reload()
    assert "no keys file" in caplog.text
    assert a.authenticate(scope(headers=bearer(ALICE))).name == "alice"


# ------------------------------------------------------------------- websockets, start-up


def test_the_subprotocol_accepted_is_never_the_key():
    offered = scope(kind="websocket", subprotocols=["carousel", f"carousel.key.{ALICE}"])
    assert auth.accepted_subprotocol(offered) == "carousel"
    assert auth.accepted_subprotocol(scope(kind="websocket",
                                           subprotocols=[f"carousel.key.{ALICE}"])) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "192.168.1.2", "example.com",
                                  "[::]", ""])
def test_a_non_loopback_address_without_keys_is_refused(host):
    reason = refusal(Settings(host=host))
    assert reason is not None
    assert "CAROUSEL_API_KEYS_FILE" in reason and "CAROUSEL_API_KEYS=" in reason
    assert "CAROUSEL_ALLOW_UNAUTHENTICATED=true" in reason


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_keys(host):
    assert refusal(Settings(host=host)) is None


def test_keys_or_the_explicit_opt_out_allow_any_address(tmp_path):
    assert refusal(Settings(host="0.0.0.0", api_keys=f"alice:{ALICE}")) is None
    assert refusal(Settings(host="0.0.0.0", api_keys_file=tmp_path / "k.toml")) is None
    assert refusal(Settings(host="0.0.0.0", allow_unauthenticated=True)) is None
    assert refusal(Settings(host="0.0.0.0", api_keys="  ")) is not None


@pytest.mark.parametrize("message, args, kept", [
    ("< %s: %s", ("Authorization", f"Bearer {ALICE}"), "< Authorization: [redacted]"),
    ("< %s: %s", ("x-api-key", ALICE), "< x-api-key: [redacted]"),
    ("< %s: %s", ("Sec-WebSocket-Protocol", f"carousel, carousel.key.{ALICE}"),
     "< Sec-WebSocket-Protocol: carousel, carousel.key.[redacted]"),
    ("< GET %s HTTP/1.1", (f"/v1/sessions/s/ws?x=1&api_key={ALICE}&y=2",),
     "< GET /v1/sessions/s/ws?x=1&api_key=[redacted]&y=2 HTTP/1.1"),
    ('%s - "GET %s" %d', ("127.0.0.1:5", "/v1/models", 200), '127.0.0.1:5 - "GET /v1/models" 200'),
])
def test_the_log_redactor_removes_keys_from_any_record(message, args, kept):
    record = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1, message, args, None)
    assert auth.KeyRedactor().filter(record) is True
    assert record.getMessage() == kept and ALICE not in record.getMessage()
