"""What every downstream method shares: the config base class, the registry, the handler's context.

A method is two things registered under one name: a config class (a dataclass of
its knobs, validated in ``__post_init__`` so one built in Python is checked like
one read from YAML) and a handler (runs the method on the pre-trained model at
one weight bit width and returns the low-bit copy). :func:`register_method` makes
the name a legal ``downstream.N.method`` and enrols the method in the conformance
tests (tests/test_downstream_methods.py).

Every knob a sweep may search is a field of its method's config, so
``downstream.0.granularity`` is as searchable as ``r2.strength``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from r2sweep.core.data import DataSplits, make_loader
from r2sweep.core.data.loader import EpochLoader
from r2sweep.core.quant.fake import GRANULARITIES
from r2sweep.core.quant.fine_tune_loop import OPTIMIZERS, FineTuneOutcome, Recipe
from r2sweep.core.registry import Registry
from r2sweep.core.validate import check, is_number, require_int

__all__ = [
    "FLOAT_ACT_BITS",
    "DEFAULT_SYMMETRIC",
    "DEFAULT_RANGE",
    "MethodConfig",
    "FineTuneConfig",
    "Rounding",
    "DownstreamContext",
    "DownstreamMethod",
    "DOWNSTREAM_METHODS",
    "Handler",
    "register_method",
    "calibration_images",
    "calibration_set",
]

#: ``act_bits`` value meaning "activations stay in float" (weights-only quantization).
FLOAT_ACT_BITS = 32
#: The weight rounding of a PTQ entry left at its defaults; the per-epoch proxy rounds
#: the weights of methods without rounding knobs of their own (QAT, DKM) this way.
DEFAULT_SYMMETRIC = True
DEFAULT_RANGE = "mse"

_TAG = re.compile(r"[a-z][a-z0-9-]*")


class Rounding(NamedTuple):
    """The round-to-nearest weight grid of an entry: what ``proxy/top1`` measures each epoch."""

    granularity: str
    keep_first_last_bits: Optional[int]
    symmetric: bool = DEFAULT_SYMMETRIC
    range: str = DEFAULT_RANGE
    bn_fold: bool = True


@dataclass
class MethodConfig:
    """The fields every method has (one entry of ``downstream:``); a method subclasses it.

    Defaults are laptop-scale versions of the papers' settings; docs/reference.md,
    "Downstream methods and their defaults", lists them with the papers' values.
    """

    section: ClassVar[str] = "downstream"
    #: The name ``downstream.N.method`` gives and the result names start with.
    method: ClassVar[str] = ""
    #: Legal ``algorithm`` values, in the order error messages list them.
    algorithms: ClassVar[tuple[str, ...]] = ()
    default_algorithm: ClassVar[str] = ""
    #: Activations stay float (``act_bits`` is fixed at 32), so result names carry no ``a<bits>``.
    weights_only: ClassVar[bool] = False

    algorithm: Optional[str] = None  # None: the method's default_algorithm
    weight_bits: Union[int, list[int]] = field(default_factory=lambda: [2])
    act_bits: Optional[int] = None  # None: 8, or float (32) for a weights-only method
    granularity: str = "channel"
    keep_first_last_bits: Optional[int] = 8
    # Appended to the result names (``ptq_rtn_w2a8_mse``) so that two entries of
    # one method and algorithm with different knobs can sit in one trial.
    tag: Optional[str] = None

    def __post_init__(self) -> None:
        s = self.section
        if self.algorithm is None:
            self.algorithm = self.default_algorithm
        check(self.algorithm in self.algorithms, f"{s}.algorithm", self.algorithm,
              f"for method {self.method}: one of {list(self.algorithms)}")
        if isinstance(self.weight_bits, int) and not isinstance(self.weight_bits, bool):
            self.weight_bits = [self.weight_bits]
        check(isinstance(self.weight_bits, list) and len(self.weight_bits) > 0, f"{s}.weight_bits", self.weight_bits,
              "an integer from 1 to 8 or a non-empty list of them")
        for bits in self.weight_bits:
            require_int(f"{s}.weight_bits", bits, 1, maximum=8)
        check(len(set(self.weight_bits)) == len(self.weight_bits), f"{s}.weight_bits", self.weight_bits, "distinct bit widths")
        if self.act_bits is None:
            self.act_bits = FLOAT_ACT_BITS if self.weights_only else 8
        self._check_act_bits()
        check(self.granularity in GRANULARITIES, f"{s}.granularity", self.granularity, f"one of {list(GRANULARITIES)}")
        if self.keep_first_last_bits is not None:
            require_int(f"{s}.keep_first_last_bits", self.keep_first_last_bits, 1, maximum=8)
        if self.tag is not None:
            check(bool(_TAG.fullmatch(self.tag)), f"{s}.tag", self.tag, "lower-case letters, digits and '-', starting with a letter")

    def _check_act_bits(self) -> None:
        # A hook, so a method's own limit (QAT: no 1-bit activations) is checked in
        # the same place as the common one and errors keep their order.
        if self.weights_only:
            check(self.act_bits == FLOAT_ACT_BITS, f"{self.section}.act_bits", self.act_bits,
                  f"{FLOAT_ACT_BITS} ({self.method.upper()} compresses weights only)")
        elif self.act_bits != FLOAT_ACT_BITS:
            require_int(f"{self.section}.act_bits", self.act_bits, 1, maximum=8)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The keys an entry of this method may hold, ``method`` first (the order of :meth:`to_mapping`)."""
        return ("method", *(f.name for f in fields(cls) if f.init))

    @property
    def float_activations(self) -> bool:
        return self.act_bits == FLOAT_ACT_BITS

    def result_name(self, weight_bits: int | str) -> str:
        """The metric prefix of one result: ``ptq_adaround_w2a8``, ``qat_lsq_w2a2``, ``dkm_w1``, ``ptq_rtn_w2a8_mse``.

        The only place a result's name is spelled: trials report under it, sweeps'
        objectives and stored runs are looked up by it. ``weight_bits="*"`` gives
        the label of all the entry's results (``ptq_rtn_w*a8``). The algorithm is
        left out when the method has only one, the activation bits when they are
        always float.
        """
        name = self.method if len(self.algorithms) == 1 else f"{self.method}_{self.algorithm}"
        name += f"_w{weight_bits}" if self.weights_only else f"_w{weight_bits}a{self.act_bits}"
        return f"{name}_{self.tag}" if self.tag else name

    def result_names(self) -> list[str]:
        return [self.result_name(bits) for bits in self.weight_bits]

    def to_mapping(self) -> dict[str, Any]:
        """Every field, resolved, plus ``method`` (what a re-runnable YAML file holds)."""
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def unused_fields(self, prefix: str = "downstream") -> dict[str, str]:
        """Fields of this entry that its algorithm and switches never read (``adaround_iters``
        under round-to-nearest, ``delta`` under LSQ, ``bn_batches`` without re-estimation),
        each with the setting that makes it unused (a ``--set`` of one is refused)."""
        return {f"{prefix}.{name}": why for name, why in self._unused(prefix).items()}

    def _unused(self, prefix: str) -> dict[str, str]:
        return {}

    def rounding(self) -> Rounding:
        """The grid ``proxy/top1`` rounds to for this entry; a method without rounding knobs rounds like default PTQ."""
        return Rounding(self.granularity, self.keep_first_last_bits)


@dataclass
class FineTuneConfig(MethodConfig):
    """The fine-tuning knobs shared by the training-based methods (QAT, DKM).

    ``optimizer`` and ``lr`` left unset follow the pre-training (its optimizer, a fifth of
    its lr: :meth:`recipe`), so a model trained with Adam is not fine-tuned with SGD.
    """

    optimizers: ClassVar[tuple[str, ...]] = OPTIMIZERS
    keeps: ClassVar[tuple[str, ...]] = ("best", "last")

    epochs: int = 5
    lr: Optional[float] = None  # None: LR_FROM_PRETRAINING x train.lr
    weight_decay: float = 2.5e-5
    batch_size: int = 64
    optimizer: Optional[str] = None  # None: train.optimizer
    # "best": the epoch (the start included) with the best validation top-1; "last": the last
    # epoch, as recorded before 2026-12-07 (the validation split then chooses nothing).
    keep: str = "best"

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.section
        require_int(f"{s}.epochs", self.epochs, 0)
        require_int(f"{s}.batch_size", self.batch_size, 1)
        check(self.lr is None or (is_number(self.lr) and self.lr > 0), f"{s}.lr", self.lr,
              "a number > 0 (or null: a fifth of train.lr)")
        check(self.weight_decay >= 0, f"{s}.weight_decay", self.weight_decay, "a number >= 0")
        check(self.optimizer is None or self.optimizer in self.optimizers, f"{s}.optimizer", self.optimizer,
              f"one of {list(self.optimizers)} (or null: train.optimizer)")
        check(self.keep in self.keeps, f"{s}.keep", self.keep,
              f"one of {list(self.keeps)} (best: the best epoch on the validation split, the start included)")

    @property
    def quantizer_lr(self) -> Optional[float]:
        """The lr of the quantizers' own parameters (steps, centroids); None: the network's."""
        return None

    def recipe(self, pretrain_optimizer: str = "sgd", pretrain_lr: float = 0.05) -> Recipe:
        """This entry's optimizer and lrs, the unset ones from the pre-training's (``train:``)."""
        return Recipe.resolve(self.optimizer, self.lr, self.quantizer_lr, pretrain_optimizer, pretrain_lr)


def calibration_images(data: DataSplits, count: int, seed: int) -> Tensor:
    """A fixed, seeded subset of the training set (never the validation set), stacked."""
    return calibration_set(data, count, seed)[0]


def calibration_set(data: DataSplits, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """:func:`calibration_images` and their labels (the same images, in the same order)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=generator)[: min(count, len(data.train))]
    samples = [data.train[int(i)] for i in order]
    return torch.stack([x for x, _ in samples]), torch.as_tensor([int(y) for _, y in samples])


@dataclass
class DownstreamContext:
    """What a handler may use besides its entry and bit width; one per trial, shared by its results."""

    data: DataSplits
    seed: int
    device: torch.device
    #: The pre-training batch size (PTQ's BN re-estimation batches are this size).
    train_batch_size: int
    num_workers: int = 0
    progress: Callable[[str], None] = lambda line: None
    #: ``train.precision``: QAT/DKM fine-tune at it (the quantizers' statistics stay float32).
    precision: str = "fp32"
    #: ``train.optimizer`` and ``train.lr``: a fine-tuning that sets neither follows them.
    train_optimizer: str = "sgd"
    train_lr: float = 0.05
    #: The accuracy (%) of a model on the validation split; fine-tunings keep their best epoch by it.
    score: Optional[Callable[[nn.Module], float]] = None
    #: Filled by the handlers: ``{result name: {metric: value}}`` beyond ``/top1`` (``start_top1``, ``kept_epoch``).
    facts: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Filled by the handlers: lines the trial logs as notes (a result no better than its start).
    notes: list[str] = field(default_factory=list)

    def calibration_images(self, count: int) -> Tensor:
        return calibration_images(self.data, count, self.seed)

    def calibration_set(self, count: int) -> tuple[Tensor, Tensor]:
        """The images of :meth:`calibration_images` and their labels."""
        return calibration_set(self.data, count, self.seed)

    def fine_tune_loader(self, entry: FineTuneConfig) -> EpochLoader:
        # seed + 1: fine-tuning batches are not the pre-training ones replayed.
        return make_loader(self.data.train, entry.batch_size, shuffle=True, seed=self.seed + 1,
                           num_workers=self.num_workers, pin_memory=self.device.type == "cuda")

    def fine_tune_options(self, entry: FineTuneConfig, weight_bits: int) -> dict[str, Any]:
        """The keyword arguments of a fine-tuning (``quantization_aware_train``, ``dkm_compress``) in this trial:
        its recipe, precision, score, a progress line per epoch, and where its outcome goes."""
        name = entry.result_name(weight_bits)
        recipe = entry.recipe(self.train_optimizer, self.train_lr)
        self.progress(f"  {name}: fine-tuning with {recipe.describe()}")

        def on_epoch(epoch: int, loss: float) -> None:
            self.progress(f"  {name}: fine-tune epoch {epoch + 1}/{entry.epochs}, loss {loss:.3f}")

        def on_done(outcome: FineTuneOutcome) -> None:
            facts = self.facts.setdefault(name, {})
            if outcome.start_top1 is not None:
                facts.update(start_top1=outcome.start_top1, kept_epoch=outcome.kept_epoch)
                self.progress(f"  {name}: start {outcome.start_top1:.1f}%, kept epoch {outcome.kept_epoch} "
                              f"({outcome.best_top1:.1f}%)")
            if outcome.remedies:
                facts["retries"] = len(outcome.remedies)
            for line in [*(f"{name}: {remedy}" for remedy in outcome.remedies), outcome.note(name)]:
                if line:
                    self.notes.append(line)
                    self.progress(f"note: {line}")

        return {"recipe": recipe, "precision": self.precision, "score": self.score if entry.keep == "best" else None,
                "on_epoch": on_epoch, "on_done": on_done}


#: ``handler(pre-trained model, entry, weight bits, context)`` -> the low-bit copy (the model is not changed).
Handler = Callable[[nn.Module, Any, int, DownstreamContext], nn.Module]


@dataclass(frozen=True)
class DownstreamMethod:
    """A registered method: ``config`` reads and checks its entries, ``quantize`` runs one result."""

    config: type[MethodConfig]
    quantize: Handler

    @property
    def name(self) -> str:
        return self.config.method


class _InOrder(Registry[DownstreamMethod]):
    # Names in registration order (ptq, qat, dkm: by cost), the order messages
    # and the docs list them in, rather than Registry's alphabetical one.
    def names(self) -> list[str]:
        return list(self._entries)


DOWNSTREAM_METHODS: Registry[DownstreamMethod] = _InOrder("downstream.method")


def register_method(config: type[MethodConfig]) -> Callable[[Handler], Handler]:
    """Decorator on a handler: register it with ``config`` under ``config.method``."""

    def add(handler: Handler) -> Handler:
        if not config.method or config.default_algorithm not in config.algorithms:
            raise ValueError(f"{config.__name__}: a method name and a default_algorithm among its algorithms are required")
        DOWNSTREAM_METHODS.register(config.method)(DownstreamMethod(config, handler))
        return handler

    return add
