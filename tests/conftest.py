"""Shared test settings."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import requests
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run the suite single-threaded.

    Test models see a few samples of at most 32x32: intra-op threading only adds
    hand-off cost, which on a busy 2-core machine multiplies step times by ~50.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    with serve_mlflow(root, f"sqlite:///{root / 'db.sqlite'}") as url:
        yield url


@contextlib.contextmanager
def serve_mlflow(
    root: Path,
    backend_uri: str,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 (``port``, else a free one) until the block ends; yields its URL."""
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",  # the default 4 workers take far longer to start on 2 cores
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(root / "artifacts"),
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


def run_tracked_sweeps(root: Path, *specs: dict) -> Path:
    """Run each sweep spec (a dict) on a fresh local Ray, tracked in ``root/mlflow.db``; return ``root``.

    The real path end to end: Ray Tune, Optuna, the tracking journal, MLflow.
    """
    import ray
    import yaml

    from r2sweep.sweep.callbacks import TrackingCallback
    from r2sweep.sweep.spec import load_sweep_spec
    from r2sweep.sweep.tuner import experiment_path, run_sweep
    from r2sweep.tracking import Tracker

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}")
        for data in specs:
            spec = load_sweep_spec(data)
            callback = TrackingCallback(tracker, spec, yaml.safe_dump(data), name=spec.name,
                                        experiment_path=experiment_path(root / "results", spec.name))
            run_sweep(spec, storage=root / "results", callbacks=[callback])
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
