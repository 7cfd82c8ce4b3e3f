"""Ray Tune orchestration: one Tune experiment per sweep, Optuna proposing, ASHA stopping.

Who sees which metric, and why:

* the **searcher** (Optuna) sees only the final objective, a key a trial
  reports once, at its end. A trial stopped early by the scheduler never
  reports it, so Optuna records it as PRUNED instead of scoring a partial
  pre-training as if it were complete;
* the **scheduler** (ASHA) ranks trials per pre-training epoch on
  ``proxy/top1``: round-to-nearest accuracy on the grid of the result the
  objective is read from (``TrialConfig.proxy_target``), the cheap stand-in
  for the downstream result.

Each epoch's pre-training state is reported as a Tune checkpoint, so a trial
restarted after a worker or driver failure resumes from its last epoch. Trials
that diverge report ``diverged = 1`` and end; Optuna sees no objective and marks
them pruned, so the best config is always a finite one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from r2sweep.core.checkpoint import write_text_atomic
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import ConfigError, TrialDiverged
from r2sweep.core.locations import join
from r2sweep.core.outcome import FINISHED, decide_outcome
from r2sweep.core.trial import HISTOGRAMS, PRETRAIN_CHECKPOINT, PRETRAINED, run_trial
from r2sweep.tune.cluster import check_data_roots, check_resources, connect
from r2sweep.tune.experiment_files import ExperimentFolder
from r2sweep.tune.space import make_sampler, make_space

__all__ = ["run_sweep", "experiment_path", "SweepOutcome", "trainable", "DEFAULT_STORAGE", "TRIAL_CONFIG", "TRIAL_ARTIFACTS"]

DEFAULT_STORAGE = "r2sweep_results"
#: The trial config as a re-runnable YAML file, in a trial's final checkpoint.
TRIAL_CONFIG = "trial_config.yaml"
TRIAL_ARTIFACTS = (PRETRAINED, HISTOGRAMS, TRIAL_CONFIG)


class _FinalOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that ignores per-epoch results.

    The stock class reads the objective from every intermediate result (for
    Optuna's pruners) and fails on results that do not carry it; here the
    objective exists only in a trial's final report, by design.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return


class _BaselineKeepingASHA(ASHAScheduler):
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


def _scheduler_metric(spec: SweepSpec) -> str:
    return "proxy/top1" if spec.trial.downstream else "val/top1"


def trainable(config: dict[str, Any], spec: SweepSpec) -> None:
    """The Tune function trainable: one r2sweep trial with the sampled values written in."""
    cpus = int(max(1, spec.settings.resources_per_trial.get("cpu", 1)))
    torch.set_num_threads(cpus)  # a trial's share of the node, not every core
    trial_config = spec.trial_config(config)
    work = Path(tune.get_context().get_trial_dir()) / "work"
    work.mkdir(parents=True, exist_ok=True)
    # Resume from what Tune's driver saw, never from the trial's own scratch state:
    # the trial writes that state before its report reaches the driver, so after a
    # driver kill it can be epochs ahead, and resuming from it would skip epochs the
    # tracking never logged (seen once in tests/test_driver_kill.py: val/top1 had no
    # step 4). Without a checkpoint the trial starts over; the journal drops repeats.
    (work / PRETRAIN_CHECKPOINT).unlink(missing_ok=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = Path(directory) / PRETRAIN_CHECKPOINT
            if saved.exists():
                shutil.copy2(saved, work / PRETRAIN_CHECKPOINT)

    node_id = ray.get_runtime_context().get_node_id()  # tagged on the trial's MLflow run

    def report(metrics: dict[str, float]) -> None:
        # Per epoch the checkpoint holds the pre-training state (to resume); at the
        # end it holds what the tracking callback logs: the pre-trained weights,
        # their histograms and the trial config. Checkpoints go to the sweep's
        # storage, which the driver can read on a cluster too.
        files = TRIAL_ARTIFACTS if metrics.get("final") else (PRETRAIN_CHECKPOINT,)
        with tempfile.TemporaryDirectory() as directory:
            for file in files:
                if (work / file).exists():
                    shutil.copy2(work / file, Path(directory) / file)
            tune.report({**metrics, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(directory))

    write_text_atomic(work / TRIAL_CONFIG, yaml.safe_dump(trial_config.to_mapping(), sort_keys=False))
    try:
        run_trial(trial_config, report, out_dir=work)
    except TrialDiverged as error:
        tune.report({"diverged": 1.0, "final": 1.0, "error": str(error)[:200], "node_id": node_id})


@dataclass
class SweepOutcome:
    """What a finished (or interrupted) sweep left: Tune's results and where they live."""

    name: str
    path: str
    results: Any  # ray.tune.ResultGrid
    spec: SweepSpec

    def finished(self) -> list[Any]:
        """Results of trials whose outcome is ``finished`` (every objective reported)."""
        return [r for r in self.results
                if decide_outcome(r.metrics, self.spec.objective_metrics, errored=r.error is not None) == FINISHED]

    def best(self) -> Any | None:
        """The best finished result by :meth:`SweepSpec.ranking`."""
        finished = self.finished()
        return max(finished, key=lambda r: self.spec.ranking(r.metrics)) if finished else None


def run_sweep(
    spec: SweepSpec,
    *,
    storage: str | Path = DEFAULT_STORAGE,
    name: str | None = None,
    resume: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    callbacks: Sequence[tune.Callback] = (),
) -> SweepOutcome:
    """Run (or resume) the sweep described by ``spec`` and return its outcome.

    Args:
        storage: Tune's ``storage_path``: a local directory or a shared URI
            (``s3://...``, a network file system) that every node can reach.
        name: the experiment's name (defaults to ``spec.name``).
        resume: continue the sweep stored under ``storage/name`` (finished trials
            kept, running ones restarted from their last epoch checkpoint).
        address: a Ray cluster to join (else ``RAY_ADDRESS``, else a local Ray).
        callbacks: Tune callbacks (tracking, progress).

    Raises:
        ClusterError: no node can hold one trial's resources, or a data root is
            missing on a node that runs trials (checked before any trial starts).
    """
    name = name or spec.name
    experiment = experiment_path(storage, name)
    # Tune checks that every result carries the searcher's metric; ours carry it
    # only in the final report, on purpose (see the module docstring).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Every epoch's checkpoint triggers an experiment snapshot (num_to_keep=2 keeps
    # disk use flat: two per trial); Tune then warns on every epoch of short trials.
    # The snapshot cost is measured in benchmarks/RESULTS.md ("sweep overhead").
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints a configuration box and result paths even
    # at verbose=0; the classic reporter stays silent there. r2sweep prints its
    # own progress (ProgressCallback).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage_path = experiment.rsplit("/", 1)[0]
    if not resume and tune.Tuner.can_restore(experiment):
        raise FileExistsError(
            f"a sweep named {name!r} already exists in {storage_path}: add --resume to continue it, or --name for a new one"
        )
    if resume and not tune.Tuner.can_restore(experiment):
        raise FileNotFoundError(f"no sweep to resume at {experiment}")
    folder = ExperimentFolder(experiment)
    if resume:
        _check_same_space(folder, spec)
    connect(address, num_cpus)
    resources = {k: float(v) for k, v in spec.settings.resources_per_trial.items() if float(v) > 0}
    check_resources(resources)
    check_data_roots(spec.data_roots())
    function = tune.with_resources(tune.with_parameters(trainable, spec=spec), resources)
    if resume:
        folder.repair()
        tuner = tune.Tuner.restore(experiment, trainable=function, resume_unfinished=True, resume_errored=True)
    else:
        folder.save_space(_space(spec))
        tuner = tune.Tuner(function, tune_config=_tune_config(spec), run_config=_run_config(spec, name, storage_path, callbacks))
        folder.backup_tuner_state()
    results = tuner.fit()
    return SweepOutcome(name=name, path=experiment, results=results, spec=spec)


def _space(spec: SweepSpec) -> dict[str, Any]:
    """Everything that decides which trials a sweep runs and how they are judged."""
    return json.loads(json.dumps({
        "trial": spec.trial.to_mapping(),
        "objective": [dataclasses.asdict(o) for o in spec.objectives],
        "search": {p.path: dataclasses.asdict(p) for p in spec.params},
        "sweep": dataclasses.asdict(spec.settings),
    }, default=str))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _check_same_space(folder: ExperimentFolder, spec: SweepSpec) -> None:
    """Refuse to resume with a search space other than the one the sweep started with.

    Raises:
        ConfigError: naming the first field that differs, both values, and the fix.
    """
    saved = folder.saved_space()
    if saved is None:
        return  # a sweep started before the space was recorded
    saved, now = _flat(saved), _flat(_space(spec))
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise ConfigError(
                key.removeprefix("trial."),
                now.get(key),
                f"the sweep at {folder.experiment} was started with {saved.get(key)!r}; resume it with the "
                "same search-space file (and --set overrides), or start a new sweep with --name",
            )


def experiment_path(storage: str | Path, name: str) -> str:
    """Where Tune keeps sweep ``name``: ``<storage>/<name>`` (a local path made absolute, or a URI)."""
    return join(storage, name)


def _tune_config(spec: SweepSpec) -> tune.TuneConfig:
    objectives = spec.objectives
    metric: str | list[str] = [o.metric for o in objectives] if spec.multi_objective else objectives[0].metric
    mode: str | list[str] = [o.mode for o in objectives] if spec.multi_objective else objectives[0].mode
    baseline = spec.baseline_point
    # Enqueued in Optuna in this order, before any sampled trial: the no-R2 baseline
    # (its other parameters sampled), then the user's start points.
    first = ([baseline] if baseline else []) + [dict(p) for p in spec.settings.start_points]
    searcher = _FinalOnlyOptunaSearch(
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
            metric=_scheduler_metric(spec),
            mode="max",
            max_t=spec.max_epochs + 1,  # + the final report
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
        scheduler: Any = _BaselineKeepingASHA(**asha, baseline=baseline) if baseline else ASHAScheduler(**asha)
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=settings.num_samples,
        max_concurrent_trials=settings.max_concurrent,
        reuse_actors=True,  # a fresh worker costs seconds of torch import per trial
    )


def _run_config(spec: SweepSpec, name: str, storage_path: str, callbacks: Sequence[tune.Callback]) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        callbacks=list(callbacks),
        failure_config=tune.FailureConfig(max_failures=spec.settings.max_failures),
        # Two, not one: Tune deletes the older checkpoint as it registers a new one,
        # and its experiment snapshot can still name it when the driver is killed.
        # Two make that rarer; ExperimentFolder.repair handles what is left.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=0,
    )


