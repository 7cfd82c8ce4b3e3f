"""The trial file: ``seed``, ``data``, ``model``, ``train``, ``r2`` and ``downstream``.

One schema serves ``r2sweep trial FILE`` and every trial of a sweep (a sweep
writes its sampled values into these same fields), so any trial can be re-run
alone. Loading is strict and complete before anything runs: unknown keys,
wrong types, out-of-range values and unknown registry names are all
:class:`~r2sweep.core.errors.ConfigError` naming the dotted field.

``--set PATH=VALUE`` overrides use the same dotted paths (``train.lr=0.1``,
``downstream.0.weight_bits=[2,4]``), applied to the raw mapping before it is
checked, so an override is validated exactly like the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from r2sweep.core.config import strict_yaml
from r2sweep.core.config.overrides import Overrides, apply_overrides, override_field, override_pairs
from r2sweep.core.config.inputs import DataConfig, ModelConfig
from r2sweep.core.config.sections import R2Config, TrainConfig, from_dict, to_dict
from r2sweep.core.errors import ConfigError, FileConfigError
from r2sweep.core.quant.methods import MethodConfig, load_downstream
from r2sweep.core.validate import check, require_int

__all__ = [
    "DataConfig",
    "ModelConfig",
    "ProxyConfig",
    "PROXY_FP",
    "TRIAL_SECTIONS",
    "TrialConfig",
    "load_trial_config",
    "read_yaml",
]


#: ``proxy.result`` meaning "the float model's validation accuracy" (no quantization).
PROXY_FP = "fp"


@dataclass
class ProxyConfig:
    """``proxy:``: the cheap per-epoch stand-in for a downstream result (``proxy/top1``).

    After every pre-training epoch the trial reports the accuracy of the current
    weights rounded to nearest on ONE downstream result's grid: that result's
    entry (granularity, symmetric, range, BN folding, first/last-layer bits) at
    that result's weight bit width, weights only. The sweep's scheduler (ASHA)
    ranks trials on it. ``result`` names the result (``ptq_rtn_w4a8``,
    ``dkm_w1``) or ``fp`` (the float ``val/top1``, for a recipe whose rounded
    weights say nothing early). Default: in a sweep, the result of the first
    objective; in a trial file, the first entry at its lowest bit width.
    """

    section: ClassVar[str] = "proxy"

    result: Optional[str] = None


@dataclass
class TrialConfig:
    """Everything one trial needs; see the module docstring."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    r2: R2Config = field(default_factory=R2Config)
    downstream: list[MethodConfig] = field(default_factory=list)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def __post_init__(self) -> None:
        require_int("seed", self.seed, 0)
        # R2 switches on at the start of epoch start_epoch (0-based): at or past the
        # last epoch it would never act, and the trial would measure no R2 at all.
        if self.r2.kind != "none" and self.r2.start_epoch >= self.train.epochs:
            raise ConfigError("r2.start_epoch", self.r2.start_epoch,
                              f"below train.epochs ({self.train.epochs}): R2 switches on at that epoch, so it would "
                              "never act; lower r2.start_epoch or raise train.epochs")
        if self.proxy.result is not None:
            check(self.proxy.result == PROXY_FP or self.proxy.result in self.result_names(), "proxy.result",
                  self.proxy.result, f"a downstream result of this trial or {PROXY_FP!r}: {[*self.result_names(), PROXY_FP]}")

    def unused_fields(self) -> dict[str, str]:
        """Every field (dotted path) whose value this trial never reads, with the setting that makes it so."""
        unused = {**self.train.unused_fields(), **self.r2.unused_fields()}
        for i, entry in enumerate(self.downstream):
            unused.update(entry.unused_fields(f"downstream.{i}"))
        return unused

    def proxy_target(self) -> tuple[MethodConfig, int] | None:
        """The (entry, weight bits) whose round-to-nearest grid ``proxy/top1`` uses; None: the float model."""
        if self.proxy.result == PROXY_FP or not self.downstream:
            return None
        for entry in self.downstream:
            for bits in entry.weight_bits:
                if self.proxy.result in (None, entry.result_name(bits)):
                    return entry, (min(entry.weight_bits) if self.proxy.result is None else bits)
        raise AssertionError("proxy.result was validated against the result names")

    def result_names(self) -> list[str]:
        """Every downstream result prefix, in run order (``ptq_adaround_w2a8``, ...)."""
        return [name for entry in self.downstream for name in entry.result_names()]

    def metric_names(self) -> list[str]:
        """The final ``/top1`` metrics this trial reports."""
        return ["fp/top1"] + [f"{name}/top1" for name in self.result_names()]

    def objective_names(self) -> list[str]:
        """Every final metric an objective may name: the ``/top1`` ones, then each result's size
        (``/size_bytes``, ``/size_ratio``; minimized, they trade accuracy against bytes)."""
        sizes = [f"{name}/{fact}" for name in self.result_names() for fact in ("size_bytes", "size_ratio")]
        return self.metric_names() + sizes

    def to_mapping(self) -> dict[str, Any]:
        """The plain form a YAML file holds (``load_trial_config`` reads it back)."""
        return {
            "seed": self.seed,
            "data": self.data.to_mapping(),
            "model": self.model.to_mapping(),
            "train": to_dict(self.train),
            "r2": to_dict(self.r2),
            "downstream": [entry.to_mapping() for entry in self.downstream],
            "proxy": to_dict(self.proxy),
        }


#: The sections of a trial file (a search-space file adds name, objective, search, sweep).
TRIAL_SECTIONS = ("seed", "data", "model", "train", "r2", "downstream", "proxy")


def load_trial_config(source: str | os.PathLike[str] | Mapping[str, Any] | TrialConfig | None,
                      overrides: Overrides = None) -> TrialConfig:
    """A :class:`TrialConfig` from a trial YAML file, its mapping or a TrialConfig, loaded strictly.

    ``overrides`` (``{path: value}``, pairs or ``"PATH=VALUE"`` texts, as ``--set``) are
    written in first; one no trial would read (``r2.strength`` with ``r2.kind: none``) is refused.
    An error names an override ``overrides['r2.kind']`` (the command line shows ``--set r2.kind``).

    Raises:
        ConfigError: naming the first bad field; a :class:`FileConfigError` naming the file
            too when ``source`` is a path.

    >>> load_trial_config({"train": {"epochs": 3}}, {"r2.kind": "linf"}).r2.kind
    'linf'
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            return load_trial_config(read_yaml(source), overrides)
        except FileConfigError:
            raise
        except ConfigError as error:
            raise FileConfigError(os.fspath(source), error) from None
    if isinstance(source, TrialConfig):
        source = source.to_mapping()
    pairs = override_pairs(overrides)
    config = _load_trial_config(apply_overrides(source, pairs) if pairs else source)
    refuse_unused_overrides(pairs, [config])
    return config


def _load_trial_config(data: Any) -> TrialConfig:
    if data is None:
        data = {}
    check(isinstance(data, Mapping), "config", type(data).__name__, f"a mapping with the sections {list(TRIAL_SECTIONS)}")
    from_dict(_Sections, dict(data))  # unknown top-level keys, with a did-you-mean
    seed = data.get("seed", 0)
    check(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "an integer >= 0")
    return TrialConfig(
        seed=seed,
        data=DataConfig.from_mapping(data.get("data")),
        model=ModelConfig.from_mapping(data.get("model")),
        train=from_dict(TrainConfig, data.get("train")),
        r2=from_dict(R2Config, data.get("r2")),
        downstream=load_downstream(data.get("downstream")),
        proxy=from_dict(ProxyConfig, data.get("proxy")),
    )


@dataclass
class _Sections:
    # Only its field names matter: from_dict's unknown-key check for the top level.
    seed: Any = None
    data: Any = None
    model: Any = None
    train: Any = None
    r2: Any = None
    downstream: Any = None
    proxy: Any = None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file strictly (:mod:`r2sweep.core.config.strict_yaml`): every problem is a ConfigError naming the line."""
    return strict_yaml.load_file(path)


def refuse_unused_overrides(overrides: list[tuple[str, Any]], configs: Sequence[TrialConfig]) -> None:
    """Refuse a ``--set`` that no trial would read: its field is unused in every one of ``configs``
    (one trial's config, or a config per value a sweep's switches can take).

    Raises:
        ConfigError: naming the override, the setting that makes it unused, and the fix.
    """
    for path, value in overrides:
        reasons = [config.unused_fields().get(path) for config in configs]
        if reasons and all(reasons):
            raise ConfigError(override_field(path), value, f"a field the trial reads: {reasons[0]} never "
                              f"reads it; drop the override, or change that setting")
