"""The container's entrypoint honours MEMOIR_ALLOW_DOWNLOAD, and the compose file passes it on
(no Docker engine here: the script runs under sh, the compose file is read as YAML)."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from tests.server import REPO


def _entrypoint_env(allow_download: str | None) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if allow_download is not None:
        env["MEMOIR_ALLOW_DOWNLOAD"] = allow_download
    out = subprocess.run(
        ["sh", str(REPO / "docker-entrypoint.sh"), "env"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on"])
def test_allowing_downloads_lifts_the_offline_switches(value):
    env = _entrypoint_env(value)
    assert "HF_HUB_OFFLINE" not in env and "TRANSFORMERS_OFFLINE" not in env


@pytest.mark.parametrize("value", [None, "false", "0", "no"])
def test_the_container_stays_offline_otherwise(value):
    assert _entrypoint_env(value)["HF_HUB_OFFLINE"] == "1"


def test_the_image_and_compose_file_use_the_entrypoint_and_the_setting():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' in dockerfile
    assert "COPY --chmod=755 docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh" in dockerfile
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for service in ("memoir", "memoir-cpu"):
        environment = compose["services"][service]["environment"]
        assert environment["MEMOIR_ALLOW_DOWNLOAD"] == "${MEMOIR_ALLOW_DOWNLOAD:-false}"
