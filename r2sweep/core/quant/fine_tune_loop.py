"""The fine-tuning loop QAT and DKM share, and the recipe it runs with.

A recipe that suits the package's own models is not one that holds on a model it
has never seen (issue 41: LSQ took a 61% ShuffleNet to chance, below the RTN it
started from), so the fine-tuning adapts to how the model was trained (a
:class:`Recipe`) and never silently makes it worse:

* the optimizer is the pre-training's and the lr a fifth of its (:data:`LR_FROM_PRETRAINING`)
  unless the entry sets them. An Adam-trained ShuffleNet has gradient norms near 45;
  plain SGD at 1e-3 took it to chance in one epoch, Adam at 2e-4 did not;
* with a ``score`` (the trial's validation accuracy), the start is scored before
  the first epoch and the weights of the best epoch are kept (the start included):
  :class:`FineTuneOutcome` says which;
* a non-finite loss rolls the epoch back and retries it at a tenth of the lr with
  gradients clipped (:data:`RETRIES` times) before the result is reported as diverged.

Quantizer parameters (steps, intervals, centroids) get their own lr and no weight
decay, which would otherwise shrink every step size towards zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from r2sweep.core.checkpoint import state_copy
from r2sweep.core.errors import TrialDiverged
from r2sweep.core.precision import Precision

if TYPE_CHECKING:  # the configs import this module (their recipe() builds a Recipe)
    from r2sweep.core.quant.methods import FineTuneConfig

__all__ = ["CLIP_NORM", "FineTuneOutcome", "LR_FROM_PRETRAINING", "OPTIMIZERS", "RETRIES", "RETRY_LR_FACTOR", "Recipe", "Score",
           "EpochProgress", "fine_tune", "quantizer_parameters"]

#: Called after each fine-tuning epoch with ``(epoch, mean task loss)``.
EpochProgress = Callable[[int, float], None]
#: The accuracy (%) of a model in eval mode, on data the fine-tuning does not train on.
Score = Callable[[nn.Module], float]

#: A fine-tuning lr left unset is this fraction of the pre-training's: the package's SGD
#: recipe (0.05) fine-tunes at 0.01, as before; a model trained with Adam at 1e-3 at 2e-4.
LR_FROM_PRETRAINING = 0.2
#: A non-finite loss: the epoch restarts from its first weights, at this fraction of the lr...
RETRY_LR_FACTOR = 0.1
#: ...with gradients clipped to this norm, at most RETRIES times per fine-tuning.
CLIP_NORM = 1.0
RETRIES = 2
#: The optimizers a fine-tuning runs with (``downstream.optimizer``).
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """The optimizer and lrs a fine-tuning runs with, resolved from its entry and the pre-training.

    Attributes:
        optimizer: ``sgd`` (momentum 0.9) or ``adam``.
        lr: the network's lr (cosine schedule).
        quantizer_lr: the quantizers' steps, intervals and centroids (no weight decay).
        source: how it was chosen, one phrase for the trial's progress line.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    quantizer_lr: float = 0.01
    source: str = "set"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: one of {list(OPTIMIZERS)}")

    @classmethod
    def resolve(cls, optimizer: str | None, lr: float | None, quantizer_lr: float | None,
                pretrain_optimizer: str, pretrain_lr: float) -> Recipe:
        """The entry's settings where it has them, else the pre-training's optimizer and a fifth of its lr."""
        chosen = optimizer or pretrain_optimizer
        rate = lr if lr is not None else pretrain_lr * LR_FROM_PRETRAINING
        parts = [] if optimizer else [f"the pre-training's optimizer ({pretrain_optimizer})"]
        if lr is None:
            parts.append(f"{LR_FROM_PRETRAINING:g} x its lr {pretrain_lr:g}")
        return cls(chosen, rate, quantizer_lr or rate, "from " + ", ".join(parts) if parts else "as set")

    def describe(self) -> str:
        return f"{self.optimizer} at lr {self.lr:.3g} ({self.source})"


@dataclass
class FineTuneOutcome:
    """What a fine-tuning did besides its weights: the start, the epoch kept, the remedies used.

    Attributes:
        start_top1: the score before the first epoch (None without a score).
        best_top1: the score of the weights kept (None without a score).
        kept_epoch: epochs trained when the kept weights were taken; 0 is the start.
        epochs: epochs trained.
        remedies: one line per non-finite loss recovered from.
    """

    start_top1: float | None = None
    best_top1: float | None = None
    kept_epoch: int = 0
    epochs: int = 0
    remedies: list[str] = field(default_factory=list)

    def note(self, name: str) -> str | None:
        """The line a trial logs when fine-tuning never beat its start (None when it did, or was not scored)."""
        if self.start_top1 is None or self.epochs == 0 or self.kept_epoch > 0:
            return None
        return (f"{name}: no fine-tuning epoch beat its start ({self.start_top1:.1f}%), so the start was kept; "
                "a lower downstream.lr, or more epochs, may help")


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of the quantizers (steps, intervals), not the network's."""
    return [p for name, p in model.named_parameters() if "_quantizer." in name and p.requires_grad]


def fine_tune(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    cfg: FineTuneConfig,
    device: torch.device,
    *,
    on_epoch: EpochProgress | None = None,
    precision: str = "fp32",
    recipe: Recipe | None = None,
    score: Score | None = None,
) -> FineTuneOutcome:
    """Fine-tune ``model`` in place on the task loss for ``cfg.epochs`` epochs (cosine schedule).

    Network weights use ``recipe.lr`` and ``cfg.weight_decay``; quantizer parameters use
    ``recipe.quantizer_lr`` and no weight decay, which would otherwise shrink every step
    size towards zero. With ``score``, the weights of the best-scoring epoch are kept,
    the start (before the first epoch) included. A non-finite loss restarts the epoch
    (see the module docstring).

    Args:
        recipe: the optimizer and lrs; None: ``cfg.recipe()`` (as if pre-trained with SGD at 0.05).
        score: the accuracy of the model in eval mode; None: keep the last epoch.
        precision: ``fp32``, ``bf16`` or ``fp16`` (``train.precision``; a handler passes
            its :class:`~r2sweep.core.quant.methods.DownstreamContext`'s).

    Raises:
        TrialDiverged: the loss stayed non-finite after the retries.
        ConfigError: ``precision`` cannot run on ``device`` (fp16 on the CPU).
    """
    recipe = recipe or cfg.recipe()
    outcome = FineTuneOutcome()
    if cfg.epochs == 0:
        return outcome
    amp = Precision(precision, device)
    amp.prepare(model)
    optimizer = _optimizer(model, cfg, recipe)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    best = _Best(model, score)
    outcome.start_top1 = best.top1
    clip: float | None = None
    epoch = 0
    while epoch < cfg.epochs:
        first = state_copy(model)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        loss = _train_epoch(model, train_loader, optimizer, amp, clip)
        if loss is None:  # non-finite: back to the epoch's first weights, a smaller lr, clipped gradients
            if len(outcome.remedies) == RETRIES:
                raise TrialDiverged(f"non-finite loss in {cfg.method} fine-tuning, epoch {epoch + 1}, also at "
                                    f"{RETRY_LR_FACTOR ** RETRIES:g} x the lr with clipped gradients: lower downstream.lr")
            model.load_state_dict(first)
            optimizer.state = defaultdict(dict)  # the moments may hold the inf
            for group in optimizer.param_groups:
                group["lr"] *= RETRY_LR_FACTOR
            scheduler.base_lrs = [lr * RETRY_LR_FACTOR for lr in scheduler.base_lrs]
            clip = CLIP_NORM
            outcome.remedies.append(f"epoch {epoch + 1}: non-finite loss, restarted at {RETRY_LR_FACTOR:g} x the lr "
                                    f"with gradients clipped to norm {CLIP_NORM:g}")
            continue
        scheduler.step()
        epoch += 1
        outcome.epochs = epoch
        if on_epoch is not None:
            on_epoch(epoch - 1, loss)
        best.offer(model, epoch)
    outcome.best_top1, outcome.kept_epoch = best.restore(model)
    model.eval()
    return outcome


def _optimizer(model: nn.Module, cfg: FineTuneConfig, recipe: Recipe) -> torch.optim.Optimizer:
    quantizer_ids = {id(p) for p in quantizer_parameters(model)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in quantizer_ids and p.requires_grad], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if id(p) in quantizer_ids], "weight_decay": 0.0, "lr": recipe.quantizer_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr)
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9)


def _train_epoch(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
                 amp: Precision, clip: float | None) -> float | None:
    """One epoch; its mean loss, or None at the first non-finite loss."""
    model.train()
    total, batches = 0.0, 0
    for x, y in loader:
        x, y = amp.batch(x, y)
        with amp.autocast():
            loss = F.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            return None
        optimizer.zero_grad(set_to_none=True)
        if clip is None:
            amp.backward_step(loss, optimizer)
        else:
            amp.backward_step(loss, optimizer, clip=lambda: nn.utils.clip_grad_norm_(model.parameters(), clip))
        total += loss.item()
        batches += 1
    return total / max(batches, 1)


class _Best:
    """A copy of the best-scoring weights seen so far (the start first); without a score, none."""

    def __init__(self, model: nn.Module, score: Score | None) -> None:
        self.score = score
        self.top1: float | None = None
        self.epoch = 0
        self.state: dict[str, Tensor] | None = None
        if score is not None:
            self.top1 = self._scored(model)
            self.state = state_copy(model)

    def _scored(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            return float(self.score(model))
        finally:
            model.train(was_training)

    def offer(self, model: nn.Module, epoch: int) -> None:
        if self.score is None:
            self.epoch = epoch
            return
        top1 = self._scored(model)
        if top1 > self.top1:  # strictly better: a tie keeps the earlier (fewer changes from the start)
            self.top1, self.epoch = top1, epoch
            self.state = state_copy(model)

    def restore(self, model: nn.Module) -> tuple[float | None, int]:
        if self.state is not None:
            model.load_state_dict(self.state)
        return self.top1, self.epoch
