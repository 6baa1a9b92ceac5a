"""python -m app: serve one model with one uvicorn worker (the memory lives in this process).

SIGTERM (docker stop, Ctrl-C): /ready turns 503, new edits are refused, open streams are closed;
then the edit being trained finishes, a checkpoint is written, and the process exits.

A fatal start-up error (a model that cannot be loaded or served, a database that stays away or
has an incompatible schema) ends the process with exit code 1 and the reason on stderr, so that a
supervisor (`restart: unless-stopped`, systemd) sees it instead of a server that is never ready.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from .config import Settings
from .main import configure_logging, create_app
from .security import KeyConfigError, load_keys


class _Server(uvicorn.Server):
    @property
    def runtime(self):
        return getattr(self.config.app.state, "runtime", None)

    def handle_exit(self, sig, frame) -> None:
        if self.runtime is not None:
            self.runtime.begin_shutdown()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        # the model loads in a background thread; its failure must end the process
        if self.runtime is not None and self.runtime.startup_error:
            self.should_exit = True
        return await super().on_tick(counter)


def _fatal(reason: str) -> None:
    print(f"memoir: fatal start-up error: {reason}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    configure_logging()
    settings = Settings()
    try:
        load_keys(settings, create_bootstrap=False)  # fail fast, before loading anything, on a key set-up that cannot run
    except (KeyConfigError, OSError) as error:
        logging.getLogger("memoir").error("%s", error)
        sys.exit(2)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    server = _Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn's exit when the lifespan start-up (migrations) failed
        pass
    if server.runtime is not None and server.runtime.startup_error:
        _fatal(server.runtime.startup_error)
    if not server.started:  # the lifespan start-up (migrations) failed; uvicorn logged why
        _fatal("the application did not start (see the log above)")


if __name__ == "__main__":
    main()
