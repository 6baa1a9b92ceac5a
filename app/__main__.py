"""python -m app: serve one model with one uvicorn worker (the memory lives in this process).

SIGTERM (docker stop, Ctrl-C): /ready turns 503, new edits are refused, open streams are closed;
then the edit being trained finishes, a checkpoint is written, and the process exits.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from .config import Settings
from .main import configure_logging, create_app
from .security import KeyConfigError, load_keys


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        runtime = getattr(self.config.app.state, "runtime", None)
        if runtime is not None:
            runtime.begin_shutdown()
        super().handle_exit(sig, frame)


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
    _Server(config).run()


if __name__ == "__main__":
    main()
