"""Container health probe: exit 0 when carousel answers GET /healthz with 200, else 1.

The slim runtime image has neither curl nor wget, so the probe is Python's standard library.
It reads the address the service itself was given (CAROUSEL_HOST / CAROUSEL_PORT), so a
changed port keeps the probe right. Used by the Dockerfile's HEALTHCHECK and by compose.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

# A wildcard bind address is not somewhere to connect to; its loopback twin is.
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
TIMEOUT_S = 3.0  # below the HEALTHCHECK's own --timeout, so the probe reports, not docker


def healthz_url(environ: dict[str, str]) -> str:
    host = environ.get("CAROUSEL_HOST", "127.0.0.1")
    host = WILDCARDS.get(host, host)
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{environ.get('CAROUSEL_PORT', '8000')}/healthz"


def main() -> int:
    url = healthz_url(dict(os.environ))
    # No proxies: an HTTP(S)_PROXY in the container's environment must not route a
    # loopback probe elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as r:
            if r.status == 200:
                return 0
            print(f"unhealthy: {url} answered {r.status}", file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
