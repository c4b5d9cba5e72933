"""Which requests may reach the API at all: the Host they name and the page they come from.

Two attacks come through a user's own browser, not from a client of the API:

- **Cross-site requests.** Any web page can make the browser send a "simple" request (a POST
  with `Content-Type: text/plain`, no preflight) to any address, the user's loopback
  included. The browser says which page sent it in `Origin`; a request whose Origin is not
  this server's own (the playground, the docs) nor listed in `cors_origins` is refused with
  403 `origin_not_allowed` before anything runs. Clients that are not browsers send no Origin
  and are not affected. JSON routes also refuse bodies that are not `application/json`
  (415), so a form or a text/plain post cannot be read as JSON even where Origin is absent.
- **DNS rebinding.** A page on evil.example whose name is re-pointed at 127.0.0.1 is, to the
  browser, same-origin with the server: Origin and Host are both evil.example. Only the Host
  header tells them apart, so it must name this server: `allowed_hosts`, by default the
  loopback names when the server listens on a loopback address (any host otherwise, where a
  load balancer in front names the service; set it there too).

`RequestGuard.refusal(host, origin)` is called by the request middleware for every HTTP
request and WebSocket handshake, with the raw header bytes: it is on the hot path, so the
common cases (an allowed host seen before, no Origin) cost one dict lookup.

CORS itself (the response headers a browser needs to let a listed origin read answers, and
preflights) is Starlette's CORSMiddleware, installed only when `cors_origins` lists origins.
"""

from __future__ import annotations

import ipaddress

from .errors import HostNotAllowed, OriginNotAllowed, ServiceError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CACHE_LIMIT = 256  # allowed Host values remembered (only allowed ones: a bounded set)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as exposed


def host_name(value: str) -> str:
    """The name in a Host header value, without its port: `[::1]:8000` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1: value.find("]")] if "]" in value else value
    name, colon, port = value.rpartition(":")
    return name if colon and port.isascii() and port.isdigit() else value


class RequestGuard:
    def __init__(self, allowed_hosts: list[str], cors_origins: list[str], listen_host: str):
        hosts = allowed_hosts or (list(LOOPBACK_NAMES) if is_loopback(listen_host) else ["*"])
        self.any_host = "*" in hosts
        self.hosts = {h.lower().strip("[]") for h in hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:].lower() for h in hosts if h.startswith("*."))  # ".x.com"
        self.any_origin = "*" in cors_origins
        self.origins = {o.lower().encode() for o in cors_origins}
        self._seen: dict[bytes, bool] = {}

    def host_allowed(self, host: bytes | None) -> bool:
        if self.any_host:
            return True
        if host is None:
            return False  # HTTP/1.0 without Host: nothing to check it against
        if host in self._seen:
            return True
        name = host_name(host.decode("latin-1"))
        ok = name in self.hosts or any(name.endswith(s) for s in self.suffixes)
        if ok and len(self._seen) < CACHE_LIMIT:
            self._seen[host] = True
        return ok

    def origin_allowed(self, origin: bytes, host: bytes | None) -> bool:
        if self.any_origin:
            return True
        origin = origin.lower()
        if origin in self.origins:
            return True
        # Same-origin: the page was served by this server under the name the request uses
        # (the Host was checked first, so a rebound name never gets here).
        scheme, sep, authority = origin.partition(b"://")
        return bool(sep) and host is not None and authority == host.lower()

    def refusal(self, host: bytes | None, origin: bytes | None) -> ServiceError | None:
        """Why this request may not be served, or None."""
        if not self.host_allowed(host):
            shown = "none" if host is None else repr(host.decode("latin-1")[:100])
            return HostNotAllowed(
                f"Host {shown} is not served here; set CAROUSEL_ALLOWED_HOSTS to the names "
                "clients use to reach this server")
        if origin is not None and not self.origin_allowed(origin, host):
            return OriginNotAllowed(
                f"requests from pages at {origin.decode('latin-1')[:100]!r} are not allowed; "
                "list the origin in CAROUSEL_CORS_ORIGINS to let its pages call the API")
        return None
