"""The tracking journal against real MLflow stores: what MLflow refuses for good is set aside, an outage is waited out.

The operations are applied the way the sweep's tracking callback applies them
(a trial's run id is looked up once and reused), to a SQLite store and to a real
``mlflow server``. The refusal is a real one: metrics for the run of a trial the
sweep forgot (``forget`` deletes the run), which MLflow rejects with
INVALID_PARAMETER_VALUE however often it is sent.
"""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ForwardingHandler, new_mlflow_store
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE

from r2sweep.tracking.errors import is_permanent
from r2sweep.tracking.journal import JournalFlusher, TrackingJournal
from r2sweep.tracking.store import SweepRun, Tracker, TrackingError


@pytest.fixture(scope="module")
def sqlite_tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    root = tmp_path_factory.mktemp("journal-sqlite")
    return Tracker(new_mlflow_store(root / "mlflow.db"), artifact_location=str(root / "artifacts"))


def _applier(sweep: SweepRun) -> Any:
    """Applies journal operations to ``sweep`` as the tracking callback does."""
    runs: dict[str, str] = {}

    def apply(op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "trial":
            runs[op["trial"]] = sweep.trial_run(op["trial"], op["params"])
        elif kind == "metrics":
            sweep.log_metrics(runs[op["trial"]], op["metrics"], step=op["step"], timestamp=op["timestamp"])
        elif kind == "tags":
            sweep.set_tags(runs[op["trial"]], op["tags"])
        elif kind == "end_trial":
            sweep.end_trial(runs[op["trial"]], op["status"])
        elif kind == "forget":
            for trial_id in op["trials"]:
                sweep.forget_trial(trial_id)
        elif kind == "end_sweep":
            sweep.end(op["status"])

    return apply


def _metrics(journal: TrackingJournal, trial: str, step: int, value: float) -> None:
    journal.append("metrics", trial=trial, metrics={"val/top1": value}, step=step, timestamp=1_000 + step)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("server", marks=pytest.mark.server)])
def test_an_operation_mlflow_refuses_for_good_is_set_aside_and_every_later_one_lands(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    tracker = request.getfixturevalue("sqlite_tracker") if backend == "sqlite" else Tracker(request.getfixturevalue("mlflow_server"))
    sweep = tracker.start_sweep(f"refused-{backend}", "x: 1\n")
    journal = TrackingJournal(tmp_path / "tracking")
    journal.append("trial", trial="t0", params={"r2.kind": "linf"})
    journal.append("trial", trial="t1", params={"r2.kind": "none"})
    _metrics(journal, "t0", 0, 50.0)
    journal.append("forget", trials=["t1"])  # deletes t1's run ...
    _metrics(journal, "t1", 0, 40.0)  # ... so this one, operation 4, is refused for good
    _metrics(journal, "t0", 1, 60.0)
    journal.append("tags", trial="t0", tags={"r2sweep.outcome": "finished"})
    journal.append("end_trial", trial="t0", status="FINISHED")
    journal.append("end_sweep", status="FINISHED")

    lines: list[str] = []
    flusher = JournalFlusher(journal, _applier(sweep), retry_s=0.2, report=lines.append)
    try:
        started = time.monotonic()
        assert flusher.flush(timeout=30), f"still pending: {journal.pending()[:1]}; reported: {lines}"
        assert time.monotonic() - started < 25
    finally:
        flusher.close()

    assert journal.pending() == [] and journal.applied() == 9
    (rejected,) = TrackingJournal(tmp_path / "tracking").rejected()  # durable: read back from the folder
    assert rejected["index"] == 4 and rejected["op"]["trial"] == "t1" and rejected["op"]["metrics"] == {"val/top1": 40.0}
    assert "must be in the 'active' state" in rejected["reason"]
    (refusal,) = [line for line in lines if "refused" in line]  # reported exactly once
    assert "operation 4 (metrics of trial t1)" in refusal and str(journal.rejected_file) in refusal
    assert not any("paused" in line for line in lines)  # a refusal is no outage

    client = MlflowClient(tracker.tracking_uri)
    (t0,) = [run for run in sweep.trial_runs() if run.data.tags["r2sweep.trial_id"] == "t0"]
    history = client.get_metric_history(t0.info.run_id, "val/top1")
    assert [(m.step, m.value) for m in history] == [(0, 50.0), (1, 60.0)]
    assert t0.data.tags["r2sweep.outcome"] == "finished" and t0.info.status == "FINISHED"
    assert client.get_run(sweep.parent_run_id).info.status == "FINISHED"


class _Forward(ForwardingHandler):
    """Forwards every request to ``upstream`` (a real mlflow server)."""


def _serve(port: int) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_outage_is_retried_until_the_server_is_back_and_only_the_refusal_is_skipped(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tracking address is a proxy to the real server: stopping it and starting it
    # again on the same port is, to the client, the server going away and coming back.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the journal retries, not MLflow
    _Forward.upstream = mlflow_server
    proxy = _serve(0)
    port = proxy.server_address[1]
    tracker = Tracker(f"http://127.0.0.1:{port}")
    tracker.check_access()  # the reachability probe lets a live server through
    sweep = tracker.start_sweep("outage-and-refusal", "x: 1\n")
    journal = TrackingJournal(tmp_path / "tracking")
    lines: list[str] = []
    flusher = JournalFlusher(journal, _applier(sweep), retry_s=0.2, report=lines.append)
    try:
        for trial in ("t0", "t1"):
            journal.append("trial", trial=trial, params={})
        _metrics(journal, "t0", 0, 50.0)
        flusher.notify()
        assert flusher.flush(timeout=30)

        proxy.shutdown()
        proxy.server_close()  # connection refused from now on
        journal.append("forget", trials=["t1"])
        _metrics(journal, "t1", 0, 40.0)  # refused for good, but only once the server answers
        _metrics(journal, "t0", 1, 60.0)
        journal.append("end_trial", trial="t0", status="FINISHED")
        flusher.notify()
        deadline = time.monotonic() + 20
        while not any(line.startswith("tracking paused") for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.1)
        time.sleep(1.0)  # several retries against the stopped server
        assert [i for i, _ in journal.pending()] == [3, 4, 5, 6] and journal.rejected() == []

        proxy = _serve(port)
        assert flusher.flush(timeout=30), f"still pending: {journal.pending()[:1]}; reported: {lines}"
    finally:
        flusher.close()
        proxy.shutdown()
        proxy.server_close()

    assert len(lines) == 3, lines  # each reported once
    assert lines[0].startswith("tracking paused") and lines[1].startswith("tracking resumed")
    assert lines[2].startswith("MLflow refused tracking operation 4 (metrics of trial t1)")
    assert [entry["index"] for entry in journal.rejected()] == [4]
    client = MlflowClient(mlflow_server)
    (t0,) = [run for run in Tracker(mlflow_server).find_sweep(sweep.name).trial_runs()
             if run.data.tags["r2sweep.trial_id"] == "t0"]
    history = client.get_metric_history(t0.info.run_id, "val/top1")
    assert [(m.step, m.value) for m in history] == [(0, 50.0), (1, 60.0)]  # nothing lost, nothing doubled
    assert t0.info.status == "FINISHED"


def _wrapped(cause: BaseException) -> TrackingError:
    """What the journal sees: the Tracker's error, raised from MLflow's."""
    try:
        raise TrackingError("http://mlflow:5000", "log 1 metrics to run r", str(cause)) from cause
    except TrackingError as error:
        return error


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error", response=response)


@pytest.mark.parametrize(
    ("cause", "permanent"),
    [
        (MlflowException("The run r must be in the 'active' state.", error_code=INVALID_PARAMETER_VALUE), True),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run 'r' not found"}), True),
        (RestException({"error_code": "BAD_REQUEST", "message": "bad"}), True),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "db down"}), False),  # 503
        (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}), False),  # 429
        (RestException({"error_code": "UNAUTHENTICATED", "message": "who?"}), False),  # 401: fixed outside
        (RestException({"error_code": "PERMISSION_DENIED", "message": "no"}), False),  # 403: fixed outside
        (RestException({"error_code": "ENDPOINT_NOT_FOUND", "message": "no route"}), False),  # a proxy's fault
        (MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 413 != 200. "
                         "Response body: '<html>Request Entity Too Large</html>'"), True),
        (MlflowException("API request to endpoint /x failed with error code 408 != 200. Response body: ''"), False),
        (MlflowException("API request to http://mlflow:5000/x failed with exception HTTPConnectionPool: "
                         "Max retries exceeded (Connection refused)"), False),
        (MlflowException("(sqlite3.OperationalError) database is locked", error_code=BAD_REQUEST), False),
        (requests.ConnectionError("Connection refused"), False),
        (requests.Timeout("read timed out"), False),
        (_http_error(404), True),
        (_http_error(503), False),
        (OSError("No space left on device"), False),
        (ValueError("anything else"), False),
    ],
)
def test_only_a_client_error_from_the_store_is_permanent(cause: BaseException, permanent: bool) -> None:
    assert is_permanent(_wrapped(cause)) is permanent
    assert is_permanent(cause) is permanent
