"""r2sweep: tune R2-Loss for 1-2-bit quantization with Ray Tune, Optuna and MLflow.

>>> import r2sweep
>>> result = r2sweep.run_sweep("search_spaces/quickstart.yaml", overrides={"sweep.num_samples": 4})  # doctest: +SKIP
>>> result.best.metrics[result.objective], len(result.trials)                                       # doctest: +SKIP

Sweeps (:func:`run_sweep`, :func:`load_sweep`, :func:`best`, :func:`compare`,
:func:`confirm`, :func:`report`), studies (:func:`run_study`, :func:`load_study`) and one trial (:func:`run_trial`) come from
:mod:`r2sweep.api`; the R2 losses and the configuration from :mod:`r2sweep.core`.
Importing this package loads neither Ray nor MLflow: the sweep functions import
them when first called.
"""

from __future__ import annotations

import importlib
from typing import Any

from r2sweep.core.config.sweep import SweepSpec, load_sweep_spec
from r2sweep.core.config.trial import TrialConfig, load_trial_config
from r2sweep.core.errors import ConfigError, DataNotFoundError, FileConfigError, R2SweepError, TrialDiverged
from r2sweep.core.losses import R2Loss, list_r2_losses, make_r2_loss, register_r2_loss

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first use (it imports Ray or MLflow).
_LAZY = {
    "run_sweep": "r2sweep.api.sweep",
    "prepare_sweep": "r2sweep.api.sweep",
    "SweepResult": "r2sweep.api.results",
    "load_sweep": "r2sweep.api.results",
    "best": "r2sweep.api.readers",
    "compare": "r2sweep.api.readers",
    "confirm": "r2sweep.api.readers",
    "report": "r2sweep.api.readers",
    "run_study": "r2sweep.api.study",
    "load_study": "r2sweep.api.study",
    "StudyResult": "r2sweep.api.study",
    "run_trial": "r2sweep.api.trial",
    "PretrainCache": "r2sweep.core.pretrain_cache",
}

__all__ = [
    "__version__",
    *_LAZY,
    "load_sweep_spec",
    "load_trial_config",
    "SweepSpec",
    "TrialConfig",
    "R2Loss",
    "make_r2_loss",
    "register_r2_loss",
    "list_r2_losses",
    "ConfigError",
    "FileConfigError",
    "DataNotFoundError",
    "TrialDiverged",
    "R2SweepError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'r2sweep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
