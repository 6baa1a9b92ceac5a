"""A database that cannot be reached answers 503 with Retry-After, never 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..db.session import is_unavailable

log = logging.getLogger(__name__)
RETRY_AFTER_S = "5"


def install_database_handler(app: FastAPI) -> None:
    async def database_unavailable(request: Request, error: Exception):
        if not is_unavailable(error):
            raise error  # a failing query is a bug: the usual 500
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path, str(error).splitlines()[0])
        detail = "the database is unavailable; retry shortly (with the same Idempotency-Key for POST /edits)"
        if request.url.path.startswith("/v1"):
            body = {"error": {"message": detail, "type": "server_error", "param": None, "code": "database_unavailable"}}
        else:
            body = {"detail": detail}
        return JSONResponse(status_code=503, content=body, headers={"Retry-After": RETRY_AFTER_S})

    app.add_exception_handler(DBAPIError, database_unavailable)
    app.add_exception_handler(PoolTimeout, database_unavailable)
