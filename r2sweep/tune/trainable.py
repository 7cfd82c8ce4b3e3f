"""The Tune function trainable: one r2sweep trial, reporting to Tune each epoch and at its end.

Each epoch's pre-training state is reported as a Tune checkpoint, so a trial
restarted after a worker or driver failure resumes from its last epoch. Trials
that diverge report ``diverged = 1`` and end; Optuna sees no objective and marks
them pruned, so the best config is always a finite one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray import tune

from r2sweep.core.checkpoint import write_text_atomic
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import ConfigError, TrialDiverged
from r2sweep.core.factories import install_callables
from r2sweep.core.pretrain_cache import PretrainCache
from r2sweep.core.environment import resolve_inputs
from r2sweep.core.trial import PRETRAIN_CHECKPOINT, TRIAL_FILES, check_out_dir, run_trial
from r2sweep.tune.data_parallel import ray_peers

__all__ = ["trainable", "TRIAL_CONFIG", "TRIAL_ARTIFACTS"]

#: The trial config as a re-runnable YAML file, in a trial's final checkpoint.
TRIAL_CONFIG = "trial_config.yaml"
TRIAL_ARTIFACTS = (*TRIAL_FILES, TRIAL_CONFIG)


def trainable(config: dict[str, Any], spec: SweepSpec, callables: Mapping[str, Any] | None = None,
              cache_dir: str | None = None) -> None:
    """The Tune function trainable: one r2sweep trial with the sampled values written in.

    ``callables``: the driver's factories given from Python that do not import by name,
    installed before the trial's config is loaded (it resolves them). ``cache_dir``: the
    pre-training cache's folder (:attr:`SweepFiles.pretrain_cache`), or None.
    """
    install_callables(callables or {})
    cpus = int(max(1, spec.settings.resources_per_trial.get("cpu", 1)))
    torch.set_num_threads(cpus)  # a trial's share of the node, not every core
    # The one place a trial looks at its node: the factories import here, init_from is hashed here.
    trial_config = resolve_inputs(spec.trial_config(config))
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
        try:
            check_out_dir(trial_config, work)
        except ConfigError:
            # This trial's own folder, so another config's state can only come from a config that
            # reads differently now (the factory's defaults changed since that attempt): start over.
            (work / PRETRAIN_CHECKPOINT).unlink(missing_ok=True)

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
    context = tune.get_context()
    sweep = context.get_experiment_name()
    cache = PretrainCache(cache_dir, user=sweep) if cache_dir else None
    try:
        run_trial(trial_config, report, out_dir=work, cache=cache, cache_label=f"{sweep}/{context.get_trial_id()}",
                  peers=ray_peers(trial_config, spec.settings.rank_resources, callables))
    except TrialDiverged as error:
        tune.report({"diverged": 1.0, "final": 1.0, "error": str(error)[:200], "node_id": node_id})
