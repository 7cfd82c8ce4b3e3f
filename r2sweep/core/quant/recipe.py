"""One downstream entry of a trial: which low-bit method runs, at which bits, with which knobs.

A trial's ``downstream:`` list holds these. Every knob a sweep may search is a
field here (granularity, range, BN handling, the algorithms' own settings), so
``downstream.0.granularity`` is as searchable as ``r2.strength``.

Fields that a method does not use are rejected when they are set (a ``tau`` on a
PTQ entry is a mistake, not a no-op); :data:`METHOD_FIELDS` says which belong
to which method.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from r2sweep.core.config.sections import from_dict
from r2sweep.core.errors import ConfigError
from r2sweep.core.quant.adaround import AdaRoundSettings
from r2sweep.core.quant.fake import GRANULARITIES, OBSERVERS, RANGES
from r2sweep.core.validate import check, require_int

__all__ = ["DownstreamConfig", "METHODS", "ALGORITHMS", "METHOD_FIELDS", "FLOAT_ACT_BITS", "load_downstream"]

METHODS = ("ptq", "qat", "dkm")
ALGORITHMS = {"ptq": ("rtn", "adaround"), "qat": ("lsq", "ewgs"), "dkm": ("dkm",)}
#: ``act_bits`` value meaning "activations stay in float" (weights-only quantization).
FLOAT_ACT_BITS = 32

_TAG = re.compile(r"[a-z][a-z0-9-]*")
_COMMON = ("method", "algorithm", "weight_bits", "act_bits", "granularity", "keep_first_last_bits", "tag")
_FINE_TUNE = ("epochs", "lr", "weight_decay", "batch_size")
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "ptq": _COMMON
    + ("symmetric", "range", "act_observer", "calib_samples", "bn_fold", "bn_reestimate", "bn_batches")
    + ("adaround_iters", "adaround_lambda", "adaround_lr"),
    "qat": _COMMON + _FINE_TUNE + ("quant_lr", "delta"),
    "dkm": _COMMON + _FINE_TUNE + ("tau", "dkm_iters", "cluster_dim"),
}


@dataclass
class DownstreamConfig:
    """A downstream method and its knobs (one entry of ``downstream:``).

    Defaults are laptop-scale versions of the papers' settings; README.md,
    "Downstream methods", lists them with the papers' values.
    """

    section: ClassVar[str] = "downstream"

    method: str = "ptq"
    algorithm: Optional[str] = None  # None: the method's default (adaround, lsq, dkm)
    weight_bits: Union[int, list[int]] = field(default_factory=lambda: [2])
    act_bits: Optional[int] = None  # None: 8 for ptq and qat, float (32) for dkm
    granularity: str = "channel"
    keep_first_last_bits: Optional[int] = 8
    # Appended to the result names (``ptq_rtn_w2a8_mse``) so that two entries of
    # one method and algorithm with different knobs can sit in one trial.
    tag: Optional[str] = None
    # PTQ
    symmetric: bool = True
    range: str = "mse"
    act_observer: str = "minmax"
    calib_samples: int = 256
    bn_fold: Optional[bool] = None  # None: fold unless bn_reestimate
    bn_reestimate: bool = False
    bn_batches: int = 8
    adaround_iters: int = 1000
    adaround_lambda: float = 0.01
    adaround_lr: float = 1e-3
    # QAT and DKM fine-tuning
    epochs: int = 5
    lr: float = 0.01
    weight_decay: float = 2.5e-5
    batch_size: int = 64
    quant_lr: Optional[float] = None  # None: the same as lr
    delta: float = 1e-3
    tau: float = 0.05
    dkm_iters: int = 3
    cluster_dim: int = 1

    def __post_init__(self) -> None:
        s = self.section
        check(self.method in METHODS, f"{s}.method", self.method, f"one of {list(METHODS)}")
        algorithms = ALGORITHMS[self.method]
        if self.algorithm is None:
            self.algorithm = {"ptq": "adaround", "qat": "lsq", "dkm": "dkm"}[self.method]
        check(self.algorithm in algorithms, f"{s}.algorithm", self.algorithm, f"for method {self.method}: one of {list(algorithms)}")
        if isinstance(self.weight_bits, int) and not isinstance(self.weight_bits, bool):
            self.weight_bits = [self.weight_bits]
        check(isinstance(self.weight_bits, list) and len(self.weight_bits) > 0, f"{s}.weight_bits", self.weight_bits, "an integer from 1 to 8 or a non-empty list of them")
        for bits in self.weight_bits:
            require_int(f"{s}.weight_bits", bits, 1, maximum=8)
        check(len(set(self.weight_bits)) == len(self.weight_bits), f"{s}.weight_bits", self.weight_bits, "distinct bit widths")
        if self.act_bits is None:
            self.act_bits = FLOAT_ACT_BITS if self.method == "dkm" else 8
        if self.method == "dkm":
            check(self.act_bits == FLOAT_ACT_BITS, f"{s}.act_bits", self.act_bits, f"{FLOAT_ACT_BITS} (DKM compresses weights only)")
        elif self.act_bits != FLOAT_ACT_BITS:
            require_int(f"{s}.act_bits", self.act_bits, 1, maximum=8)
        if self.method == "qat" and self.act_bits == 1:
            raise ConfigError(f"{s}.act_bits", 1, "2 to 8 or 32 for qat (1-bit activations after ReLU would be a step function)")
        check(self.granularity in GRANULARITIES, f"{s}.granularity", self.granularity, f"one of {list(GRANULARITIES)}")
        if self.keep_first_last_bits is not None:
            require_int(f"{s}.keep_first_last_bits", self.keep_first_last_bits, 1, maximum=8)
        if self.tag is not None:
            check(bool(_TAG.fullmatch(self.tag)), f"{s}.tag", self.tag, "lower-case letters, digits and '-', starting with a letter")
        check(self.range in RANGES, f"{s}.range", self.range, f"one of {list(RANGES)}")
        check(self.act_observer in OBSERVERS, f"{s}.act_observer", self.act_observer, f"one of {list(OBSERVERS)}")
        if self.bn_fold is None:
            self.bn_fold = not self.bn_reestimate
        check(not (self.bn_fold and self.bn_reestimate), f"{s}.bn_fold", self.bn_fold,
              "false when bn_reestimate is true (folded BatchNorms have no statistics left to re-estimate)")
        require_int(f"{s}.calib_samples", self.calib_samples, 1)
        require_int(f"{s}.bn_batches", self.bn_batches, 1)
        require_int(f"{s}.epochs", self.epochs, 0)
        require_int(f"{s}.batch_size", self.batch_size, 1)
        check(self.lr > 0, f"{s}.lr", self.lr, "a number > 0")
        check(self.quant_lr is None or self.quant_lr > 0, f"{s}.quant_lr", self.quant_lr, "a number > 0 (or null: the same as lr)")
        check(self.weight_decay >= 0, f"{s}.weight_decay", self.weight_decay, "a number >= 0")
        check(self.delta >= 0, f"{s}.delta", self.delta, "a number >= 0 (0 is the plain straight-through estimator)")
        check(self.tau > 0, f"{s}.tau", self.tau, "a number > 0 (relative to the layer's weight variance)")
        require_int(f"{s}.dkm_iters", self.dkm_iters, 1)
        require_int(f"{s}.cluster_dim", self.cluster_dim, 1)
        self.adaround_settings()  # validates the AdaRound knobs

    def unused_fields(self, prefix: str = "downstream") -> dict[str, str]:
        """Fields of this method that its algorithm and switches never read (``adaround_iters``
        under round-to-nearest, ``delta`` under LSQ, ``bn_batches`` without re-estimation),
        each with the setting that makes it unused."""
        unused: dict[str, str] = {}
        algorithm = f"{prefix}.algorithm={self.algorithm}"
        if self.method == "ptq":
            if self.algorithm != "adaround":
                unused.update(dict.fromkeys(("adaround_iters", "adaround_lambda", "adaround_lr"), algorithm))
            if not self.bn_reestimate:
                unused["bn_batches"] = f"{prefix}.bn_reestimate=false"
        if self.method == "qat" and self.algorithm != "ewgs":
            unused["delta"] = algorithm
        return {f"{prefix}.{name}": why for name, why in unused.items()}

    def adaround_settings(self, seed: int = 0) -> AdaRoundSettings:
        return AdaRoundSettings(
            iterations=self.adaround_iters, lr=self.adaround_lr, lambda_r=self.adaround_lambda, seed=seed
        )

    @property
    def float_activations(self) -> bool:
        return self.act_bits == FLOAT_ACT_BITS

    def result_name(self, weight_bits: int) -> str:
        """The metric prefix of one result: ``ptq_adaround_w2a8``, ``qat_lsq_w2a2``, ``dkm_w1``, ``ptq_rtn_w2a8_mse``."""
        if self.method == "dkm":
            name = f"dkm_w{weight_bits}"
        else:
            name = f"{self.method}_{self.algorithm}_w{weight_bits}a{self.act_bits}"
        return f"{name}_{self.tag}" if self.tag else name

    def result_names(self) -> list[str]:
        return [self.result_name(bits) for bits in self.weight_bits]

    def to_mapping(self) -> dict[str, Any]:
        """The fields this method uses, resolved (what a re-runnable YAML file holds)."""
        return {name: getattr(self, name) for name in METHOD_FIELDS[self.method]}


def load_downstream(data: Any, path: str = "downstream") -> list[DownstreamConfig]:
    """The ``downstream:`` list, strictly: unknown keys, keys the method does not use, duplicates.

    Raises:
        ConfigError: naming ``downstream[i].field``.
    """
    if data is None:
        return []
    if isinstance(data, Mapping):
        data = [data]
    check(isinstance(data, list), path, data, "a list of {method: ptq|qat|dkm, ...} entries")
    entries: list[DownstreamConfig] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        check(isinstance(item, Mapping), where, item, "a mapping such as {method: ptq, algorithm: adaround, weight_bits: [2]}")
        method = item.get("method", "ptq")
        if method in METHOD_FIELDS:
            for key in item:
                if key in DownstreamConfig.__dataclass_fields__ and key not in METHOD_FIELDS[method]:
                    users = [m for m, names in METHOD_FIELDS.items() if key in names]
                    raise ConfigError(f"{where}.{key}", item[key], f"not used by method {method} (only by {users})")
        entry = _with_path(lambda: from_dict(DownstreamConfig, item, where), where)
        for name in entry.result_names():
            check(name not in seen, where, name, f"results distinct from entry {seen.get(name)} (both produce {name}/top1); set a distinct 'tag' on one of them")
            seen[name] = i
        entries.append(entry)
    return entries


def _with_path(build: Any, where: str) -> DownstreamConfig:
    # __post_init__ names fields "downstream.x"; in a list, "downstream[i].x" says which entry.
    try:
        return build()
    except ConfigError as error:
        if error.field.startswith("downstream.") and where != "downstream":
            raise ConfigError(where + error.field[len("downstream") :], error.value, error.allowed) from None
        raise
