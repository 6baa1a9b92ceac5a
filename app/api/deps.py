"""Dependencies shared by the routers: the runtime, readiness, API-key scopes and rate limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from ..runtime import Runtime
from ..security import retry_after


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def ready_runtime(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Runtime:
    """The runtime, once the model is loaded and the memory rebuilt; 503 before and at shutdown."""
    if runtime.shutting_down:
        raise HTTPException(status_code=503, detail="the server is shutting down", headers={"Retry-After": "10"})
    if not runtime.ready:
        detail = runtime.startup_error or "the model is loading and the memory is being rebuilt; retry shortly"
        raise HTTPException(status_code=503, detail=detail, headers={"Retry-After": "5"})
    return runtime


@dataclass(frozen=True)
class Principal:
    key_id: str | None  # None when the server runs without keys
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def require(scope: str):
    """Dependency: a caller allowed `scope` (401 without a known key, 403 without the scope, 429
    over the key's rate limit). Without configured keys every caller is allowed."""

    def dependency(request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]) -> Principal:
        store = runtime.keys
        if store.enabled:
            presented = _presented_key(request)
            key = store.authenticate(presented) if presented else None
            if key is None:
                runtime.metrics.auth_failures.labels("401").inc()
                message = "missing API key" if presented is None else "unknown API key"
                raise HTTPException(
                    status_code=401,
                    detail=f"{message}: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            principal = Principal(key.key_id, key.scopes)
            if not principal.allows(scope):
                runtime.metrics.auth_failures.labels("403").inc()
                raise HTTPException(status_code=403, detail=f"API key {key.key_id!r} lacks the {scope!r} scope")
        else:  # no keys: a loopback-only server for trusted local clients, not rate limited
            return Principal(None, frozenset({"admin"}))
        wait = runtime.rate_limiter.take(key.key_id)
        if wait > 0:
            runtime.metrics.rate_limited.inc()
            raise HTTPException(
                status_code=429,
                detail=f"rate limit of {runtime.settings.rate_limit_per_minute} requests per minute exceeded",
                headers={"Retry-After": retry_after(wait)},
            )
        return principal

    return dependency


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ReadyRuntime = Annotated[Runtime, Depends(ready_runtime)]
GenerateCaller = Annotated[Principal, Depends(require("generate"))]
EditCaller = Annotated[Principal, Depends(require("edit"))]
AdminCaller = Annotated[Principal, Depends(require("admin"))]
