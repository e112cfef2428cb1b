"""The dashboard: a static page and script (api/static/) and plotly.js from the installed package.

Every response of the app, API and dashboard alike, carries `SECURITY_HEADERS`: a content security
policy that runs only scripts served from here (no inline script, no eval, no other origin), never
lets the page be framed, and `nosniff`. plotly.js writes its own <style> elements, hence the only
allowance, `style-src 'unsafe-inline'`; the page's own code sets every server-given text (job names,
log lines, reasons) with `textContent`, never as markup.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).with_name("static")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every HTTP response (a plain ASGI middleware: streams pass through
    untouched). FastAPI's own /docs and /redoc pages load Swagger UI from a CDN with an inline script,
    so they keep every header but the content security policy."""

    def __init__(self, app: ASGIApp, exempt_from_csp: tuple[str, ...] = ()) -> None:
        self.app = app
        self.exempt = exempt_from_csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exempt = scope["path"] in self.exempt

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if not (exempt and name == "Content-Security-Policy"):
                        headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def plotly_js() -> Path:
    """plotly.min.js shipped inside the `plotly` Python package (a dependency, never vendored here)."""
    return Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))


def mount(app: FastAPI) -> None:
    docs = (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    app.add_middleware(SecurityHeaders, exempt_from_csp=tuple(p for p in docs if p))

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    def plotly() -> FileResponse:
        path = plotly_js()
        if not path.is_file():
            raise HTTPException(404, "plotly.min.js not found in the installed plotly package")
        return FileResponse(path, media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
