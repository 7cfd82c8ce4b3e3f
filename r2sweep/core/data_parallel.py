"""The other ranks of a data-parallel trial: what each one runs, and how ``r2sweep trial`` starts them.

A trial with ``train.workers: N`` is rank 0 of N (:mod:`r2sweep.core.distributed`).
The other ranks rebuild what rank 0 built from the same config and seed (the data,
the model, R2), join the process group, and run the same pre-training loop on their
share of each batch; they evaluate, write and report nothing. They are started only
when the trial really pre-trains: a trial served from the pre-training cache starts none.

Who starts them is a :class:`Peers`: :class:`LocalPeers` runs them as processes on
this machine (``r2sweep trial``); the Ray adapter (:mod:`r2sweep.tune.data_parallel`)
runs them in the trial's placement group, where Tune reserved their resources.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ContextManager, Protocol

import numpy as np
import torch

from r2sweep.core.build import build_trial_data, build_trial_model
from r2sweep.core.config.trial import TrialConfig, load_trial_config
from r2sweep.core.data import make_loader
from r2sweep.core.distributed import World, parameters_digest
from r2sweep.core.environment import resolve_inputs
from r2sweep.core.errors import ConfigError, TrialDiverged

__all__ = ["Peers", "LocalPeers", "run_peer", "PeerFailed", "seed_everything", "train_loader", "RANK_EXIT_S"]

#: Seconds a rank may take to end after rank 0's last all-reduce (it only has to return).
RANK_EXIT_S = 120


class PeerFailed(RuntimeError):
    """A rank other than 0 ended with an error (its text is the message)."""


class Peers(Protocol):
    """Starts ranks 1..N-1 of a trial's pre-training; ``host`` is where rank 0 can be reached from them."""

    host: str

    def run(self, address: str) -> ContextManager[list[dict[str, Any]]]:
        """Ranks 1..N-1 running against rank 0 at ``address`` for the block; they are waited for at
        its end (their failure raised as :class:`PeerFailed`) and stopped if the block fails. The
        list it gives holds, after the block, what each rank's :func:`run_peer` returned."""
        ...


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so initialization is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_peer(config: Mapping[str, Any], rank: int, address: str, threads: int = 1,
             device: str | None = None) -> dict[str, Any]:
    """Rank ``rank`` of ``config``'s pre-training (rank 0 listens at ``address``).

    Returns its communication figures and ``weights``, its parameters' digest
    (:func:`~r2sweep.core.distributed.parameters_digest`), which rank 0 checks against its own.

    Builds what :func:`r2sweep.core.trial.run_trial` builds, in the same order from the
    same seed, so the ranks start from the same weights even before DDP sends rank 0's.
    """
    from r2sweep.core.train import pretrain, resolve_device

    torch.set_num_threads(max(1, threads))
    trial = resolve_inputs(load_trial_config(dict(config)))
    resolved = resolve_device(device or trial.train.device, trial.train.precision)
    seed_everything(trial.seed)
    data = build_trial_data(trial)
    model, _ = build_trial_model(trial, data)
    r2 = trial.r2.build(model)
    loader = train_loader(trial, data.train, resolved, rank)
    world = World(rank, trial.train.workers, address, trial.seed)
    try:
        pretrain(model, r2, loader, (), trial.train, device=resolved, world=world)
    except TrialDiverged:
        pass  # rank 0 raised it too, at the same epoch's end: it reports the divergence
    return {**world.meter.per_step(), "rank": rank, "weights": parameters_digest(model)}


def train_loader(trial: TrialConfig, dataset: Any, device: torch.device, rank: int = 0) -> Any:
    """The trial's shuffled training loader, rank ``rank``'s share of it when ``train.workers`` > 1."""
    loader = make_loader(dataset, trial.train.batch_size, shuffle=True, seed=trial.seed,
                         num_workers=trial.train.num_workers, pin_memory=device.type == "cuda")
    if trial.train.workers > 1:
        loader.shard(rank, trial.train.workers)
    return loader


class LocalPeers:
    """Ranks 1..N-1 as processes on this machine: ``python -m r2sweep.core.data_parallel`` each, the
    config on its standard input as JSON (a fresh interpreter; the caller's ``__main__`` is not re-imported)."""

    host = "127.0.0.1"

    def __init__(self, config: TrialConfig, threads: int = 1, device: torch.device | None = None) -> None:
        self.config = config.to_mapping()
        self.workers = config.train.workers
        self.threads = threads
        # On CUDA each rank takes its own GPU (NCCL refuses two ranks on one): rank r on cuda:r.
        self.cuda = device is not None and device.type == "cuda"
        if self.cuda and torch.cuda.device_count() < self.workers:
            raise ConfigError("train.workers", self.workers, f"at most {torch.cuda.device_count()} on this machine's "
                              "GPUs (a GPU per rank); lower it, or run on the CPU (train.device: cpu)")

    @contextmanager
    def run(self, address: str) -> Iterator[list[dict[str, Any]]]:
        processes, logs = [], []
        results: list[dict[str, Any]] = []
        for rank in range(1, self.workers):
            # stderr to a file: a chatty rank must not block on a full pipe nobody reads until the end.
            log = tempfile.TemporaryFile()
            logs.append(log)
            process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                       stderr=log, stdout=subprocess.PIPE)
            task = {"config": self.config, "rank": rank, "address": address, "threads": self.threads,
                    "device": f"cuda:{rank}" if self.cuda else None}
            assert process.stdin is not None
            process.stdin.write(json.dumps(task, default=str).encode())
            process.stdin.close()
            processes.append(process)
        try:
            yield results
        except BaseException as error:
            # Rank 0's error may only be the symptom (a closed connection): a rank that died first says why.
            dead = [(rank, p, log) for rank, p, log in zip(range(1, self.workers), processes, logs) if p.poll()]
            for process in processes:
                process.kill()
            if dead and isinstance(error, Exception):
                raise PeerFailed(_last_line(*dead[0])) from error
            raise
        finally:
            for process in processes:
                try:  # past rank 0's last collective a rank only has to exit; one that does not is stopped
                    process.wait(timeout=RANK_EXIT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        failed = [(rank, p, log) for rank, p, log in zip(range(1, self.workers), processes, logs) if p.returncode]
        if failed:
            raise PeerFailed(_last_line(*failed[0]))
        for process, log in zip(processes, logs):
            assert process.stdout is not None
            log.close()
            results.append(json.loads(process.stdout.read().decode().strip().splitlines()[-1]))


def _last_line(rank: int, process: subprocess.Popen, log: Any) -> str:
    log.seek(0)
    tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    return f"rank {rank} exited with {process.returncode}: {tail[0]}"


def _main() -> None:
    task = json.load(sys.stdin)
    print(json.dumps(run_peer(task["config"], task["rank"], task["address"], task["threads"], task["device"])), flush=True)
    sys.stderr.flush()
    # Done, and said so: skip the interpreter's teardown, where a gloo thread still joinable at exit
    # has aborted the process ("terminate called without an active exception") after a good run.
    os._exit(0)


if __name__ == "__main__":
    _main()
