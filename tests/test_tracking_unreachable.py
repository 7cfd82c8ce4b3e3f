"""A tracking server that is not there fails each command in seconds, with one line naming it.

Through the real CLI, in-process, with MLflow's default retries (7, with backoff:
about four minutes per request) left as they are: only the first reachability
probe is a single quick try. Nothing is created: no MLflow database, no results
folder, no Ray.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml
from conftest import _free_port

import r2sweep.analysis.confirm  # noqa: F401
import r2sweep.analysis.report  # noqa: F401

# What the commands import, imported now: the bound below is on the waiting, not on imports.
import r2sweep.tune.callbacks  # noqa: F401
import r2sweep.tune.tuner  # noqa: F401
from r2sweep.cli.app import main

SPEC = {
    "name": "nowhere",
    "data": {"name": "synthetic", "num_samples": 64},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 1},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
    "sweep": {"num_samples": 2, "max_concurrent": 1},
}
COMMANDS = {
    "sweep": ["sweep", "space.yaml"],
    "best": ["best", "nowhere"],
    "compare": ["compare", "nowhere"],
    "report": ["report", "nowhere", "--out", "report"],
    "confirm": ["confirm", "nowhere"],
}


@pytest.mark.parametrize("where", ["refused", "unknown-host"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unreachable_server_fails_fast_naming_it_and_creates_nothing(
    command: str, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # MLflow's defaults: minutes
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(copy.deepcopy(SPEC)))
    if where == "refused":
        uri = shown = f"http://127.0.0.1:{_free_port()}"  # nobody listens there
    else:
        uri, shown = "http://alice:hunter2@no-such-host.invalid:5000", "http://alice:***@no-such-host.invalid:5000"

    started = time.monotonic()
    status = main([*COMMANDS[command], "--tracking-uri", uri])
    elapsed = time.monotonic() - started

    assert elapsed < 30, f"took {elapsed:.0f} s"  # MLflow's retries alone would take minutes
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("r2sweep: error:")]
    assert len(errors) == 1, errors
    assert f"MLflow at {shown}: could not reach the tracking store" in errors[0]
    assert ("connection refused" if where == "refused" else "unknown host") in errors[0]
    assert "hunter2" not in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # no mlflow.db, r2sweep_results, report
    assert status == 1  # not 2: the input was fine, the server is not there
