"""``r2sweep report`` on real tiny sweeps in a real MLflow store: the page, its figures, the parent run."""

from __future__ import annotations

import base64
import html as html_escaping
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray  # noqa: F401 - a hard dependency: a broken install fails here, never skips
import yaml
from conftest import run_tracked_sweeps
from PIL import Image

from r2sweep.analysis.figures import BitsSeries, TrialPoint, accuracy_vs_bits, optimization_history
from r2sweep.analysis.report import PAGE, REPORT_ARTIFACT_DIR, build_report, importance_groups, range_edge_advice
from r2sweep.analysis.select import read_sweep
from r2sweep.cli.app import main
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.tracking.store import TAG_ROLE, Tracker

pytestmark = pytest.mark.ray

BASE = {
    "data": {"name": "synthetic", "num_samples": 128},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2, "batch_size": 32},
    "r2": {"kind": "none"},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2, 4, 8]}],
}
KINDS = {**BASE, "name": "report-kinds",
         "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
         "search": {"r2.kind": {"choice": ["none", "linf"]},
                    "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": ["linf"]}},
                    "train.lr": {"loguniform": [0.01, 0.1]}},
         "sweep": {"num_samples": 10, "max_concurrent": 2, "seed": 0, "sampler": "random", "scheduler": "none"}}
PARETO = {**BASE, "name": "report-pareto",
          "objective": [{"metric": "ptq_rtn_w2a8/top1", "mode": "max"}, {"metric": "fp/top1", "mode": "max"}],
          "search": {"r2.kind": {"choice": ["none", "linf"]}, "train.lr": {"loguniform": [0.01, 0.1]}},
          "sweep": {"num_samples": 5, "max_concurrent": 2, "seed": 1, "sampler": "random", "scheduler": "none"}}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_tracked_sweeps(tmp_path_factory.mktemp("report"), KINDS, PARETO)


def _tracker(store: Path) -> Tracker:
    return Tracker(f"sqlite:///{store / 'mlflow.db'}")


def _trials(tracker: Tracker, name: str) -> list:
    experiment = tracker.client.get_experiment_by_name(name)
    return tracker.client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")


def _valid_png(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.verify()  # checks every chunk's CRC
    return Image.open(io.BytesIO(data)).size


def test_report_writes_a_self_contained_page_with_valid_figures_and_logs_them(store: Path) -> None:
    tracker = _tracker(store)
    report = build_report(tracker, "report-kinds", store / "out-kinds")
    names = sorted(p.name for p in report.figures)
    assert names == ["accuracy_vs_bits.png", "accuracy_vs_bytes.png", "optimization_history.png",
                     "parameter_importances.png", "weight_histograms.png"]
    html = report.page.read_text()
    # Self-contained: no script, no stylesheet link, every image inline.
    assert "<script" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    inline = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(inline) == len(report.figures) == len(re.findall(r"<img ", html))
    for path, encoded in zip(report.figures, inline):
        data = path.read_bytes()
        width, height = _valid_png(data)
        assert width >= 600 and height >= 200 and len(data) > 5000
        assert base64.b64decode(encoded) == data  # the page shows exactly the file beside it
    # The headline numbers are MLflow's.
    runs = _trials(tracker, "report-kinds")
    best = max(r.data.metrics["ptq_rtn_w4a8/top1"] for r in runs)
    no_r2 = max(r.data.metrics["ptq_rtn_w4a8/top1"] for r in runs if r.data.params["r2.kind"] == "none")
    assert f'<div class="value ">{best:.2f}</div>' in html
    assert f"{best - no_r2:+.2f}</div>" in html and f"({no_r2:.2f})" in html
    assert html.count("<tr") == 1 + len(runs) + 1 + 3  # header + trials; header + 2 kinds + whole sweep
    # Logged on the sweep's parent run, byte for byte.
    sweep, _ = read_sweep(tracker, "report-kinds")
    assert report.logged_to_run == sweep.parent_run_id
    logged = {Path(a.path).name: a.file_size for a in tracker.client.list_artifacts(sweep.parent_run_id, REPORT_ARTIFACT_DIR)}
    assert logged == {p.name: p.stat().st_size for p in [*report.figures, report.page]}
    assert not [p for p in report.page.parent.iterdir() if p.name.startswith(".")]  # no scratch left
    # Range-edge advice, when there is any, is on the page under its own heading.
    assert ("Worth checking" in html) == bool(report.advice)
    assert all(html_escaping.escape(line) in html for line in report.advice)


def test_importances_are_fanova_over_the_parameters_the_trials_have(store: Path) -> None:
    tracker = _tracker(store)
    _, spec = read_sweep(tracker, "report-kinds")
    finished = _trials(tracker, "report-kinds")
    groups, notes = importance_groups(finished, spec)
    title, everything = groups[0]
    # Across all trials only the parameters every trial has: r2.strength exists only with linf.
    assert title.startswith(f"all {len(finished)} finished trials") and set(everything) == {"r2.kind", "train.lr"}
    assert sum(everything.values()) == pytest.approx(1.0)
    with_r2 = [r for r in finished if r.data.params["r2.kind"] == "linf"]
    if len(with_r2) >= 4:
        assert set(groups[1][1]) == {"r2.strength", "train.lr"}  # r2.kind is constant there
    else:
        assert len(groups) == 1 and "r2.strength" in notes[0] and "needs at least 4" in notes[0]


def test_multi_objective_report_has_the_pareto_front(store: Path) -> None:
    report = build_report(_tracker(store), "report-pareto", store / "out-pareto", log_to_run=False)
    assert "pareto_front.png" in [p.name for p in report.figures]
    _valid_png((store / "out-pareto" / "pareto_front.png").read_bytes())
    assert report.logged_to_run is None
    assert 'id="pareto"' in report.page.read_text()


def test_confirm_candidates_of_a_multi_objective_sweep_are_its_pareto_front(store: Path) -> None:
    from r2sweep.analysis.confirm import _top_trials

    sweep, spec = read_sweep(_tracker(store), "report-pareto")
    finished = [r for r in sweep.trial_runs() if all(o.metric in r.data.metrics for o in spec.objectives)]
    metrics = [(r.data.metrics["ptq_rtn_w2a8/top1"], r.data.metrics["fp/top1"]) for r in finished]
    dominated = {r.info.run_id for r, m in zip(finished, metrics)
                 if any(o[0] >= m[0] and o[1] >= m[1] and o != m for o in metrics)}
    assert dominated, metrics  # the seeded sweep has some: otherwise this test could not fail
    candidates = _top_trials(sweep, spec, top=len(finished))
    assert {r.info.run_id for r in candidates} == {r.info.run_id for r in finished} - dominated
    assert [r.data.metrics["ptq_rtn_w2a8/top1"] for r in candidates] == sorted(
        (r.data.metrics["ptq_rtn_w2a8/top1"] for r in candidates), reverse=True)


def test_a_running_sweep_reports_what_has_finished(store: Path, tmp_path: Path) -> None:
    tracker = _tracker(store)
    sweep, _ = read_sweep(tracker, "report-kinds")
    run_id = sweep.trial_run("still-running", {"r2.kind": "linf", "train.lr": 0.05})
    try:
        report = build_report(tracker, "report-kinds", tmp_path / "out", log_to_run=False)
        html = report.page.read_text()
        assert "<td>still-running</td><td>running</td>" in html
    finally:
        tracker.client.delete_run(run_id)


def test_stopped_and_failed_trials_are_drawn(tmp_path: Path) -> None:
    points = [TrialPoint(1, "none", "finished", objective=50.0, proxy=40.0),
              TrialPoint(2, "linf", "stopped", proxy=20.0),
              TrialPoint(3, "margin", "diverged"),
              TrialPoint(4, "linf", "finished", objective=70.0)]
    path = optimization_history(points, "ptq_rtn_w2a8/top1", "max", tmp_path / "h.png")
    _valid_png(path.read_bytes())


def test_accuracy_against_bits_draws_seed_spread_as_error_bars(tmp_path: Path) -> None:
    series = [BitsSeries("no R2, 3 seeds", "none", {1: 40.0, 2: 60.0}, 70.0, {1: 3.0, 2: 1.0}),
              BitsSeries("R2 linf, 3 seeds", "linf", {1: 55.0, 2: 66.0}, 71.0, {1: 2.0, 2: 0.5})]
    path = accuracy_vs_bits([("dkm_w*", series)], tmp_path / "bits.png")
    _valid_png(path.read_bytes())


def test_cli_writes_the_report_and_says_where(store: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(store)
    assert main(["report", "report-kinds", "--out", "cli-out", "--no-log"]) == 0
    out = capsys.readouterr().out
    assert f"report: cli-out/{PAGE} (5 figures" in out and "logged" not in out
    assert (store / "cli-out" / PAGE).is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "report-kind", "--out", "bad"], "no sweep named 'report-kind' in sqlite:///mlflow.db; did you mean 'report-kinds'?"),
        (["report", "zzz", "--out", "bad"], "no sweep named 'zzz' in sqlite:///mlflow.db (experiments there: "),
        (["report", "empty", "--out", "bad"], "sweep 'empty' has no trials yet"),
        (["report", "unfinished", "--out", "bad"], "sweep 'unfinished' has no finished trial with ptq_rtn_w4a8/top1 yet (1 started)"),
    ],
)
def test_bad_names_and_empty_sweeps_are_one_line_exit_2(store: Path, monkeypatch, capsys, argv, message) -> None:
    tracker = _tracker(store)
    if tracker.find_sweep("empty") is None:
        tracker.start_sweep("empty", yaml.safe_dump({**KINDS, "name": "empty"}))
        unfinished = tracker.start_sweep("unfinished", yaml.safe_dump({**KINDS, "name": "unfinished"}))
        unfinished.trial_run("t0", {"r2.kind": "none"})
    monkeypatch.chdir(store)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (store / "bad").exists()


def test_no_store_is_an_error_and_is_not_created(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["report", "anything", "--out", "r"]) == 2
    assert "no MLflow store at mlflow.db" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _run_with(**params: str) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(params=params))


def test_a_best_trial_on_the_edge_of_a_range_is_flagged() -> None:
    spec = load_sweep_spec(KINDS)  # train.lr in [0.01, 0.1] (log), r2.strength in [1e-3, 1e-1] (log)
    at_top = _run_with(**{"r2.kind": "linf", "r2.strength": "0.01", "train.lr": "0.099"})
    (line,) = range_edge_advice([("the best trial", at_top)], spec)
    assert line.startswith("train.lr = 0.099 in the best trial sits at the upper edge of its range [0.01, 0.1]")
    assert "widen the range" in line
    at_bottom = _run_with(**{"r2.kind": "none", "train.lr": "0.0101"})  # no strength: nothing to say about it
    (line,) = range_edge_advice([("the best trial without R2", at_bottom)], spec)
    assert "lower edge" in line and "beyond 0.01" in line
    inside = _run_with(**{"r2.kind": "linf", "r2.strength": "0.0012", "train.lr": "0.03"})
    assert range_edge_advice([("the best trial", inside)], spec) == ["r2.strength = 0.0012 in the best trial sits at "
                                                                     "the lower edge of its range [0.001, 0.1]: the optimum "
                                                                     "may lie beyond 0.001; widen the range and sweep again."]
    assert range_edge_advice([("the best trial", _run_with(**{"r2.kind": "linf", "r2.strength": "0.01",
                                                              "train.lr": "0.03"}))], spec) == []
