"""Shared test settings."""

from __future__ import annotations

import contextlib
import http.server
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from pathlib import Path

import numpy as np
import pytest
import requests
import torch


# The files that take minutes (measured: benchmarks/RESULTS.md, "Suite time"), longest first.
# `make test` hands whole files to two workers in collection order; collected last, one of
# these ran alone for the suite's last minutes. First, they overlap with the many short files.
LONGEST_FIRST = ("test_study.py", "test_driver_kill.py", "test_tracking_outage.py", "test_tracking_postgres.py",
                 "test_pretrain_cache_sweep.py", "test_own_model_sweeps.py", "test_store_is_data.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the real ``mlflow server`` fixture is a ``server`` test, wherever it is
    (``make test-fast`` leaves those out), so no module has to remember to say so. The files in
    :data:`LONGEST_FIRST` are moved to the front (the rest keep their order)."""
    for item in items:
        if "mlflow_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run the suite single-threaded.

    Test models see a few samples of at most 32x32: intra-op threading only adds
    hand-off cost, which on a busy 2-core machine multiplies step times by ~50.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The same for every process the suite starts (the CLI, sweep drivers, servers):
    # torch reads OMP_NUM_THREADS when it starts. A CLI trial with torch's default
    # 2 threads beside the other xdist worker ran its AdaRound >10x slower than with
    # one. Ray's workers get 1 anyway (their num_cpus); trials set their own share.
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if previous is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous


def _short_temp_base() -> str:
    """The system temp folder when a Ray session below it fits Ray's socket limit, else /tmp."""
    from r2sweep.tune.ray_temp import MAX_TEMP_DIR_LENGTH

    base = tempfile.gettempdir()
    return base if len(f"{base}/r2s-ray-xxxxxxxx/ray".encode()) <= MAX_TEMP_DIR_LENGTH else "/tmp"


@pytest.fixture(autouse=True, scope="session")
def _ray_temp_dir() -> Iterator[Path]:
    """Every Ray the suite starts (in this process and in the drivers it spawns) keeps
    its session files in one fresh, short folder, removed at the end.

    Short: Ray's Unix socket paths below it must fit 107 bytes, which a folder under
    pytest's ``tmp_path`` does not once ``TMPDIR`` is a little long. Fresh: nothing
    an earlier run left (a stale ``ray_current_cluster`` address file) can leak in.
    The ``ray`` folder is made up front because ``ray.cluster_utils.Cluster`` writes
    its address file there without creating it.
    """
    root = Path(tempfile.mkdtemp(prefix="r2s-ray-", dir=_short_temp_base()))
    (root / "ray").mkdir()
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(root)
    # One auth mode for every Ray of the run: a Ray started in this process with token
    # auth and a later one without make the later one's actors die before they start.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield root
    if previous is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = previous
    shutil.rmtree(root, ignore_errors=True)


_EMPTY_MLFLOW_STORE: list[Path] = []  # made on first use, once per worker (below)


@pytest.fixture(autouse=True, scope="session")
def _empty_mlflow_store_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    _EMPTY_MLFLOW_STORE[:] = [tmp_path_factory.mktemp("mlflow-empty") / "mlflow.db"]
    yield
    _EMPTY_MLFLOW_STORE.clear()


def new_mlflow_store(path: Path) -> str:
    """Put a new, empty MLflow SQLite store at ``path``; return its ``sqlite:///`` URI.

    A fresh store costs 4-8 s of CPU: MLflow builds its tables by running every alembic
    migration. Here MLflow does that once per worker, into a file with every table and
    no experiment (the first client to open a copy adds the Default experiment, with its
    own artifact root); each store is a copy. The stores stay real MLflow stores; the
    tests that check a store's creation itself (``test_tracking.py``) leave it to MLflow.
    """
    (empty,) = _EMPTY_MLFLOW_STORE
    if not empty.is_file():
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables

        engine = sqlalchemy.create_engine(f"sqlite:///{empty.with_suffix('.part')}")
        _initialize_tables(engine)
        engine.dispose()
        empty.with_suffix(".part").rename(empty)
    if path.exists():
        raise FileExistsError(f"{path}: a store is there already")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty, path)
    return f"sqlite:///{path}"


SERVER_START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, served artifacts); yields its URL.

    Shared by the tracking and sweep tests. Fails, never skips,
    when the server does not answer ``/health`` in time, and shows its log.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    with serve_mlflow(root, new_mlflow_store(root / "db.sqlite")) as url:
        yield url


@contextlib.contextmanager
def serve_mlflow(
    root: Path,
    backend_uri: str,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    port: int | None = None,
    artifacts: str | None = None,
) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 (``port``, else a free one) until the block ends; yields its URL.
    ``artifacts``: where it keeps them (default ``root/artifacts``; an ``s3://`` URI works too)."""
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",  # the default 4 workers take far longer to start on 2 cores
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts or str(root / "artifacts"),
        *extra_args,
    ]  # fmt: skip
    # The background job runner is not needed by tracking calls; it only costs CPU.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    log_path = root / "server.log"
    with open(log_path, "ab") as log:
        # Its own session, so that teardown can stop the server and its uvicorn
        # worker (a child process) as one process group, and nothing else.
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    def stop() -> None:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=15)

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with code {server.returncode} before answering; log:\n{log_tail()}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {url}/health within {SERVER_START_TIMEOUT_S:.0f} s; log:\n{log_tail()}")
            time.sleep(0.25)
        yield url
    finally:
        stop()


@contextlib.contextmanager
def serve_moto(root: Path, bucket: str) -> Iterator[Any]:
    """moto's standalone S3 server on 127.0.0.1 with ``bucket`` made, and the environment (endpoint, dummy
    credentials) pointing every process started meanwhile at it; yields a boto3 client."""
    import boto3

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "moto.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not answer {url}/moto-api/; log:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/moto-api/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.05)
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                env.delenv(name, raising=False)
            env.setenv("AWS_ENDPOINT_URL", url)
            env.setenv("MLFLOW_S3_ENDPOINT_URL", url)  # an MLflow server's artifacts
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential lookup on a metadata address
            client = boto3.client("s3")
            client.create_bucket(Bucket=bucket)
            yield client
    finally:
        server.kill()
        server.wait()


def run_tracked_sweeps(root: Path, *specs: dict) -> Path:
    """Run each sweep spec (a dict) through the public API on one fresh local Ray, tracked in
    ``root/mlflow.db`` with results in ``root/results``; return ``root``.

    The real path end to end: Ray Tune, Optuna, the tracking journal, MLflow.
    """
    import ray

    import r2sweep

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    uri = new_mlflow_store(root / "mlflow.db")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for data in specs:
            r2sweep.run_sweep(data, tracking_uri=uri, storage=root / "results",
                              progress=False, register=False)
    finally:
        ray.shutdown()
    return root


def write_cifar(root: Path, name: str, n_train: int = 20, n_test: int = 10) -> None:
    """A tiny CIFAR-10 or CIFAR-100 folder in the python-pickle layout torchvision downloads."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, key, classes = root / "cifar-10-batches-py", b"labels", 10
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files = ["test_batch"]
    else:
        folder, key, classes = root / "cifar-100-python", b"fine_labels", 100
        train_files, test_files = ["train"], ["test"]
    folder.mkdir(parents=True)

    def dump(path: Path, n: int, offset: int) -> None:
        labels = [(offset + i) % classes for i in range(n)]
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: labels}
        if name == "cifar100":
            entry[b"coarse_labels"] = [lab // 5 for lab in labels]
        with open(path, "wb") as f:
            pickle.dump(entry, f)

    per_file = n_train // len(train_files)
    for i, f in enumerate(train_files):
        dump(folder / f, per_file, i * per_file)
    for f in test_files:
        dump(folder / f, n_test, 0)


class ForwardingHandler(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy in front of a real server (``upstream``): a test stops it, or subclasses
    :meth:`intercept` to answer some requests itself, to play a flaky network."""

    upstream = ""

    def intercept(self, body: bytes) -> bool:
        """Answer the request here instead of forwarding it; True when answered."""
        return False

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.intercept(body):
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        reply = requests.request(self.command, self.upstream + self.path, data=body, headers=headers, timeout=30)
        self.send_response(reply.status_code)
        self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


def tiny_sweep(name: str) -> dict:
    """The smallest real sweep: two one-epoch trials of a tiny CNN on synthetic data (seconds each)."""
    return {
        "name": name,
        "data": {"name": "synthetic", "num_samples": 64},
        "model": {"name": "small_cnn", "width": 0.25},
        "train": {"epochs": 1, "batch_size": 32},
        "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
        "objective": {"metric": "ptq_rtn_w4a8/top1"},
        "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
        "sweep": {"num_samples": 2, "max_concurrent": 2, "scheduler": "none"},
    }


def wait_group_gone(group: int, timeout: float = 30) -> None:
    """Wait until no live process of the killed group is left (Ray's raylet, its workers), so that
    the next driver never shares the experiment folder with a dying trial of the last one.
    Zombies do not count: they write nothing, and their reaper is not ours."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone while we looked
            if int(fields[2]) == group and fields[0] != "Z":
                alive.append(stat.parent.name)
        if not alive:
            return
        time.sleep(0.2)


def kill_group_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL ``process``'s whole group (the driver and the Ray it started) once ``ready()`` holds,
    then wait until the group is gone. Fails if the process ends first or nothing happens in time."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"it ended before the kill: {process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no progress before the kill"
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    wait_group_gone(process.pid)


def cli_main(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """An ``r2sweep`` command through the CLI's ``main`` in this process: its exit status and
    its (stdout, stderr), without the seconds a fresh interpreter spends importing torch,
    Ray and MLflow. For refusals and reads; each test file still runs the real
    ``python -m r2sweep.cli`` in its own process where a process's behaviour is the point."""
    from r2sweep.cli.app import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the working directory on it
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["r2sweep", *args], status, out, err)

