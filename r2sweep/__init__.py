"""r2sweep: tune R2-Loss for 1-2-bit quantization with Ray Tune, Optuna and MLflow.

The package root exposes the library API only; the sweep service lives in
``r2sweep.sweep`` and ``r2sweep.tracking.store`` and is imported on demand.
"""

from __future__ import annotations

from r2sweep.core.errors import ConfigError, DataNotFoundError, R2SweepError
from r2sweep.core.losses import R2Loss, list_r2_losses, make_r2_loss, register_r2_loss

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "R2Loss",
    "make_r2_loss",
    "register_r2_loss",
    "list_r2_losses",
    "ConfigError",
    "DataNotFoundError",
    "R2SweepError",
]
