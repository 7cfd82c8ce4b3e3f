"""The deployment files: docker/compose.yaml validated by Docker Compose itself,
the KubeRay manifest and the Dockerfile checked for what docs/cluster.md promises.

The suite needs no Docker engine: ``docker compose config`` validates the files, and the
Dockerfile is checked as text. The images are built and the cluster run for real by
``make cluster-check`` (docker/cluster_check.py), a release step. No Kubernetes runs here:
the KubeRay manifests are validated, not applied.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def _compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    plugin = Path.home() / ".docker" / "cli-plugins" / "docker-compose"
    if plugin.is_file():
        return [str(plugin)]  # the plugin binary also runs standalone
    if os.environ.get("R2SWEEP_REQUIRE_COMPOSE") == "1":
        pytest.fail("Docker Compose v2 is missing (.ci/system-deps installs it)")
    pytest.skip("Docker Compose v2 is not installed (.ci/system-deps installs it)")


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    """docker/ plus the repository files the build context names, with env files from the examples."""
    copy = tmp_path / "repo"
    shutil.copytree(DOCKER, copy / "docker", ignore=shutil.ignore_patterns("wheelhouse"))  # GBs once filled
    for name in ("server", "client"):
        shutil.copy(copy / "docker" / f"{name}.env.example", copy / "docker" / f"{name}.env")
    return copy / "docker"


def _config(compose_dir: Path, *files: str, env: dict[str, str] | None = None) -> dict:
    args = [a for f in files for a in ("-f", str(compose_dir / f))]
    done = subprocess.run([*_compose_command(), *args, "config", "--format", "json"],
                          capture_output=True, text=True, cwd=compose_dir, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_file_validates_with_the_whole_local_cluster(compose_dir: Path) -> None:
    config = _config(compose_dir, "compose.yaml")
    services = config["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker"}
    assert services["ray-worker"]["deploy"]["replicas"] == 2
    assert all("healthcheck" in s for s in services.values())
    # Dashboards on loopback only, and nothing else published.
    published = {(name, p["published"], p.get("host_ip")) for name, s in services.items() for p in s.get("ports", [])}
    assert published == {("mlflow", "5000", "127.0.0.1"), ("ray-head", "8265", "127.0.0.1")}
    # The tracking server: PostgreSQL backend, basic auth, artifacts served through it.
    command = " ".join(services["mlflow"]["command"])
    assert "--app-name basic-auth" in command and "--serve-artifacts" in command
    assert "postgresql://" in command and "@postgres:5432/" in command
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Named volumes for the database, MLflow's artifacts and Tune's shared storage.
    assert {"pgdata", "mlflow", "results"} <= set(config["volumes"])
    for node in ("ray-head", "ray-worker"):
        targets = {v["target"]: v for v in services[node]["volumes"]}
        assert targets["/shared/results"]["source"] == "results"
        assert targets["/data"]["read_only"] is True
    # Credentials come from the env files, never from the compose file itself.
    secrets = [line.split("=", 1)[1] for name in ("server.env", "client.env")
               for line in (compose_dir / name).read_text().splitlines() if "PASSWORD=" in line]
    assert secrets and not any(secret in (DOCKER / "compose.yaml").read_text() for secret in secrets)
    assert services["ray-head"]["environment"]["MLFLOW_TRACKING_PASSWORD"] == secrets[-1]


def test_base_images_ca_secret_and_offline_build_come_from_the_environment(compose_dir: Path, tmp_path: Path) -> None:
    default = _config(compose_dir, "compose.yaml")
    assert default["services"]["postgres"]["image"] == "postgres:16.6-bookworm"
    assert default["services"]["ray-head"]["build"]["args"]["PYTHON_IMAGE"] == "python:3.11.11-slim-bookworm"
    assert default["services"]["ray-head"]["build"]["args"]["OFFLINE"] == "0"
    assert default["secrets"]["ca_bundle"]["file"] == "/dev/null"  # no CA given: an empty secret
    # While the image creates its database, its server answers on the Unix socket only: a
    # socket check would pass before the real server listens; the check goes over TCP.
    assert "-h 127.0.0.1" in " ".join(default["services"]["postgres"]["healthcheck"]["test"])
    # A worker is healthy once its raylet has joined (the node agent asks the head), not
    # while a raylet process merely runs; a start period covers a slow first start.
    worker_check = default["services"]["ray-worker"]["healthcheck"]
    assert "/api/local_raylet_healthz" in " ".join(worker_check["test"]) and worker_check["start_period"]

    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    (tmp_path / "server.env").write_text((compose_dir / "server.env").read_text())
    (tmp_path / "client.env").write_text((compose_dir / "client.env").read_text().replace("change-me-mlflow", "other"))
    config = _config(compose_dir, "compose.yaml", env={
        "PYTHON_IMAGE": "local/python:3.11", "POSTGRES_IMAGE": "local/postgres:15", "R2SWEEP_OFFLINE": "1",
        "R2SWEEP_CA_BUNDLE": str(tmp_path / "ca.pem"), "R2SWEEP_ENV_DIR": str(tmp_path)})
    services = config["services"]
    assert services["postgres"]["image"] == "local/postgres:15"
    for name in ("mlflow", "ray-head", "ray-worker"):
        build = services[name]["build"]
        assert build["args"]["PYTHON_IMAGE"] == "local/python:3.11" and build["args"]["OFFLINE"] == "1"
        assert [s["source"] for s in build["secrets"]] == ["ca_bundle"]
    assert config["secrets"]["ca_bundle"]["file"] == str(tmp_path / "ca.pem")
    # R2SWEEP_ENV_DIR: the credentials from another folder (docker/cluster_check.py's own).
    assert services["ray-head"]["environment"]["MLFLOW_TRACKING_PASSWORD"] == "other"


def test_compose_gpu_overlay_gives_each_worker_a_gpu(compose_dir: Path) -> None:
    worker = _config(compose_dir, "compose.yaml", "compose.gpu.yaml")["services"]["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1


def test_compose_refuses_to_start_without_the_credentials_file(compose_dir: Path) -> None:
    (compose_dir / "server.env").unlink()
    done = subprocess.run([*_compose_command(), "-f", str(compose_dir / "compose.yaml"), "config"],
                          capture_output=True, text=True, cwd=compose_dir)
    assert done.returncode != 0 and "server.env" in done.stderr


def test_rayjob_runs_a_sweep_from_a_configmap_with_gpu_workers_and_secret_credentials() -> None:
    (job,) = list(yaml.safe_load_all((DOCKER / "kuberay" / "rayjob.yaml").read_text()))
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].split()[:3] == ["r2sweep", "sweep", "/config/space.yaml"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__, "the manifest must name the Ray the image installs"

    head = cluster["headGroupSpec"]["template"]["spec"]
    (head_container,) = head["containers"]
    mounts = {m["mountPath"]: m["name"] for m in head_container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts["/config"]]["configMap"]["name"] == "r2sweep-space"
    env = {e["name"]: e for e in head_container["env"]}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "r2sweep-mlflow", "key": key}
    assert "value" not in env["MLFLOW_TRACKING_PASSWORD"]

    claims = {d["metadata"]["name"] for d in yaml.safe_load_all((DOCKER / "kuberay" / "storage.yaml").read_text())}
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (worker,) = pod["containers"]
        assert worker["image"] == head_container["image"]
        assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        used = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert used == claims
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_dockerfile_pins_its_base_runs_as_a_user_and_builds_both_variants() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and "VARIANT must be cpu or cuda" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] != "root"
    assert '/build/pip-install ".[cluster,s3]"' in text  # the s3 extra: a pre-training cache on S3
    # pip runs only through docker/pip-install, with the CA secret and the build folder
    # mounted for the step alone: no COPY or ADD brings a certificate or a wheel into a layer.
    pip_steps = re.findall(r"^RUN (.*?)(?=^\S|\Z)", text, re.M | re.S)
    for step in (s for s in pip_steps if "pip-install" in s):
        assert "--mount=type=secret,id=ca_bundle" in step and "--mount=type=bind,source=docker/wheelhouse,target=/build/wheelhouse" in step
    assert not any("pip install" in s for s in pip_steps)
    copied = re.findall(r"^(?:COPY|ADD) (.*)$", text, re.M)
    assert not any(re.search(r"wheelhouse|\.pem|\.crt|ca_bundle|^docker( |/$)", c) for c in copied), copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "docker/server.env" in ignored and "docker/client.env" in ignored
