"""``r2sweep study``: a small real study end to end, its driver SIGKILLed mid-study and resumed.

digits, a tiny CNN, two epochs: the tuned baseline's sweep, two R2 kinds' sweeps started
from its best, every winner re-run on two seeds, the controls, the table, the page, the
recommended trial file and the champion. Every number of the table is recomputed here
from MLflow with MLflow's own client, and the study is re-reported from MLflow alone.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import kill_group_when, new_mlflow_store
from mlflow import MlflowClient

import r2sweep

pytestmark = [pytest.mark.slow, pytest.mark.ray]

OBJECTIVE = "ptq_rtn_w2a8/top1"
STUDY = {
    "name": "tiny",
    "data": {"name": "digits"},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2, "batch_size": 64},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2, 4]}],
    "objective": {"metric": OBJECTIVE, "mode": "max"},
    "baseline": {"trials": 2, "search": {"train.lr": {"loguniform": [0.01, 0.1]}}},
    "kinds": {"linf": {"trials": 2, "search": {"r2.strength": {"loguniform": [1e-3, 0.1]}}},
              "margin": {"trials": 2, "search": {"r2.strength": {"loguniform": [1e-3, 0.1]}}}},
    "confirm": {"seeds": [1, 2]},
    "sweep": {"max_concurrent": 2, "scheduler": "none"},
}
SWEEPS = {"tiny-baseline": 2, "tiny-linf": 2, "tiny-margin": 2}
SEEDS = (1, 2)


def _start(work: Path) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("r2sweep")), "study", "study.yaml"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _runs(client: MlflowClient, experiment: str, role: str) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], filter_string=f"tags.`r2sweep.role` = '{role}'")


def _ended(client: MlflowClient, experiment: str) -> int:
    return sum(1 for r in _runs(client, experiment, "trial") if "r2sweep.outcome" in r.data.tags)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values)


def _direct(client: MlflowClient, experiment: str, tags: dict[str, str], metric: str = OBJECTIVE) -> list[float]:
    """One metric of the confirm runs carrying ``tags``, in seed order: MLflow's query, not r2sweep's."""
    found = client.get_experiment_by_name(experiment)
    where = " AND ".join([f"tags.`r2sweep.role` = 'confirm'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    runs = client.search_runs([found.experiment_id], filter_string=where)
    return [r.data.metrics[metric] for r in sorted(runs, key=lambda r: int(r.data.params["seed"]))]


def test_a_study_killed_mid_sweep_resumes_and_its_table_is_mlflows(tmp_path: Path) -> None:
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    client = MlflowClient(new_mlflow_store(tmp_path / "mlflow.db"))
    kill_group_when(_start(tmp_path), lambda: _ended(client, "tiny-linf") >= 1)  # inside the second sweep
    assert _runs(client, "tiny-margin", "trial") == []  # killed inside the second sweep

    final = _start(tmp_path)
    output = final.communicate(timeout=600)[0]
    assert final.returncode == 0, output[-4000:]
    assert "study tiny: [1/3] sweep tiny-baseline: in MLflow already, skipped" in output
    assert "study tiny: [3/3] sweep tiny-margin: started, 2 trials, the baseline's best 1 first" in output

    # Nothing ran twice: num_samples trial runs per sweep, one per trial id, and one
    # confirm run per (configuration, seed): 3 winners and 2 x 2 controls, on 2 seeds.
    for sweep, samples in SWEEPS.items():
        trials = _runs(client, sweep, "trial")
        assert len(trials) == samples and len({r.data.tags["r2sweep.trial_id"] for r in trials}) == samples
        assert all(r.info.status == "FINISHED" for r in trials)
    confirm = [r for s in SWEEPS for r in _runs(client, s, "confirm")]
    assert len(confirm) == 3 * 2 + 2 * 2 * 2 == len({r.data.tags["r2sweep.trial_id"] for r in confirm})
    # Re-runs share the sweeps' pre-training cache (a re-run killed after its pre-training finds it there).
    assert {r.data.tags["r2sweep.pretrain_cache"] for r in confirm} <= {"stored", "hit"}
    # Grouped under the study; each sweep with its own recorded sampler seed.
    for sweep in SWEEPS:
        (parent,) = _runs(client, sweep, "sweep")
        assert parent.data.tags["r2sweep.study"] == "tiny" and parent.info.status == "FINISHED"
    seeds = {yaml.safe_load(Path(client.download_artifacts(_runs(client, s, "sweep")[0].info.run_id, "sweep.yaml",
                                                           str(tmp_path / s))).read_text())["sweep"]["seed"]
             for s in SWEEPS}
    assert len(seeds) == 3
    (study_run,) = _runs(client, "tiny", "study")
    assert study_run.info.status == "FINISHED"

    # Every number of the table, recomputed from MLflow directly.
    result = r2sweep.load_study("tiny", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    table = result.table
    assert [row.sweep for row in table.rows] == list(SWEEPS)
    winners = {s: client.get_run(_runs(client, s, "sweep")[0].info.run_id).data.tags["r2sweep.confirmed_best_trial"]
               for s in SWEEPS}
    base = _direct(client, "tiny-baseline", {"r2sweep.confirm_of": winners["tiny-baseline"]})
    base_fp = _direct(client, "tiny-baseline", {"r2sweep.confirm_of": winners["tiny-baseline"]}, "fp/top1")
    lines = (tmp_path / "tiny-study" / "table.md").read_text().splitlines()
    rows = {line.split("|")[1].strip().removesuffix(" **recommended**"): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines if line.startswith("| ") and not line.startswith("| R2 ")}
    assert rows["none (tuned baseline)"][0] == "{:.1f} +- {:.1f} (n=2)".format(*_mean_sd(base))
    for row in table.rows[1:]:
        mine = _direct(client, row.sweep, {"r2sweep.confirm_of": winners[row.sweep]})
        off = _direct(client, row.sweep, {"r2sweep.control": "r2_off", "r2sweep.control_of": winners[row.sweep]})
        on_base = _direct(client, row.sweep, {"r2sweep.control": "r2_on_baseline",
                                              "r2sweep.control_of": winners[row.sweep]})
        fp = _direct(client, row.sweep, {"r2sweep.confirm_of": winners[row.sweep]}, "fp/top1")
        assert len(mine) == len(off) == len(on_base) == 2
        assert row.objective.mean == pytest.approx(statistics.fmean(mine))
        assert row.gain.delta == pytest.approx(statistics.fmean(mine) - statistics.fmean(base))
        se = (statistics.stdev(mine) ** 2 / 2 + statistics.stdev(base) ** 2 / 2) ** 0.5
        assert row.gain.se == pytest.approx(se)
        assert row.gain_over_r2_off.delta == pytest.approx(statistics.fmean(mine) - statistics.fmean(off))
        assert row.gain_on_baseline.delta == pytest.approx(statistics.fmean(on_base) - statistics.fmean(base))
        assert row.fp_change == pytest.approx(statistics.fmean(fp) - statistics.fmean(base_fp))
        cells = rows[row.kind]
        assert cells[0] == "{:.1f} +- {:.1f} (n=2)".format(*_mean_sd(mine))
        assert cells[1].startswith(f"{statistics.fmean(mine) - statistics.fmean(base):+.1f} +- {se:.1f}")
        assert cells[2].startswith(f"{statistics.fmean(mine) - statistics.fmean(off):+.1f}")
        assert cells[3].startswith(f"{statistics.fmean(on_base) - statistics.fmean(base):+.1f}")
        assert cells[5] == f"{statistics.fmean(fp) - statistics.fmean(base_fp):+.1f}"
    # The recommendation is the best mean, and what was exported and registered is its winner.
    means = {row.kind: row.objective.mean for row in table.rows}
    assert means[table.recommended.kind] == max(means.values())
    recommended = yaml.safe_load((tmp_path / "tiny-study" / "recommended.yaml").read_text())
    logged = Path(client.download_artifacts(table.recommended.run_id, "trial_config.yaml", str(tmp_path / "winner")))
    assert recommended == yaml.safe_load(logged.read_text())
    assert r2sweep.load_trial_config(recommended).r2.kind == table.recommended.kind
    champion = client.get_model_version_by_alias("r2sweep-study-tiny", "champion")
    assert champion.run_id == table.recommended.run_id
    assert f"answer: {table.verdict()}" in output
    page = (tmp_path / "tiny-study" / "index.html").read_text()
    assert table.verdict() .replace("'", "&#x27;") in page and page.count("data:image/png;base64,") == 5
    for figure in ("accuracy_vs_bits", "weight_histograms", "history_tiny-baseline", "history_tiny-linf"):
        assert (tmp_path / "tiny-study" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id, "report")}
    assert {"report/index.html", "report/table.md", "report/accuracy_vs_bits.png"} <= artifacts

    # Re-reported anywhere: a folder with no Tune state, the store alone.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "study.yaml").write_text(yaml.safe_dump(STUDY))
    again = subprocess.run([str(Path(sys.executable).with_name("r2sweep")), "study", "study.yaml", "--tracking-uri",
                            f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-register"], cwd=elsewhere, capture_output=True,
                           text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("in MLflow already, skipped") == 3 and " re-runs (" not in again.stderr
    assert (elsewhere / "tiny-study" / "table.md").read_text() == (tmp_path / "tiny-study" / "table.md").read_text()
    assert len([r for s in SWEEPS for r in _runs(client, s, "confirm")]) == 14

