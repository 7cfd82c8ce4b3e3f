"""``r2sweep confirm``: re-run a sweep's top trials on fresh seeds and pick on the mean.

A sweep ranks every trial on one training seed, so its best trial is partly the
luckiest draw (the winner's curse; how far picks moved on fresh seeds here:
benchmarks/RESULTS.md, "The paper's effect at embedded scale"). This command re-runs the ``top`` trials' exact configurations (their logged
``trial_config.yaml``) with each of ``seeds`` as Ray tasks on the same cluster,
logs each re-run as a child run of the sweep (role ``confirm``: compare, report
and best never count it as a trial), and ranks the trials on their mean.

Re-runs already finished in MLflow are not run again, so an interrupted
confirmation resumes. With the sweep's own seed a re-run reproduces the trial
(on the CPU, bit for bit), which is how the tests check it.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml

from r2sweep.analysis.select import TRIAL_CONFIG_ARTIFACT, read_sweep
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.environment import code_named_by, resolve_inputs
from r2sweep.core.errors import R2SweepError
from r2sweep.core.ranking import top as top_trials
from r2sweep.core.sweep_files import SweepFiles
from r2sweep.core.outcome import DIVERGED, FAILED, FINISHED, RUN_STATUS, TAG_OUTCOME, decide_outcome, finished_runs, run_outcome
from r2sweep.core.trial import TEXT_RESULTS
from r2sweep.tracking.names import TAG_EXPERIMENT_PATH, TAG_TEXT_PREFIX
from r2sweep.tracking.store import TAG_TRIAL_ID, SweepRun, Tracker
from r2sweep.tune.cluster import connect
from r2sweep.tune.data_parallel import task_placement
from r2sweep.tune.runtime_env import check_runtime_env, runtime_env_for, shipped_callables

__all__ = ["Confirmation", "Rerun", "run_reruns", "confirm_top", "logged_trial_config", "TAG_CONFIRM_OF", "TAG_CONFIRMED_BEST"]

TAG_CONFIRM_OF = "r2sweep.confirm_of"  # on a re-run: the trial id it re-runs
TAG_CONFIRMED_BEST = "r2sweep.confirmed_best_trial"  # on the parent: the trial with the best mean


@dataclass
class Confirmation:
    """One of the sweep's top trials and its re-runs."""

    trial_id: str
    params: dict[str, str]
    sweep_value: float  # the objective the sweep ranked it on
    values: dict[int, float]  # seed -> objective of the re-run (missing: it diverged)
    fp: dict[int, float]  # seed -> fp/top1
    objective: str = ""  # the metric the values are of

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else 0.0


def _rerun_id(trial_id: str, seed: int) -> str:
    return f"{trial_id}-seed{seed}"


@ray.remote
def _run_trial(mapping: dict[str, Any], threads: int, callables: dict[str, Any], cache_dir: str | None = None,
               cache_label: str = "", rank_resources: dict[str, float] | None = None) -> dict[str, Any]:
    """One re-run in a Ray worker: its final metrics, and its text results (``TEXT_RESULTS``) as strings."""
    import torch

    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.errors import TrialDiverged
    from r2sweep.core.factories import install_callables
    from r2sweep.core.pretraining import PretrainCache
    from r2sweep.core.trial import run_trial
    from r2sweep.tune.data_parallel import ray_peers

    torch.set_num_threads(threads)
    install_callables(callables)  # factories given from Python in this driver, as a sweep ships them
    cache = PretrainCache(cache_dir, user=cache_label.split("/")[0]) if cache_dir else None
    config = load_trial_config(mapping)
    # A data-parallel re-run's other ranks go to the bundles its placement group reserved (task_placement).
    peers = ray_peers(config, rank_resources or {}, callables)
    try:
        final = run_trial(config, cache=cache, cache_label=cache_label, peers=peers)
        texts = {key: str(final[key]) for key in TEXT_RESULTS if final.get(key)}  # tagged, as a trial's are
        return {**{k: float(v) for k, v in final.items() if isinstance(v, (int, float))}, **texts}
    except TrialDiverged as error:
        return {"diverged": 1.0, "error": str(error)[:200]}  # type: ignore[dict-item]


def logged_trial_config(sweep: SweepRun, run_id: str) -> dict[str, Any]:
    """The trial config a run of ``sweep`` logged (its ``trial_config.yaml``), as a mapping."""
    with tempfile.TemporaryDirectory() as tmp:
        path = sweep.tracker.client.download_artifacts(run_id, TRIAL_CONFIG_ARTIFACT, tmp)
        return yaml.safe_load(Path(path).read_text())


def _top_trials(sweep: SweepRun, spec: SweepSpec, top: int) -> list[Any]:
    finished = finished_runs(sweep.trial_runs(), spec.objective_metrics)
    if not finished:
        raise R2SweepError(f"sweep {sweep.name!r} has no finished trial with {spec.objective.metric} yet")
    return top_trials(finished, spec, top)  # the winner is then the best mean of the first objective


@dataclass(frozen=True)
class Rerun:
    """One configuration to train again on each seed, logged as ``<key>-seed<N>`` confirm runs of a sweep.

    ``config`` gives the trial config mapping (called only when some seed is still to run);
    ``params`` and ``tags`` go on each re-run's MLflow run.
    """

    key: str
    config: Callable[[], dict[str, Any]]
    params: dict[str, Any]
    tags: dict[str, str]


def run_reruns(sweep: SweepRun, spec: SweepSpec, reruns: Sequence[Rerun], seeds: Sequence[int], *,
               address: str | None = None, num_cpus: int | None = None, label: str = "",
               what: str = "configurations", progress: Callable[[str], None] = print,
               storage: str | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """Train each of ``reruns`` on each of ``seeds`` as Ray tasks; ``{key: {seed: final metrics}}``.

    A re-run that finished or diverged in MLflow is not run again (training is
    deterministic per seed); one that failed or was interrupted is. A crashed worker
    fails its re-run only. ``storage``: the sweeps' storage, whose pre-training cache
    the re-runs share as the sweep's trials do (a configuration re-run on a seed it
    already pre-trained on, say for another downstream method, does not pre-train
    again); None: no cache.
    """
    cache_dir = SweepFiles(storage, sweep.name, spec.settings).pretrain_cache if storage is not None else None
    done = {r.data.tags.get(TAG_TRIAL_ID): r for r in sweep.confirm_runs()
            if run_outcome(r, spec.objective_metrics) in (FINISHED, DIVERGED)}
    resources = spec.settings.resources_per_trial
    threads = int(max(1, resources.get("cpu", 1)))
    objective = spec.objective.metric
    pending: dict[Any, tuple[str, str, int]] = {}  # task -> (key, run id, seed)
    groups: dict[Any, Any] = {}  # task -> the placement group of a data-parallel re-run
    results: dict[str, dict[int, dict[str, float]]] = {}
    to_run: list[tuple[Rerun, dict[str, Any], int]] = []
    for rerun in reruns:
        results[rerun.key] = {}
        config = None
        for seed in seeds:
            previous = done.get(_rerun_id(rerun.key, seed))
            if previous is not None:
                results[rerun.key][seed] = dict(previous.data.metrics)
                continue
            config = config if config is not None else rerun.config()
            to_run.append((rerun, config, seed))
    if to_run:
        # Re-running executes what the stored configs name: say which code, and from where, first;
        # then check it here, as a sweep's start does, so a factory that does not import is one
        # line before any re-run exists instead of a failed task per seed.
        configs = {id(config): load_trial_config(config) for _, config, _ in to_run}
        named = sorted({text for config in configs.values() for text in code_named_by(config)})
        progress(f"{label or sweep.name}: the re-runs import " + (", ".join(named) if named else "r2sweep's own models and "
                 "datasets only") + f", as the configs stored in {sweep.tracker.display_uri} name them")
        for config in configs.values():
            resolve_inputs(config)
        check_runtime_env(spec.settings.runtime_env, Path.cwd())
        connect(address, num_cpus, runtime_env_for(spec))  # the user's code, shipped as the sweep shipped it
    for rerun, config, seed in to_run:
        run_id = sweep.trial_run(_rerun_id(rerun.key, seed), {**rerun.params, "seed": seed}, confirm=True)
        sweep.set_tags(run_id, dict(rerun.tags))
        options, group = task_placement(spec.settings)
        task = _run_trial.options(**options).remote(
            {**config, "seed": seed}, threads, shipped_callables(spec), cache_dir,
            f"{sweep.name}/{_rerun_id(rerun.key, seed)}", spec.settings.rank_resources)
        pending[task] = (rerun.key, run_id, seed)
        if group is not None:
            groups[task] = group

    total = len(pending)
    if total:
        progress(f"{label or sweep.name}: {total} re-runs ({len(reruns)} {what} x {len(seeds)} seeds, "
                 f"{sum(len(v) for v in results.values())} already in MLflow)")
    while pending:
        finished, _ = ray.wait(list(pending), num_returns=1)
        key, run_id, seed = pending.pop(finished[0])
        if finished[0] in groups:
            ray.util.remove_placement_group(groups.pop(finished[0]))
        try:
            final = ray.get(finished[0])
        except Exception as error:  # a crashed worker: this re-run fails, the others go on
            sweep.set_tags(run_id, {TAG_OUTCOME: FAILED})
            sweep.end_trial(run_id, RUN_STATUS[FAILED])
            progress(f"[{total - len(pending)}/{total}] {what.rstrip('s')} {key} seed {seed}: failed ({type(error).__name__})")
            continue
        texts = {TAG_TEXT_PREFIX + key: final.pop(key)[:4000] for key in TEXT_RESULTS if key in final}
        sweep.log_metrics(run_id, final)
        outcome = decide_outcome(final, spec.objective_metrics)
        sweep.set_tags(run_id, {**texts, TAG_OUTCOME: outcome})
        sweep.end_trial(run_id, RUN_STATUS[outcome])
        results[key][seed] = final
        value = final.get(objective)
        progress(f"[{total - len(pending)}/{total}] {what.rstrip('s')} {key} seed {seed}: "
                 + (f"{objective} = {value:.2f}" if value is not None else "diverged"))
    return results


def confirm_top(
    tracker: Tracker,
    name: str,
    *,
    top: int = 3,
    seeds: Sequence[int] = (1, 2, 3),
    out: str | Path | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: Callable[[str], None] = print,
    storage: str | None = None,
) -> list[Confirmation]:
    """Re-run the ``top`` trials of sweep ``name`` on ``seeds``; best mean first.

    ``out``: where to write the winner's trial config (its sweep seed kept).
    ``storage``: the sweep's storage, for its pre-training cache (see :func:`run_reruns`);
    None: the storage the sweep ran in, as its parent run recorded it.

    Raises:
        R2SweepError: ``top`` below 1, no seed, no such sweep or no finished trial.
    """
    if top < 1:
        raise R2SweepError(f"--top {top}: must be at least 1 (how many of the best trials to re-run)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise R2SweepError(f"--seeds {list(seeds)}: give one or more distinct seeds, e.g. --seeds 1 2 3")
    sweep, spec = read_sweep(tracker, name)
    if storage is None:
        recorded = tracker.client.get_run(sweep.parent_run_id).data.tags.get(TAG_EXPERIMENT_PATH)
        storage = SweepFiles.of_experiment(recorded, spec.settings).storage if recorded else None
    objective = spec.objective.metric
    trials = _top_trials(sweep, spec, top)
    ids = {run.info.run_id: run.data.tags.get(TAG_TRIAL_ID, run.info.run_id) for run in trials}
    reruns = [Rerun(key=ids[run.info.run_id], config=lambda run_id=run.info.run_id: logged_trial_config(sweep, run_id),
                    params=dict(run.data.params), tags={TAG_CONFIRM_OF: ids[run.info.run_id]}) for run in trials]
    results = run_reruns(sweep, spec, reruns, seeds, address=address, num_cpus=num_cpus, label=f"confirm {name}",
                         what="trials", progress=progress, storage=storage)

    confirmations = []
    for run in trials:
        trial_id = ids[run.info.run_id]
        per_seed = results[trial_id]
        confirmations.append(Confirmation(
            trial_id=trial_id,
            params=dict(run.data.params),
            sweep_value=run.data.metrics[objective],
            values={s: m[objective] for s, m in per_seed.items() if objective in m},
            fp={s: m["fp/top1"] for s, m in per_seed.items() if "fp/top1" in m},
            objective=objective,
        ))
    sign = 1 if spec.objective.mode == "max" else -1
    confirmations.sort(key=lambda c: -sign * c.mean if c.mean is not None else float("inf"))
    winner = confirmations[0]
    if winner.mean is not None:
        sweep.set_tags(sweep.parent_run_id, {TAG_CONFIRMED_BEST: winner.trial_id})
        if out is not None:
            winner_run = next(r for r in trials if ids[r.info.run_id] == winner.trial_id)
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(logged_trial_config(sweep, winner_run.info.run_id), sort_keys=False))
    return confirmations


def render(confirmations: Sequence[Confirmation], objective: str) -> str:
    """A plain table: each trial's sweep value against its re-runs' mean +- sd."""
    lines = [f"{'trial':<14} {'sweep':>7} {'mean':>7} {'sd':>6} {'fp mean':>8}  per seed / config",
             f"{'':<14} {objective}"]
    for c in confirmations:
        fp = f"{statistics.fmean(c.fp.values()):8.2f}" if c.fp else f"{'-':>8}"
        mean = f"{c.mean:7.2f}" if c.mean is not None else f"{'-':>7}"
        seeds = ", ".join(f"{s}: {v:.2f}" for s, v in sorted(c.values.items())) or "all diverged"
        config = ", ".join(f"{k}={v}" for k, v in sorted(c.params.items()))
        lines.append(f"{c.trial_id:<14} {c.sweep_value:7.2f} {mean} {c.sd:6.2f} {fp}  {seeds} | {config}")
    return "\n".join(lines)
