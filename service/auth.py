"""API keys and tenants: who sent a request, what it may reach, and what it may spend.

With no keys configured carousel is open, as it always was (and refuses to start on a
non-loopback address unless told it may: `refusal`). With keys, every request to /v1, /v2
and /openai must carry one, and the key names its **tenant**: sessions and v2 sequences
belong to the tenant that made them (sessions.py checks), and the tenant's limits apply.

Where keys come from:
- `CAROUSEL_API_KEYS`, for development: `tenant:KEY` pairs, comma-separated, `tenant:KEY:admin`
  for an admin key. The keys themselves are in the environment, so this is for a laptop.
- `CAROUSEL_API_KEYS_FILE`, for deployments: a TOML file holding no key, only the SHA-256 of
  each (several per tenant, so a key can be rotated without a gap), with the tenant's admin
  mark and limits; re-read on SIGHUP (`Authenticator.reload`: a file that does not parse
  leaves the keys as they were, and says so in the log):

      [tenants.alice]
      sha256 = ["<64 hex digits: printf %s KEY | sha256sum>", "<a second key's>"]
      requests_per_s = 50      # 0: no limit; every limit left out is the CAROUSEL_TENANT_* default
      tokens_per_s = 20000     # tokens consumed and generated
      burst_requests = 100     # default: a second's worth
      burst_tokens = 40000
      max_sessions = 1000      # live sessions (v2 sequences included)
      max_generations = 8      # generations running at once

      [tenants.ops]
      sha256 = ["<...>"]
      admin = true             # may read /metrics

A key travels as `Authorization: Bearer KEY` or `X-API-Key: KEY`. A browser cannot set
headers on a WebSocket, so a handshake may also carry it as the subprotocol
`carousel.key.KEY` (the server answers with the subprotocol `carousel`, which the client
must offer too: a browser drops a socket whose server picks none of its offers) or as
`?api_key=KEY`, which is the worst of the four: URLs end up in proxies' access logs and in
browser history. carousel strips the parameter from the request before anything logs it.

A presented key is hashed, and its SHA-256 compared with every configured digest using
`hmac.compare_digest`, without stopping at a match, so the time taken says nothing about
which digest, or how much of one, matched. Keys are never logged, and never kept: only
their digests are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from .errors import Forbidden, RateLimited, Unauthorized
from .origins import is_loopback
from .ratelimit import TokenBucket

log = logging.getLogger("carousel.service")

TENANT = "carousel.tenant"  # the ASGI scope key of the request's Tenant
CREDENTIAL = "carousel.credential"  # (key digest, keys generation): re-checked by sockets
SUBPROTOCOL = "carousel"  # the subprotocol a WebSocket is accepted with
KEY_SUBPROTOCOL = "carousel.key."  # + KEY: a key offered as a subprotocol
QUERY_KEY = "api_key"
_QUERY_KEY_BYTES = QUERY_KEY.encode()

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # no '~': sequence keys use it
DEV_KEY = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")

OPEN, KEY, ADMIN = "none", "key", "admin"  # what a path needs (metrics_auth, docs_auth)
TENANT_ROUTES = frozenset({"v1", "v2", "openai"})  # first path segments that need a key
DOCS_ROUTES = frozenset({"docs", "redoc", "openapi.json"})


class AuthConfigError(ValueError):
    """Keys or a keys file that cannot be used. The message never quotes a key."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()


# ------------------------------------------------------------------------------ tenants


@dataclass(frozen=True, slots=True)
class Limits:
    """A tenant's limits; 0 means none."""

    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0
    burst_requests: float = 0.0  # 0: a second's worth (requests_per_s)
    burst_tokens: float = 0.0  # 0: a second's worth (tokens_per_s)
    max_sessions: int = 0
    max_generations: int = 0

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(requests_per_s=settings.tenant_requests_per_s,
                   tokens_per_s=settings.tenant_tokens_per_s,
                   max_sessions=settings.tenant_max_sessions,
                   max_generations=settings.tenant_max_generations)


LIMIT_FIELDS = {f.name: f.type for f in fields(Limits)}


def _bucket(old: TokenBucket | None, rate: float, burst: float,
            clock: Callable[[], float]) -> TokenBucket | None:
    if rate <= 0:
        return None
    burst = burst or rate
    if old is None:
        return TokenBucket(rate, burst, clock)
    old.configure(rate, burst)
    return old


class Tenant:
    """Who a key belongs to: its name (the owner of its sessions), whether it is an admin,
    its limits and the buckets that enforce the rates (kept across reloads)."""

    __slots__ = ("name", "admin", "limits", "requests", "tokens")

    def __init__(self, name: str, admin: bool, limits: Limits, *,
                 previous: Tenant | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.admin = admin
        self.limits = limits
        self.requests = _bucket(previous and previous.requests, limits.requests_per_s,
                                limits.burst_requests, clock)
        self.tokens = _bucket(previous and previous.tokens, limits.tokens_per_s,
                              limits.burst_tokens, clock)

    def admit_request(self) -> None:
        """Spend one request (an HTTP request, a WebSocket handshake or frame)."""
        if self.requests is not None and (wait := self.requests.take(1)):
            raise RateLimited(
                f"tenant {self.name!r} is over its limit of {self.limits.requests_per_s:g} "
                f"requests/s; retry in {wait:.2g} s", retry_after=wait)

    def take_tokens(self, n: int) -> int:
        """Spend n tokens before running them; returns what was taken (to give back if the
        work does not run)."""
        if self.tokens is None or n <= 0:
            return 0
        if wait := self.tokens.take(n):
            raise RateLimited(
                f"tenant {self.name!r} is over its limit of {self.limits.tokens_per_s:g} "
                f"tokens/s; {n} tokens fit in {wait:.2g} s", retry_after=wait)
        return n

    def give_tokens(self, n: int) -> None:
        if self.tokens is not None and n > 0:
            self.tokens.give(n)

    def __repr__(self) -> str:
        return f"Tenant({self.name!r}, admin={self.admin})"


class KeyRing:
    """Every valid key's digest with its tenant: one immutable snapshot of the keys."""

    def __init__(self, entries: list[tuple[bytes, Tenant]],
                 tenants: dict[str, Tenant] | None = None) -> None:
        self._entries = tuple(entries)
        self.tenants = tenants if tenants is not None else {t.name: t for _, t in entries}

    def __len__(self) -> int:
        return len(self._entries)

    def tenant(self, key_digest: bytes) -> Tenant | None:
        """The tenant whose key has this digest. Every digest is compared, in constant time,
        whatever matches: the time taken is the same for every key presented. (Linear in
        the number of keys: ~0.2 us each, fine for the tens of keys a server has.)"""
        found = None
        for candidate, tenant in self._entries:
            if hmac.compare_digest(candidate, key_digest):
                found = tenant
        return found


# ------------------------------------------------------------------------ configuration


@dataclass
class TenantSpec:
    """A tenant as configured: its key digests, admin mark and the limits it sets."""

    digests: set[bytes]
    admin: bool = False
    limits: dict | None = None  # the fields of Limits it sets


def parse_api_keys(text: str) -> dict[str, TenantSpec]:
    """`tenant:KEY[:admin]` pairs, comma-separated (CAROUSEL_API_KEYS)."""
    specs: dict[str, TenantSpec] = {}
    for i, item in enumerate(text.split(",")):
        item = item.strip()
        if not item:
            continue
        name, _, rest = item.partition(":")
        key, _, mark = rest.partition(":")
        where = f"CAROUSEL_API_KEYS entry {i + 1}"
        if not TENANT_NAME.fullmatch(name):
            raise AuthConfigError(f"{where}: the tenant name must be 1-64 letters, digits, "
                                  "'_', '.' or '-' (starting with a letter or digit)")
        if not DEV_KEY.fullmatch(key):
            raise AuthConfigError(
                f"{where} (tenant {name!r}): the key must be at least 16 characters of "
                "letters, digits and ._~+/=- (make one: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')")
        if mark not in ("", "admin"):
            raise AuthConfigError(f"{where} (tenant {name!r}): after the key, only ':admin'")
        spec = specs.setdefault(name, TenantSpec(set()))
        spec.digests.add(digest(key))
        spec.admin = spec.admin or mark == "admin"
    return specs


def parse_keys_file(path: Path) -> dict[str, TenantSpec]:
    """The keys file (TOML; see the module docstring)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise AuthConfigError(f"keys file {path}: cannot read it ({e.__class__.__name__}: "
                              f"{getattr(e, 'strerror', None) or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise AuthConfigError(f"keys file {path}: not valid TOML ({e})") from None
    unknown = set(raw) - {"tenants"}
    if unknown:
        raise AuthConfigError(f"keys file {path}: unknown top-level {sorted(unknown)}; "
                              "tenants go in [tenants.NAME] tables")
    tenants = raw.get("tenants", {})
    if not isinstance(tenants, dict):
        raise AuthConfigError(f"keys file {path}: 'tenants' must be a table of tenants")
    specs: dict[str, TenantSpec] = {}
    tenant_of_digest: dict[bytes, str] = {}
    for name, entry in tenants.items():
        where = f"keys file {path}: tenant {name!r}"
        if not TENANT_NAME.fullmatch(name):
            raise AuthConfigError(f"{where}: a tenant name is 1-64 letters, digits, '_', '.' "
                                  "or '-' (starting with a letter or digit)")
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{where}: must be a table ([tenants.{name}])")
        unknown = set(entry) - {"sha256", "admin", *LIMIT_FIELDS}
        if unknown:
            raise AuthConfigError(f"{where}: unknown fields {sorted(unknown)}; known: sha256, "
                                  f"admin, {', '.join(LIMIT_FIELDS)}")
        hashes = entry.get("sha256", [])
        if not isinstance(hashes, list):
            raise AuthConfigError(f"{where}: sha256 must be a list of hex digests")
        spec = TenantSpec(set(), limits={})
        for j, value in enumerate(hashes):
            if not (isinstance(value, str) and SHA256_HEX.fullmatch(value)):
                raise AuthConfigError(f"{where}: sha256[{j}] is not a SHA-256 hex digest "
                                      "(64 hex digits: printf %s KEY | sha256sum)")
            d = bytes.fromhex(value)
            if tenant_of_digest.setdefault(d, name) != name:
                raise AuthConfigError(f"{where}: sha256[{j}] is also a key of tenant "
                                      f"{tenant_of_digest[d]!r}; a key belongs to one tenant")
            spec.digests.add(d)
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise AuthConfigError(f"{where}: admin must be true or false")
        spec.admin = admin
        for field, kind in LIMIT_FIELDS.items():
            if field not in entry:
                continue
            value = entry[field]
            integral = kind == "int"
            if isinstance(value, bool) or not isinstance(value, int if integral else int | float) \
                    or value < 0:
                raise AuthConfigError(f"{where}: {field} must be a number >= 0"
                                      + (" (a whole number)" if integral else ""))
            spec.limits[field] = value
        specs[name] = spec
    return specs


# ------------------------------------------------------------------------ authenticator


class Authenticator:
    """The keys in force and the rules that use them, one per service.

    `enabled` is fixed at start (keys configured or not); a reload changes which keys and
    tenants there are, never whether keys are needed."""

    def __init__(self, settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        api_keys = settings.api_keys.get_secret_value() if settings.api_keys else ""
        self.keys_file: Path | None = settings.api_keys_file
        self.enabled = bool(api_keys.strip()) or self.keys_file is not None
        self.metrics_access = settings.metrics_auth
        self.docs_access = settings.docs_auth
        self._env = parse_api_keys(api_keys)  # raises AuthConfigError
        self._defaults = Limits.from_settings(settings)
        self._clock = clock
        self.generation = 0  # bumped each time keys are installed (start, every reload)
        self.ring = KeyRing([])
        if self.enabled:
            self._install(self._read())  # raises AuthConfigError: the server does not start

    # -------------------------------------------------------------- loading

    def _read(self) -> dict[str, TenantSpec]:
        specs = {name: TenantSpec(set(s.digests), s.admin, {}) for name, s in self._env.items()}
        if self.keys_file is None:
            return specs
        for name, spec in parse_keys_file(self.keys_file).items():
            for other, known in specs.items():
                if other != name and known.digests & spec.digests:
                    raise AuthConfigError(
                        f"keys file {self.keys_file}: a key of tenant {name!r} is also "
                        f"tenant {other!r}'s in CAROUSEL_API_KEYS; a key belongs to one tenant")
            merged = specs.setdefault(name, TenantSpec(set(), limits={}))
            merged.digests |= spec.digests
            merged.admin = merged.admin or spec.admin
            merged.limits = spec.limits
        return specs

    def _install(self, specs: dict[str, TenantSpec]) -> None:
        current = self.ring.tenants
        tenants, entries = {}, []
        for name, spec in specs.items():
            tenant = tenants[name] = Tenant(
                name, spec.admin, replace(self._defaults, **(spec.limits or {})),
                previous=current.get(name), clock=self._clock)
            entries += [(d, tenant) for d in sorted(spec.digests)]
        self.ring = KeyRing(entries, tenants)  # a tenant without keys keeps its buckets too
        self.generation += 1
        log.info("API keys: %d tenants, %d keys%s", len(specs), len(entries),
                 f" (keys file {self.keys_file})" if self.keys_file else "")

    def reload(self) -> bool:
        """Re-read the keys file (SIGHUP). A file that cannot be used keeps the keys in force
        and logs why; sessions are never touched. True if new keys are in force."""
        if self.keys_file is None:
            log.info("SIGHUP: no keys file to reload (CAROUSEL_API_KEYS_FILE is not set)")
            return False
        try:
            specs = self._read()
        except AuthConfigError as e:
            log.warning("keys file not reloaded, the previous keys stay in force: %s", e)
            return False
        self._install(specs)
        return True

    # -------------------------------------------------------------- requests

    def access(self, path: str) -> str:
        """What a path needs: OPEN, KEY (any tenant's) or ADMIN."""
        first = path.split("/", 2)[1] if path.startswith("/") else ""
        if first in TENANT_ROUTES:
            return KEY
        if first == "metrics":
            return self.metrics_access
        if first in DOCS_ROUTES:
            return self.docs_access
        return OPEN  # /healthz, /readyz, the playground page (its calls carry the key)

    def authenticate(self, scope: dict) -> Tenant | None:
        """The tenant of a request (HTTP, or a WebSocket handshake), put in the scope, and one
        request spent from its bucket; None for a path that needs no key. Raises
        Unauthorized, Forbidden (an admin path, a key without the mark) or RateLimited."""
        if not self.enabled:
            return None
        from_query = strip_query_key(scope)  # first: uvicorn logs the scope's query string
        access = self.access(scope["path"])
        if access == OPEN:
            return None
        key = presented_key(scope, from_query)
        if key is None:
            how = "Authorization: Bearer KEY (or X-API-Key: KEY)"
            if scope["type"] == "websocket":
                how += f", the subprotocol {KEY_SUBPROTOCOL}KEY (with {SUBPROTOCOL}), or " \
                       f"?{QUERY_KEY}=KEY"
            raise Unauthorized(f"this server needs an API key: send {how}")
        key_digest = digest(key)
        tenant = self.ring.tenant(key_digest)
        if tenant is None:
            raise Unauthorized("the API key is not valid: it is mistyped, revoked, or for "
                               "another server", invalid_token=True)
        if access == ADMIN and not tenant.admin:
            raise Forbidden(f"{scope['path']} needs an admin key (admin = true in the keys "
                            "file, or tenant:KEY:admin in CAROUSEL_API_KEYS)")
        scope[TENANT] = tenant
        scope[CREDENTIAL] = (key_digest, self.generation)
        tenant.admit_request()
        return tenant

    def current(self, scope: dict) -> Tenant | None:
        """The tenant of an open WebSocket, for its next frame: the handshake's, looked up
        again after a reload, so a revoked key's socket stops (Unauthorized)."""
        if not self.enabled:
            return None
        key_digest, generation = scope[CREDENTIAL]
        if generation == self.generation:
            return scope[TENANT]
        tenant = self.ring.tenant(key_digest)
        if tenant is None:
            raise Unauthorized("the API key of this WebSocket was revoked", invalid_token=True)
        scope[TENANT] = tenant
        scope[CREDENTIAL] = (key_digest, self.generation)
        return tenant


def tenant_of(scope: dict) -> Tenant | None:
    """The request's tenant (None when the server has no keys)."""
    return scope.get(TENANT)


def strip_query_key(scope: dict) -> str | None:
    """Remove `?api_key=` from the scope's query string (whatever the request: uvicorn's log
    lines print it), returning its value."""
    query = scope.get("query_string", b"")
    if not query or _QUERY_KEY_BYTES not in query:
        return None
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != QUERY_KEY]).encode()
    return next((v for k, v in pairs if k == QUERY_KEY), None)


def presented_key(scope: dict, from_query: str | None = None) -> str | None:
    """The key a request carries, if any: a header, or for a WebSocket handshake also the
    key's subprotocol or the query parameter (`from_query`, see strip_query_key)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("send the API key as Authorization: Bearer KEY")
            return token.strip()
        if name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    if scope["type"] != "websocket":
        return None
    for protocol in scope.get("subprotocols", ()):
        if protocol.startswith(KEY_SUBPROTOCOL) and len(protocol) > len(KEY_SUBPROTOCOL):
            return protocol[len(KEY_SUBPROTOCOL):]
    return from_query or None


def accepted_subprotocol(scope: dict) -> str | None:
    """The subprotocol to accept a WebSocket with: `carousel` when the client offered it
    (never the key's subprotocol: the answer would carry the key back)."""
    return SUBPROTOCOL if SUBPROTOCOL in scope.get("subprotocols", ()) else None


# ------------------------------------------------------------------------------ logging


class KeyRedactor(logging.Filter):
    """Keeps keys out of every log line, whoever writes it. carousel logs none, and strips
    `?api_key=` before uvicorn's lines print the path; but at debug level the websockets
    library logs each handshake's request line and headers (Authorization, X-API-Key, the
    key's subprotocol) before carousel sees the request. Installed on the log handlers by
    server.py when keys are configured."""

    PATTERNS = (
        (re.compile(r"(?i)\b(authorization|x-api-key)(\s*:\s*)[^\r\n]*"), r"\1\2[redacted]"),
        (re.compile(re.escape(KEY_SUBPROTOCOL) + r"[^\s,;'\"]+"), KEY_SUBPROTOCOL + "[redacted]"),
        (re.compile(r"(?i)\b" + QUERY_KEY + r"=[^&\s'\"]*"), QUERY_KEY + "=[redacted]"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern, replacement in self.PATTERNS:
            redacted = pattern.sub(replacement, redacted)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


# ------------------------------------------------------------------------------ start-up


def refusal(settings) -> str | None:
    """Why `carousel serve` must not start, or None: a non-loopback address, no keys, and
    no explicit opt-out. The message names both ways out."""
    keys = bool(settings.api_keys and settings.api_keys.get_secret_value().strip())
    if keys or settings.api_keys_file is not None or settings.allow_unauthenticated:
        return None
    if is_loopback(settings.host):
        return None
    return (
        f"refusing to serve on {settings.host}, a non-loopback address, without API keys: "
        "anyone who reaches the port could read, step and delete every session.\n"
        "Either configure keys: CAROUSEL_API_KEYS_FILE=/path/keys.toml (tenants and the "
        "SHA-256 of their keys; see docs/SECURITY.md), or CAROUSEL_API_KEYS=tenant:KEY for "
        "development;\n"
        "or opt out explicitly, if something in front of carousel authenticates every "
        "request: CAROUSEL_ALLOW_UNAUTHENTICATED=true (--allow-unauthenticated)."
    )
