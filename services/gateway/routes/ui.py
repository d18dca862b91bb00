"""The web UI: the board at `/`, a task's page at `/tasks/{task_id}`, its assets under `/static/`.

Both pages are the same `index.html`; `app.js` routes on `location.pathname`. Nothing here is
under `/api` or `/docs`, so the API and its OpenAPI pages are never shadowed.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent.parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Revalidate on every load: a new install's UI is seen at once (ETag/Last-Modified keep it cheap).
_HEADERS = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def _page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_HEADERS)


@router.get("/")
def board_page() -> FileResponse:
    return _page()


@router.get("/tasks/{task_id}")
def task_page(task_id: str) -> FileResponse:
    return _page()


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    path = (STATIC / name).resolve()
    if path.parent != STATIC or path.suffix not in _MEDIA_TYPES or not path.is_file():
        raise HTTPException(404, f"no file {name!r}")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_HEADERS)
