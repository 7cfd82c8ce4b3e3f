"""``r2sweep study``: a small real study with two search replicates end to end, its driver
SIGKILLed mid-study and resumed.

digits, a tiny CNN, two epochs, ``replicates: 2``: per replicate the tuned baseline's
sweep and an R2 kind's sweep started from that replicate's best, every winner re-run on
two seeds, the controls; then the table (per arm over the two searches), the page, the
recommended trial file and the champion. Every number of the table, the combined
uncertainty included, is recomputed here from MLflow with MLflow's own client, and the
study is re-reported from MLflow alone, as one search (``--set replicates=1``).
"""

from __future__ import annotations

import math
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
    # One baseline recipe: every baseline trial, its re-runs and the R2-off controls are one
    # pre-training per seed, so the replicates' must come from the pre-training cache.
    "baseline": {"trials": 2, "search": {"train.lr": {"choice": [0.05]}}},
    "kinds": {"linf": {"trials": 2, "search": {"r2.strength": {"loguniform": [1e-3, 0.1]}}}},
    "confirm": {"seeds": [1, 2]},
    "replicates": 2,
    "sweep": {"max_concurrent": 2, "scheduler": "none"},
}
SWEEPS = {"tiny-baseline": 2, "tiny-linf": 2, "tiny-baseline-r2": 2, "tiny-linf-r2": 2}
REPLICATES = (("tiny-baseline", "tiny-linf"), ("tiny-baseline-r2", "tiny-linf-r2"))
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
    where = " AND ".join(["tags.`r2sweep.role` = 'confirm'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    runs = client.search_runs([found.experiment_id], filter_string=where)
    return [r.data.metrics[metric] for r in sorted(runs, key=lambda r: int(r.data.params["seed"]))]


def _gain(mine: list[float], base: list[float]) -> tuple[float, float]:
    """One search's gain and the standard error of that difference of means."""
    return (statistics.fmean(mine) - statistics.fmean(base),
            math.sqrt(statistics.variance(mine) / len(mine) + statistics.variance(base) / len(base)))


def test_a_study_with_two_replicates_killed_mid_sweep_resumes_and_its_table_is_mlflows(tmp_path: Path) -> None:
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    client = MlflowClient(new_mlflow_store(tmp_path / "mlflow.db"))
    kill_group_when(_start(tmp_path), lambda: _ended(client, "tiny-linf") >= 1)  # inside the second sweep
    assert _runs(client, "tiny-baseline-r2", "trial") == []  # killed inside the first replicate

    final = _start(tmp_path)
    output = final.communicate(timeout=900)[0]
    assert final.returncode == 0, output[-4000:]
    assert "study tiny: [1/4] sweep tiny-baseline: in MLflow already, skipped" in output
    assert "study tiny: [4/4] sweep tiny-linf-r2: started, 2 trials, the baseline's best 1 first" in output

    # Nothing ran twice: num_samples trial runs per sweep, one per trial id, and one confirm
    # run per (configuration, seed): per replicate 2 winners and 2 controls, on 2 seeds.
    for sweep, samples in SWEEPS.items():
        trials = _runs(client, sweep, "trial")
        assert len(trials) == samples and len({r.data.tags["r2sweep.trial_id"] for r in trials}) == samples
        assert all(r.info.status == "FINISHED" for r in trials)
    confirm = [r for s in SWEEPS for r in _runs(client, s, "confirm")]
    assert len(confirm) == 2 * (2 * 2 + 2 * 2) == len({(r.info.experiment_id, r.data.tags["r2sweep.trial_id"])
                                                        for r in confirm})
    # The second search reuses the first's pre-trainings: one baseline recipe, one pre-training per seed.
    for sweep in ("tiny-baseline-r2",):
        assert {r.data.tags["r2sweep.pretrain_cache"] for r in _runs(client, sweep, "trial")} == {"hit"}
        assert {r.data.tags["r2sweep.pretrain_cache"] for r in _runs(client, sweep, "confirm")} == {"hit"}
    off = [r for r in _runs(client, "tiny-linf-r2", "confirm") if r.data.tags.get("r2sweep.control") == "r2_off"]
    assert len(off) == 2 and {r.data.tags["r2sweep.pretrain_cache"] for r in off} == {"hit"}
    # Grouped under the study; each sweep with its own recorded sampler seed.
    for sweep in SWEEPS:
        (parent,) = _runs(client, sweep, "sweep")
        assert parent.data.tags["r2sweep.study"] == "tiny" and parent.info.status == "FINISHED"
    seeds = {yaml.safe_load(Path(client.download_artifacts(_runs(client, s, "sweep")[0].info.run_id, "sweep.yaml",
                                                           str(tmp_path / s))).read_text())["sweep"]["seed"]
             for s in SWEEPS}
    assert len(seeds) == 4
    (study_run,) = _runs(client, "tiny", "study")
    assert study_run.info.status == "FINISHED"

    # Every number of the table, recomputed from MLflow directly.
    result = r2sweep.load_study("tiny", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    table = result.table
    assert [row.sweep for row in table.rows] == list(SWEEPS) and table.searches == 2
    winners = {s: client.get_run(_runs(client, s, "sweep")[0].info.run_id).data.tags["r2sweep.confirmed_best_trial"]
               for s in SWEEPS}
    gains, objective_means, picks = [], {"none": [], "linf": []}, {"none": 0, "linf": 0}
    for (base_sweep, linf_sweep), rows in zip(REPLICATES, table.replicates):
        base = _direct(client, base_sweep, {"r2sweep.confirm_of": winners[base_sweep]})
        mine = _direct(client, linf_sweep, {"r2sweep.confirm_of": winners[linf_sweep]})
        off = _direct(client, linf_sweep, {"r2sweep.control": "r2_off", "r2sweep.control_of": winners[linf_sweep]})
        on_base = _direct(client, linf_sweep, {"r2sweep.control": "r2_on_baseline",
                                               "r2sweep.control_of": winners[linf_sweep]})
        assert len(base) == len(mine) == len(off) == len(on_base) == 2
        row = rows[1]
        assert row.gain.delta == pytest.approx(_gain(mine, base)[0]) and row.gain.se == pytest.approx(_gain(mine, base)[1])
        assert row.gain_over_r2_off.delta == pytest.approx(statistics.fmean(mine) - statistics.fmean(off))
        assert row.gain_on_baseline.delta == pytest.approx(statistics.fmean(on_base) - statistics.fmean(base))
        gains.append(_gain(mine, base))
        objective_means["none"].append(statistics.fmean(base))
        objective_means["linf"].append(statistics.fmean(mine))
        picks["linf" if statistics.fmean(mine) > statistics.fmean(base) else "none"] += 1
    # Over the two searches: the mean, and sqrt(max(between-search variance, mean seed variance) / R).
    base_arm, linf_arm = table.arms
    deltas = [g for g, _ in gains]
    combined = math.sqrt(max(statistics.variance(deltas), statistics.fmean(se**2 for _, se in gains)) / 2)
    assert linf_arm.gain.mean == pytest.approx(statistics.fmean(deltas))
    assert linf_arm.gain.se == pytest.approx(combined)
    assert linf_arm.objective.mean == pytest.approx(statistics.fmean(objective_means["linf"]))
    assert [base_arm.picks, linf_arm.picks] == [picks["none"], picks["linf"]]
    lines = (tmp_path / "tiny-study" / "table.md").read_text().splitlines()
    (linf_line,) = [line for line in lines if line.startswith("| linf")]
    assert f"| {statistics.fmean(deltas):+.1f} +- {combined:.1f}" in linf_line and "2 searches |" in linf_line
    # The recommendation is the best mean over the searches; what ships is that arm's best search's winner.
    means = {arm.kind: arm.objective.mean for arm in table.arms}
    assert means[table.recommended.kind] == max(means.values())
    assert table.recommended in table.recommended_arm.rows
    recommended = yaml.safe_load((tmp_path / "tiny-study" / "recommended.yaml").read_text())
    logged = Path(client.download_artifacts(table.recommended.run_id, "trial_config.yaml", str(tmp_path / "winner")))
    assert recommended == yaml.safe_load(logged.read_text())
    assert r2sweep.load_trial_config(recommended).r2.kind == table.recommended.kind
    champion = client.get_model_version_by_alias("r2sweep-study-tiny", "champion")
    assert champion.run_id == table.recommended.run_id
    assert f"answer: {table.verdict()}" in output and "over 2 searches x seeds [1, 2]" in table.verdict()
    page = (tmp_path / "tiny-study" / "index.html").read_text()
    assert table.verdict().replace("'", "&#x27;") in page and page.count("data:image/png;base64,") == 2 + 4
    for figure in ("accuracy_vs_bits", "weight_histograms", "history_tiny-baseline", "history_tiny-linf-r2"):
        assert (tmp_path / "tiny-study" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id, "report")}
    assert {"report/index.html", "report/table.md", "report/accuracy_vs_bits.png"} <= artifacts

    # Re-reported anywhere, from the store alone (no Tune state here), as the first search only:
    # nothing runs, and the answer says in words that the search's spread is not measured.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "study.yaml").write_text(yaml.safe_dump(STUDY))
    again = subprocess.run([str(Path(sys.executable).with_name("r2sweep")), "study", "study.yaml", "--set", "replicates=1",
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-register"], cwd=elsewhere,
                           capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("in MLflow already, skipped") == 2 and " re-runs (" not in again.stderr
    one = (elsewhere / "tiny-study" / "table.md").read_text()
    assert "(over seeds only: one search, whose spread is not measured;" in one.splitlines()[0]
    assert "(clear)" not in one and "each +- is the spread over the confirmation seeds only" in one
    unmarked = lambda text: [line.replace(" **recommended**", "") for line in text if line.startswith("| 1 |")]  # noqa: E731
    assert unmarked(lines) and unmarked(lines) == unmarked(one.splitlines())  # the first search's rows, unchanged
    assert len([r for s in SWEEPS for r in _runs(client, s, "confirm")]) == 16
