"""A team's tracking server: ``mlflow server`` on a real PostgreSQL, basic auth on.

The test starts its own PostgreSQL (Debian's ``postgresql`` package; ``.ci/run``
installs it when missing) and an MLflow server on it with ``--app-name
basic-auth``, then runs real sweeps through the CLI against it: with the right
credentials everything is logged and the password appears nowhere in MLflow or
in the output; with a wrong password the sweep stops at once with one clear
line and leaves nothing behind. And two drivers opening a fresh database at the
same instant both get it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import _free_port, serve_mlflow
from mlflow import MlflowClient

from r2sweep.tracking.store import TAG_ROLE

pytestmark = [pytest.mark.slow, pytest.mark.server]

SPEC = {
    "name": "team-sweep",
    "data": {"name": "synthetic", "num_samples": 128},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 1, "batch_size": 32},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
    "sweep": {"num_samples": 2, "max_concurrent": 2, "seed": 0, "scheduler": "none"},
}
ADMIN = "admin"


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    if not found:
        pytest.fail(f"PostgreSQL's {name} not found: install Debian's postgresql package (.ci/run does)")
    return found[-1]


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres account."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with password auth; yields a server URL (no database).

    Also what ``benchmarks/scale.py`` tracks into (through an ``mlflow server``)."""
    # Not under pytest's tmp dir: its parents are private to root, and the server
    # runs as the postgres account when the tests run as root.
    root = Path(tempfile.mkdtemp(prefix="r2sweep-pg-"))
    password = secrets.token_urlsafe(12)
    (root / "pw").write_text(password)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    port = _free_port()
    data = root / "data"
    subprocess.run(
        _as_postgres_user([_pg_bin("initdb"), "-D", str(data), "-U", "r2sweep", f"--pwfile={root / 'pw'}",
                           "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8"]),
        check=True, capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = subprocess.run(
        _as_postgres_user([_pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]),
        capture_output=True, text=True,
    )
    if started.returncode != 0:
        pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{(root / 'log').read_text(errors='replace')[-2000:]}")
    try:
        yield f"postgresql://r2sweep:{password}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres_user([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def create_database(server_url: str, name: str) -> str:
    import psycopg  # the driver MLflow's SQLAlchemy uses for postgresql:// URIs

    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{server_url}/{name}"


@pytest.fixture(scope="module")
def auth_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """An MLflow server on PostgreSQL with basic auth; yields (url, admin password)."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    admin_password = secrets.token_urlsafe(16)
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {create_database(postgres, 'mlflow_auth')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # MLflow's own credential cache (off by default): without it the server checks
        # the password's scrypt hash on every one of the sweep's ~200 requests (0.1-0.5 s
        # each on 2 busy cores). Keyed by an HMAC of the password, so a wrong password
        # never hits it and is checked, and refused, in full.
        "auth_cache_ttl_seconds = 600\n"
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}  # the auth app's CSRF key
    backend = create_database(postgres, "mlflow")
    with serve_mlflow(root, backend, ["--app-name", "basic-auth"], env) as url:
        yield url, admin_password


def _admin_client(url: str, password: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=url)


def _sweep(tmp_path: Path, url: str, username: str, password: str, name: str) -> subprocess.CompletedProcess:
    spec = tmp_path / "space.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "name": name}))
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password,
           "RAY_AUTH_MODE": "disabled", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    return subprocess.run(
        [str(Path(sys.executable).with_name("r2sweep")), "sweep", str(spec), "--tracking-uri", url,
         "--storage", str(tmp_path / "results")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )


def test_a_sweep_logs_with_the_right_credentials_and_never_leaks_them(
    auth_server: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, password = auth_server
    done = _sweep(tmp_path, url, ADMIN, password, "team-sweep")
    assert done.returncode == 0, done.stderr[-3000:]

    client = _admin_client(url, password, monkeypatch)
    experiment = client.get_experiment_by_name("team-sweep")
    runs = client.search_runs([experiment.experiment_id])
    roles = sorted(r.data.tags.get(TAG_ROLE) for r in runs)
    assert roles == ["sweep", "trial", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all("ptq_rtn_w4a8/top1" in r.data.metrics for r in runs if r.data.tags[TAG_ROLE] == "trial")

    # The password is nowhere: not in params, tags or metrics keys, not in any
    # text artifact (the spec, the trial configs), not in the CLI's output.
    for run in runs:
        assert password not in repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics)
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith((".yaml", ".json", ".txt")):
                local = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))
                assert password not in Path(local).read_text()
    assert password not in done.stdout + done.stderr


def test_a_wrong_password_stops_the_sweep_at_once_and_logs_nothing(
    auth_server: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, password = auth_server
    started = time.monotonic()
    done = _sweep(tmp_path, url, ADMIN, "not-" + password, "refused-sweep")
    assert done.returncode == 1
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("r2sweep: error:")]
    assert len(error_lines) == 1 and "refused the credentials" in error_lines[0]
    assert "MLFLOW_TRACKING_PASSWORD" in error_lines[0]
    assert "Traceback" not in done.stderr
    assert password not in done.stderr and "not-" + password not in done.stderr
    assert time.monotonic() - started < 120  # no retry storm: 401 is not a transient error

    client = _admin_client(url, password, monkeypatch)
    assert client.get_experiment_by_name("refused-sweep") is None
    assert not (tmp_path / "results").exists()


def test_two_sweeps_opening_a_fresh_database_at_once_both_get_it(postgres: str, tmp_path: Path) -> None:
    # MLflow's own guard is a lock file in this host's temporary folder, Optuna has none: on a
    # database server the lock must live in the database (drivers on different hosts share it).
    from test_tracking_concurrent_init import open_at_once

    for round_ in range(2):
        open_at_once(create_database(postgres, f"fresh_mlflow_{round_}"), create_database(postgres, f"fresh_optuna_{round_}"),
                     tmp_path / f"go{round_}")
