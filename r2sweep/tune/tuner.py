"""One Tune experiment per sweep: checked, started or restored, and fitted.

:func:`check_experiment` does every check that needs no running Ray (is there
a sweep of that name already, or one to resume; is its search space the one it
started with), so that a face can refuse before it announces anything;
:func:`run_experiment` then joins Ray, checks the cluster and fits. The search
and scheduling live in :mod:`r2sweep.tune.search`, the trial in
:mod:`r2sweep.tune.trainable`, the mending of Tune's saved state in
:mod:`r2sweep.tune.state_repairs`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from r2sweep.core.config.record import RECORD_FILE, read_record, sweep_mapping, sweep_record
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import ConfigError
from r2sweep.core.outcome import FINISHED, decide_outcome
from r2sweep.core.ranking import best_of
from r2sweep.core.sweep_files import DEFAULT_STORAGE, SweepFiles, experiment_path
from r2sweep.tune.checkpoints import KeepNewestCheckpoints
from r2sweep.tune.cluster import check_data_roots, check_resources, connect, trial_nodes
from r2sweep.tune.data_parallel import trial_resources
from r2sweep.tune.experiment_files import ExperimentFolder
from r2sweep.tune.runtime_env import check_imports, runtime_env_for, shipped_callables
from r2sweep.tune.search import tune_config
from r2sweep.tune.state_repairs import backup_tuner_state, repair_tune_state
from r2sweep.tune.trainable import trainable

__all__ = ["run_experiment", "check_experiment", "experiment_path", "ExperimentOutcome", "DEFAULT_STORAGE"]



@dataclass
class ExperimentOutcome:
    """What a finished (or interrupted) Tune experiment left: Tune's results and where they live."""

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
        return best_of(self.finished(), self.spec)


def check_experiment(spec: SweepSpec, experiment: str, *, resume: bool) -> None:
    """Refuse a new sweep where one exists, a resume where none does, a resume with another space.

    Needs no running Ray: it reads the experiment folder only.

    Raises:
        FileExistsError, FileNotFoundError: naming the fix (``--resume``, ``--name``).
        ConfigError: the search space differs from the one the sweep started with.
    """
    name = experiment.rstrip("/").rsplit("/", 1)[-1]
    storage_path = experiment.rsplit("/", 1)[0]
    if not resume and tune.Tuner.can_restore(experiment):
        raise FileExistsError(
            f"a sweep named {name!r} already exists in {storage_path}: add --resume to continue it, or --name for a new one"
        )
    if resume and not tune.Tuner.can_restore(experiment):
        raise FileNotFoundError(f"no sweep to resume at {experiment}")
    if resume:
        _check_same_space(ExperimentFolder(experiment), spec)


def run_experiment(
    spec: SweepSpec,
    *,
    storage: str | Path = DEFAULT_STORAGE,
    name: str | None = None,
    resume: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    callbacks: Sequence[tune.Callback] = (),
    say: Callable[[str], None] | None = None,
) -> ExperimentOutcome:
    """Run (or resume) the Tune experiment of ``spec`` and return its outcome.

    Args:
        storage: Tune's ``storage_path``: a local directory or a shared URI
            (``s3://...``, a network file system) that every node can reach.
        name: the experiment's name (defaults to ``spec.name``).
        resume: continue the sweep stored under ``storage/name`` (finished trials
            kept, running ones restarted from their last epoch checkpoint).
        address: a Ray cluster to join (else ``RAY_ADDRESS``, else a local Ray).
        callbacks: Tune callbacks (tracking, progress).
        say: where a line about mended Tune state goes (default: nowhere).

    Raises:
        ClusterError: no node can hold one trial's resources, or a data root or
            checkpoint is missing on a node that runs trials (checked before any trial starts).
        ConfigError: a factory of the user's does not import on a node (its code did not travel).
    """
    name = name or spec.name
    experiment = experiment_path(storage, name)
    check_experiment(spec, experiment, resume=resume)
    # Tune checks that every result carries the searcher's metric; ours carry it
    # only in the final report, on purpose (see r2sweep.tune.search).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's newer console output prints a configuration box and result paths even
    # at verbose=0; the classic reporter stays silent there. r2sweep prints its
    # own progress (ProgressCallback).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    folder = ExperimentFolder(experiment)
    connect(address, num_cpus, runtime_env_for(spec))
    check_resources(spec.settings.rank_resources, spec.settings.workers)
    for field, paths in spec.shared_paths().items():
        check_data_roots(paths, field)
    check_imports(spec, trial_nodes())
    # Callables given from Python that do not import by name travel with the trainable, by value.
    trial = tune.with_parameters(trainable, spec=spec, callables=shipped_callables(spec),
                                 cache_dir=SweepFiles(str(storage), name, spec.settings).pretrain_cache)
    function = tune.with_resources(trial, trial_resources(spec.settings))
    if resume:
        for line in repair_tune_state(folder):
            if say is not None:
                say(line)
        tuner = tune.Tuner.restore(experiment, trainable=function, resume_unfinished=True, resume_errored=True)
    else:
        folder.save_record(sweep_record(spec))
        tuner = tune.Tuner(function, tune_config=tune_config(spec), run_config=_run_config(name, experiment, spec, callbacks))
        backup_tuner_state(folder)
    results = tuner.fit()
    return ExperimentOutcome(name=name, path=experiment, results=results, spec=spec)


def _space(spec: SweepSpec) -> dict[str, Any]:
    """Everything in a sweep's record that decides which trials it runs and how they are judged:
    not its name, nor where pre-trained weights are cached or the Optuna study is shown (a
    resume may change those; the study stays where the sweep started it)."""
    mapping = sweep_mapping(spec)
    del mapping["name"]
    for key in ("pretrain_cache", "optuna_storage"):
        del mapping["sweep"][key]
    return mapping


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _check_same_space(folder: ExperimentFolder, spec: SweepSpec) -> None:
    """Refuse to resume with a search space other than the one the sweep started with.

    Raises:
        ConfigError: naming the first field that differs, both values, and the fix; or a
            folder without a record (not started by this r2sweep), naming the fix.
    """
    text = folder.saved_record()
    if text is None:
        raise ConfigError("resume", folder.experiment, f"a sweep this r2sweep started (the folder has no {RECORD_FILE}); "
                          "start a new sweep with --name")
    saved, now = _flat(_space(read_record(text))), _flat(_space(spec))
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise ConfigError(
                key,
                now.get(key),
                f"the sweep at {folder.experiment} was started with {saved.get(key)!r}; resume it with the "
                "same search-space file (and --set overrides), or start a new sweep with --name",
            )


def _run_config(name: str, experiment: str, spec: SweepSpec, callbacks: Sequence[tune.Callback]) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=experiment.rsplit("/", 1)[0],
        # Tune keeps every checkpoint (its num_to_keep would force a snapshot per trial);
        # KeepNewestCheckpoints deletes all but each trial's newest two.
        callbacks=[*callbacks, KeepNewestCheckpoints()],
        failure_config=tune.FailureConfig(max_failures=spec.settings.max_failures),
        verbose=0,
    )
