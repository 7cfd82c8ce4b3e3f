"""How a sweep searches and stops: Optuna proposes, ASHA stops, and who sees which metric.

* the **searcher** (Optuna) sees only the final objective, a key a trial
  reports once, at its end. A trial stopped early by the scheduler never
  reports it, so Optuna records it as PRUNED instead of scoring a partial
  pre-training as if it were complete;
* the **scheduler** (ASHA) ranks trials per pre-training epoch on
  ``proxy/top1``: round-to-nearest accuracy on the grid of the result the
  objective is read from (``TrialConfig.proxy_target``), the cheap stand-in
  for the downstream result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.experiment import Trial
from ray.tune.search.optuna import OptunaSearch

from r2sweep.core.config.search import SearchParam
from r2sweep.core.config.start_from import HistoryTrial
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.tune.space import distributions_of, make_sampler, make_space

__all__ = ["tune_config", "FinalOnlyOptunaSearch", "BaselineKeepingASHA", "LiveTrialsFIFO", "LiveTrialsASHA",
           "scheduler_metric"]


class FinalOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that ignores per-epoch results, and may start from an earlier sweep's trials.

    The stock class reads the objective from every intermediate result (for
    Optuna's pruners) and fails on results that do not carry it; here the
    objective exists only in a trial's final report, by design. ``history``
    (:class:`~r2sweep.core.config.start_from.HistoryTrial`) goes into the study
    before anything is sampled; the stock ``evaluated_rewards`` cannot take it
    with a define-by-run space, and would enqueue the points to run them again.
    """

    def __init__(self, *args: Any, history: Sequence[HistoryTrial] = (), params: Sequence[SearchParam] = (),
                 **kwargs: Any) -> None:
        self._history, self._history_params = tuple(history), tuple(params)
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        distributions = distributions_of(self._history_params)
        for earlier in self._history:
            state = optuna.trial.TrialState.COMPLETE if earlier.values is not None else optuna.trial.TrialState.PRUNED
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=state, values=list(earlier.values) if earlier.values is not None else None,
                params=dict(earlier.params), distributions={k: distributions[k] for k in earlier.params},
            ))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return


class LiveTrialsQueue:
    """Chooses the next trial to run among the trials not ended yet, not among all of them.

    Tune's FIFO scheduler (and ASHA, which inherits it) scans every trial of the sweep at
    every step of the driver's loop for one that is PENDING: O(trials so far) per step,
    35% of the driver's time at trial 3,000 of a 10,000-trial sweep (issue 42). The trials
    not ended are at most the running ones and those queued behind them, so keeping them
    (Tune announces each trial added and each one ended) makes the choice O(concurrency).
    Should Tune hold more trials than were announced (a path that adds one without telling
    the scheduler), the live set is rebuilt from a full scan once: a missed trial is
    never left waiting.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live: dict[str, Any] = {}
        self._announced = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": {}, "_announced": 0}  # a restored driver is told of its trials again

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        self._live[trial.trial_id] = trial
        self._announced += 1

    def _ended(self, trial: Any) -> None:
        self._live.pop(trial.trial_id, None)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._ended(trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_error(tune_controller, trial)
        self._ended(trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_remove(tune_controller, trial)
        self._ended(trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        trials = tune_controller.get_trials()
        if len(trials) != self._announced:  # not told of every trial: take Tune's own list, once
            self._live = {t.trial_id: t for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)}
            self._announced = len(trials)
        for wanted in (Trial.PENDING, Trial.PAUSED):  # FIFO's order: pending first, in the order added
            for trial in self._live.values():
                if trial.status == wanted:
                    return trial
        return None


class LiveTrialsFIFO(LiveTrialsQueue, FIFOScheduler):
    """Tune's FIFO scheduler, choosing among the trials not ended (:class:`LiveTrialsQueue`)."""


class LiveTrialsASHA(LiveTrialsQueue, ASHAScheduler):
    """Tune's ASHA, choosing among the trials not ended (:class:`LiveTrialsQueue`)."""


class BaselineKeepingASHA(LiveTrialsASHA):
    """ASHA that never stops the first no-R2 trial to report.

    A sweep is read as "what R2 buys over no R2"; ASHA would otherwise stop the
    no-R2 trials first exactly when R2 matters (their low-bit proxy lags), and
    leave nothing finished to compare against. The other no-R2 trials are
    ranked like any trial.
    """

    def __init__(self, *args: Any, baseline: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._baseline = dict(baseline)
        self._baseline_trial: str | None = None

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if self._baseline_trial is None and all(trial.config.get(k) == v for k, v in self._baseline.items()):
            self._baseline_trial = trial.trial_id
        if trial.trial_id == self._baseline_trial and decision == TrialScheduler.STOP:
            return TrialScheduler.CONTINUE  # the trainable ends itself after its final report
        return decision


def scheduler_metric(spec: SweepSpec) -> str:
    return "proxy/top1" if spec.trial.downstream else "val/top1"


def tune_config(spec: SweepSpec) -> tune.TuneConfig:
    objectives = spec.objectives
    metric: str | list[str] = [o.metric for o in objectives] if spec.multi_objective else objectives[0].metric
    mode: str | list[str] = [o.mode for o in objectives] if spec.multi_objective else objectives[0].mode
    baseline = spec.baseline_point
    # Enqueued in Optuna in this order, before any sampled trial: the no-R2 baseline
    # (its other parameters sampled), an earlier sweep's best (--start-from), then
    # the user's start points.
    lent = spec.start_from
    first = (([baseline] if baseline else []) + [dict(p) for p in (lent.points if lent else ())]
             + [dict(p) for p in spec.settings.start_points])
    searcher = FinalOnlyOptunaSearch(
        history=lent.history if lent else (),
        params=spec.params,
        space=make_space(spec.params),
        metric=metric,
        mode=mode,
        sampler=make_sampler(spec.settings, spec.multi_objective),
        points_to_evaluate=first or None,
    )
    settings = spec.settings
    if settings.scheduler == "asha":
        asha = dict(
            time_attr="training_iteration",
            metric=scheduler_metric(spec),
            mode="max",
            max_t=spec.max_epochs + 1,  # + the final report
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
        scheduler: Any = BaselineKeepingASHA(**asha, baseline=baseline) if baseline else LiveTrialsASHA(**asha)
    else:
        scheduler = LiveTrialsFIFO()
    return tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=settings.num_samples,
        max_concurrent_trials=settings.max_concurrent,
        reuse_actors=True,  # a fresh worker costs seconds of torch import per trial
    )
