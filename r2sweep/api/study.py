"""Run a study from Python: "what does R2 buy for my model?" as one call (``r2sweep study FILE``).

>>> import r2sweep
>>> result = r2sweep.run_study("search_spaces/studies/dkm-r18.yaml")      # doctest: +SKIP
>>> result.table.verdict(), result.recommended_path                       # doctest: +SKIP

The workflow (:mod:`r2sweep.core.config.study`): the no-R2 baseline's sweep, then one
sweep per R2 kind started from the baseline's best (``--start-from``), every sweep's
best re-run on fresh seeds (``r2sweep confirm``), the controls, and the answer: a
table, a page, the recommended trial file, the champion ``r2sweep-study-NAME``.

Each step is an ordinary sweep or confirmation, visible in MLflow on its own, and
what the study decides is read back from MLflow, never from a state file: the same
call after an interruption (even a SIGKILL of the driver) skips the finished sweeps,
resumes the unfinished one from its Tune state, and runs only the re-runs MLflow
does not hold yet. :func:`load_study` rebuilds the answer anywhere that reaches the store.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from r2sweep.api import options as check
from r2sweep.api.stores import open_store, quiet_mlflow
from r2sweep.core.config.overrides import Overrides, apply_overrides, override_pairs
from r2sweep.core.config.strict_yaml import load_file
from r2sweep.core.config.study import StudySpec, StudySweep, load_study_spec
from r2sweep.core.errors import ConfigError, FileConfigError, R2SweepError

__all__ = ["run_study", "load_study", "read_study_file", "StudyResult", "RECOMMENDED_FILE"]
#: The recommended configuration, a trial file (``r2sweep trial FILE`` re-runs it), in the output folder.
RECOMMENDED_FILE = "recommended.yaml"
_NEW, _RESUME, _DONE = "new", "resume", "done"


@dataclass
class StudyResult:
    """A study's answer as MLflow holds it.

    Attributes:
        name: the study's name (its MLflow experiment; its sweeps are ``NAME-baseline``, ``NAME-<kind>``).
        table: the :class:`~r2sweep.analysis.study_table.StudyTable`: per sweep its confirmed winner,
            the gains and controls; ``table.recommended`` and ``table.verdict()`` the answer.
        page: the study page (``index.html``, ``table.md``, figures) when one was written.
        recommended_path: the recommended trial file when one was written.
        model_uri: ``models:/r2sweep-study-NAME/<version>``, the registered champion, when registered.
    """

    name: str
    tracking_uri: str
    table: Any
    page: Any = None
    recommended_path: Path | None = None
    model_uri: str | None = None


def _writer(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    return (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)


def read_study_file(study: Any, overrides: Overrides) -> tuple[StudySpec, dict[str, Any]]:
    """(the validated study, the mapping as resolved with the overrides: what MLflow keeps).

    Raises:
        ConfigError: naming the first bad field (a :class:`FileConfigError` names the file too).
    """
    is_file = isinstance(study, (str, os.PathLike))
    try:
        raw = load_file(study) if is_file else dict(study)
        pairs = override_pairs(overrides)
        resolved = apply_overrides(raw, pairs) if pairs else raw
        return load_study_spec(resolved), resolved
    except ConfigError as error:
        raise FileConfigError(os.fspath(study), error) if is_file else error from None


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'the file'}: {old!r} then, {new!r} now"


def _sweeps_part(study: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a study's sweeps: all of the file but ``confirm`` and ``replicates``, which may
    change between runs (more seeds, more top trials, more searches): re-runs and replicates only add
    to what MLflow holds, and replicate r's sweeps do not depend on how many others there are."""
    return {k: v for k, v in study.items() if k not in ("confirm", "replicates")}


def _ended_trials(tracker: Any, name: str) -> tuple[int, bool]:
    """(trials of sweep ``name`` that MLflow knows ended, whether its parent run is FINISHED)."""
    from r2sweep.core.outcome import TAG_OUTCOME

    sweep = tracker.find_sweep(name)
    if sweep is None:
        return 0, False
    ended = sum(1 for r in sweep.trial_runs() if TAG_OUTCOME in r.data.tags)
    return ended, tracker.client.get_run(sweep.parent_run_id).info.status == "FINISHED"


def _sweep_state(tracker: Any, sweep: StudySweep, storage: str) -> str:
    """Skip it (MLflow holds it whole), resume it (its Tune state is here), or start it."""
    from ray import tune

    from r2sweep.core.sweep_files import experiment_path

    wanted = sweep.spec.settings.num_samples
    ended, closed = _ended_trials(tracker, sweep.name)
    if closed and ended >= wanted:
        return _DONE
    if tune.Tuner.can_restore(experiment_path(storage, sweep.name)):
        return _RESUME  # also a sweep whose last results a killed driver had not sent yet
    if tracker.find_sweep(sweep.name) is None:
        return _NEW
    if ended >= wanted:
        return _DONE  # ran elsewhere (a cluster's storage); MLflow holds every trial
    raise R2SweepError(f"sweep {sweep.name!r} of the study is unfinished in {tracker.display_uri} ({ended} of {wanted} "
                       f"trials ended) and its Tune state is not under {storage}: run the study where its sweeps ran "
                       "(--storage), or give the study another name")


def _run_sweeps(tracker: Any, study: StudySpec, storage: str, *, tracking_uri: str | None, address: str | None,
                num_cpus: int | None, stage: Callable[[str], None], say: Callable[[str], None]) -> None:
    from r2sweep.api.sweep import prepare_sweep
    from r2sweep.tracking.names import TAG_STUDY

    for number, sweep in enumerate(study.sweeps, start=1):
        state = _sweep_state(tracker, sweep, storage)
        head = f"[{number}/{len(study.sweeps)}] sweep {sweep.name}"
        if state == _DONE:
            stage(f"{head}: in MLflow already, skipped")
        else:
            lent = study.baseline_of(sweep).name if sweep.kind != "none" and state == _NEW else None
            stage(f"{head}: {'resumed' if state == _RESUME else 'started'}, {sweep.spec.settings.num_samples} trials"
                + (f", the baseline's best {study.start_top} first" if lent else ""))
            prepared = prepare_sweep(sweep.mapping, tracking_uri=tracking_uri, storage=storage, address=address,
                                     resume=state == _RESUME, start_from=lent, start_top=study.start_top)
            prepared.run(progress=say, num_cpus=num_cpus, register=False)
            ended, _ = _ended_trials(tracker, sweep.name)
            if ended < sweep.spec.settings.num_samples:  # Ctrl-C: Tune returns what it had
                raise R2SweepError(f"sweep {sweep.name} stopped after {ended} of {sweep.spec.settings.num_samples} "
                                   "trials; run the study again to resume it")
        run = tracker.find_sweep(sweep.name)
        run.set_tags(run.parent_run_id, {TAG_STUDY: study.name})


def run_study(
    study: str | os.PathLike[str] | Mapping[str, Any],
    *,
    overrides: Overrides = None,
    tracking_uri: str | None = None,
    storage: str | os.PathLike[str] | None = None,
    address: str | None = None,
    out: str | os.PathLike[str] | None = None,
    num_cpus: int | None = None,
    register: bool = True,
    progress: bool | Callable[[str], None] = True,
) -> StudyResult:
    """Run (or go on with) a study and write its answer.

    Args:
        study: a study file (``search_spaces/studies/*.yaml``) or the mapping it would hold.
        overrides: ``{dotted path: value}`` or ``PATH=VALUE`` texts, applied to the study file
            (``{"data.root": "/data/cifar10"}``).
        tracking_uri, storage, address, num_cpus: as for :func:`r2sweep.run_sweep`; every sweep of
            the study uses them.
        out: the folder for the page, ``table.md`` and ``recommended.yaml`` (default ``NAME-study``).
        register: register the recommended configuration's model as ``r2sweep-study-NAME@champion``.
        progress: one line per stage and per finished trial on stderr (True), a function, or False.

    Raises:
        ConfigError: bad input, before anything is created; R2SweepError: the study holds in MLflow
            a file other than this one, or a sweep of it is unfinished with its Tune state elsewhere.
    """
    from r2sweep.analysis.study_reruns import confirm_winners, run_controls
    from r2sweep.tracking.names import STUDY_ARTIFACT
    from r2sweep.tracking.store import Tracker
    from r2sweep.tracking.studies import find_study, open_study, study_text
    from r2sweep.core.sweep_files import DEFAULT_STORAGE

    storage_text = None if storage is None else os.fspath(storage)
    check.storage(storage_text, "storage")
    check.tracking_uri(tracking_uri, "tracking_uri")
    check.ray_address(address, "address")
    spec, resolved = read_study_file(study, overrides)
    folder = check.output_folder(out if out is not None else f"{spec.name}-study", "out",
                                 what="the study's page and recommended trial file")
    say = _writer(progress)
    started = time.perf_counter()

    def stage(line: str) -> None:
        say(f"[{time.perf_counter() - started:7.1f}s] study {spec.name}: {line}")

    quiet_mlflow()
    tracker = Tracker(tracking_uri)
    tracker.check_access()
    text = yaml.safe_dump(resolved, sort_keys=False)
    existing = find_study(tracker, spec.name)
    if existing is not None:
        started_with = yaml.safe_load(study_text(existing))
        if _sweeps_part(started_with) != _sweeps_part(resolved):
            raise R2SweepError(f"study {spec.name!r} in {tracker.display_uri} was started with another file "
                               f"({_first_difference(_sweeps_part(started_with), _sweeps_part(resolved))}): go on "
                               "with the same file (its confirm: section may change), or give the study another name")
        if started_with != resolved:  # more seeds, or more top trials confirmed: the file says so from now on
            existing.log_text(existing.parent_run_id, text, STUDY_ARTIFACT)
            changed = [f"{key}: {started_with.get(key)} -> {resolved.get(key)}" for key in ("confirm", "replicates")
                       if started_with.get(key) != resolved.get(key)]
            stage(f"{'; '.join(changed)}; the sweeps run so far are kept")
    record = existing or open_study(tracker, spec.name, text)
    storage_text = storage_text or DEFAULT_STORAGE
    _run_sweeps(tracker, spec, storage_text, tracking_uri=tracking_uri, address=address,
                num_cpus=num_cpus, stage=stage, say=say)
    stage(f"confirming each sweep's best {spec.confirm_top} on seeds {list(spec.seeds)}")
    confirm_winners(tracker, spec, address=address, num_cpus=num_cpus, progress=say, storage=storage_text)
    stage("the controls: R2 off at each winner's knobs, and its R2 on the baseline's knobs")
    run_controls(tracker, spec, address=address, num_cpus=num_cpus, progress=say, storage=storage_text)
    result = _answer(tracker, spec, record, folder, text, register=register)
    stage(f"answered: {result.table.verdict()}")
    record.end("FINISHED")
    return result


def _answer(tracker: Any, spec: StudySpec, record: Any, folder: Path, text: str, *, register: bool) -> StudyResult:
    """Read the table from MLflow, write the page and the recommended trial file, log them, register the champion."""
    from r2sweep.analysis.confirm import logged_trial_config
    from r2sweep.analysis.select import read_sweep, register_champion
    from r2sweep.analysis.study_page import write_study_page
    from r2sweep.analysis.study_read import read_study_table
    from r2sweep.tracking.names import TAG_STUDY

    table = read_study_table(tracker, spec)
    pick = table.recommended
    page = write_study_page(tracker, spec, table, folder, study_text=text)
    sweep, _ = read_sweep(tracker, pick.sweep)
    recommended = folder / RECOMMENDED_FILE
    recommended.write_text(yaml.safe_dump(logged_trial_config(sweep, pick.run_id), sort_keys=False))
    for path in (*page.figures, page.table, page.page, recommended):
        record.log_artifact(record.parent_run_id, path, "report" if path != recommended else None)
    tags = {TAG_STUDY: spec.name, "r2sweep.recommended": pick.kind, "r2sweep.recommended_run": pick.run_id,
            "r2sweep.verdict": table.verdict()}
    model_uri = None
    if register:
        _, model_uri = register_champion(sweep, pick.run_id, f"r2sweep-study-{spec.name}")
        tags["r2sweep.champion"] = model_uri
    record.set_tags(record.parent_run_id, tags)
    return StudyResult(name=spec.name, tracking_uri=tracker.display_uri, table=table, page=page,
                       recommended_path=recommended, model_uri=model_uri)


def load_study(name: str, *, tracking_uri: str | None = None, out: str | os.PathLike[str] | None = None) -> StudyResult:
    """Study ``name``'s answer from MLflow alone (on any machine that reaches the store).

    With ``out``, its page is written there too (nothing is logged, registered or run).

    Raises:
        R2SweepError: no such study, or it has not reached its answer yet.
    """
    from r2sweep.analysis.study_page import write_study_page
    from r2sweep.analysis.study_read import read_study_table
    from r2sweep.tracking.studies import find_study, study_text

    check.sweep_to_read(name, "name")
    folder = None if out is None else check.output_folder(out, "out", what="the study's page")
    tracker = open_store(tracking_uri, "tracking_uri")
    record = find_study(tracker, name)
    if record is None:
        raise R2SweepError(f"no study named {name!r} in {tracker.display_uri}")
    text = study_text(record)
    spec = load_study_spec(yaml.safe_load(text))
    table = read_study_table(tracker, spec)
    page = write_study_page(tracker, spec, table, folder, study_text=text) if folder is not None else None
    return StudyResult(name=name, tracking_uri=tracker.display_uri, table=table, page=page)
