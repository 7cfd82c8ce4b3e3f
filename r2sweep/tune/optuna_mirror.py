"""A sweep's trials as an Optuna study in a lasting storage: what optuna-dashboard and
``optuna.visualization`` read, on a running sweep or a finished one.

The searcher's own study lives in memory and travels pickled with Tune's experiment;
after a driver kill the restored copy can lag behind what Tune actually ran (see
:mod:`r2sweep.tune.state_repairs`). The lasting study is therefore a projection of
Tune's trials, kept by a driver callback: built afresh from Tune's trials each time a
driver starts (a resumed sweep keeps each trial's per-epoch values and run id), then
updated as trials start, report and end. Its trials are Tune's, one each, in the
order Tune created them, whatever the driver went through.

Each Optuna trial holds the searched values with their distributions, the scheduler's
metric per epoch as intermediate values, the objective value(s), and user attributes
``tune_trial_id``, ``mlflow_run_id`` and ``outcome``. Its state is what the searcher
recorded: COMPLETE for a finished trial, FAIL for one that raised, PRUNED otherwise
(stopped early, diverged). A storage that stops answering costs the sweep nothing: one
line says so and the study is rebuilt at the next driver start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState
from ray import tune

from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.outcome import FINISHED, decide_outcome
from r2sweep.tracking.schema_lock import schema_lock
from r2sweep.tune.search import scheduler_metric
from r2sweep.tune.space import distributions_of

__all__ = ["OptunaMirror", "check_storage", "ATTR_TUNE_TRIAL", "ATTR_MLFLOW_RUN", "ATTR_OUTCOME"]

ATTR_TUNE_TRIAL, ATTR_MLFLOW_RUN, ATTR_OUTCOME = "tune_trial_id", "mlflow_run_id", "outcome"


class OptunaMirror(tune.Callback):
    """Keeps study ``name`` in ``url`` equal to the sweep's Tune trials (see the module)."""

    def __init__(self, spec: SweepSpec, url: str, name: str, tracking: Any | None = None) -> None:
        self.spec, self.url, self.name = spec, url, name
        self.tracking = tracking  # the TrackingCallback, for the MLflow run ids it learns
        self._ids: dict[str, int] = {}  # Tune trial id -> the storage's trial id (this driver's)
        self._storage: Any = None
        self._study_id: int | None = None
        self._broken = False

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with Tune's experiment: the connection and this driver's ids stay behind.
        return {**self.__dict__, "_ids": {}, "_storage": None, "_study_id": None, "_broken": False}

    # -- Tune's events -----------------------------------------------------------

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._study_id is None:
            self._guard(self._rebuild, trials, needs_study=False)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard(self._ensure, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        metric = scheduler_metric(self.spec)
        if not result.get("final") and isinstance(result.get(metric), (int, float)):
            step = int(result.get("epoch", result.get("training_iteration", 1) - 1))
            self._guard(lambda: self._storage.set_trial_intermediate_value(self._ensure(trial), step,
                                                                           float(result[metric])))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard(self._end, trial, False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard(self._end, trial, True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._guard(self._record_run_ids)  # the tracking has flushed by now (it ends first)

    # -- the storage ---------------------------------------------------------------

    def _guard(self, action: Any, *args: Any, needs_study: bool = True) -> Any:
        if self._broken or (needs_study and self._study_id is None):
            return None
        try:
            return action(*args)
        except Exception as error:  # the storage is a view of the sweep: never the sweep's end
            self._broken = True
            print(f"r2sweep: the Optuna study in {self.url} is not updated for the rest of this run ({error}); "
                  "'r2sweep sweep ... --resume' rebuilds it", file=sys.stderr)
            return None

    def _rebuild(self, trials: list) -> None:
        if self.url.startswith("sqlite:///"):  # the default: beside the results, which Tune may not have made yet
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        with schema_lock(self.url):  # two sweeps opening one new database must not both create its tables
            storage = optuna.storages.get_storage(self.url)
        kept: dict[str, Any] = {}
        try:
            old = storage.get_study_id_from_name(self.name)
        except KeyError:
            old = None
        if old is not None:  # what only the old study knows: per-epoch values, run ids
            kept = {t.user_attrs.get(ATTR_TUNE_TRIAL): t for t in storage.get_all_trials(old, deepcopy=False)}
            storage.delete_study(old)
        directions = [StudyDirection.MAXIMIZE if o.mode == "max" else StudyDirection.MINIMIZE
                      for o in self.spec.objectives]
        self._storage, self._study_id = storage, storage.create_new_study(directions, self.name)
        for trial in trials:
            self._ensure(trial, kept.get(trial.trial_id))
            if trial.status in ("TERMINATED", "ERROR"):
                self._end(trial, trial.status == "ERROR")

    def _ensure(self, trial: Any, earlier: Any | None = None) -> int:
        """The storage's id of ``trial``, created RUNNING with its values if it has none yet."""
        if trial.trial_id in self._ids:
            return self._ids[trial.trial_id]
        every = distributions_of(self.spec.params)
        params = {k: trial.config[k] for k in every if k in trial.config}
        attrs = {ATTR_TUNE_TRIAL: trial.trial_id}
        run_id = self._run_id_of(trial.trial_id) or (earlier.user_attrs.get(ATTR_MLFLOW_RUN) if earlier else None)
        if run_id:
            attrs[ATTR_MLFLOW_RUN] = run_id
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING, params=params, distributions={k: every[k] for k in params},
            user_attrs=attrs, intermediate_values=dict(earlier.intermediate_values) if earlier else None,
        )
        self._ids[trial.trial_id] = self._storage.create_new_trial(self._study_id, template_trial=template)
        return self._ids[trial.trial_id]

    def _end(self, trial: Any, errored: bool) -> None:
        trial_id = self._ensure(trial)
        if self._storage.get_trial(trial_id).state.is_finished():
            return
        outcome = decide_outcome(trial.last_result, self.spec.objective_metrics, errored=errored)
        self._storage.set_trial_user_attr(trial_id, ATTR_OUTCOME, outcome)
        run_id = self._run_id_of(trial.trial_id)
        if run_id:
            self._storage.set_trial_user_attr(trial_id, ATTR_MLFLOW_RUN, run_id)
        if outcome == FINISHED:
            values = [float(trial.last_result[m]) for m in self.spec.objective_metrics]
            self._storage.set_trial_state_values(trial_id, TrialState.COMPLETE, values)
        else:
            self._storage.set_trial_state_values(trial_id, TrialState.FAIL if errored else TrialState.PRUNED)

    def _run_ids(self) -> dict[str, str]:
        return self.tracking.run_ids() if self.tracking is not None else {}

    def _run_id_of(self, trial_id: str) -> str | None:
        return self.tracking.run_id_of(trial_id) if self.tracking is not None else None

    def _record_run_ids(self) -> None:
        # Trials still running when the driver stops (a finished trial got its id as it ended).
        for tune_id, run_id in self._run_ids().items():
            if tune_id in self._ids and not self._storage.get_trial(self._ids[tune_id]).state.is_finished():
                self._storage.set_trial_user_attr(self._ids[tune_id], ATTR_MLFLOW_RUN, run_id)


def check_storage(url: str, name: str) -> None:
    """Refuse, before a new sweep starts, a configured storage that does not answer or
    already holds a study named ``name`` (a sweep's study is rebuilt from its trials).

    Raises:
        ConfigError: naming ``sweep.optuna_storage`` and the fix.
    """
    from r2sweep.core.errors import ConfigError
    from r2sweep.core.locations import redact_uri

    try:
        with schema_lock(url):
            storage = optuna.storages.get_storage(url)
        names = {study.study_name for study in storage.get_all_studies()}
    except Exception as error:
        raise ConfigError("sweep.optuna_storage", redact_uri(url),
                          f"an Optuna storage that answers ({type(error).__name__}: {str(error)[:200]})") from None
    if name in names:
        raise ConfigError("sweep.optuna_storage", redact_uri(url),
                          f"a storage without a study named {name!r} (it holds one: pick another --name, or "
                          f"delete it: optuna delete-study --study-name {name} --storage URL)")
