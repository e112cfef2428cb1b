"""The dashboard: a static page and script (api/static/) and plotly.js from the installed package."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")


def plotly_js() -> Path:
    """plotly.min.js shipped inside the `plotly` Python package (a dependency, never vendored here)."""
    return Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))


def mount(app: FastAPI) -> None:
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
