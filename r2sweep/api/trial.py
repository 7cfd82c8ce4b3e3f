"""One trial from Python, as ``r2sweep trial`` runs it: the config checked, the output folder kept.

>>> import r2sweep
>>> metrics = r2sweep.run_trial("search_spaces/trial_digits.yaml", out_dir="runs/digits",
...                             overrides={"train.epochs": 1})             # doctest: +SKIP
>>> metrics["fp/top1"], metrics["dkm_w1/top1"]                             # doctest: +SKIP

The engine is :func:`r2sweep.core.trial.run_trial` (a :class:`TrialConfig`
and a report callback, nothing written but its checkpoints); this face adds
what a person running one trial wants: a file or mapping as input, overrides,
and an output folder holding ``config.yaml`` (written first, so the folder
says what it holds) and ``metrics.json``, resumable from its last epoch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from r2sweep.api import options as check
from r2sweep.core.checkpoint import write_text_atomic
from r2sweep.core.config.overrides import Overrides
from r2sweep.core.config.trial import TrialConfig, load_trial_config

__all__ = ["run_trial"]


def run_trial(
    config: str | os.PathLike[str] | Mapping[str, Any] | TrialConfig,
    *,
    overrides: Overrides = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    device: Any = None,
    pretrain_cache: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Pre-train with R2, run every downstream method, return the final metrics.

    Args:
        config: a trial YAML file, its mapping, or a :class:`TrialConfig`.
        overrides: ``{dotted path: value}``, as ``--set``.
        out_dir: keep ``config.yaml``, ``metrics.json`` and the checkpoints here; a
            folder of the same config resumes from its last epoch, one of another is refused.
        progress: called with one line per epoch and per downstream result.
        device: a ``torch.device`` (default: the config's ``train.device``).
        pretrain_cache: a pre-training cache folder or ``s3://`` URI (a sweep storage's
            ``pretrain_cache/`` or ``sweep.pretrain_cache``): weights pre-trained before are
            taken from it, and new ones stored in it. Default: no cache.

    Raises:
        ConfigError: bad input, before anything is written; DataNotFoundError;
        TrialDiverged: the loss became non-finite.
    """
    out = None if out_dir is None else check.output_folder(
        out_dir, "out_dir", what="the trial's metrics.json, config.yaml and checkpoints")
    trial = load_trial_config(config, overrides)
    from r2sweep.core.environment import check_trial_environment  # torch and the models: only for a config that loaded
    from r2sweep.core.trial import check_out_dir
    from r2sweep.core.trial import run_trial as run_one

    check_trial_environment(trial)  # the user's factory or checkpoint: one line before anything is written

    cache = None
    if pretrain_cache is not None:
        from r2sweep.core.pretrain_cache import PretrainCache

        from r2sweep.core.locations import is_uri

        where = str(pretrain_cache) if is_uri(pretrain_cache) else check.output_folder(
            pretrain_cache, "pretrain_cache", what="the pre-training cache")
        cache = PretrainCache(where, user="r2sweep trial")  # an s3:// URI is checked there (scheme, boto3, credentials)
    if out is None:
        return run_one(trial, progress=progress, device=device, cache=cache, cache_label="r2sweep trial")
    check_out_dir(trial, out)  # before config.yaml is overwritten
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(trial.to_mapping(), sort_keys=False))
    metrics = run_one(trial, out_dir=out, progress=progress, device=device, cache=cache,
                      cache_label=f"r2sweep trial {out}")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics

