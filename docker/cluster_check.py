"""The cluster kit, for real: build the images, bring the Compose cluster up, run a sweep in it, check, tear down.

    make cluster-check                      # or: .venv/bin/python docker/cluster_check.py [--keep]

Stages, one line each with its time: the base images (the official ones, else local
stand-ins from docker/make-base-images), the wheelhouse (docker/fill-wheelhouse, when
docker/wheelhouse is empty: this host's versions, so the image runs what the tests
passed with and ``ray job submit`` from this host meets the same Ray), the image build
(from the wheelhouse alone unless ``R2SWEEP_OFFLINE=0``; this host's CA bundle as the
build secret), a look at the image for the CA (in no layer, no variable), ``docker compose up --wait``
(PostgreSQL, the MLflow server with basic auth, a Ray head, two Ray workers), a shrunk
quickstart sweep inside the cluster (``docker compose exec ray-head r2sweep sweep ...
--address auto``) and its report, the same sweep as a Ray job submitted from this host
(``ray job submit``, docs/cluster.md's second path), then the checks from this host through
the MLflow server with the client credentials:

- one sweep parent run and one run per trial; trials on both worker nodes;
- the champion registered, the report logged on the sweep's run;
- a request without credentials refused; the dashboards published on 127.0.0.1 only,
  PostgreSQL not at all.

Then ``docker compose down -v``, on failure too (``--keep`` leaves the cluster up). The
cluster runs as its own Compose project (``r2sweep-check``) with credentials made for
the run, so a cluster of yours (project ``r2sweep``) and your ``docker/*.env`` are left
alone; it does need ports 5000 and 8265 of 127.0.0.1 free.

Environment: ``PYTHON_IMAGE``/``POSTGRES_IMAGE`` pin the base images,
``R2SWEEP_CA_BUNDLE`` is the CA bundle pip trusts in the build (default: this host's),
``R2SWEEP_OFFLINE=0`` lets the build reach the index for what the wheelhouse lacks.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
PROJECT = "r2sweep-check"
SWEEP = "cluster-check"
JOB_SWEEP = "cluster-check-job"
OFFICIAL = {"PYTHON_IMAGE": "python:3.11.11-slim-bookworm", "POSTGRES_IMAGE": "postgres:16.6-bookworm"}
MLFLOW_URL = "http://127.0.0.1:5000"
RAY_DASHBOARD = "http://127.0.0.1:8265"
#: Where this host keeps the CA bundle its own TLS clients trust (Debian/Ubuntu, then Fedora/RHEL).
SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
# The quickstart space, shrunk to minutes: 4 trials of 2 epochs, one per worker at a time.
SHRINK = ["--num-samples", "4", "--max-concurrent", "2", "--set", "train.epochs=2", "--set", "sweep.scheduler=none"]


class CheckFailed(RuntimeError):
    """One stage's check did not hold."""


def say(line: str) -> None:
    print(f"cluster-check: {line}", flush=True)


def run(command: list[str], *, env: dict[str, str], timeout: float, capture: bool = False) -> str:
    """Run a command; on failure raise with the tail of its output."""
    done = subprocess.run(command, env=env, cwd=ROOT, timeout=timeout, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    if done.returncode != 0:
        tail = (done.stdout or "")[-3000:]
        raise CheckFailed(f"{' '.join(command[:6])} ... exited {done.returncode}{': ' + tail if tail else ''}")
    return done.stdout or ""


@contextmanager
def stage(name: str, times: dict[str, float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    times[name] = time.perf_counter() - started
    say(f"{name}: ok in {times[name]:.1f} s")


def credentials(folder: Path) -> dict[str, str]:
    """server.env and client.env for this run, from the examples, with fresh secrets."""
    password, admin_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    values = {"POSTGRES_PASSWORD": password, "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
              "MLFLOW_TRACKING_PASSWORD": admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    found: dict[str, str] = {}
    for name in ("server", "client"):
        lines = []
        for line in (ROOT / "docker" / f"{name}.env.example").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.startswith("#"):
                value = values.get(key, value)
                found[key] = value
                line = f"{key}={value}"
            lines.append(line)
        (folder / f"{name}.env").write_text("\n".join(lines) + "\n")
    return found


def base_images(env: dict[str, str]) -> None:
    """The official base images when this host has or can pull them, else local stand-ins."""
    wanted = [k for k in OFFICIAL if not env.get(k)]
    missing = [k for k in wanted if not _have_or_pull(OFFICIAL[k], env)]
    if not missing:
        for key in wanted:
            env[key] = OFFICIAL[key]
        return
    say(f"no {', '.join(OFFICIAL[k] for k in missing)} (no registry?): making local stand-ins from Debian's packages")
    for line in run([str(ROOT / "docker" / "make-base-images")], env=env, timeout=1800, capture=True).splitlines():
        key, sep, value = line.partition("=")
        if sep and key in wanted:
            env[key] = value


def _have_or_pull(image: str, env: dict[str, str]) -> bool:
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True, env=env).returncode == 0:
        return True
    try:
        return subprocess.run(["docker", "pull", "-q", image], capture_output=True, env=env, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def host_ca_bundle() -> str | None:
    """The CA bundle this host's TLS clients trust: a TLS-inspecting proxy's CA is in it when pip works here."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), *SYSTEM_CA_BUNDLES):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def wheelhouse(env: dict[str, str]) -> None:
    if any((ROOT / "docker" / "wheelhouse").glob("*.whl")):
        say("  docker/wheelhouse has wheels: kept")
        return
    run([str(ROOT / "docker" / "fill-wheelhouse")], env={**env, "PYTHON": sys.executable}, timeout=3600)


def check_no_ca_in_image(env: dict[str, str]) -> None:
    """The CA secret reached pip only: no variable, no file, no certificate of it in the image's own bundle."""
    image = image_name(env)
    config = json.loads(run(["docker", "image", "inspect", image], env=env, timeout=60, capture=True))[0]["Config"]
    check(not any(v.startswith(("PIP_CERT=", "SSL_CERT_FILE=", "REQUESTS_CA_BUNDLE=")) for v in config.get("Env") or []),
          "the image sets no CA variable")
    shipped, base = (set(_certificates(run(["docker", "run", "--rm", "--entrypoint", "sh", name, "-c",
                                             "test ! -e /run/secrets/ca_bundle && cat /etc/ssl/certs/ca-certificates.crt"],
                                            env=env, timeout=120, capture=True)))
                     for name in (image, env["PYTHON_IMAGE"]))
    secret = env.get("R2SWEEP_CA_BUNDLE")
    if secret and secret != "/dev/null":
        # The certificates the secret adds to what the base image trusts (a proxy's CA).
        extra = set(_certificates(Path(secret).read_text())) - base
        check(not shipped & extra, f"none of the {len(extra)} certificate(s) the secret adds to the base image's "
              f"is in the image ({len(shipped & extra)} found)")


def _certificates(pem: str) -> list[str]:
    return ["".join(block.split()) for block in pem.split("-----BEGIN CERTIFICATE-----")[1:]]


def compose(*args: str) -> list[str]:
    return ["docker", "compose", "-p", PROJECT, "-f", str(COMPOSE_FILE), *args]


def mlflow_status(path: str, auth: tuple[str, str] | None) -> int:
    """The HTTP status the MLflow server answers a GET of ``path`` with, with basic auth or without."""
    request = urllib.request.Request(f"{MLFLOW_URL}{path}")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    say(f"  checked: {what}")


def check_sweep(client, sweep: str, samples: int, worker_nodes: set[str]) -> None:
    """One parent run, one finished run per trial, trials on every worker node, the champion, the report."""
    experiment = client.get_experiment_by_name(sweep)
    check(experiment is not None, f"sweep {sweep}: its MLflow experiment exists")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("r2sweep.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("r2sweep.role") == "trial"]
    check(len(parents) == 1, f"sweep {sweep}: one sweep run (found {len(parents)})")
    check(len(trials) == samples and all(r.info.status == "FINISHED" for r in trials),
          f"sweep {sweep}: {samples} finished trial runs (found {len(trials)})")
    nodes = {r.data.tags.get("r2sweep.node_id") for r in trials}
    check(nodes == worker_nodes, f"sweep {sweep}: trials ran on both worker nodes ({len(nodes & worker_nodes)} of 2)")
    champion = client.get_model_version_by_alias(f"r2sweep-{sweep}", "champion")
    check(champion.run_id in {r.info.run_id for r in trials}, f"sweep {sweep}: the champion is one of its trials")
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    check("report/index.html" in artifacts, f"sweep {sweep}: its report is logged on the sweep run")


def worker_node_ids(env: dict[str, str]) -> set[str]:
    """The Ray node ids of the nodes with CPUs for trials (the head has none)."""
    listing = run(compose("exec", "-T", "ray-head", "ray", "list", "nodes", "--format", "json", "--detail"),
                  env=env, timeout=120, capture=True)
    nodes = json.loads(listing[listing.index("["):])
    return {n["node_id"] for n in nodes if n.get("state") == "ALIVE" and n.get("resources_total", {}).get("CPU", 0) > 0}


def published_ports(env: dict[str, str]) -> set[tuple[str, str, int]]:
    """(service, host address, host port) of every port the cluster publishes on this host."""
    listing = run(compose("ps", "--format", "json"), env=env, timeout=60, capture=True).strip()
    containers = json.loads(listing) if listing.startswith("[") else [json.loads(line) for line in listing.splitlines()]
    return {(c["Service"], p["URL"], p["PublishedPort"]) for c in containers for p in c.get("Publishers") or []
            if p.get("PublishedPort")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster up at the end (docker compose -p "
                        f"{PROJECT} ... down -v removes it)")
    args = parser.parse_args(argv)
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        say("no Docker engine answers (docker info); nothing was run")
        return 2
    times: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="r2sweep-cluster-check-"))
    values = credentials(work)
    env = {**os.environ, "R2SWEEP_ENV_DIR": str(work), "RAY_WORKER_CPUS": "1"}
    env.setdefault("R2SWEEP_OFFLINE", "1")
    env.setdefault("R2SWEEP_CA_BUNDLE", host_ca_bundle() or "/dev/null")
    started = time.perf_counter()
    try:
        with stage("base images", times):
            base_images(env)
            say(f"  PYTHON_IMAGE={env['PYTHON_IMAGE']} POSTGRES_IMAGE={env['POSTGRES_IMAGE']}")
        with stage("wheelhouse", times):
            wheelhouse(env)
        with stage("image build", times):
            run(compose("build", "ray-head"), env=env, timeout=3600)
        with stage("no CA in the image", times):
            check_no_ca_in_image(env)
        with stage("cluster up", times):
            run(compose("up", "-d", "--wait"), env=env, timeout=900)
        with stage("sweep in the cluster", times):
            run(compose("exec", "-T", "ray-head", "r2sweep", "sweep", "/opt/r2sweep/search_spaces/quickstart.yaml",
                        "--name", SWEEP, "--address", "auto", "--storage", "/shared/results", *SHRINK),
                env=env, timeout=1800)
            run(compose("exec", "-T", "ray-head", "r2sweep", "report", SWEEP, "--out", f"/shared/results/{SWEEP}-report"),
                env=env, timeout=600)
        with stage("ray job submit", times):
            submit_job(env)
        with stage("checks", times):
            run_checks(env, (values["MLFLOW_TRACKING_USERNAME"], values["MLFLOW_TRACKING_PASSWORD"]))
    except (CheckFailed, subprocess.TimeoutExpired) as failure:
        say(f"FAILED: {failure}")
        subprocess.run(compose("logs", "--tail", "40"), env=env, cwd=ROOT)
        return 1
    finally:
        if not args.keep:
            with stage("down", times):
                subprocess.run(compose("down", "-v", "--remove-orphans"), env=env, cwd=ROOT, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    size = run(["docker", "image", "inspect", "--format", "{{.Size}}", image_name(env)], env=env, timeout=60, capture=True)
    say(f"passed in {time.perf_counter() - started:.0f} s; image {image_name(env)}: {int(size) / 1e9:.2f} GB; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 0


def image_name(env: dict[str, str]) -> str:
    return f"r2sweep:{env.get('R2SWEEP_VARIANT', 'cpu')}"


def submit_job(env: dict[str, str]) -> None:
    """docs/cluster.md's second path: this host's ``ray job submit`` against the head's job server."""
    folder = Path(tempfile.mkdtemp(prefix="r2sweep-job-"))
    try:
        shutil.copy(ROOT / "search_spaces" / "quickstart.yaml", folder / "space.yaml")
        ray = str(Path(sys.executable).with_name("ray"))
        run([ray, "job", "submit", "--address", RAY_DASHBOARD, "--working-dir", str(folder), "--",
             "r2sweep", "sweep", "space.yaml", "--name", JOB_SWEEP, "--address", "auto", "--storage", "/shared/results",
             *SHRINK], env=env, timeout=1800)
        run([ray, "job", "submit", "--address", RAY_DASHBOARD, "--", "r2sweep", "report", JOB_SWEEP, "--out", "report"], env=env,
            timeout=600)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_checks(env: dict[str, str], auth: tuple[str, str]) -> None:
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = auth
    client = MlflowClient(MLFLOW_URL)
    workers = worker_node_ids(env)
    check(len(workers) == 2, f"two Ray worker nodes alive (found {len(workers)})")
    for sweep in (SWEEP, JOB_SWEEP):
        check_sweep(client, sweep, 4, workers)
    status = mlflow_status("/api/2.0/mlflow/experiments/search?max_results=1", None)
    check(status == 401, f"a request without credentials is refused (HTTP {status})")
    status = mlflow_status("/api/2.0/mlflow/experiments/search?max_results=1", auth)
    check(status == 200, f"the same request with the client credentials is answered (HTTP {status})")
    ports = published_ports(env)
    check(ports == {("mlflow", "127.0.0.1", 5000), ("ray-head", "127.0.0.1", 8265)},
          f"only MLflow (5000) and Ray's dashboard (8265) are published, on 127.0.0.1 only (found {sorted(ports)})")


if __name__ == "__main__":
    sys.exit(main())
