"""python -m app: serve one model with one uvicorn worker (the memory lives in this process)."""

from __future__ import annotations

import uvicorn

from .config import Settings
from .main import configure_logging, create_app


def main() -> None:
    configure_logging()
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1, log_config=None)


if __name__ == "__main__":
    main()
