"""Tune callbacks on the driver: MLflow tracking and the live progress line.

Tracking runs on the driver, not in the trials: only the driver needs to reach
the tracking server, and a run is found by its trial-id tag before one is
created, so a trial restarted after a crash, or a resumed sweep, never leaves a
second run (Ray's own MLflow callback does; see docs/architecture.md). Artifacts come from the
trial's final checkpoint, which lives in the sweep's storage and so is readable
from the driver on a cluster too.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from r2sweep.core.checkpoint import write_text_atomic
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import ConfigError
from r2sweep.core.outcome import DIVERGED, FAILED, FINISHED, RUN_STATUS, STOPPED, TAG_OUTCOME, decide_outcome, diverged_result
from r2sweep.core.ranking import best_of
from r2sweep.core.sweep_files import SweepFiles
from r2sweep.core.trial import TEXT_RESULTS
from r2sweep.tracking.journal import JournalFlusher, TrackingJournal
from r2sweep.tracking.names import TAG_EXPERIMENT_PATH, TAG_NOTES, TAG_START_FROM, TAG_TEXT_PREFIX
from r2sweep.tracking.store import SweepRun, Tracker
from r2sweep.tune.trainable import TRIAL_ARTIFACTS

__all__ = ["TrackingCallback", "ProgressCallback", "EPOCH_METRICS", "TAG_NOTES"]

#: Per-epoch metrics logged with their step (the pre-training epoch).
EPOCH_METRICS = ("train/loss", "train/r2", "val/top1", "proxy/top1", "lr", "weights/max_abs", "weights/range", "weights/kurtosis", "time/epoch_s")

#: In the journal folder: the store a sweep started logging to (its location, no password).
STORE_FILE = "store.json"
#: Where the trial ran (Ray node id and host): the last node, if it was restored elsewhere.
TAG_NODE_ID = "r2sweep.node_id"
TAG_NODE_HOST = "r2sweep.node_host"


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def _say(line: str) -> None:
    print(f"r2sweep: {line}", file=sys.stderr, flush=True)


class TrackingCallback(tune.Callback):
    """Logs a sweep to MLflow: one parent run, one child run per trial.

    Every trial event becomes an operation in a durable :class:`TrackingJournal`
    that a background thread applies in order (see :mod:`r2sweep.tracking.journal`):
    Tune's loop never waits for MLflow, and an unreachable server delays the
    records instead of losing them or ending the sweep.

    Args:
        tracker: the MLflow backend.
        spec: the validated spec (its YAML text is the parent's artifact).
        spec_text: the sweep's record (:func:`~r2sweep.core.config.record.sweep_record`).
        experiment_path: where Tune keeps the sweep (``storage/name``); tagged on
            the parent run, so a resumed sweep continues the same run.
        journal_dir: where the journal lives; default ``<experiment_path>/tracking``
            for local storage, ``./r2sweep_journal/<name>`` for a storage URI.
        flush_timeout_s: how long the end of the sweep waits for MLflow to take
            what is still pending (the journal keeps it either way).
    """

    def __init__(
        self,
        tracker: Tracker,
        spec: SweepSpec,
        spec_text: str,
        *,
        name: str,
        experiment_path: str,
        journal_dir: str | None = None,
        flush_timeout_s: float = 900.0,
    ) -> None:
        self.tracker = tracker.pinned()  # Tune may unpickle this in another working directory
        self.spec = spec
        self.spec_text = spec_text
        self.name = name
        self.experiment_path = experiment_path
        self.journal_dir = journal_dir or SweepFiles.of_experiment(experiment_path, spec.settings).journal_dir
        self.flush_timeout_s = flush_timeout_s
        self.sweep: SweepRun | None = None
        self._runs: dict[str, str] = {}
        self._nodes: dict[str, str] = {}
        self._texts: dict[str, dict[str, str]] = {}
        self._journal: TrackingJournal | None = None
        self._flusher: JournalFlusher | None = None
        self._reconciled = False

    @property
    def _store_file(self) -> Path:
        return Path(self.journal_dir) / STORE_FILE

    def check_resume(self) -> None:
        """Refuse to resume this sweep with another MLflow store than it started with.

        Tune resumes a sweep with the callbacks pickled when it started and ignores
        the ones passed now, so the trials would keep logging to the first store
        while the best configuration was read from this one.

        Raises:
            ConfigError: naming ``--tracking-uri``, both stores, and the fix.
        """
        if not self._store_file.exists():
            return  # a sweep from before the record was kept, or not started yet
        started = json.loads(self._store_file.read_text())["tracking"]
        if started != self.tracker.location:
            raise ConfigError(
                "--tracking-uri", self.tracker.location,
                f"sweep {self.name!r} logs to {started} (a resumed sweep keeps the store it started with); "
                f"resume it with --tracking-uri {started}",
            )

    def check_new(self) -> None:
        """Refuse to start a sweep whose name MLflow already holds, when there is no Tune state to resume.

        The sweep's results folder was deleted (or is on another machine) but its
        MLflow experiment is still there: the new trials would become children of
        the old parent run, judged by the old spec, two sweeps in one. When the Tune
        state is there, :func:`~r2sweep.tune.tuner.check_experiment` asks for ``--resume``.

        Raises:
            ConfigError: naming ``--name``, the store, and the two ways out.
        """
        if tune.Tuner.can_restore(self.experiment_path):
            return
        database = self.tracker.sqlite_file
        if database is not None and not database.is_file():
            return  # no store yet (and looking would create its file)
        existing = self.tracker.find_sweep(self.name)
        if existing is not None:
            trials = len(existing.trial_runs())
            raise ConfigError(
                "--name", self.name,
                f"a new sweep name: {self.tracker.display_uri} already holds sweep {self.name!r} ({trials} trials, "
                f"parent run {existing.parent_run_id}) and its Tune state at {self.experiment_path} is gone, so it "
                f"cannot be resumed; pass --name for a new sweep, or delete that MLflow experiment first",
            )

    def _recorded(self) -> dict[str, Any]:
        """What the journal folder recorded when the sweep started (store, parent run), or {}."""
        return json.loads(self._store_file.read_text()) if self._store_file.exists() else {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; the journal and its
        # thread are rebuilt in setup(), from the files on disk.
        return {**self.__dict__, "_journal": None, "_flusher": None, "_runs": {}, "_texts": {}, "_reconciled": False}

    def setup(self, **info: Any) -> None:
        # A restored Tune experiment brings back this callback as it was pickled
        # before the first run, so it cannot be told "resume": it continues the
        # parent run its journal folder recorded, which lives (and is deleted) with
        # the sweep's Tune state. No record: a new parent run, never an old one
        # that happens to share the name.
        recorded = self._recorded()
        if self.sweep is None:
            existing = self.tracker.find_sweep(self.name)
            if "parent_run_id" in recorded:
                resume = existing is not None and existing.parent_run_id == recorded["parent_run_id"]
            else:  # journal folders of sweeps started before the parent run was recorded
                resume = "tracking" in recorded and existing is not None and (
                    self.tracker.client.get_run(existing.parent_run_id).data.tags.get(TAG_EXPERIMENT_PATH)
                    == self.experiment_path
                )
            tags = {TAG_EXPERIMENT_PATH: self.experiment_path}
            lent = self.spec.start_from
            if lent is not None:
                tags[TAG_START_FROM] = f"{lent.source} (top {lent.top}: {len(lent.points)} tried first, "\
                                       f"{len(lent.history)} as history)"
            self.sweep = self.tracker.start_sweep(self.name, self.spec_text, tags=tags, resume=resume)
        if recorded.get("parent_run_id") != self.sweep.parent_run_id:
            write_text_atomic(self._store_file, json.dumps(
                {"tracking": self.tracker.location, "parent_run_id": self.sweep.parent_run_id}))
        if self._flusher is None:
            # Operations a killed driver left unapplied go first.
            self._journal = TrackingJournal(self.journal_dir)
            self._flusher = JournalFlusher(self._journal, self._apply, report=_say)

    # -- what Tune tells us: recorded, never sent from here ------------------

    def _record(self, op: str, **fields: Any) -> None:
        assert self._journal is not None and self._flusher is not None, "setup() was not called"
        if self._journal.append(op, **fields):
            self._flusher.notify()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        # Once per driver start: trials the journal knows but Tune does not were
        # created after Tune's last experiment snapshot, before a driver crash.
        # Tune has forgotten them (their slots are sampled anew), so their runs
        # are removed from the sweep: one MLflow run per trial Tune ran, no more.
        if self._reconciled or self._journal is None:
            return
        self._reconciled = True
        forgotten = sorted(self._journal.trials() - {t.trial_id for t in trials})
        if forgotten:
            self._record("forget", trials=forgotten)

    def _params(self, trial: Any) -> dict[str, Any]:
        # The searched values, and the fixed ones that say whose code and which checkpoint it used.
        return {**self.spec.identity_params(), **dict(trial.config)}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record("trial", trial=trial.trial_id, params=self._params(trial))

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record("trial", trial=trial.trial_id, params=self._params(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        node = result.get("node_id")
        if node and self._nodes.get(trial.trial_id) != node:
            self._nodes[trial.trial_id] = node
            self._record("tags", trial=trial.trial_id, tags={TAG_NODE_ID: node, TAG_NODE_HOST: result.get("hostname", "")})
        # Text results are tags; tagged when they change (pretrain_cache comes with every epoch).
        texts = {TAG_TEXT_PREFIX + key: str(result[key])[:4000] for key in TEXT_RESULTS if result.get(key)}
        known = self._texts.setdefault(trial.trial_id, {})
        changed = {tag: value for tag, value in texts.items() if known.get(tag) != value}
        if changed:
            known.update(changed)
            self._record("tags", trial=trial.trial_id, tags=changed)
        if result.get("final"):
            metrics = {k: v for k, v in result.items() if "/" in k or k in ("diverged",)}
            step, once = 0, f"{trial.trial_id}:final"
        else:
            metrics = {k: result[k] for k in EPOCH_METRICS if k in result}
            step = int(result.get("epoch", result.get("training_iteration", 1) - 1))
            once = f"{trial.trial_id}:epoch:{step}"  # a restored trial repeats epochs after its checkpoint
        # The timestamp is fixed now, so that a replay is an exact duplicate MLflow ignores.
        self._record("metrics", trial=trial.trial_id, metrics=_finite(metrics), step=step,
                     timestamp=int(time.time() * 1000), once=once)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        outcome = decide_outcome(trial.last_result, self.spec.objective_metrics)
        status = RUN_STATUS[outcome]
        self._record("tags", trial=trial.trial_id, tags={TAG_OUTCOME: outcome})
        if outcome != STOPPED and trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as directory:
                files = [p for p in sorted(Path(directory).iterdir()) if p.name in TRIAL_ARTIFACTS]
                if files:
                    self._record("artifacts", trial=trial.trial_id, files=files)
        self._record("end_trial", trial=trial.trial_id, status=status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record("tags", trial=trial.trial_id, tags={TAG_OUTCOME: FAILED})
        self._record("end_trial", trial=trial.trial_id, status=RUN_STATUS[FAILED])

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._flusher is None:
            return
        self._record("end_sweep", status="FINISHED")
        if not self._flusher.flush(self.flush_timeout_s):
            print(
                f"r2sweep: MLflow has not taken {len(self._journal.pending())} tracking operations yet "
                f"({self._flusher.last_error}); they are kept in {self.journal_dir} and sent by "
                "'r2sweep sweep ... --resume'",
                file=sys.stderr,
            )
        self._flusher.close()
        self._flusher = None

    def run_ids(self) -> dict[str, str]:
        """The MLflow run id of each trial whose run exists by now (Tune trial id -> run id)."""
        return dict(self._runs)  # one C-level copy: safe against the flusher thread adding one

    def run_id_of(self, trial_id: str) -> str | None:
        """The MLflow run id of one trial, if its run exists by now (no copy: per-trial callers stay O(1))."""
        return self._runs.get(trial_id)

    # -- applying one recorded operation to MLflow (the flusher's thread) ----

    def _run_id(self, trial_id: str, params: dict[str, Any] | None = None) -> str:
        assert self.sweep is not None
        if params is not None or trial_id not in self._runs:
            self._runs[trial_id] = self.sweep.trial_run(trial_id, params or {})
        return self._runs[trial_id]

    def _apply(self, op: dict[str, Any]) -> None:
        assert self.sweep is not None
        kind = op["op"]
        if kind == "trial":
            self._run_id(op["trial"], op["params"])
        elif kind == "metrics":
            self.sweep.log_metrics(self._run_id(op["trial"]), op["metrics"], step=op["step"], timestamp=op["timestamp"])
        elif kind == "tags":
            self.sweep.set_tags(self._run_id(op["trial"]), op["tags"])
        elif kind == "artifacts":
            for path in op["files"]:
                self.sweep.log_artifact(self._run_id(op["trial"]), path)
        elif kind == "end_trial":
            self.sweep.end_trial(self._run_id(op["trial"]), op["status"])
        elif kind == "end_sweep":
            self.sweep.end(op["status"])
        elif kind == "forget":
            for trial_id in op["trials"]:
                self.sweep.forget_trial(trial_id)
        else:
            raise ValueError(f"unknown tracking operation {kind!r} in {self.journal_dir}")


class ProgressCallback(tune.Callback):
    """One line per finished trial: counts and the best objective so far.

    Counts and best come from Tune's trial list, not from the events this
    process saw: a resumed sweep gets back its callbacks as they were pickled
    when it started (Tune ignores the ones passed on resume), so anything kept
    here would restart from that first snapshot and miss the trials an earlier
    driver finished. The clock restarts in ``setup``, which each driver calls.
    """

    def __init__(self, spec: SweepSpec, write: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.started = time.perf_counter()

    def setup(self, **info: Any) -> None:
        self.started = time.perf_counter()

    def _outcome(self, trial: Any) -> str:
        return decide_outcome(trial.last_result, self.spec.objective_metrics, errored=trial.status == "ERROR")

    def _line(self, trials: list, event: str, ended: Any) -> None:
        # Tune calls on_trial_complete while the trial is still RUNNING.
        done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is ended]
        counts = {FINISHED: 0, STOPPED: 0, DIVERGED: 0, FAILED: 0}
        finished = []
        for trial in done:
            outcome = self._outcome(trial)
            counts[outcome] += 1
            if outcome == FINISHED:
                finished.append(trial.last_result)
        objective = self.spec.objective
        best = best_of(finished, self.spec)  # the trial `best` will pick, by the one rule
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not ended)
        shown = "-" if best is None else f"{best[objective.metric]:.2f}"
        self.write(
            f"[{time.perf_counter() - self.started:7.1f}s] {event}; trials: {counts[FINISHED]} finished, "
            f"{counts[STOPPED]} stopped, {counts[DIVERGED]} diverged, {counts[FAILED]} failed, {running} running of "
            f"{self.spec.settings.num_samples}; best {objective.metric} = {shown}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        outcome = self._outcome(trial)
        result = trial.last_result or {}
        if outcome == FINISHED:
            event = f"trial {trial.trial_id}: {self.spec.objective.metric} = {result[self.spec.objective.metric]:.2f}"
        elif outcome == DIVERGED:
            event = f"trial {trial.trial_id}: diverged ({diverged_result(result, self.spec.objective_metrics)})"
        elif outcome == STOPPED:
            event = f"trial {trial.trial_id}: stopped early"
        else:
            event = f"trial {trial.trial_id}: failed"
        self._line(trials, event, trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trials, f"trial {trial.trial_id}: failed", trial)
