"""What a sweep leaves, as one object: the best trial, every trial as a table, and what to do next.

:class:`SweepResult` is read from MLflow, so the one :func:`r2sweep.run_sweep`
returns and the one :func:`r2sweep.load_sweep` opens later (on another machine,
while the sweep still runs) are the same thing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.sweep_files import SweepFiles

__all__ = ["SweepResult", "load_sweep"]


@dataclass
class SweepResult:
    """A sweep in MLflow.

    Attributes:
        name: the sweep's (and its MLflow experiment's) name.
        experiment_id: the MLflow experiment, to open in the MLflow UI.
        tracking_uri: the store, with any password masked.
        spec: the search space the sweep was started with.
        best: the best finished trial (:class:`~r2sweep.analysis.select.BestTrial`):
            ``run_id``, ``trial_id``, ``metrics``, ``params``, ``config`` (re-runnable
            with :func:`r2sweep.run_trial`), and after :func:`r2sweep.run_sweep` or
            :func:`r2sweep.best` its ``config_path`` and champion ``model_version``.
            None while no trial has finished.
        path: where Tune keeps the sweep (None when opened from MLflow alone).
        tune_results: Ray Tune's ``ResultGrid`` of this run (None when opened from MLflow).
    """

    name: str
    experiment_id: str
    tracking_uri: str
    spec: SweepSpec
    best: Any
    path: str | None = None
    tune_results: Any = None
    _tracker: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, tracker: Any, name: str, *, spec: SweepSpec | None = None, best: Any = None, path: str | None = None,
           tune_results: Any = None) -> SweepResult:
        from r2sweep.analysis.select import best_trial, read_sweep
        from r2sweep.core.errors import R2SweepError

        sweep, stored_spec = read_sweep(tracker, name)
        if best is None:
            try:
                best = best_trial(tracker, sweep, stored_spec)
            except R2SweepError:
                best = None  # nothing finished yet
        return cls(name=name, experiment_id=sweep.experiment_id, tracking_uri=tracker.display_uri,
                   spec=spec or stored_spec, best=best, path=path, tune_results=tune_results, _tracker=tracker.pinned())

    @property
    def objective(self) -> str:
        """The metric the sweep ranks on (its first objective)."""
        return self.spec.objective.metric

    @cached_property
    def trials(self) -> Any:
        """A pandas DataFrame, one row per trial: ``trial_id``, ``run_id``, ``outcome``
        (finished, stopped, diverged, failed), ``config/<path>`` per searched parameter, then its metrics."""
        from r2sweep.analysis.trials import trials_frame

        return trials_frame(self._tracker.find_sweep(self.name).trial_runs(), self.spec)

    @property
    def optuna_storage(self) -> str | None:
        """The Optuna storage URL holding this sweep's trials as study ``name`` (``sweep.optuna_storage``),
        for ``optuna-dashboard URL``; None when the sweep keeps none."""
        path = self.path
        if path is None:  # opened from MLflow: the parent run says where Tune kept the sweep
            from r2sweep.tracking.names import TAG_EXPERIMENT_PATH

            sweep = self._tracker.find_sweep(self.name)
            path = self._tracker.client.get_run(sweep.parent_run_id).data.tags.get(TAG_EXPERIMENT_PATH)
        return SweepFiles.of_experiment(path, self.spec.settings).optuna_url if path else None

    def optuna_study(self) -> Any:
        """The sweep's trials as an ``optuna.Study`` (for ``optuna.visualization``; read-only use).

        Raises:
            R2SweepError: the sweep keeps no Optuna study (``sweep.optuna_storage: false``, or a URI storage).
        """
        import optuna

        from r2sweep.core.errors import R2SweepError

        url = self.optuna_storage
        if url is None:
            raise R2SweepError(f"sweep {self.name!r} keeps no Optuna study: set sweep.optuna_storage (true, "
                               "or an RDB URL under a URI storage) when starting a sweep")
        return optuna.load_study(study_name=self.name, storage=url)

    def report(self, out: str | os.PathLike[str], *, log_to_run: bool = True) -> Any:
        """Write the sweep's HTML report and figures to ``out`` (see :func:`r2sweep.report`)."""
        from r2sweep.api.readers import report

        return report(self.name, out, tracking_uri=self._tracker.tracking_uri, log_to_run=log_to_run)

    def confirm(self, *, top: int = 3, seeds: Sequence[int] = (1, 2, 3), out: str | Path | None = None,
                address: str | None = None, progress: Callable[[str], None] | None = None) -> list[Any]:
        """Re-run the ``top`` trials on fresh ``seeds``, best mean first (see :func:`r2sweep.confirm`)."""
        from r2sweep.api.readers import confirm

        return confirm(self.name, top=top, seeds=seeds, out=out, address=address, progress=progress,
                       tracking_uri=self._tracker.tracking_uri)


def load_sweep(name: str, *, tracking_uri: str | None = None) -> SweepResult:
    """Open sweep ``name`` from MLflow: the same :class:`SweepResult` :func:`r2sweep.run_sweep` returns.

    ``best`` is picked without writing anything (no tag, no export, no registration).
    """
    from r2sweep.api import options as check
    from r2sweep.api.stores import open_store

    check.sweep_to_read(name, "name")
    return SweepResult.of(open_store(tracking_uri, "tracking_uri"), name)
