#!/bin/sh
# The image is offline by default (HF_HUB_OFFLINE=1: only files under /models are used). With
# MEMOIR_ALLOW_DOWNLOAD=true (pydantic's true words) the hub is reachable again, so MEMOIR_MODEL may
# name a hub id to fetch into /models/huggingface. exec: SIGTERM reaches the server itself.
case "$(printf '%s' "${MEMOIR_ALLOW_DOWNLOAD:-false}" | tr '[:upper:]' '[:lower:]')" in
  1 | true | t | yes | y | on) unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE ;;
esac
exec "$@"
