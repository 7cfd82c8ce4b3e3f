"""Repairs of Tune's own saved state after a driver kill, checked against the Ray they were verified on.

Tune rewrites the files of an experiment in place (when it syncs its driver
staging folder to the storage path, for one), so a driver killed at the wrong
moment can leave files that make the sweep impossible to resume (seen in
tests/test_driver_kill.py). Before Tune reads an experiment back,
:func:`repair_tune_state` mends three such states:

* **an empty or torn** ``tuner.pkl``: Tune cannot restore without it, so
  :func:`backup_tuner_state` keeps an atomically written copy
  (``r2sweep_tuner.pkl``) when a sweep starts, and the repair puts it back;
* **a torn newest** ``experiment_state-<time>.json``: it and the searcher files
  saved with it (``*-<time>.*``) are moved to ``torn_snapshots/``, so Tune
  restores the snapshot before it;
* **a snapshot naming checkpoints deleted since**: each trial keeps its newest
  two checkpoints (:mod:`r2sweep.tune.checkpoints`) while Tune snapshots at its
  own pace, so a kill in between leaves the snapshot pointing at deleted
  ``<trial>/checkpoint_NNNNNN`` folders. The trial's newest checkpoint is
  copied under the names the snapshot expects, so the trial resumes from its
  newest epoch, which is the point;
* **a searcher state ahead of the snapshot**: Tune restores the newest snapshot
  and, separately, the newest searcher files, and its sync copies the files of
  a snapshot one by one, so a kill mid-sync can leave a searcher that counts
  trials the snapshot never held. Tune then believes those trials were created
  and never creates their slots again (a sweep of 6 ended with 5, seen once in
  tests/test_driver_kill.py). Searcher files of a later session than the
  snapshot are moved to ``torn_snapshots/``; a counter of the snapshot's own
  session that is ahead of its trials is set back to them.

All four were worked out against Ray 2.60's layout of an experiment folder
(those file names, and the checkpoint manager stored in the snapshot as a hex
``CLOUDPICKLE_FALLBACK`` blob) and only ever act on files of those names. On a
Ray outside :data:`VERIFIED_RAY` nothing is touched: the repair reports one line
saying so, and what to mend by hand should a resume fail.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import ray

from r2sweep.tune.experiment_files import ExperimentFolder

__all__ = ["VERIFIED_RAY", "backup_tuner_state", "is_verified_ray", "repair_tune_state"]

#: The Ray versions (major.minor) whose experiment folder layout the repairs were verified on.
VERIFIED_RAY = ("2.60",)
TUNER_STATE = "tuner.pkl"
TUNER_BACKUP = "r2sweep_tuner.pkl"
TORN_SNAPSHOTS = "torn_snapshots"
_SNAPSHOT = re.compile(r"experiment_state-(.*)\.json")
_CHECKPOINT = re.compile(rb"checkpoint_\d{6}")
#: The searcher's files Tune saves beside each snapshot (the same session stamp).
_SEARCHER_FILE = re.compile(r"(search_gen_state|searcher-state)-(?P<stamp>.*)\.(json|pkl)")


def _major_minor(version: str) -> str | None:
    """``"2.60"`` for ``"2.60.0"`` (or ``"2.60.0rc1"``); None for what is not a version."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    return f"{int(match[1])}.{int(match[2])}" if match else None


def is_verified_ray(version: str) -> bool:
    """Whether the repairs were verified on Ray ``version`` (its major.minor is in :data:`VERIFIED_RAY`)."""
    return _major_minor(version) in {_major_minor(v) for v in VERIFIED_RAY}


def _skip_line(version: str, experiment: str) -> str:
    verified = ", ".join(VERIFIED_RAY)
    return (
        f"Tune state repairs skipped: they were verified on Ray {verified} and are skipped on "
        f"Ray {_major_minor(version) or version}, so a resume of {experiment} after a driver kill may fail "
        f"on a torn file (if {TUNER_STATE} is empty, copy {TUNER_BACKUP} over it; if the newest "
        f"experiment_state-<time>.json is torn, move it and the files ending -<time>.* out of the folder)"
    )


def backup_tuner_state(folder: ExperimentFolder) -> None:
    """Keep an atomically written copy of Tune's ``tuner.pkl`` (``r2sweep_tuner.pkl``) for the repair."""
    state = folder.read(TUNER_STATE)
    if state:
        folder.write(TUNER_BACKUP, state)


def repair_tune_state(folder: ExperimentFolder) -> list[str]:
    """Undo what a kill mid-write can leave before Tune reads the experiment back.

    Returns one short line per repair made (empty when nothing needed one); on a
    Ray outside :data:`VERIFIED_RAY`, touches nothing and returns the one line
    saying the repairs were skipped.
    """
    if not is_verified_ray(ray.__version__):
        return [_skip_line(ray.__version__, folder.experiment)]
    done: list[str] = []
    backup = folder.read(TUNER_BACKUP)
    if backup and not _parses(folder.read(TUNER_STATE), pickle.loads):
        folder.write(TUNER_STATE, backup)
        done.append(f"{TUNER_STATE} was empty or torn: put back the copy in {TUNER_BACKUP}")
    snapshots = [i.base_name for i in folder.children() if _SNAPSHOT.fullmatch(i.base_name)]
    if len(snapshots) > 1 and not _parses(folder.read(snapshots[-1]), json.loads):
        done.append(_move_torn_snapshot(folder, snapshots[-1], snapshots[-2]))
        snapshots = snapshots[:-1]
    if snapshots:
        done += _restore_named_checkpoints(folder, snapshots[-1])
        done += _align_searcher(folder, snapshots[-1])
    return done


def _align_searcher(folder: ExperimentFolder, snapshot: str) -> list[str]:
    """Make the searcher Tune will restore agree with the snapshot it will restore."""
    import ray.cloudpickle as cloudpickle

    stamp = _SNAPSHOT.fullmatch(snapshot)[1]
    done = []
    later = [i for i in folder.children()
             if (match := _SEARCHER_FILE.fullmatch(i.base_name)) and match["stamp"] > stamp]
    if later:
        aside = folder.path(TORN_SNAPSHOTS)
        folder.fs.create_dir(aside, recursive=True)
        for info in later:
            folder.fs.move(info.path, f"{aside}/{info.base_name}")
        done.append(f"searcher state newer than {snapshot} ({', '.join(i.base_name for i in later)}): moved to "
                    f"{TORN_SNAPSHOTS}/, so Tune restores the searcher of that snapshot")
    try:
        known = {json.loads(trial)["trial_id"] for trial, _ in json.loads(folder.read(snapshot) or b"")["trial_data"]}
        name = f"search_gen_state-{stamp}.json"  # a cloudpickle, whatever its name says
        state = cloudpickle.loads(folder.read(name) or b"")
        counter = int(state["counter"])
    except Exception:  # noqa: BLE001 - missing or unreadable: Tune reports it itself
        return done
    if counter > len(known):
        state["counter"] = len(known)
        # The concurrency limiter would hold a slot for each such trial for ever.
        limiter = state.get("name:ConcurrencyLimiter") or {}
        orphans = set(limiter.get("live_trials", ())) - known
        if orphans:
            limiter["live_trials"] = set(limiter["live_trials"]) - orphans
            limiter["num_unfinished_live_trials"] = max(0, limiter.get("num_unfinished_live_trials", 0) - len(orphans))
        folder.write(name, cloudpickle.dumps(state))
        done.append(f"{name} counted {counter} trials, {snapshot} holds {len(known)}: set back to {len(known)}, so "
                    f"Tune creates the {counter - len(known)} trial(s) it never snapshotted again")
    return done


def _move_torn_snapshot(folder: ExperimentFolder, torn: str, previous: str) -> str:
    stamp = _SNAPSHOT.fullmatch(torn)[1]
    aside = folder.path(TORN_SNAPSHOTS)
    folder.fs.create_dir(aside, recursive=True)
    moved = 0
    for info in folder.children():
        if f"-{stamp}." in info.base_name:  # the snapshot and the searcher files saved with it
            folder.fs.move(info.path, f"{aside}/{info.base_name}")
            moved += 1
    return f"{torn} was torn: moved it and the {moved - 1} file(s) saved with it to {TORN_SNAPSHOTS}/, so Tune restores {previous}"


def _restore_named_checkpoints(folder: ExperimentFolder, snapshot: str) -> list[str]:
    try:
        trials = json.loads(folder.read(snapshot) or b"")["trial_data"]
    except (ValueError, KeyError):
        return []
    done = []
    folders = [i for i in folder.children() if i.type == pafs.FileType.Directory]
    for trial_json, runtime_json in trials:
        trial_id = json.loads(trial_json).get("trial_id", "")
        # The checkpoint manager is stored as a cloudpickle blob in hex; the folder
        # names it refers to can be read off the bytes without unpickling anything.
        blobs = [v["value"] for v in json.loads(runtime_json).values()
                 if isinstance(v, dict) and v.get("_type") == "CLOUDPICKLE_FALLBACK"]
        named = {m.decode() for blob in blobs for m in _CHECKPOINT.findall(bytes.fromhex(blob))}
        for trial_dir in (f for f in folders if f"_{trial_id}_" in f.base_name):
            existing = [c for c in folder.children(trial_dir.base_name) if c.base_name.startswith("checkpoint_")]
            copied = []
            for name in sorted(named):
                target = f"{trial_dir.path}/{name}"
                if existing and folder.fs.get_file_info(target).type == pafs.FileType.NotFound:
                    folder.copy_tree(existing[-1].path, target)
                    copied.append(name)
            if copied:
                done.append(f"{trial_dir.base_name}: {snapshot} names deleted checkpoint(s) {', '.join(copied)}: "
                            f"copied the newest, {existing[-1].base_name}, under those names")
    return done


def _parses(data: bytes | None, parse: Callable[[bytes], Any]) -> bool:
    """Whether ``data`` exists and parses (a pickle Tune itself wrote, or JSON)."""
    if not data:
        return False
    try:
        parse(data)
        return True
    except Exception:  # noqa: BLE001 - empty, torn or missing: all mean "not usable"
        return False
