"""/docs: the OpenAPI document (/openapi.json) in Swagger UI, served by carousel itself.

FastAPI's own /docs and /redoc load their scripts and styles from a CDN, so on an offline
deployment they are blank pages; both are off (app.py), and this page takes /docs' place.
Swagger UI's files come from the `swagger-ui-bundle-v2` package (Swagger UI 5, which reads
OpenAPI 3.1 as FastAPI writes it; Apache-2.0, like Swagger UI), read once and served from
memory; the page and its initialiser are package data (static/docs.html, static/docs.js).

Everything goes out with the playground's security headers, the Content-Security-Policy
widened only as Swagger UI needs: its stylesheet draws its icons as `data:` images.
"""

from __future__ import annotations

from functools import cache

from fastapi import Request, Response
from starlette.routing import Route
from swagger_ui_bundle import swagger_ui_path

from .errors import NotFound
from .playground import STATIC, security_headers

HEADERS = security_headers(img_src="'self' data:")

# The only files served, by name (no path from a request reaches the file system).
BUNDLED = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
OWN = {"docs.js": "text/javascript; charset=utf-8"}


@cache
def _read(name: str) -> bytes:
    folder = swagger_ui_path if name in BUNDLED else STATIC
    return (folder / name).read_bytes()


async def page(request: Request) -> Response:
    return Response(_read("docs.html"), media_type="text/html; charset=utf-8",
                    headers=HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    media = BUNDLED.get(name) or OWN.get(name)
    if media is None:
        raise NotFound(f"no docs file {name!r}")
    return Response(_read(name), media_type=media, headers=HEADERS)


ROUTES = [
    Route("/docs", page, methods=["GET"]),
    Route("/docs/{name}", asset, methods=["GET"]),
]
