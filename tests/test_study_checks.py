"""A study's arithmetic and its refusals, without Ray: gains and their uncertainty, the decision,
a file changed under a study's name, an unknown study, a bad field (each one line, exit 2)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import yaml

from r2sweep.analysis.study_table import Gain, OverSeeds, Reruns, StudyRow, StudyTable
from r2sweep.cli.app import main

STUDY = {
    "name": "tiny",
    "data": {"name": "digits"},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2]}],
    "objective": {"metric": "ptq_rtn_w2a8/top1", "mode": "max"},
    "baseline": {"trials": 2, "search": {"train.lr": {"loguniform": [0.01, 0.1]}}},
    "kinds": {"linf": {"trials": 2, "search": {"r2.strength": {"loguniform": [1e-3, 0.1]}}}},
    "confirm": {"seeds": [1, 2]},
}


def test_a_gain_is_the_difference_of_means_with_the_standard_error_of_that_difference() -> None:
    after, before = OverSeeds((70.0, 74.0, 72.0)), OverSeeds((60.0, 61.0, 65.0))
    gain = Gain.of(after, before, sign=1)
    assert gain.delta == pytest.approx(72.0 - 62.0)
    assert gain.se == pytest.approx(math.sqrt(statistics.variance(after.values) / 3 + statistics.variance(before.values) / 3))
    assert gain.clear and gain.text() == f"+10.0 +- {gain.se:.1f} (clear)"
    assert not Gain.of(OverSeeds((63.0, 70.0)), OverSeeds((60.0, 61.0)), sign=1).clear  # inside twice its uncertainty
    assert not Gain.of(OverSeeds((80.0,)), OverSeeds((60.0,)), sign=1).clear  # one seed has no spread: never clear
    assert Gain.of(OverSeeds((50.0, 51.0)), OverSeeds((60.0, 61.0)), sign=-1).clear  # a minimised objective
    assert Gain.of(OverSeeds(()), before, sign=1) is None  # every re-run diverged


def _row(kind: str, values: tuple[float, ...]) -> StudyRow:
    return StudyRow(kind=kind, sweep=f"s-{kind}", trial_id=f"t-{kind}", run_id="r", params={"train.lr": "0.05"},
                    reruns=Reruns({}), objective=OverSeeds(values), fp=OverSeeds((90.0, 90.0)))


def test_the_best_mean_is_recommended_and_a_tie_keeps_the_baseline() -> None:
    base, linf = _row("none", (60.0, 62.0)), _row("linf", (70.0, 72.0))
    linf.gain, linf.fp_change = Gain.of(linf.objective, base.objective, 1), 0.0
    table = StudyTable("s", "m/top1", "max", (1, 2), [base, linf], recommended=linf)
    assert table.verdict().startswith("ship R2 linf: m/top1 71.0 +- 1.4 over seeds [1, 2], +10.0 +- 1.4 over the "
                                      "tuned baseline (clear: more than twice its uncertainty); FP +0.0")
    assert "**recommended**" in table.markdown().splitlines()[3]
    tied = StudyTable("s", "m/top1", "max", (1, 2), [base, linf], recommended=base)
    assert tied.verdict().startswith("ship the tuned baseline without R2: no R2 kind beat its m/top1 61.0 +- 1.4")


def test_a_changed_file_under_a_studys_name_is_refused_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from r2sweep.tracking.store import Tracker
    from r2sweep.tracking.studies import open_study

    monkeypatch.chdir(tmp_path)
    open_study(Tracker("sqlite:///mlflow.db"), "tiny", yaml.safe_dump(STUDY))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**STUDY, "confirm": {"seeds": [1, 2, 3]}}))
    capsys.readouterr()  # MLflow's lines on creating the store
    assert main(["study", "study.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "study 'tiny'" in err and "another file (confirm.seeds: [1, 2] then, [1, 2, 3] now)" in err
    assert not (tmp_path / "r2sweep_results").exists() and not (tmp_path / "tiny-study").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["study", "study.yaml", "--set", "kinds.lnif={}"], "kinds='lnif' is not valid: R2 kinds"),
    (["study", "study.yaml", "--set", "baseline.trials=0"], "baseline.trials=0 is not valid"),
    (["study", "nosuch", "--report-only"], "no study named 'nosuch'"),
])
def test_bad_input_to_the_study_command_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    if "--report-only" in argv:
        from r2sweep.tracking.store import Tracker

        Tracker("sqlite:///mlflow.db").experiment_names()  # an existing, empty store
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
