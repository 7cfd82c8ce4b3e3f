"""A study's arithmetic and its refusals, without Ray: gains and their uncertainty, the decision,
a file changed under a study's name, an unknown study, a bad field (each one line, exit 2)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import new_mlflow_store

from r2sweep.analysis.study_table import FRAGILE_FP_SPAN, Gain, OverSeeds, Reruns, StudyRow, StudyTable
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
    assert gain.clear and gain.text() == f"+10.0 +- {gain.se:.1f}"  # beyond the seeds' spread (the table's word needs searches)
    assert not Gain.of(OverSeeds((63.0, 70.0)), OverSeeds((60.0, 61.0)), sign=1).clear  # inside twice its uncertainty
    assert not Gain.of(OverSeeds((80.0,)), OverSeeds((60.0,)), sign=1).clear  # one seed has no spread: never clear
    assert Gain.of(OverSeeds((50.0, 51.0)), OverSeeds((60.0, 61.0)), sign=-1).clear  # a minimised objective
    assert Gain.of(OverSeeds(()), before, sign=1) is None  # every re-run diverged


def _row(kind: str, values: tuple[float, ...], replicate: int = 1) -> StudyRow:
    return StudyRow(kind=kind, sweep=f"s-{kind}-r{replicate}", trial_id=f"t-{kind}-r{replicate}", run_id="r",
                    params={"train.lr": "0.05"}, reruns=Reruns({}), objective=OverSeeds(values),
                    fp=OverSeeds((90.0, 90.0)), replicate=replicate)


def _table(seeds: tuple[int, ...], *replicates: list[StudyRow]) -> StudyTable:
    return StudyTable.build("s", "m/top1", "max", seeds, [list(rows) for rows in replicates])


def test_one_search_the_best_mean_is_recommended_but_never_called_clear() -> None:
    base, linf = _row("none", (60.0, 62.0)), _row("linf", (70.0, 72.0))
    table = _table((1, 2), [base, linf])
    assert table.recommended is linf and linf.gain.clear  # beyond twice the seeds' spread...
    assert table.verdict().startswith("ship R2 linf: m/top1 71.0 +- 1.0 over seeds [1, 2], +10.0 +- 1.4 over the "
                                      "tuned baseline (over seeds only: one search, whose spread is not measured")
    assert "clear" not in table.verdict().replace("not measured", "")  # ...but one search: not called clear
    markdown = table.markdown()
    assert "**recommended**" in markdown.splitlines()[3] and "(clear)" not in markdown.split("\n\n")[0]
    assert "each +- is the spread over the confirmation seeds only" in markdown
    assert "| seeds only, 1 search |" in markdown
    tied = _table((1, 2), [base, _row("linf", (60.0, 62.0))])
    assert tied.recommended is base
    assert tied.verdict().startswith("ship the tuned baseline without R2: no R2 kind beat its m/top1 61.0 +- 1.0")
    assert tied.verdict().endswith("(over seeds only: one search, whose spread is not measured; another search of "
                                   "the same space may land elsewhere (replicates: 2 or more measures it))")


def test_over_replicates_the_uncertainty_counts_the_searches_spread_and_never_less_than_the_seeds() -> None:
    # Two searches of one space: the kind's gain +10 in one, +4 in the other (seeds spread ~1).
    first = [_row("none", (60.0, 62.0)), _row("linf", (70.0, 72.0))]
    second = [_row("none", (61.0, 63.0), 2), _row("linf", (65.0, 67.0), 2)]
    table = _table((1, 2), first, second)
    base, linf = table.arms
    gains = [10.0, 4.0]
    seed_var = statistics.fmean([g.se**2 for g in (first[1].gain, second[1].gain)])
    assert linf.gain.mean == pytest.approx(7.0)
    assert linf.gain.se == pytest.approx(math.sqrt(max(statistics.variance(gains), seed_var) / 2))
    assert linf.gain.search_sd == pytest.approx(math.sqrt(statistics.variance(gains) - seed_var))
    assert linf.gain.clear(1) and linf.picks == 2 and base.picks == 0
    assert table.recommended is first[1]  # the recommended kind's best search's winner ships
    assert table.verdict().startswith("ship R2 linf: m/top1 68.5 +- 2.5 over 2 searches x seeds [1, 2], +7.0 +- 3.0 "
                                      "over the tuned baseline (clear: more than twice its uncertainty, the searches' "
                                      "spread included); the pick of 2 of 2 searches")
    assert "search sd 4.0, seeds 1.4, 2 searches" in table.markdown()
    # Searches that agree: the seeds' spread is the floor, not a spread of zero.
    same = _table((1, 2), [_row("none", (60.0, 62.0)), _row("linf", (70.0, 72.0))],
                  [_row("none", (60.0, 62.0), 2), _row("linf", (70.0, 72.0), 2)])
    assert same.arms[1].gain.se == pytest.approx(math.sqrt(2.0) / math.sqrt(2))
    # Searches that disagree: the gain is not clear, and each search's pick is counted.
    split = _table((1, 2), [_row("none", (60.0, 62.0)), _row("linf", (70.0, 72.0))],
                   [_row("none", (70.0, 72.0), 2), _row("linf", (64.0, 66.0), 2)])
    assert not split.arms[1].gain.clear(1) and [a.picks for a in split.arms] == [1, 1]
    assert "inside its uncertainty: not clear" in split.verdict()


def test_a_winner_whose_pre_training_fails_on_some_seeds_is_called_fragile(tmp_path: Path) -> None:
    # The ptq-mbv2 re-run's baseline winner: FP 37.2, 88.3, 35.7 over seeds 1-3.
    base, linf = _row("none", (13.8, 66.0, 18.1)), _row("linf", (80.6, 80.8, 81.9))
    base.fp, linf.fp = OverSeeds((37.2, 88.3, 35.7)), OverSeeds((90.4, 89.7, 90.0))
    table = _table((1, 2, 3), [base, linf])
    (warning,) = table.warnings()
    assert warning.startswith("none (tuned baseline): its winner t-none-r1 is fragile: FP 35.7 to 88.3 over the seeds")
    assert "every gain here is measured against it" in warning and "confirm.top" in warning
    # A spread of FRAGILE_FP_SPAN points is still a working recipe; a kind's winner is checked too.
    base.fp = OverSeeds((80.0, 80.0 + FRAGILE_FP_SPAN))
    assert table.warnings() == []
    linf.fp = OverSeeds((30.0, 90.0))
    assert [w.split(":")[0] for w in table.warnings()] == ["linf"]
    # Shown where the answer is: table.md and the page.
    from r2sweep.analysis.study_page import write_study_page
    from r2sweep.core.config.study import load_study_spec
    from r2sweep.tracking.store import Tracker

    page = write_study_page(Tracker(new_mlflow_store(tmp_path / "mlflow.db")), load_study_spec(STUDY), table,
                            tmp_path / "page")
    assert f"warning: {table.warnings()[0]}" in (tmp_path / "page" / "table.md").read_text()
    assert "Warning: linf: its winner t-linf-r1 is fragile" in page.page.read_text()


def test_a_changed_file_under_a_studys_name_is_refused_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from r2sweep.tracking.store import Tracker
    from r2sweep.tracking.studies import open_study

    monkeypatch.chdir(tmp_path)
    new_mlflow_store(tmp_path / "mlflow.db")
    open_study(Tracker("sqlite:///mlflow.db"), "tiny", yaml.safe_dump(STUDY))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**STUDY, "baseline": {**STUDY["baseline"], "trials": 3}}))
    capsys.readouterr()
    assert main(["study", "study.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "study 'tiny'" in err and "another file (baseline.trials: 2 then, 3 now)" in err
    # Only confirm: may change (more seeds, more top trials: re-runs add to what MLflow holds).
    from r2sweep.api.study import _sweeps_part

    assert _sweeps_part({**STUDY, "confirm": {"seeds": [1, 2, 3], "top": 3}, "replicates": 3}) == _sweeps_part(STUDY)
    assert _sweeps_part({**STUDY, "seed": 1}) != _sweeps_part(STUDY)  # another seed: other sweeps
    assert not (tmp_path / "r2sweep_results").exists() and not (tmp_path / "tiny-study").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["study", "study.yaml", "--set", "kinds.lnif={}"], "kinds='lnif' is not valid: R2 kinds"),
    (["study", "study.yaml", "--set", "baseline.trials=0"], "baseline.trials=0 is not valid"),
    (["study", "study.yaml", "--set", "replicates=0"], "replicates=0 is not valid: an integer >= 1"),
    (["study", "nosuch", "--report-only"], "no study named 'nosuch'"),
])
def test_bad_input_to_the_study_command_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    if "--report-only" in argv:
        new_mlflow_store(tmp_path / "mlflow.db")  # an existing, empty store
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _fake_study_store(uri: str, baseline: tuple[float, float] = (60.0, 64.0)) -> None:
    """A study as MLflow would hold it, written with the tracking layer alone (no Ray, no training):
    the baseline and L-inf confirmed with controls; every Margin trial diverged; Soft-Min-Max not run.
    L-inf also holds an R2-on-baseline control made on an earlier baseline winner (t0), which
    ``confirm.top`` raised later replaced by t1."""
    from r2sweep.analysis.confirm import TAG_CONFIRM_OF, TAG_CONFIRMED_BEST
    from r2sweep.core.config.study import load_study_spec
    from r2sweep.core.outcome import TAG_OUTCOME
    from r2sweep.tracking.names import TAG_CONTROL, TAG_CONTROL_OF
    from r2sweep.tracking.store import Tracker
    from r2sweep.tracking.studies import open_study

    raw = {**STUDY, "name": "fake", "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2, 4]}],
           "kinds": {**STUDY["kinds"], "margin": {"search": {"r2.strength": {"loguniform": [1e-3, 0.1]}}},
                     "softminmax": {"search": {"r2.strength": {"loguniform": [1e-3, 0.1]}}}}}
    study = load_study_spec(raw)
    tracker = Tracker(uri)
    open_study(tracker, "fake", yaml.safe_dump(raw))

    def runs(sweep, key, values, tags, confirm=True, outcome="finished", params=None):
        for seed, value in zip((1, 2), values):
            run_id = sweep.trial_run(f"{key}-seed{seed}" if confirm else key, {"seed": seed, **(params or {})},
                                     confirm=confirm)
            if value is not None:
                sweep.log_metrics(run_id, {"ptq_rtn_w2a8/top1": value, "ptq_rtn_w4a8/top1": value + 10,
                                           "fp/top1": value + 20})
            sweep.set_tags(run_id, {**tags, TAG_OUTCOME: outcome})
            sweep.end_trial(run_id)
            if not confirm:
                return

    for sweep_spec, values in zip(study.sweeps[:3], (baseline, (70.0, 72.0), None)):
        sweep = tracker.start_sweep(sweep_spec.name, yaml.safe_dump(dict(sweep_spec.mapping)))
        if values is None:  # every trial diverged: nothing to confirm
            runs(sweep, "t0", [None], {}, confirm=False, outcome="diverged")
            continue
        runs(sweep, "t1", [values[0]], {}, confirm=False)
        sweep.set_tags(sweep.parent_run_id, {TAG_CONFIRMED_BEST: "t1"})
        runs(sweep, "t1", values, {TAG_CONFIRM_OF: "t1"})
        if sweep_spec.kind == "linf":
            runs(sweep, "r2_off-t1", (65.0, 66.0), {TAG_CONTROL: "r2_off", TAG_CONTROL_OF: "t1"})
            on_baseline = {TAG_CONTROL: "r2_on_baseline", TAG_CONTROL_OF: "t1"}
            for key, values, base in (("r2_on_baseline-t1-on-t1", (68.0, 69.0), "t1"),
                                      ("r2_on_baseline-t1", (20.0, 21.0), "t0")):  # either order must read the same
                runs(sweep, key, values, on_baseline, params={"baseline_trial": base})


def test_the_answer_is_read_from_mlflow_and_a_kind_without_a_winner_is_shown_not_fatal(tmp_path: Path) -> None:
    import r2sweep

    uri = new_mlflow_store(tmp_path / "mlflow.db")
    _fake_study_store(uri)
    result = r2sweep.load_study("fake", tracking_uri=uri, out=tmp_path / "page")
    table = result.table
    base, linf, margin, softminmax = table.rows
    assert (margin.missing, softminmax.missing) == ("has no finished trial", "has not run yet")
    assert table.recommended is linf and linf.objective.mean == 71.0
    assert linf.gain.delta == pytest.approx(9.0) and linf.gain.se == pytest.approx(math.sqrt(8 / 2 + 2 / 2))
    assert linf.gain.clear and linf.fp_change == pytest.approx(9.0)
    assert linf.gain_over_r2_off.delta == pytest.approx(71.0 - 65.5)
    assert linf.gain_on_baseline.delta == pytest.approx(68.5 - 62.0)  # on t1's knobs; t0's control is stale
    lines = table.markdown().splitlines()
    assert lines[4] == "| margin | has no finished trial |" + " - |" * 7
    assert lines[3] == ("| linf **recommended** | 71.0 +- 1.0 (1 search x 2 seeds) | +9.0 +- 2.2 | seeds only, 1 search "
                        "| +5.5 +- 1.1 | +6.5 +- 2.1 | +9.0 | 1 of 1 | t1 |")
    per_sweep = table.sweeps_markdown().splitlines()
    assert per_sweep[3].startswith("| 1 | linf **recommended** | fake-linf | 71.0 +- 1.4 (n=2) | +9.0 +- 2.2 | +5.5 +- 1.1 "
                                   "| +6.5 +- 2.1 |")
    # The page is drawn from what is there; the weights it cannot find are a note, not a failure.
    assert result.page.page.read_text().count("data:image/png;base64,") == 1 + 3  # bits; three sweeps' histories
    assert result.page.notes == ["Weight histograms: the winner of fake-baseline has no pretrained.pt artifact.",
                                 "Weight histograms: the winner of fake-linf has no pretrained.pt artifact."]


def test_the_command_prints_a_fragile_winner_under_the_answer(tmp_path: Path, monkeypatch, capsys) -> None:
    uri = new_mlflow_store(tmp_path / "mlflow.db")
    _fake_study_store(uri, baseline=(20.0, 64.0))  # FP 40 and 84: the baseline's pre-training failed on seed 1
    monkeypatch.chdir(tmp_path)
    assert main(["study", "fake", "--report-only", "--tracking-uri", uri, "--out", "page"]) == 0
    lines = capsys.readouterr().out.splitlines()
    answer = next(i for i, line in enumerate(lines) if line.startswith("answer: "))
    assert lines[answer + 1].startswith("warning: none (tuned baseline): its winner t1 is fragile: FP 40.0 to 84.0")


def test_the_r2_on_baseline_control_is_keyed_by_the_baseline_winner_it_took(tmp_path: Path) -> None:
    # confirm.top raised after a study answered can change the baseline's winner: the control
    # must then run again on the new winner's knobs, not count the old winner's runs.
    from r2sweep.analysis.select import read_sweep
    from r2sweep.analysis.study_reruns import _on_baseline_key
    from r2sweep.tracking.store import Tracker

    uri = new_mlflow_store(tmp_path / "mlflow.db")
    _fake_study_store(uri)
    sweep, _ = read_sweep(Tracker(uri), "fake-linf")
    assert _on_baseline_key(sweep, "t1", "t0") == "r2_on_baseline-t1"  # runs before the key held the baseline
    assert _on_baseline_key(sweep, "t1", "t1") == "r2_on_baseline-t1-on-t1"
    assert _on_baseline_key(sweep, "t1", "t7") == "r2_on_baseline-t1-on-t7"  # a new winner: new re-runs
