"""Two sweeps started together on a new store both get it (issue 42, finding 4).

Both used to run MLflow's schema migrations at once, and one died with ``No such index``
or alembic's "expected to match one row"; Optuna's storage has no guard of its own. Real
processes, a real store (MLflow's and Optuna's), started at the same instant, several
times over. The same on a fresh PostgreSQL database: tests/test_tracking_postgres.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

OPEN_AND_WRITE = """
import os, sys, time
import optuna
from r2sweep.tracking.store import Tracker
from r2sweep.tune.optuna_mirror import check_storage
tracking_uri, optuna_url, go, name = sys.argv[1:]
tracker = Tracker(tracking_uri)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
tracker.client.create_experiment(name)
check_storage(optuna_url, name)  # opens (creates) the Optuna storage as a sweep does
optuna.create_study(study_name=name, storage=optuna_url)
print("ok")
"""


def open_at_once(tracking_uri: str, optuna_url: str, go: Path) -> None:
    """Two processes open the same two new stores at the same instant; both must succeed."""
    runs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_WRITE, tracking_uri, optuna_url, str(go), name],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for run in runs:  # both past their imports, then both open the new store at once
        assert run.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-600:] for _, err in outputs]
    from mlflow import MlflowClient

    assert {"a", "b"} <= {e.name for e in MlflowClient(tracking_uri=tracking_uri).search_experiments()}
    assert {s.study_name for s in optuna.get_all_study_summaries(optuna_url)} == {"a", "b"}


@pytest.mark.slow
def test_two_processes_opening_a_new_sqlite_store_at_once_both_succeed(tmp_path: Path) -> None:
    for round_ in range(2):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        open_at_once(f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder / 'optuna.db'}", folder / "go")
        assert sorted(p.name for p in folder.iterdir()) == ["go", "mlflow.db", "optuna.db"]  # no lock file left
