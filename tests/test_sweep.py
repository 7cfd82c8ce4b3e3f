"""The sweep on a real local Ray: Optuna proposes, ASHA stops, only final objectives reach Optuna."""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
import ray
from ray import tune
from conftest import new_mlflow_store

from r2sweep.core.config.sweep import load_sweep_spec

pytestmark = pytest.mark.ray

TINY = {
    "name": "tiny",
    "data": {"name": "synthetic", "num_samples": 256},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 3, "batch_size": 32},
    "r2": {"kind": "none"},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2]}],
    "objective": {"metric": "ptq_rtn_w2a8/top1", "mode": "max"},
    "search": {
        "r2.kind": {"choice": ["none", "linf"]},
        "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": "linf"}},
        "train.lr": {"loguniform": [0.01, 0.2]},
    },
    # Random, not TPE: with 2 trials at a time TPE's picks depend on which trial ended first,
    # and a seeded random sampler draws the same trials every run (ASHA's stop test needs
    # that). Seed 4 draws trials ASHA stops early: the sweep is no slower than with TPE.
    "sweep": {"num_samples": 6, "max_concurrent": 2, "seed": 4, "sampler": "random", "scheduler": "asha",
              "start_points": [{"r2.kind": "linf", "r2.strength": 0.05}]},
}


@pytest.fixture(scope="module")
def local_ray():
    # Ray's session files go to the suite's short RAY_TMPDIR (conftest): a folder
    # under tmp_path can be too long for Ray's socket paths.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_sweep(local_ray, tmp_path_factory: pytest.TempPathFactory):
    from r2sweep.tune.tuner import run_experiment

    storage = tmp_path_factory.mktemp("sweeps")
    return run_experiment(load_sweep_spec(TINY), storage=storage)


def _study(path: str) -> optuna.Study:
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(path)
    return searcher._ot_study


def test_every_sample_runs_with_its_conditional_parameters(tiny_sweep) -> None:
    results = list(tiny_sweep.results)
    assert len(results) == TINY["sweep"]["num_samples"]
    for result in results:
        assert result.error is None
        config = result.config
        assert ("r2.strength" in config) == (config["r2.kind"] == "linf")
        assert 0.01 <= config["train.lr"] <= 0.2


def test_asha_stops_some_trials_and_optuna_sees_only_final_objectives(tiny_sweep) -> None:
    objective, full_run = "ptq_rtn_w2a8/top1", TINY["train"]["epochs"] + 1  # every epoch, then the final report
    results = list(tiny_sweep.results)
    finished = tiny_sweep.finished()
    stopped = [r for r in results if r not in finished]
    assert finished, "at least one trial runs to the end"
    for result in finished:
        assert result.metrics["final"] == 1 and result.metrics["training_iteration"] == full_run
    # ASHA really stopped one: with reduction factor 2, a trial is stopped at its first epoch
    # when its proxy is below the median of the first-epoch proxies recorded before it. The
    # last trial starts only once all but one of the others have ended (2 run at a time), so
    # that median is over at least all of them but one; the seeded random sampler draws the
    # same trials every run, and the last one's proxy is below every such median.
    ordered = _in_creation_order(tiny_sweep)
    first_epoch = [r.metrics_dataframe.sort_values("training_iteration")["proxy/top1"].iloc[0] for r in ordered]
    *earlier, last = first_epoch
    cutoffs = [np.percentile(seen, 50) for seen in [earlier, *itertools.combinations(earlier, len(earlier) - 1)]]
    assert last < min(cutoffs), f"the fixture no longer makes ASHA stop its last trial: {first_epoch}"
    assert ordered[-1] in stopped and ordered[-1].metrics["training_iteration"] == 1
    for result in stopped:  # stopped by ASHA: neither failed nor run to the end
        assert result.error is None
        assert result.metrics["training_iteration"] < full_run and "final" not in result.metrics
        assert objective not in result.metrics
    # Optuna saw the objective of the finished trials only: each stopped one is PRUNED, without a value.
    study = _study(tiny_sweep.path)
    by_config = {tuple(sorted(t.params.items())): t for t in study.trials}
    assert len(by_config) == len(study.trials) == len(results)
    for result in results:
        trial = by_config[tuple(sorted(result.config.items()))]
        if result in finished:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == result.metrics[objective]
        else:
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.value is None


def _in_creation_order(sweep) -> list:
    # Trial directories are trainable_<id>_<creation index>_...
    return sorted(sweep.results, key=lambda r: int(Path(r.path).name.split("_")[2]))


def test_the_first_trial_is_the_no_r2_baseline_and_asha_lets_it_finish(tiny_sweep) -> None:
    first = _in_creation_order(tiny_sweep)[0]
    assert first.config["r2.kind"] == "none" and "r2.strength" not in first.config
    assert first in tiny_sweep.finished()


def test_the_start_point_runs_next_with_its_unnamed_parameters_sampled(tiny_sweep) -> None:
    second = _in_creation_order(tiny_sweep)[1]
    assert second.config["r2.kind"] == "linf" and second.config["r2.strength"] == 0.05
    assert 0.01 <= second.config["train.lr"] <= 0.2
    sampled = [r.config.get("r2.strength") for r in _in_creation_order(tiny_sweep)[2:]]
    assert 0.05 not in sampled  # the sampler drew the rest


def test_the_baseline_trial_is_never_stopped_but_other_laggards_are() -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from r2sweep.tune.search import BaselineKeepingASHA

    scheduler = BaselineKeepingASHA(time_attr="t", metric="proxy", mode="max", max_t=10, grace_period=1,
                                     reduction_factor=2, baseline={"r2.kind": "none"})
    leader = SimpleNamespace(trial_id="a", config={"r2.kind": "linf"})
    baseline = SimpleNamespace(trial_id="b", config={"r2.kind": "none"})
    laggard = SimpleNamespace(trial_id="c", config={"r2.kind": "linf"})
    other_none = SimpleNamespace(trial_id="d", config={"r2.kind": "none"})
    for trial in (leader, baseline, laggard, other_none):
        scheduler.on_trial_add(None, trial)
    decisions = {}
    for t in (1, 2, 4):
        for trial, proxy in ((leader, 90.0), (baseline, 10.0), (laggard, 11.0), (other_none, 9.0)):
            if decisions.get(trial.trial_id) != TrialScheduler.STOP:
                decisions[trial.trial_id] = scheduler.on_trial_result(None, trial, {"t": t, "proxy": proxy})
    assert decisions == {"a": TrialScheduler.CONTINUE, "b": TrialScheduler.CONTINUE,
                         "c": TrialScheduler.STOP, "d": TrialScheduler.STOP}


@pytest.mark.parametrize("kind", ["fifo", "asha"])
def test_the_next_trial_is_chosen_among_live_trials_and_none_is_ever_missed(kind: str) -> None:
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from r2sweep.tune.search import LiveTrialsASHA, LiveTrialsFIFO

    scheduler = LiveTrialsFIFO() if kind == "fifo" else LiveTrialsASHA(time_attr="t", metric="proxy", mode="max", max_t=4)
    trials: list = []
    controller = SimpleNamespace(get_trials=lambda: trials)

    def add(trial_id: str, status: str) -> SimpleNamespace:
        trial = SimpleNamespace(trial_id=trial_id, status=status, config={})
        trials.append(trial)
        scheduler.on_trial_add(controller, trial)
        return trial

    done = [add(str(i), Trial.TERMINATED) for i in range(50)]
    for trial in done:
        scheduler.on_trial_complete(controller, trial, {"t": 4, "proxy": 1.0})
    assert scheduler.choose_trial_to_run(controller) is None and len(scheduler._live) == 0  # the ended are gone
    paused, running, first, second = (add("p", Trial.PAUSED), add("r", Trial.RUNNING), add("a", Trial.PENDING),
                                      add("b", Trial.PENDING))
    assert scheduler.choose_trial_to_run(controller) is first  # pending before paused, in the order added
    first.status = Trial.RUNNING
    assert scheduler.choose_trial_to_run(controller) is second
    second.status = Trial.ERROR
    scheduler.on_trial_error(controller, second)
    assert scheduler.choose_trial_to_run(controller) is paused
    paused.status = Trial.RUNNING
    # A trial Tune holds without having announced it (no on_trial_add) is still found.
    hidden = SimpleNamespace(trial_id="h", status=Trial.PENDING, config={})
    trials.append(hidden)
    assert scheduler.choose_trial_to_run(controller) is hidden
    assert running.status == Trial.RUNNING and "0" not in scheduler._live


def test_best_is_the_highest_finished_objective(tiny_sweep) -> None:
    best = tiny_sweep.best()
    assert best.metrics["ptq_rtn_w2a8/top1"] == max(r.metrics["ptq_rtn_w2a8/top1"] for r in tiny_sweep.finished())


def test_checkpoints_hold_the_pretraining_state_then_the_trial_artifacts(tiny_sweep) -> None:
    finished = tiny_sweep.finished()
    for result in tiny_sweep.results:
        assert result.checkpoint is not None
        with result.checkpoint.as_directory() as directory:
            names = {p.name for p in Path(directory).iterdir()}
        if result in finished:  # the final report's checkpoint: what tracking logs
            assert {"pretrained.pt", "weights.png", "trial_config.yaml"} <= names
        else:  # stopped after an epoch: the state a restart resumes from
            assert names == {"pretrain_state.pt"}


def test_a_diverging_trial_is_failed_in_mlflow_pruned_in_optuna_and_never_best(local_ray, tmp_path: Path) -> None:
    import r2sweep
    from r2sweep.analysis.select import select_best
    from r2sweep.tracking.store import TAG_ROLE, Tracker
    from r2sweep.tune.callbacks import TAG_OUTCOME

    data = {**TINY, "name": "diverging", "search": {"train.lr": {"choice": [0.05, 1.0e6]}},
            "sweep": {"num_samples": 4, "max_concurrent": 2, "seed": 1, "sampler": "random", "scheduler": "none"}}
    tracker = Tracker(new_mlflow_store(tmp_path / "mlflow.db"))
    result = r2sweep.run_sweep(data, tracking_uri=tracker.tracking_uri, storage=tmp_path / "results",
                               progress=False, register=False)

    results = list(result.tune_results)
    assert len(results) == 4 and all(r.error is None for r in results)  # the sweep went on
    diverged = [r for r in results if r.metrics.get("diverged")]
    assert {r.config["train.lr"] for r in diverged} == {1.0e6}
    assert 0 < len(diverged) < 4
    assert all(r.metrics["training_iteration"] == 1 for r in diverged)  # stopped in its first epoch

    runs = tracker.client.search_runs([tracker.client.get_experiment_by_name("diverging").experiment_id],
                                      filter_string=f"tags.`{TAG_ROLE}` = 'trial'")
    by_outcome = {}
    for run in runs:
        by_outcome.setdefault(run.data.tags[TAG_OUTCOME], []).append(run.info.status)
    assert by_outcome["diverged"] == ["FAILED"] * len(diverged)
    assert by_outcome["finished"] == ["FINISHED"] * (4 - len(diverged))

    states = sorted(t.state.name for t in _study(result.path).trials)
    assert states.count("COMPLETE") == 4 - len(diverged)  # no score for a diverged trial
    assert all(state in ("COMPLETE", "PRUNED", "FAIL") for state in states)

    best = select_best(tracker, "diverging", out=tmp_path / "best.yaml", register=False)
    assert best.run_id == result.best.run_id  # what run_sweep picked
    assert float(best.params["train.lr"]) == 0.05
    assert all(v == v and abs(v) != float("inf") for v in best.metrics.values())


class _KillAWorkerAfter(tune.Callback):
    """SIGKILLs the worker of the first trial to report ``epochs_done`` epochs (once).

    From the driver, on the result itself: Tune's result files reach the storage only when
    it snapshots the experiment (every 10 s or more), so watching them can miss a short trial."""

    def __init__(self, epochs_done: int, killed: list) -> None:
        self.epochs_done, self.killed = epochs_done, killed

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if not self.killed and result.get("epoch", -1) + 1 >= self.epochs_done and "pid" in result:
            os.kill(result["pid"], signal.SIGKILL)
            self.killed.append((Path(trial.path).name, result["epoch"]))


@pytest.mark.parametrize("max_failures", [1, 0])
def test_a_killed_worker_is_retried_from_its_checkpoint_or_marked_failed(local_ray, tmp_path: Path, max_failures: int) -> None:
    import json

    from r2sweep.tune.tuner import run_experiment

    data = {**TINY, "name": "worker-killed", "train": {"epochs": 10, "batch_size": 32},
            "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
            "sweep": {"num_samples": 2, "max_concurrent": 2, "seed": 0, "scheduler": "none",
                      "max_failures": max_failures}}
    storage = tmp_path / "results"
    killed: list = []
    outcome = run_experiment(load_sweep_spec(data), storage=storage, callbacks=[_KillAWorkerAfter(3, killed)])
    assert len(killed) == 1, "a worker was killed mid-trial"
    victim, epoch_at_kill = killed[0]
    results = {Path(r.path).name: r for r in outcome.results}
    assert len(results) == 2
    others = [r for name, r in results.items() if name != victim]
    assert others[0].error is None and "ptq_rtn_w2a8/top1" in others[0].metrics  # the sweep went on

    if max_failures:
        assert results[victim].error is None and "ptq_rtn_w2a8/top1" in results[victim].metrics
        epochs = [json.loads(line).get("epoch") for line in (storage / "worker-killed" / victim / "result.json").read_text().splitlines()]
        epochs = [e for e in epochs if e is not None]
        # The retry resumed after its last checkpoint instead of starting again at epoch 0. Tune's own
        # result.json can miss the epochs before the kill when no experiment snapshot synced them
        # (MLflow has every epoch: tests/test_driver_kill.py); what follows the kill is all there.
        after_kill = epochs[epochs.index(epoch_at_kill) + 1:] if epoch_at_kill in epochs else epochs
        assert after_kill and 0 < after_kill[0] <= epoch_at_kill + 1
        assert set(range(epoch_at_kill + 1, 10)) <= set(epochs)
    else:
        assert results[victim].error is not None  # failed, and reported as such


def test_progress_line_counts_trials_an_earlier_driver_finished() -> None:
    """The line is computed from Tune's trial list, so a resumed sweep (whose
    callback Tune unpickles from the sweep's start) still counts every trial."""
    import pickle
    from types import SimpleNamespace

    from r2sweep.tune.callbacks import ProgressCallback

    lines: list[str] = []
    fresh = ProgressCallback(load_sweep_spec(TINY), write=lines.append)
    restored = pickle.loads(pickle.dumps(fresh))  # what Tune hands a resumed sweep
    restored.write = lines.append
    restored.setup()

    def trial(trial_id: str, status: str, **result: float) -> SimpleNamespace:
        return SimpleNamespace(trial_id=trial_id, status=status, last_result=result)

    trials = [
        trial("a", "TERMINATED", **{"ptq_rtn_w2a8/top1": 61.5}),  # finished by the killed driver
        trial("b", "TERMINATED", **{"val/top1": 30.0}),  # stopped early by ASHA
        trial("c", "ERROR"),
        trial("d", "RUNNING", **{"ptq_rtn_w2a8/top1": 40.25}),  # completing now (Tune: still RUNNING)
        trial("e", "RUNNING"),
        trial("f", "PENDING"),
    ]
    restored.on_trial_complete(0, trials, trials[3])
    assert lines[-1].endswith(
        "trial d: ptq_rtn_w2a8/top1 = 40.25; trials: 2 finished, 1 stopped, 0 diverged, 1 failed, 1 running of 6; "
        "best ptq_rtn_w2a8/top1 = 61.50"
    ), lines[-1]
    trials[3].status = "TERMINATED"
    trials[4] = trial("e", "ERROR")
    restored.on_trial_error(0, trials, trials[4])
    assert "trial e: failed; trials: 2 finished, 1 stopped, 0 diverged, 2 failed, 0 running of 6" in lines[-1]
