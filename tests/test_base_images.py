"""The PostgreSQL stand-in's entrypoint (docker/base/postgres-entrypoint.sh) keeps the official image's contract.

docker/make-base-images builds the stand-in for hosts without a public image registry;
docker/compose.yaml must run on it unchanged. Its entrypoint is run here without Docker,
on this machine's PostgreSQL (Debian's, the package the image installs): the first start
creates POSTGRES_USER with POSTGRES_PASSWORD and POSTGRES_DB, the server answers over TCP
with password checks, a restart keeps the data, and a missing password is refused.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from conftest import _free_port

ENTRYPOINT = Path(__file__).resolve().parent.parent / "docker" / "base" / "postgres-entrypoint.sh"
pytestmark = pytest.mark.server


@pytest.fixture
def pg_env() -> Iterator[dict[str, str]]:
    """The variables a compose file gives the image, and PATH with PostgreSQL's programs (the image links them)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins or os.geteuid() != 0:
        pytest.fail("needs root and Debian's postgresql package (.ci/run has both)")
    # Not under pytest's tmp dir: its parents are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="r2sweep-pg-entry-"))
    shutil.chown(root, "postgres")
    yield {**os.environ, "PATH": f"{bins[-1]}:{os.environ['PATH']}", "PGDATA": str(root / "data"),
           "PGPORT": str(_free_port()), "POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": "s3cret pass",
           "POSTGRES_DB": "tracking"}
    shutil.rmtree(root, ignore_errors=True)


def _start(env: dict[str, str]) -> subprocess.Popen:
    server = subprocess.Popen(["sh", str(ENTRYPOINT), "postgres", "-c", "fsync=off"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the entrypoint exited {server.returncode}: {server.stdout.read()[-3000:]}")
        if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", env["PGPORT"]], env=env,
                          capture_output=True).returncode == 0:
            return server
        time.sleep(0.5)
    server.kill()
    pytest.fail("the server did not answer over TCP within 120 s")


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)  # the image's STOPSIGNAL: a fast shutdown
    server.wait(timeout=60)


def _url(env: dict[str, str], password: str) -> str:
    return f"postgresql://mlflow:{quote(password)}@127.0.0.1:{env['PGPORT']}/tracking"


def test_first_start_creates_the_user_and_database_and_a_restart_keeps_them(pg_env: dict[str, str]) -> None:
    server = _start(pg_env)
    try:
        with psycopg.connect(_url(pg_env, "s3cret pass")) as connection:
            connection.execute("CREATE TABLE kept (x int)")
            connection.execute("INSERT INTO kept VALUES (7)")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(_url(pg_env, "wrong"))
    finally:
        _stop(server)
    assert "created the cluster" in server.stdout.read()

    server = _start(pg_env)  # PGDATA holds a cluster now: no second initdb, the row is still there
    try:
        with psycopg.connect(_url(pg_env, "s3cret pass")) as connection:
            assert connection.execute("SELECT x FROM kept").fetchall() == [(7,)]
    finally:
        _stop(server)
    assert "created the cluster" not in server.stdout.read()


def test_a_first_start_without_a_password_is_refused_with_the_fix(pg_env: dict[str, str]) -> None:
    env = {k: v for k, v in pg_env.items() if k != "POSTGRES_PASSWORD"}
    done = subprocess.run(["sh", str(ENTRYPOINT), "postgres"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "POSTGRES_PASSWORD is not set" in done.stderr and "docker/server.env" in done.stderr
    assert not (Path(env["PGDATA"]) / "PG_VERSION").exists()
