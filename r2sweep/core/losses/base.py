"""The R2-Loss module every kind derives from, and the registry of kinds.

A kind is one small subclass of :class:`R2Loss` that implements
:meth:`R2Loss.layer_penalty` (and, when it learns per-layer scalars, creates and
initialises them). Registering it with :func:`register_r2_loss` makes it a legal
``r2.kind`` in the YAML files and enrols it in the conformance tests.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.graph import edge_layers, low_bit_layers
from r2sweep.core.losses.functional import GRANULARITIES, REDUCTIONS
from r2sweep.core.registry import Registry

__all__ = ["R2Loss", "R2_LOSSES", "register_r2_loss", "make_r2_loss", "list_r2_losses", "regularized_layers"]

R2_LOSSES: Registry[type["R2Loss"]] = Registry("r2.kind")


def register_r2_loss(kind: str):
    """Class decorator: make ``kind`` a legal ``r2.kind``."""

    def add(cls: type[R2Loss]) -> type[R2Loss]:
        cls.kind = kind
        return R2_LOSSES.register(kind)(cls)

    return add


def list_r2_losses() -> list[str]:
    return R2_LOSSES.names()


def regularized_layers(model: nn.Module, skip_first_last: bool = False) -> list[tuple[str, nn.Parameter]]:
    """``(module name, weight)`` of every layer R2 restricts, in module order.

    Exactly the layers every downstream method quantizes (:func:`~r2sweep.core.graph.low_bit_layers`,
    the one rule). ``skip_first_last`` leaves out the layers the quantizers keep at
    ``keep_first_last_bits``: the first and last on the data flow
    (:func:`~r2sweep.core.graph.edge_layers`), not in module order.
    """
    layers = low_bit_layers(model)
    if skip_first_last:
        edges = edge_layers(model)
        layers = [(name, module) for name, module in layers if not edges.first_or_last(name)]
    return [(name, module.weight) for name, module in layers]


def _densify_sparse_grad(param: Tensor) -> None:
    # L-inf and Margin return sparse gradients, which autograd adds into the dense
    # task gradient. A weight that gets no task gradient (an unused head, a test
    # calling r2().backward() alone) would keep a sparse .grad that optimizers
    # reject with weight decay; make it dense once it is accumulated.
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


class R2Loss(nn.Module):
    """``strength * reduce over layers of R(W_l)`` for the Conv/Linear weights of a model.

    Call it with no arguments and add the result to the task loss. Its
    ``parameters()`` are exactly its learnable per-layer scalars (margins,
    temperatures), meant for an optimizer group without weight decay; the model's
    weights are referenced, not owned.

    Args:
        model: the network whose Conv/Linear weights are regularized.
        strength: lambda, >= 0.
        reduction: ``"sum"`` or ``"mean"``, applied to every sum the penalty takes
            over weights (the Margin hinge) and over channels (``granularity="channel"``).
            Layers are always summed, as in the paper.
        granularity: ``"tensor"`` (one range per layer, the paper's) or ``"channel"``
            (one per output channel).
        skip_first_last: leave the first and last layers on the data flow alone (those
            ``keep_first_last_bits`` keeps at 8 bits; see :func:`regularized_layers`).
        start_epoch: the loss is zero until :meth:`set_epoch` reaches this epoch;
            learnable scalars are initialised from the weights at that moment.
    """

    kind: ClassVar[str] = ""
    #: Names of the keyword options this kind adds to the common ones.
    own_options: ClassVar[tuple[str, ...]] = ()
    common_options: ClassVar[tuple[str, ...]] = ("reduction", "granularity", "skip_first_last", "start_epoch")

    def __init__(
        self,
        model: nn.Module,
        strength: float,
        *,
        reduction: str = "sum",
        granularity: str = "tensor",
        skip_first_last: bool = False,
        start_epoch: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
            raise ConfigError("r2.strength", strength, "a number >= 0 (0 switches the loss off)")
        if reduction not in REDUCTIONS:
            raise ConfigError("r2.reduction", reduction, f"choose one of {list(REDUCTIONS)}")
        if granularity not in GRANULARITIES:
            raise ConfigError("r2.granularity", granularity, f"choose one of {list(GRANULARITIES)}")
        if not isinstance(skip_first_last, bool):
            raise ConfigError("r2.skip_first_last", skip_first_last, "true or false")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ConfigError("r2.start_epoch", start_epoch, "an integer >= 0")
        self.strength = float(strength)
        self.reduction = reduction
        self.granularity = granularity
        self.skip_first_last = skip_first_last
        self.start_epoch = start_epoch
        self.epoch = 0
        layers = regularized_layers(model, skip_first_last)
        self.layer_names = [name for name, _ in layers]
        # A plain list: the weights belong to the model, not to this module.
        self._weights: list[nn.Parameter] = [weight for _, weight in layers]
        # Whether the learnable scalars were set from the weights yet (saved with
        # the state, so a resumed run does not initialise them twice).
        self.register_buffer("initialized", torch.tensor(False))
        self._hooks = [w.register_post_accumulate_grad_hook(_densify_sparse_grad) for w in self._weights]

    @property
    def weights(self) -> list[nn.Parameter]:
        return list(self._weights)

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch is training (it is off before ``start_epoch``)."""
        self.epoch = epoch

    @property
    def active(self) -> bool:
        return self.strength > 0 and self.epoch >= self.start_epoch and bool(self._weights)

    def forward(self) -> Tensor:
        if not self.active:
            device = self._weights[0].device if self._weights else None
            return torch.zeros((), device=device)
        if not bool(self.initialized):
            with torch.no_grad():
                self.reset_parameters()
            self.initialized.fill_(True)
        total = sum(self._reduce_channels(self.layer_penalty(i, w)) for i, w in enumerate(self._weights))
        return self.strength * total

    def layer_penalties(self) -> list[float]:
        """``R(W_l)`` of every layer as plain numbers (for logging; no gradient)."""
        with torch.no_grad():
            return [float(self._reduce_channels(self.layer_penalty(i, w))) for i, w in enumerate(self._weights)]

    def _reduce_channels(self, penalty: Tensor) -> Tensor:
        if penalty.dim() == 0:
            return penalty
        return penalty.mean() if self.reduction == "mean" else penalty.sum()

    # --- what a kind implements -------------------------------------------------
    def layer_penalty(self, index: int, weight: Tensor) -> Tensor:
        """R(W) of layer ``index``: a scalar, or one value per channel."""
        raise NotImplementedError

    def notes(self, device: torch.device) -> list[str]:
        """What a user should know about how this loss runs on ``device`` (the trial records them)."""
        return []

    def reset_parameters(self) -> None:
        """Set learnable scalars from the current weights (called when the loss switches on)."""

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, strength={self.strength}, layers={len(self._weights)}, "
            f"granularity={self.granularity!r}, reduction={self.reduction!r}, start_epoch={self.start_epoch}"
        )

    def _scalar_shape(self, weight: Tensor) -> tuple[int, ...]:
        return (weight.shape[0],) if self.per_channel else ()


def make_r2_loss(model: nn.Module, kind: str = "none", strength: float = 0.0, **options: Any) -> R2Loss:
    """Build the R2-Loss of ``kind`` for ``model``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
        >>> r2 = make_r2_loss(net, "margin", strength=0.01, margin_init="3std")
        >>> loss = r2()          # add to the task loss; r2.parameters() -> optimizer group, no decay
        >>> float(loss) > 0
        True

    Raises:
        ConfigError: an unknown kind, an option this kind does not take, or a bad value;
            the message names the ``r2.`` field, the value and what is allowed.
    """
    cls = R2_LOSSES.get(kind)
    allowed = cls.common_options + cls.own_options
    for name in options:
        if name not in allowed:
            raise ConfigError(f"r2.{name}", options[name], f"r2.kind={kind!r} takes the options {list(allowed)}")
    return cls(model, strength, **options)
