"""The sweep's Optuna study in a lasting storage: Tune's trials, one each, whatever the driver went through.

Tune's trial objects are stood in for (the callback reads ``trial_id``, ``config``,
``status`` and ``last_result``); the storage is a real SQLite file read back with
Optuna's own API. The real sweeps are in test_api.py (a finished sweep) and
test_driver_kill.py (a sweep killed twice and resumed).
"""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.errors import ConfigError
from r2sweep.core.sweep_files import SweepFiles
from r2sweep.tune.optuna_mirror import ATTR_MLFLOW_RUN, ATTR_OUTCOME, ATTR_TUNE_TRIAL, OptunaMirror, check_storage

SPEC = load_sweep_spec({
    "name": "mirrored",
    "data": {"name": "synthetic", "num_samples": 64},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 3},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "search": {"r2.kind": {"choice": ["none", "linf"]},
               "r2.strength": {"loguniform": [1e-3, 1e-1], "when": {"r2.kind": "linf"}},
               "train.batch_size": {"choice": [16, 32]}},
    "sweep": {"num_samples": 4},
})
OBJECTIVE = "ptq_rtn_w4a8/top1"


class FakeTracking:
    def __init__(self) -> None:
        self.runs: dict[str, str] = {}

    def run_ids(self) -> dict[str, str]:
        return dict(self.runs)

    def run_id_of(self, trial_id: str) -> str | None:
        return self.runs.get(trial_id)


def _trial(trial_id: str, config: dict, status: str = "RUNNING", **last) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config, status=status, last_result=last)


def _epochs(mirror: OptunaMirror, trial, proxies: list[float]) -> None:
    for epoch, proxy in enumerate(proxies):
        mirror.on_trial_result(0, [], trial, {"epoch": epoch, "proxy/top1": proxy, "training_iteration": epoch + 1})


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="mirrored", storage=url)


def test_every_outcome_lands_with_its_values_distributions_and_attributes(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    tracking = FakeTracking()
    mirror = OptunaMirror(SPEC, url, "mirrored", tracking)
    done = _trial("a_00000", {"r2.kind": "linf", "r2.strength": 0.01, "train.batch_size": 32, "seed": 0})
    stopped = _trial("a_00001", {"r2.kind": "none", "train.batch_size": 16})
    failed = _trial("a_00002", {"r2.kind": "none", "train.batch_size": 32})
    running = _trial("a_00003", {"r2.kind": "linf", "r2.strength": 0.05, "train.batch_size": 16})
    mirror.on_step_begin(0, [])
    for trial in (done, stopped, failed, running):
        mirror.on_trial_start(0, [], trial)
    tracking.runs.update({"a_00000": "run0", "a_00001": "run1"})
    _epochs(mirror, done, [40.0, 55.0, 61.0])
    _epochs(mirror, stopped, [12.0])
    mirror.on_trial_result(0, [], done, {"final": 1, OBJECTIVE: 58.5, "proxy/top1": 99.0})  # not an epoch
    done.last_result = {"final": 1, OBJECTIVE: 58.5}
    stopped.last_result = {"proxy/top1": 12.0}
    mirror.on_trial_complete(0, [], done)
    mirror.on_trial_complete(0, [], stopped)
    mirror.on_trial_error(0, [], failed)
    mirror.on_experiment_end([])

    trials = _study(url).trials
    assert [t.user_attrs[ATTR_TUNE_TRIAL] for t in trials] == ["a_00000", "a_00001", "a_00002", "a_00003"]
    first, second, third, fourth = trials
    assert first.state == TrialState.COMPLETE and first.value == 58.5
    assert first.params == {"r2.kind": "linf", "r2.strength": 0.01, "train.batch_size": 32}  # searched only
    assert isinstance(first.distributions["r2.strength"], optuna.distributions.FloatDistribution)
    assert first.distributions["r2.strength"].log and first.intermediate_values == {0: 40.0, 1: 55.0, 2: 61.0}
    assert first.user_attrs[ATTR_MLFLOW_RUN] == "run0" and first.user_attrs[ATTR_OUTCOME] == "finished"
    assert second.state == TrialState.PRUNED and second.value is None and second.user_attrs[ATTR_OUTCOME] == "stopped"
    assert "r2.strength" not in second.params  # never sampled: the condition did not hold
    assert third.state == TrialState.FAIL and third.user_attrs[ATTR_OUTCOME] == "failed"
    assert fourth.state == TrialState.RUNNING


def test_a_new_driver_rebuilds_the_study_from_tunes_trials_keeping_their_epochs(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    first_driver = OptunaMirror(SPEC, url, "mirrored", FakeTracking())
    kept = _trial("t_00000", {"r2.kind": "none", "train.batch_size": 16})
    forgotten = _trial("t_00001", {"r2.kind": "none", "train.batch_size": 32})  # created after Tune's last snapshot
    first_driver.on_step_begin(0, [])
    first_driver.on_trial_start(0, [], kept)
    first_driver.on_trial_start(0, [], forgotten)
    _epochs(first_driver, kept, [30.0, 35.0])
    # The driver is killed; Tune restores the callback from its pickle and knows one trial
    # (resumed), plus a finished one the snapshot holds, and creates a new one.
    import pickle

    second_driver = pickle.loads(pickle.dumps(first_driver))
    finished = _trial("t_00002", {"r2.kind": "linf", "r2.strength": 0.002, "train.batch_size": 32},
                      status="TERMINATED", final=1, **{OBJECTIVE: 70.0})
    second_driver.on_step_begin(0, [kept, finished])
    _epochs(second_driver, kept, [30.0, 35.0, 47.0])  # from its checkpoint on; epochs repeat
    fresh = _trial("t_00003", {"r2.kind": "none", "train.batch_size": 16})
    second_driver.on_trial_start(0, [], fresh)
    kept.last_result = {"final": 1, OBJECTIVE: 64.0}
    second_driver.on_trial_complete(0, [], kept)

    trials = _study(url).trials
    assert [t.user_attrs[ATTR_TUNE_TRIAL] for t in trials] == ["t_00000", "t_00002", "t_00003"]
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == 64.0
    assert trials[0].intermediate_values == {0: 30.0, 1: 35.0, 2: 47.0}
    assert trials[1].state == TrialState.COMPLETE and trials[1].value == 70.0
    assert [t.number for t in trials] == [0, 1, 2]


def test_a_storage_that_fails_costs_the_sweep_nothing(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    mirror = OptunaMirror(SPEC, f"sqlite:///{blocker}/optuna.db", "mirrored", None)
    trial = _trial("x_00000", {"r2.kind": "none", "train.batch_size": 16})
    mirror.on_step_begin(0, [])
    mirror.on_trial_start(0, [], trial)
    _epochs(mirror, trial, [1.0])
    mirror.on_trial_complete(0, [], trial)
    mirror.on_experiment_end([])
    lines = [line for line in capsys.readouterr().err.splitlines() if "Optuna study" in line]
    assert len(lines) == 1 and "--resume" in lines[0]


def test_a_configured_storage_is_checked_before_a_sweep_starts(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    check_storage(url, "mirrored")  # empty: fine
    optuna.create_study(study_name="mirrored", storage=url)
    with pytest.raises(ConfigError, match="sweep.optuna_storage.*optuna delete-study --study-name mirrored"):
        check_storage(url, "mirrored")
    with pytest.raises(ConfigError, match="sweep.optuna_storage.*an Optuna storage that answers"):
        check_storage(f"sqlite:///{tmp_path}/no/such/folder/x.db", "mirrored")


@pytest.mark.parametrize(("value", "message"), [
    ("redis://localhost/0", "an RDB URL"),
    ("postgresql://me:secret@db/optuna", "without a password"),
    (3, "true or false or a string"),
])
def test_bad_optuna_storage_settings_are_refused_naming_the_field(value, message) -> None:
    raw = {**SPEC_RAW, "sweep": {"optuna_storage": value}}
    with pytest.raises(ConfigError, match=f"sweep.optuna_storage.*{message}") as caught:
        load_sweep_spec(raw)
    assert "secret" not in str(caught.value)


SPEC_RAW = {k: v for k, v in {
    "name": "mirrored", "data": {"name": "synthetic"}, "model": {"name": "small_cnn"},
    "objective": {"metric": "fp/top1"}, "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
}.items()}


def test_the_default_study_lives_beside_the_sweep_and_a_uri_storage_has_none(tmp_path) -> None:
    settings = SPEC.settings
    assert SweepFiles(str(tmp_path), "mirrored", settings).optuna_url == f"sqlite:///{tmp_path}/mirrored/optuna.db"
    assert SweepFiles("s3://bucket/sweeps", "mirrored", settings).optuna_url is None
