"""The playground: a page served by carousel itself at /playground (and / redirects there).

Static HTML, CSS and JavaScript from `static/` (package data), no build step and nothing
loaded from anywhere else, so it works offline. The page speaks only the public v1 API
(models, sessions, step, generate, fork, delete), like any other client.

Every file goes out with a strict Content-Security-Policy: scripts, styles, images and
requests from this origin only, no inline script or style (the page has none: all of its
behaviour is in app.js), no frames, no plugins, no form posts, no <base> tricks.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from starlette.routing import Route

from .errors import NotFound

STATIC = files(__package__) / "static"

def security_headers(img_src: str = "'self'") -> dict[str, str]:
    """The headers every page and page asset goes out with (docs.py widens `img_src`)."""
    csp = "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src {img_src}",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",  # revalidate: a new release's page is seen at once
    }


SECURITY_HEADERS = security_headers()

# The only files served (by name: no path from a request ever reaches the file system).
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.ico": "image/x-icon",
}


def static_file(name: str) -> Response:
    if name not in FILES:
        raise NotFound(f"no playground file {name!r}")
    return Response((STATIC / name).read_bytes(), media_type=FILES[name],
                    headers=SECURITY_HEADERS)


async def root(request: Request) -> Response:
    return RedirectResponse("/playground", status_code=307, headers=SECURITY_HEADERS)


async def page(request: Request) -> Response:
    return static_file("index.html")


async def asset(request: Request) -> Response:
    return static_file(request.path_params["name"])


async def favicon(request: Request) -> Response:
    return static_file("favicon.ico")


ROUTES = [
    Route("/", root, methods=["GET"]),
    Route("/playground", page, methods=["GET"]),
    Route("/playground/{name}", asset, methods=["GET"]),
    Route("/favicon.ico", favicon, methods=["GET"]),
]
