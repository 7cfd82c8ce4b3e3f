"""Run a sweep from Python: the one assembly of spec, tracking, Ray and selection that every face calls.

>>> import r2sweep
>>> result = r2sweep.run_sweep("search_spaces/quickstart.yaml",
...                            overrides={"sweep.num_samples": 4})     # doctest: +SKIP
>>> result.best.metrics[result.objective], result.best.config_path    # doctest: +SKIP

:func:`prepare_sweep` makes every check that can refuse (the options, the file,
the data, the tracking store, the cluster's address, the Tune state under that
name) before anything is created or announced; :meth:`PreparedSweep.run` then
starts (or joins) Ray, runs the Tune experiment with its trials tracked in
MLflow through the journal, and selects, exports and registers the best trial.
:func:`run_sweep` is the two in one call. The CLI's ``r2sweep sweep`` is
``prepare_sweep`` + one announcement line + ``run``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r2sweep.api import options as check
from r2sweep.api.results import SweepResult
from r2sweep.api.stores import quiet_mlflow
from r2sweep.core.config.inputs import with_references
from r2sweep.core.config.overrides import Overrides, override_pairs
from r2sweep.core.config.record import sweep_record
from r2sweep.core.config.strict_yaml import load_file
from r2sweep.core.config.sweep import SweepSpec, load_sweep_spec
from r2sweep.core.environment import check_sweep_environment
from r2sweep.core.errors import ConfigError, FileConfigError, R2SweepError
from r2sweep.core.locations import is_uri
from r2sweep.core.sweep_files import DEFAULT_STORAGE, SweepFiles

__all__ = ["run_sweep", "prepare_sweep", "PreparedSweep"]


def run_sweep(
    spec: str | os.PathLike[str] | Mapping[str, Any],
    *,
    overrides: Overrides = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    storage: str | os.PathLike[str] | None = None,
    resume: bool = False,
    address: str | None = None,
    progress: bool | Callable[[str], None] = True,
    callbacks: Sequence[Any] = (),
    num_cpus: int | None = None,
    register: bool = True,
    start_from: str | None = None,
    start_top: int = 3,
) -> SweepResult:
    """Run (or resume) a sweep and return its result, with every guarantee of ``r2sweep sweep``.

    Args:
        spec: a search-space YAML file, or the mapping it would hold.
        overrides: ``{dotted path: value}`` (``{"sweep.num_samples": 8}``), or pairs, or
            ``"PATH=VALUE"`` texts as ``--set`` takes them.
        name: the sweep's (and MLflow experiment's) name; default the file's ``name``.
        tracking_uri: MLflow (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here).
        storage: Tune's results, a folder or a URI every node reaches (default ``./r2sweep_results``).
        resume: continue the interrupted sweep of that name.
        address: a Ray cluster to join (default ``RAY_ADDRESS``, else a new local Ray).
        progress: one line per finished trial on stderr (True), a function taking the lines, or False.
        callbacks: extra Ray Tune callbacks.
        num_cpus: the CPUs of a local Ray (default: all of this machine's).
        register: register the best trial's model as the champion ``r2sweep-NAME``
            (its config is exported to ``best.yaml`` beside the results either way).
        start_from: an earlier sweep (in the same tracking store) whose ``start_top`` best
            configurations run first, mapped onto this sweep's space; when both search the
            same space, its trials also go to Optuna as history (see ``r2sweep.analysis.start_from``).

    Returns:
        A :class:`SweepResult`; its ``best`` is None when no trial finished.

    Raises:
        ConfigError: bad input, before anything is created (a :class:`FileConfigError`
            names the file); FileExistsError/FileNotFoundError: a sweep of that name
            exists without ``resume``, or none to resume; TrackingError,
            ClusterUnreachable: the store or the cluster does not answer.
    """
    prepared = prepare_sweep(spec, overrides=overrides, name=name, tracking_uri=tracking_uri, storage=storage,
                             resume=resume, address=address, start_from=start_from, start_top=start_top)
    return prepared.run(progress=progress, callbacks=callbacks, num_cpus=num_cpus, register=register)


def prepare_sweep(
    spec: str | os.PathLike[str] | Mapping[str, Any],
    *,
    overrides: Overrides = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    storage: str | os.PathLike[str] | None = None,
    resume: bool = False,
    address: str | None = None,
    start_from: str | None = None,
    start_top: int = 3,
) -> PreparedSweep:
    """Every check of :func:`run_sweep`, in the order a person would fix them; nothing is created.
    An error names the argument by its keyword (the command line shows its flag)."""
    storage_text = None if storage is None else os.fspath(storage)
    check.storage(storage_text, "storage")
    check.tracking_uri(tracking_uri, "tracking_uri")
    check.ray_address(address, "address")
    check.sweep_name(name, "name", uri_storage=is_uri(storage_text))
    check.start_from(start_from, start_top, resume, "start_from", "start_top")
    loaded = _load(spec, overrides)
    cluster = address or os.environ.get("RAY_ADDRESS")
    try:
        if name is None:
            check.sweep_name(loaded.name, uri_storage=is_uri(storage_text), in_file=True)
        loaded = check_sweep_environment(loaded, local=not cluster)
        from r2sweep.tune.runtime_env import check_runtime_env  # Ray's own keys: the adapter knows them

        check_runtime_env(loaded.settings.runtime_env, Path.cwd())
        text = sweep_record(loaded)  # what MLflow and Tune's folder keep, and every reader reads
        cache = SweepFiles(storage_text or DEFAULT_STORAGE, name or loaded.name, loaded.settings).pretrain_cache
        if is_uri(cache):  # an object store: boto3 and credentials there now, not in every trial
            from r2sweep.core.pretrain_cache import PretrainCache

            try:
                PretrainCache(cache)
            except ConfigError as error:
                raise ConfigError("sweep.pretrain_cache", cache, f"{error.allowed}; or sweep.pretrain_cache: false") from None
        elif isinstance(loaded.settings.pretrain_cache, str):  # a folder the user named: usable, or said so now
            check.output_folder(loaded.settings.pretrain_cache, "sweep.pretrain_cache", what="the pre-training cache")
    except ConfigError as error:
        raise FileConfigError(os.fspath(spec), error) if _is_file(spec) else error from None

    from r2sweep.tracking.store import Tracker
    from r2sweep.tune.callbacks import TrackingCallback
    from r2sweep.tune.ray_address import reach_ray
    from r2sweep.tune.tuner import check_experiment

    quiet_mlflow()
    name = name or loaded.name
    tracker = Tracker(tracking_uri)
    storage_text = storage_text or DEFAULT_STORAGE
    experiment = SweepFiles(storage_text, name, loaded.settings).experiment
    tracker.check_access()  # a refused password fails here, before Ray starts or anything is logged
    if start_from is not None:
        from r2sweep.analysis.start_from import start_from as lent_by

        loaded = dataclasses.replace(loaded, start_from=lent_by(
            tracker, start_from, loaded, start_top, field="start_from"))
    tracking = TrackingCallback(tracker, loaded, text, name=name, experiment_path=experiment)
    if resume:
        tracking.check_resume()
    else:
        tracking.check_new()  # a name MLflow holds without its Tune state would merge two sweeps
    if cluster:
        reach_ray(cluster)  # its one line, in seconds
    check_experiment(loaded, experiment, resume=resume)
    if isinstance(loaded.settings.optuna_storage, str) and not resume:
        from r2sweep.tune.optuna_mirror import check_storage

        try:
            check_storage(loaded.settings.optuna_storage, name)
        except ConfigError as error:
            raise FileConfigError(os.fspath(spec), error) if _is_file(spec) else error from None
    return PreparedSweep(spec=loaded, name=name, tracker=tracker, storage=storage_text, experiment=experiment,
                         resume=resume, address=address, tracking=tracking)


@dataclass
class PreparedSweep:
    """A sweep that passed every check and has not started: :meth:`run` starts it."""

    spec: SweepSpec
    name: str
    tracker: Any  # r2sweep.tracking.store.Tracker
    storage: str
    experiment: str
    resume: bool
    address: str | None
    tracking: Any  # r2sweep.tune.callbacks.TrackingCallback

    def announcement(self) -> str:
        """The line a face prints before starting: what runs, and where it is tracked."""
        settings, objective = self.spec.settings, self.spec.objective
        return (f"sweep {self.name}: {settings.num_samples} trials, {settings.max_concurrent} at a time, "
                f"objective {objective.metric} ({objective.mode}); tracking {self.tracker.display_uri}")

    def run(self, *, progress: bool | Callable[[str], None] = True, callbacks: Sequence[Any] = (),
            num_cpus: int | None = None, register: bool = True) -> SweepResult:
        """Run the Tune experiment, then select, export and (with ``register``) register the best trial."""
        from r2sweep.analysis.select import select_best
        from r2sweep.tune.callbacks import ProgressCallback
        from r2sweep.tune.tuner import run_experiment

        write = _writer(progress)
        lent = self.spec.start_from
        if lent is not None and write is not None:
            for line in (lent.summary(), *lent.notes):
                write(f"{self.name}: {line}")
        tune_callbacks: list[Any] = [self.tracking]
        files = SweepFiles(self.storage, self.name, self.spec.settings)
        optuna_url = files.optuna_url
        if optuna_url is not None:  # (a resumed sweep keeps the one it was started with, in Tune's state)
            from r2sweep.tune.optuna_mirror import OptunaMirror

            tune_callbacks.append(OptunaMirror(self.spec, optuna_url, self.name, self.tracking))
        if write is not None:
            tune_callbacks.append(ProgressCallback(self.spec, write))
        outcome = run_experiment(self.spec, storage=self.storage, name=self.name, resume=self.resume,
                                 address=self.address, num_cpus=num_cpus,
                                 callbacks=[*tune_callbacks, *callbacks], say=write)
        try:
            best = select_best(self.tracker, self.name, out=files.best_config, register=register)
        except R2SweepError:
            best = None  # no trial finished: nothing to select (the result says so)
        return SweepResult.of(self.tracker, self.name, spec=self.spec, best=best, path=outcome.path,
                              tune_results=outcome.results)


def _writer(progress: bool | Callable[[str], None]) -> Callable[[str], None] | None:
    if callable(progress):
        return progress
    return (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None


def _load(spec: Any, overrides: Overrides) -> SweepSpec:
    """The file (or mapping) with its overrides written in, loaded (pure: nothing it names is imported)."""
    if isinstance(spec, SweepSpec):
        raise TypeError("run_sweep takes a search-space file or its mapping, not a SweepSpec "
                        "(its record is made from the file); pass the path or the dict")
    try:
        raw = load_file(spec) if _is_file(spec) else spec
        if isinstance(raw, Mapping):  # callables given from Python: their references are what a file can hold
            raw = {**raw, **with_references({k: v for k, v in raw.items() if k in ("model", "data")})}
        loaded = load_sweep_spec(raw, overrides=override_pairs(overrides),
                                 default_name=Path(spec).stem if _is_file(spec) else None)
    except ConfigError as error:  # a file's problems (and a --set's) name the file, as the CLI always did
        raise FileConfigError(os.fspath(spec), error) if _is_file(spec) else error from None
    return loaded


def _is_file(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike))
