"""The MLflow adapter against real MLflow backends: a SQLite file and a real ``mlflow server``.

No mocks: every assertion reads back through a fresh ``MlflowClient``, the way
a user (or the MLflow UI) would see the sweep. The SQLite database and the
server are module-scoped because creating either costs seconds here (schema
migrations; the server needs 10-20 s to start on a busy 2-core machine).
"""

from __future__ import annotations

import http.server
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import requests
import torch
from conftest import ForwardingHandler, _free_port, new_mlflow_store
from mlflow import MlflowClient
from torch import nn

from r2sweep import __version__
from r2sweep.core.plots import compare_weight_histograms, outlier_layers, weight_histograms
from r2sweep.core.pretrained_file import export_archive
from r2sweep.tracking.store import (
    SPEC_ARTIFACT,
    TAG_PARENT_RUN,
    TAG_ROLE,
    TAG_SWEEP_NAME,
    TAG_TRIAL_ID,
    TAG_VERSION,
    Tracker,
    TrackingError,
    sanitize_key,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPEC = "name: {name}\nmetric: ptq_adaround_w2a8/top1\nsearch_space:\n  r2.strength: {{loguniform: [1e-4, 1e-1]}}\n"
@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One database for the module: creating one runs MLflow's schema migrations (~5 s).
    return new_mlflow_store(tmp_path_factory.mktemp("mlflow-sqlite") / "mlflow.db")


@pytest.fixture(scope="module")
def sqlite_tracker(sqlite_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    # An explicit artifact location: MLflow's default for SQLite is ./mlruns in the cwd.
    return Tracker(sqlite_uri, artifact_location=str(tmp_path_factory.mktemp("mlflow-artifacts")))


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 10)
    )
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = 2.5  # one outlier: this layer must rank first
    return model


def _trial_params(index: int) -> dict[str, object]:
    return {"r2.kind": "linf", "r2.strength": 0.01 * (index + 1), "train.lr": 0.1, "model.name": "tiny_cnn"}


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _run_basic_flow(tracker: Tracker, name: str, work: Path) -> None:
    """Start a sweep, log 3 trials, check everything through a fresh client, end, resume."""
    work.mkdir(parents=True, exist_ok=True)
    hist = weight_histograms(_tiny_cnn(), work / "hist.png", layers=3)
    sweep = tracker.start_sweep(name, SPEC.format(name=name), tags={"owner": "tests"})
    run_ids = []
    for index in range(3):
        run_id = sweep.trial_run(f"trial_{index:05d}", _trial_params(index))
        run_ids.append(run_id)
        for epoch in range(3):
            logged = sweep.log_metrics(
                run_id,
                {"train/loss": 1.0 / (epoch + 1), "val/top1": 0.5 + 0.1 * epoch, "diverged": float("nan"), "note": "x"},
                step=epoch,
            )
            assert set(logged) == {"train/loss", "val/top1"}
        sweep.log_metrics(run_id, {"ptq_adaround_w2a8/top1": 0.6 + index / 10, "fp/top1": np.float32(0.9), "done": 1})
        sweep.log_text(run_id, f"seed: {index}\nr2:\n  kind: linf\n", "trial_config.yaml")
        sweep.log_artifact(run_id, hist, "plots")
        sweep.set_tags(run_id, {"ray.trial_status": "TERMINATED"})
    sweep.end_trial(run_ids[0], "FINISHED")
    sweep.end_trial(run_ids[1], "FAILED")  # run_ids[2] stays RUNNING until end()

    client = MlflowClient(tracker.tracking_uri)
    experiment = client.get_experiment_by_name(name)
    all_runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in all_runs if run.data.tags.get(TAG_ROLE) == "sweep"]
    assert [run.info.run_id for run in parents] == [sweep.parent_run_id]
    parent_tags = parents[0].data.tags
    assert parent_tags[TAG_SWEEP_NAME] == name and parent_tags[TAG_VERSION] == __version__
    assert parent_tags["owner"] == "tests"
    commit = parent_tags.get("mlflow.source.git.commit")
    assert commit is None or len(commit) == 40  # present when the cwd is a checkout
    spec_file = client.download_artifacts(sweep.parent_run_id, SPEC_ARTIFACT, str(work))
    assert Path(spec_file).read_text() == SPEC.format(name=name)

    children = [run for run in all_runs if run.data.tags.get(TAG_PARENT_RUN) == sweep.parent_run_id]
    assert len(children) == 3 and len(all_runs) == 4
    assert {run.info.run_id for run in children} == set(run_ids)
    by_trial = {run.data.tags[TAG_TRIAL_ID]: run for run in children}
    for index in range(3):
        run = by_trial[f"trial_{index:05d}"]
        assert run.data.params == {key: str(value) for key, value in _trial_params(index).items()}
        assert run.data.tags[TAG_ROLE] == "trial"
        history = client.get_metric_history(run.info.run_id, "val/top1")
        assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7)]
        assert run.data.metrics["ptq_adaround_w2a8/top1"] == pytest.approx(0.6 + index / 10)
        assert run.data.metrics["fp/top1"] == pytest.approx(0.9) and run.data.metrics["done"] == 1
        assert "diverged" not in run.data.metrics and "note" not in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"trial_config.yaml", "plots"}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/hist.png"]
        assert run.data.tags["ray.trial_status"] == "TERMINATED"
    assert len(sweep.trial_runs()) == 3

    # A restored trial asks again: same run, RUNNING again, params untouched
    # (a changed value is not logged: MLflow params are immutable).
    changed = {**_trial_params(0), "r2.strength": 0.5, "extra.new": 7}
    assert sweep.trial_run("trial_00000", changed) == run_ids[0]
    again = client.get_run(run_ids[0])
    assert again.info.status == "RUNNING"
    assert again.data.params["r2.strength"] == str(_trial_params(0)["r2.strength"])
    assert again.data.params["extra.new"] == "7"  # a param missing from the run is added
    assert sweep.trial_run("trial_00002", _trial_params(2)) == run_ids[2]
    assert len(client.search_runs([experiment.experiment_id])) == 4

    sweep.end()
    statuses = {run.info.run_id: run.info.status for run in client.search_runs([experiment.experiment_id])}
    assert "RUNNING" not in statuses.values()
    assert statuses[sweep.parent_run_id] == "FINISHED"
    assert statuses[run_ids[0]] == "KILLED" and statuses[run_ids[1]] == "FAILED" and statuses[run_ids[2]] == "KILLED"

    # The sweep driver restarts: resume finds the same parent and trial runs.
    resumed = tracker.start_sweep(name, SPEC.format(name=name), resume=True)
    assert resumed.parent_run_id == sweep.parent_run_id
    assert tracker.find_sweep(name).parent_run_id == sweep.parent_run_id
    assert client.get_run(sweep.parent_run_id).info.status == "RUNNING"
    assert resumed.trial_run("trial_00001", _trial_params(1)) == run_ids[1]
    resumed.end("KILLED")
    final = client.search_runs([experiment.experiment_id])
    assert len(final) == 4 and all(run.info.status != "RUNNING" for run in final)

    with pytest.raises(TrackingError, match=r"no sweep named 'never-started' in "):
        tracker.start_sweep("never-started", "", resume=True)
    assert tracker.find_sweep("never-started") is None


def test_sweep_flow_sqlite(sqlite_tracker: Tracker, tmp_path: Path) -> None:
    _run_basic_flow(sqlite_tracker, "flow-sqlite", tmp_path)


def test_sweep_flow_server(mlflow_server: str, tmp_path: Path) -> None:
    _run_basic_flow(Tracker(mlflow_server), "flow-server", tmp_path)


def test_opening_trial_runs_searches_the_store_once_not_once_per_trial(sqlite_tracker: Tracker,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A search per trial scans every run of the experiment: a sweep's cost would grow with its trials.
    sweep = sqlite_tracker.start_sweep("known-runs", SPEC.format(name="known-runs"))
    searches: list[str] = []
    search = sweep.client.search_runs
    monkeypatch.setattr(sweep.client, "search_runs", lambda *a, **k: searches.append(k["filter_string"]) or search(*a, **k))
    run_ids = [sweep.trial_run(f"t{i}", {"i": i}) for i in range(30)]
    assert len(searches) == 1 and len(set(run_ids)) == 30
    sweep.end_trial(run_ids[3], "FAILED")
    assert sweep.trial_run("t3", {"i": 3, "j": 1}) == run_ids[3]  # restarted: the same run, RUNNING again
    sweep.forget_trial("t4")
    assert len(searches) == 1
    run = sweep.client.get_run(run_ids[3])
    assert run.info.status == "RUNNING" and run.data.params == {"i": "3", "j": "1"}
    # A driver started again (another SweepRun, as after a crash) reads them back with one search.
    resumed = sqlite_tracker.start_sweep("known-runs", SPEC.format(name="known-runs"), resume=True)
    monkeypatch.setattr(resumed.client, "search_runs", lambda *a, **k: searches.append(k["filter_string"]) or search(*a, **k))
    before = len(searches)
    assert [resumed.trial_run(f"t{i}", {"i": i}) for i in (0, 3, 29)] == [run_ids[0], run_ids[3], run_ids[29]]
    assert resumed.trial_run("t4", {"i": 4}) != run_ids[4]  # forgotten (deleted): a new run
    assert len(searches) - before == 1
    resumed.end()


def test_sweep_run_pickles_and_keys_are_sanitized(sqlite_tracker: Tracker) -> None:
    # The sweep callback is pickled into Ray's tuner.pkl: the client must not be.
    sweep = pickle.loads(pickle.dumps(sqlite_tracker.start_sweep("pickled", "x: 1\n")))
    run_id = sweep.trial_run("t'quote", {"a b": 1})  # a quote cannot go into an MLflow filter
    assert sweep.trial_run("t'quote", {"a b": 1}) == run_id
    logged = sweep.log_metrics(run_id, {"acc@1 (val)": 0.5, "/a//b/": 1.0, "x/../y": 2.0, "t": torch.tensor(3.0)})
    assert logged == {"acc_1 _val_": 0.5, "a/b": 1.0, "x/__/y": 2.0, "t": 3.0}
    assert sanitize_key("ptq_adaround_w2a8/top1") == "ptq_adaround_w2a8/top1"
    assert sanitize_key("r2.strength") == "r2.strength"
    with pytest.raises(ValueError, match="status='DONE' is not valid"):
        sweep.end_trial(run_id, "DONE")
    sweep.end()
    assert MlflowClient(sqlite_tracker.tracking_uri).get_run(run_id).info.status == "KILLED"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("server", marks=pytest.mark.server)])
def test_log_model_and_champion_alias(backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    tracker = request.getfixturevalue("sqlite_tracker") if backend == "sqlite" else Tracker(request.getfixturevalue("mlflow_server"))
    sweep = tracker.start_sweep("models", "x: 1\n")
    example = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    models, versions, run_ids = [], [], []
    for index in range(2):
        torch.manual_seed(index)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        run_id = sweep.trial_run(f"t{index}", {"r2.strength": index})
        archive = tmp_path / f"model{index}.pt2"
        assert export_archive(model, torch.from_numpy(example), archive) is None
        model_uri = sweep.log_model(run_id, archive, input_shape=[6], num_classes=3)
        assert model_uri.startswith("models:/")
        version = sweep.register_champion(run_id, "r2sweep-test-champion", model_uri)
        champion = MlflowClient(tracker.tracking_uri).get_model_version_by_alias("r2sweep-test-champion", "champion")
        assert champion.version == version.version and champion.run_id == run_id
        models.append(model)
        versions.append(version.version)
        run_ids.append(run_id)
    assert versions[0] != versions[1]  # the second registration moved the alias

    # The champion is a loadable model: the second one, with its weights.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    loaded = mlflow.pytorch.load_model("models:/r2sweep-test-champion@champion")
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.from_numpy(example)), models[1](torch.from_numpy(example)))
    sweep.end()


def test_unreachable_server_fails_fast_with_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's defaults retry with exponential backoff for minutes; bound them.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there any more
    start = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        Tracker(uri).start_sweep("nowhere", "x: 1\n")
    assert time.monotonic() - start < 20
    message = str(caught.value)
    assert uri in message and "look up experiment 'nowhere'" in message and "reachable" in message


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """What a server with basic auth answers a client without valid credentials."""

    def _refuse(self) -> None:
        body = b"You are not authenticated. Please provide valid credentials."
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args: object) -> None:
        pass


def test_refused_credentials_name_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(TrackingError, match="check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD") as caught:
            Tracker(uri).find_sweep("secret")
        assert uri in str(caught.value)
        # The access check's reachability probe takes any answer, a 401 too, as "there".
        with pytest.raises(TrackingError, match="check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"):
            Tracker(uri).check_access()
    finally:
        server.shutdown()
        server.server_close()


def test_weight_histograms_png(tmp_path: Path) -> None:
    model = _tiny_cnn()
    assert outlier_layers(model, 2)[0] == "2"  # the layer holding the planted outlier
    path = weight_histograms(model, tmp_path / "sub" / "weights.png", layers=4, bins=50)
    assert path == tmp_path / "sub" / "weights.png"
    _check_png(path)
    clipped = _tiny_cnn()
    with torch.no_grad():
        for weight in clipped.parameters():
            weight.clamp_(-0.1, 0.1)
    _check_png(compare_weight_histograms({"no R2": model, "R2": clipped}, tmp_path / "compare.png", layers=3))
    with pytest.raises(ValueError, match="no Conv/Linear layer"):
        weight_histograms(nn.ReLU(), tmp_path / "none.png")


@pytest.mark.parametrize("layers, models", [(1, 1), (3, 1), (4, 1), (4, 3)])
def test_histogram_labels_stay_inside_the_figure_and_clear_of_each_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layers: int, models: int) -> None:
    # The histogram grid has fixed margins (no layout engine; each trial draws one):
    # every axes with its tick labels, axis labels and title must fit, and not overlap.
    import r2sweep.core.plots as plots

    drawn = []
    save = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda figure, path: (drawn.append(figure), save(figure, path))[1])
    if models == 1:
        weight_histograms(_tiny_cnn(), tmp_path / "w.png", layers=layers)
    else:
        compare_weight_histograms({f"model {i}": _tiny_cnn(i) for i in range(models)}, tmp_path / "w.png", layers=layers)
    (figure,) = drawn
    renderer = figure.canvas.get_renderer()
    page = figure.bbox
    boxes = [ax.get_tightbbox(renderer) for ax in figure.axes if ax.get_visible()]
    title = figure._suptitle.get_window_extent(renderer)
    assert len(boxes) == layers
    for box in [*boxes, title]:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)
    for i, box in enumerate(boxes):
        assert not box.overlaps(title)
        assert not any(box.overlaps(other) for other in boxes[i + 1:])


def test_passwords_in_uris_are_masked_wherever_a_tracker_shows_its_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    from r2sweep.tracking.store import redact_uri

    assert redact_uri("http://alice:s3cr@t@mlflow:5000/x") == "http://alice:***@mlflow:5000/x"
    assert redact_uri("failed: postgresql://u:pw@db:5432/m") == "failed: postgresql://u:***@db:5432/m"
    assert redact_uri("http://mlflow:5000/a@b") == "http://mlflow:5000/a@b"  # no credentials: unchanged
    tracker = Tracker("http://alice:hunter2@127.0.0.1:1")
    assert "hunter2" not in repr(tracker) and "hunter2" not in tracker.display_uri
    assert "hunter2" not in tracker.location and "hunter2" in tracker.pinned().tracking_uri  # a copy that still logs in
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert Tracker().tracking_uri == "http://127.0.0.1:9"  # MLflow's own variable, before the SQLite default
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert Tracker().tracking_uri == "sqlite:///mlflow.db"


def test_a_pinned_tracker_names_the_same_store_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tune unpickles a sweep's callbacks in the resuming driver's directory.
    monkeypatch.chdir(tmp_path)
    relative = Tracker("sqlite:///mlflow.db")
    pinned = pickle.loads(pickle.dumps(relative.pinned()))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert pinned.location == pinned.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert relative.location == f"sqlite:///{tmp_path.resolve() / 'elsewhere' / 'mlflow.db'}"
    assert Tracker("http://127.0.0.1:5000").pinned().location == "http://127.0.0.1:5000"


def test_an_unreachable_server_fails_the_access_check_without_showing_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(f"http://alice:hunter2@127.0.0.1:{_free_port()}")
    with pytest.raises(TrackingError, match=r"reach the tracking store") as caught:
        tracker.check_access()
    assert "hunter2" not in str(caught.value) and "alice:***@" in str(caught.value)


class _FlakyProxy(ForwardingHandler):
    """Forwards to a real MLflow server, answering 503 to the first ``failures`` metric writes."""

    failures = 0
    refused: list[str] = []

    def intercept(self, body: bytes) -> bool:
        if "log-batch" in self.path and type(self).failures > 0:
            type(self).failures -= 1
            type(self).refused.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        return False


def test_transient_server_errors_are_retried_and_nothing_is_doubled(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # keep the test short
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    _FlakyProxy.upstream, _FlakyProxy.failures, _FlakyProxy.refused = mlflow_server, 2, []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        tracker = Tracker(f"http://127.0.0.1:{proxy.server_address[1]}")
        sweep = tracker.start_sweep("flaky-server", "spec: 1")
        run_id = sweep.trial_run("t0", {"r2.kind": "linf"})
        sweep.log_metrics(run_id, {"proxy/top1": 50.0}, step=0)
        sweep.log_metrics(run_id, {"proxy/top1": 60.0}, step=1)
    finally:
        proxy.shutdown()
    assert len(_FlakyProxy.refused) == 2  # the server failed twice ...
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "proxy/top1")
    assert [(m.step, m.value) for m in history] == [(0, 50.0), (1, 60.0)]  # ... and every value landed once


def test_a_relative_sqlite_store_follows_the_working_directory(tmp_path, monkeypatch) -> None:
    # MLflow caches one store per URI string: without resolving, the second
    # directory's tracker would read the first directory's mlflow.db.
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        if name == "second":  # the first store MLflow creates; the second is a copy of an empty one (faster)
            new_mlflow_store(folder / "mlflow.db")
        tracker = Tracker("sqlite:///mlflow.db")
        tracker.client.create_experiment(f"only-in-{name}")
        assert tracker.experiment_names() == [f"only-in-{name}"]
        assert (folder / "mlflow.db").is_file()
