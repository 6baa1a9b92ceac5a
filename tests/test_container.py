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


def test_compose_scales_the_server_behind_a_balancer_that_checks_ready():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "ports" not in services["memoir"]  # `--scale memoir=N` publishes nothing twice
    assert services["lb"]["ports"] == ["${MEMOIR_PUBLISH_PORT:-8000}:8000"]
    mounted = services["lb"]["volumes"][0].split(":")
    assert (REPO / mounted[0]).resolve() == (REPO / "deploy" / "haproxy.cfg").resolve()
    haproxy = (REPO / "deploy" / "haproxy.cfg").read_text()
    assert "option httpchk GET /ready" in haproxy and "http-check expect status 200" in haproxy
    assert "server-template memoir" in haproxy and "memoir:8000" in haproxy
    assert services["memoir"]["environment"]["MEMOIR_DATABASE_URL"].startswith("postgresql://")


def test_compose_keeps_the_memory_log_blobs_in_a_minio_bucket_every_replica_reads():
    from urllib.parse import urlparse

    from app.config import Settings

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("memoir", "memoir-cpu"):
        environment = services[name]["environment"]
        blob_url = urlparse(environment["MEMOIR_BLOB_URL"])
        assert blob_url.scheme == "s3"
        assert urlparse(environment["AWS_ENDPOINT_URL"]).hostname == "minio" and "minio" in services
        assert f"store/{blob_url.netloc}" in " ".join(services["minio-bucket"]["entrypoint"])  # the bucket is made
        assert services[name]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
        settings = Settings(blob_url=environment["MEMOIR_BLOB_URL"], database_url=environment["MEMOIR_DATABASE_URL"])
        assert settings.resolved_blob_url == environment["MEMOIR_BLOB_URL"]
    assert "minio-data" in yaml.safe_load((REPO / "docker-compose.yml").read_text())["volumes"]


def test_kubernetes_manifests_are_valid_and_probe_ready():
    import kubernetes_validate

    documents = [
        doc for path in sorted((REPO / "deploy" / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
    ]
    for doc in documents:  # against the API schemas of the newest Kubernetes release it knows
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)
    kinds = {doc["kind"]: doc for doc in documents}
    assert set(kinds) >= {"Deployment", "Service", "PodDisruptionBudget", "Secret", "PersistentVolumeClaim"}
    deployment = kinds["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert deployment["spec"]["replicas"] > 1
    env = {item["name"]: item for item in container["env"]}
    assert env["MEMOIR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    assert kinds["Service"]["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
