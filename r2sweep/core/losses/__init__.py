"""R2-Loss (range restriction loss, arXiv 2303.08253) for any PyTorch training loop.

>>> r2 = make_r2_loss(model, "linf", strength=0.1)            # doctest: +SKIP
>>> loss = task_loss + r2()                                    # doctest: +SKIP

``functional`` holds the per-tensor formulas; :class:`R2Loss` subclasses are the
kinds, registered under the names ``r2.kind`` accepts.
"""

from r2sweep.core.losses import functional
from r2sweep.core.losses.base import (
    R2_LOSSES,
    R2Loss,
    list_r2_losses,
    make_r2_loss,
    register_r2_loss,
    regularized_layers,
)
from r2sweep.core.losses.linf import LinfR2
from r2sweep.core.losses.margin import MarginR2
from r2sweep.core.losses.none import NoR2
from r2sweep.core.losses.softminmax import SoftMinMaxR2

__all__ = [
    "functional",
    "R2Loss",
    "R2_LOSSES",
    "make_r2_loss",
    "register_r2_loss",
    "list_r2_losses",
    "regularized_layers",
    "NoR2",
    "LinfR2",
    "MarginR2",
    "SoftMinMaxR2",
]
