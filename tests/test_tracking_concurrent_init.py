"""Two sweeps started together on a new SQLite store both get it (issue 42, finding 4).

Both used to run MLflow's schema migrations at once, and one died with ``No such index``
or alembic's "expected to match one row". Real processes, a real store, started at the
same instant, several times over.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

OPEN_AND_WRITE = """
import os, sys, time
from r2sweep.tracking.store import Tracker
tracker = Tracker("sqlite:///" + sys.argv[1])
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
tracker.client.create_experiment(sys.argv[3])
print("ok")
"""


@pytest.mark.slow
def test_two_processes_opening_a_new_sqlite_store_at_once_both_succeed(tmp_path: Path) -> None:
    for round_ in range(2):
        database = tmp_path / f"round{round_}" / "mlflow.db"
        database.parent.mkdir()
        go = database.parent / "go"
        runs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_WRITE, str(database), str(go), name],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
        for run in runs:  # both past their imports, then both open the new store at once
            assert run.stdout.readline().strip() == "ready"
        go.touch()
        outputs = [run.communicate(timeout=120) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], [err[-600:] for _, err in outputs]
        from mlflow import MlflowClient

        names = {e.name for e in MlflowClient(tracking_uri=f"sqlite:///{database}").search_experiments()}
        assert {"a", "b"} <= names
        assert sorted(p.name for p in database.parent.iterdir()) == ["go", "mlflow.db"]  # no lock file left
