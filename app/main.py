"""The FastAPI application."""

from __future__ import annotations

from contextlib import asynccontextmanager
import logging

from fastapi import FastAPI

from .api.routes import edits, explain, generate, system
from .config import Settings
from .console import install_console
from .middleware import BodySizeLimit
from .api.errors import install_database_handler
from .openai.router import install_error_handlers
from .openai.router import router as openai_router
from .runtime import Runtime


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime = app.state.runtime = Runtime(settings)
        try:
            runtime.migrate()  # before serving: the schema must match the code
        except Exception as error:
            runtime.startup_error = f"database migrations failed: {type(error).__name__}: {error}"
            raise
        runtime.start()  # model loading and rebuild run in the background; /ready tells
        try:
            yield
        finally:
            runtime.stop()

    app = FastAPI(
        title="MEMOIR server",
        version="0.1.0",
        description="Lifelong model editing (MEMOIR): ordered fact corrections and generation with "
        "conditional knowledge activation.",
        lifespan=lifespan,
    )
    app.include_router(system.router)
    app.include_router(edits.router)
    app.include_router(generate.router)
    app.include_router(explain.router)
    app.include_router(openai_router)
    if settings.console:
        install_console(app)
    install_error_handlers(app)
    install_database_handler(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
