"""A trial's pre-training phase: taken from the pre-training cache, or trained (and then stored).

Whichever way the weights come, the trial reports the same per-epoch metrics in
the same order, so a scheduler (ASHA) decides on a trial served from the cache
exactly as on the trial that trained: a hit replays the entry's epochs, and a
trial waiting on another that is pre-training the same key follows that trial's
epochs as they finish. The weights and the RNG state after pre-training are
restored from the entry, so everything downstream is what the trial would have
computed itself (bit-identical on the CPU).

The per-epoch ``proxy/top1`` belongs to the trial, not to the pre-training: two
trials that differ only in the proxied result's grid share one entry. The entry
records the grid its history was measured on (:func:`proxy_grid`). A trial with
the same grid replays the history as it is; one with another grid replays the
epochs without ``proxy/top1`` (the scheduler passes over a report without its
metric) and measures its own proxy on the restored final weights, so it is
ranked on its final result. A float proxy (``val/top1``) is derived on every
epoch, whatever the entry's grid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r2sweep.core.checkpoint import capture_rng_state, load_checkpoint, load_state, restore_rng_state, state_copy
from r2sweep.core.config.trial import TrialConfig
from r2sweep.core.data_parallel import PeerFailed, Peers
from r2sweep.core.distributed import World, open_store, parameters_digest
from r2sweep.core.losses import R2Loss
from r2sweep.core.pretrain_cache import CacheKey, NotCacheable, PretrainCache, pretrain_key
from r2sweep.core.pretrain_cache.store import Epochs
from r2sweep.core.train import pretrain

__all__ = ["PretrainJob", "Pretrained", "run_pretraining", "proxy_grid", "OFF", "STORED", "HIT", "UNCACHEABLE", "MISS"]

#: How the pre-trained weights came (the trial's ``pretrain_cache`` result, an MLflow tag).
OFF, STORED, HIT, UNCACHEABLE = "off", "stored", "hit", "uncacheable"
#: An epoch trained under the cache (the entry is stored when pre-training ends).
MISS = "miss"

#: Adds what only the live model can give (``proxy/top1``) to an epoch's metrics.
Measure = Callable[[dict[str, Any]], None]
#: Reports one epoch's metrics (``replayed``: they come from the cache, not this process's training).
Emit = Callable[[dict[str, Any], bool], None]


@dataclass
class PretrainJob:
    """Everything the pre-training of one trial needs."""

    config: TrialConfig
    model: nn.Module
    r2: R2Loss
    train_loader: Any
    val_loader: Any
    device: torch.device
    measure: Measure
    emit: Emit
    checkpoint: Path | None = None  # the trial's own resumable state
    owner: str | None = None  # its fingerprint (see r2sweep.core.trial.check_out_dir)
    started: float = field(default_factory=time.perf_counter)
    peers: Peers | None = None  # who runs ranks 1..N-1 when config.train.workers > 1
    comm: dict[str, float] = field(default_factory=dict)  # the gradient all-reduce's figures, once trained


@dataclass
class Pretrained:
    """What the phase did: the per-epoch history and how the weights came."""

    history: list[dict[str, Any]]
    cache: str
    key: str = ""
    source: str = ""  # the trial that trained a cached entry
    saved_s: float = 0.0  # the entry's pre-training time, less what taking it cost
    note: str = ""
    resumed: int = 0  # epochs the trial's own checkpoint held when this attempt began (a restart)


def proxy_grid(config: TrialConfig) -> Any:
    """What ``proxy/top1`` is measured on each epoch: None (no proxy), ``"fp"`` (``val/top1``), or a rounding grid."""
    if not config.downstream:
        return None
    target = config.proxy_target()
    if target is None:
        return "fp"
    entry, bits = target
    return json.loads(json.dumps({"rounding": entry.rounding()._asdict(), "bits": bits}, default=str))


def _as_this_trial(epochs: Epochs, job: PretrainJob) -> list[dict[str, Any]]:
    """Another trial's epochs as this trial reports them: its proxy kept only when measured on this trial's grid.

    A rounding grid that differs cannot be re-measured on past epochs (their weights are gone): those
    epochs go without ``proxy/top1``, and the caller measures the last one on the restored weights.
    """
    grid = proxy_grid(job.config)
    out = [dict(m) for m in epochs.history]
    if epochs.proxy == grid:
        return out
    for metrics in out:
        metrics.pop("proxy/top1", None)
        if not isinstance(grid, dict):
            job.measure(metrics)  # "fp" reads val/top1; None adds nothing
    return out


def _epochs_reported(job: PretrainJob) -> int:
    """Epochs the scheduler already saw: those in the trial's own checkpoint (a restored trial resumes after them)."""
    if job.checkpoint is None or not job.checkpoint.is_file():
        return 0
    return int(load_checkpoint(job.checkpoint)["epoch"]) + 1


def _train(job: PretrainJob, reported: int, publish: Callable[[list[dict[str, Any]]], None] | None = None,
           earlier: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Pre-train (resuming from the trial's checkpoint); epochs below ``reported`` are not emitted again."""
    history: list[dict[str, Any]] = list(earlier or [])

    def on_epoch(metrics: dict[str, Any]) -> None:
        job.measure(metrics)
        del history[int(metrics["epoch"]):]
        history.append(dict(metrics))
        if publish is not None:
            publish(history)
        if metrics["epoch"] >= reported:
            job.emit(metrics, False)

    workers = job.config.train.workers
    if workers == 1:
        pretrain(job.model, job.r2, job.train_loader, job.val_loader, job.config.train, on_epoch=on_epoch,
                 checkpoint_path=job.checkpoint, checkpoint_owner=job.owner, device=job.device)
        return history
    if job.peers is None:
        raise ValueError(f"train.workers is {workers}, and nothing was given to run ranks 1..{workers - 1}")
    store, address = open_store(job.peers.host, workers)
    world = World(0, workers, address, job.config.seed, store=store)
    with job.peers.run(address) as peers:
        pretrain(job.model, job.r2, job.train_loader, job.val_loader, job.config.train, on_epoch=on_epoch,
                 checkpoint_path=job.checkpoint, checkpoint_owner=job.owner, device=job.device, world=world)
    mine = parameters_digest(job.model)
    differ = [int(peer["rank"]) for peer in peers if peer["weights"] != mine]
    if differ:  # every rank took the same steps from the same weights: a difference is a bug, not noise
        raise PeerFailed(f"rank(s) {differ} ended pre-training with other weights than rank 0")
    job.comm.update(world.meter.per_step())
    return history


def _summary(config: TrialConfig) -> str:
    return (f"{config.model.reference} on {config.data.reference}, R2 {config.r2.kind}, "
            f"{config.train.epochs} epochs, seed {config.seed}")


def run_pretraining(job: PretrainJob, cache: PretrainCache | None, label: str = "") -> Pretrained:
    """Pre-train ``job.model`` in place, through ``cache`` when one is given.

    ``label`` names this trial in the entry it stores (its source) and in its lock.
    """
    resumed = _epochs_reported(job)
    done = _pretrained(job, cache, label, resumed)
    done.resumed = resumed
    return done


def _pretrained(job: PretrainJob, cache: PretrainCache | None, label: str, resumed: int) -> Pretrained:
    reported = resumed
    if cache is None:
        return Pretrained(_train(job, reported), OFF)
    try:
        key = pretrain_key(job.config, job.device)
    except NotCacheable as why:
        return Pretrained(_train(job, reported), UNCACHEABLE, note=f"pre-training cache not used: {why}")
    while True:
        try:
            entry = cache.lookup(key.digest)
            claim = None if entry is not None else cache.claim(key.digest, label)
        except OSError as error:  # an unwritable or vanished cache folder never costs the trial
            return Pretrained(_train(job, reported), UNCACHEABLE,
                              note=f"pre-training cache not used: {cache.root}: {error}")
        if entry is not None:
            load_state(job.model, entry.model_state)
            job.model.to(job.device)
            history = _as_this_trial(entry.epochs, job)
            if history and "proxy/top1" not in history[-1]:
                job.measure(history[-1])  # another grid's entry: this trial's proxy on the final weights
            restore_rng_state(entry.rng_state)  # after measuring: the RNG is as pre-training left it
            for metrics in history[reported:]:
                job.emit(dict(metrics), True)
            spent = time.perf_counter() - job.started
            return Pretrained(history, HIT, key.digest, entry.source, max(0.0, entry.pretrain_s - spent))
        if claim is not None:
            with claim:
                try:
                    stored_meanwhile = cache.lookup(key.digest) is not None
                except OSError:
                    stored_meanwhile = False  # unreadable now: train (and try to store) as the owner
                if stored_meanwhile:
                    continue  # stored between our lookup and our claim: take it
                return _train_and_store(job, cache, key, reported, resumed, label)
        # Another trial pre-trains this key: follow its epochs, so the scheduler sees this trial progress too.
        # The last one waits for the entry (its proxy may need the final weights).
        followed = _as_this_trial(cache.progress(key.digest), job)[:job.config.train.epochs - 1]
        for metrics in followed[reported:]:
            job.emit(metrics, True)
            reported += 1
        time.sleep(cache.poll_s)


def _train_and_store(job: PretrainJob, cache: PretrainCache, key: CacheKey, reported: int, resumed: int,
                     label: str) -> Pretrained:
    # A trial resumed from its own checkpoint has its earlier epochs only in what it published then.
    earlier = _as_this_trial(cache.progress(key.digest), job)[:resumed] if resumed else []
    grid = proxy_grid(job.config)

    def publish(history: list[dict[str, Any]]) -> None:
        try:
            cache.publish_progress(key.digest, Epochs(history, grid))
        except OSError:
            pass  # the waiting trials then see no progress until the entry (or a stale lock)

    history = _train(job, reported, publish, earlier)
    rng = capture_rng_state()  # first: nothing may draw between the end of pre-training and this
    pretrain_s = time.perf_counter() - job.started
    if len(history) != job.config.train.epochs:
        return Pretrained(history, OFF, key.digest, note="pre-training resumed without its earlier epochs' "
                          "history: not stored in the cache")
    state = state_copy(job.model, "cpu")
    try:
        cache.store(key, model_state=state, rng_state=rng, epochs=Epochs(history, grid), pretrain_s=pretrain_s, source=label,
                    summary=_summary(job.config))
    except OSError as error:  # a full disk: the trial goes on with the weights it has
        return Pretrained(history, OFF, key.digest, note=f"pre-trained weights not stored in the cache: {error}")
    return Pretrained(history, STORED, key.digest, label)
