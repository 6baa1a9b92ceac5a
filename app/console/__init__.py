"""The edit console: a static page at /console/ that calls the API with the key its user types.

The page holds no privileges of its own: every request it makes carries the user's key (or none),
so the API's scopes decide what it may do, exactly as for curl.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# The page renders text that API users submitted and keeps an API key in the tab: only our own
# scripts may run, it talks only to this origin, and no other site may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/console")
def console_redirect() -> RedirectResponse:
    # relative, so that it also works behind a proxy that serves the API under a path prefix
    return RedirectResponse("console/", status_code=308)


@router.get("/console/")
def console_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def install_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/console/assets", StaticFiles(directory=STATIC / "assets"), name="console-assets")
