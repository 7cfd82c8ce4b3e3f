"""The one step that looks at this machine: what a config names outside its own text.

Loading a trial or sweep file (or a stored record of one) is pure: it checks the
text and touches nothing else (:mod:`r2sweep.core.config.inputs`). What the text
*names* is checked here, and only where something will execute: a sweep's start
(:func:`check_sweep_environment`, on the driver), and every trial, re-run and
study run (:func:`check_trial_environment`, called by ``run_trial``). Here the
user's factories and plugins are imported, their options checked against their
signatures (their defaults filled in), ``model.init_from`` read and hashed, the
local data roots looked for, and, for outside code, one batch built and run
through the model. The cluster's nodes are checked where Ray is joined
(``r2sweep.tune.tuner.run_experiment``).

Readers (``best``, ``compare``, ``report``, ``load_sweep``) never come here: a
stored record names code, and reading it must not run that code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from r2sweep.core.config.search import validate_values
from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.config.trial import TrialConfig
from r2sweep.core.errors import ConfigError

__all__ = ["check_trial_environment", "check_sweep_environment", "resolve_inputs", "code_named_by"]

#: The sections whose values name code or files: a searched path in them is checked per value.
_OUTSIDE_SECTIONS = ("model", "data")


def resolve_inputs(config: TrialConfig) -> TrialConfig:
    """Import the trial's factories (or plugins), check their options, fill in their defaults, hash
    ``init_from``; in place, and returned. Idempotent.

    Raises:
        ConfigError: naming the field (a factory that does not import, an unknown name or option,
            a missing or changed checkpoint).
    """
    config.data.resolve()
    config.model.resolve()
    return config


def code_named_by(config: TrialConfig) -> list[str]:
    """What running ``config`` imports beyond r2sweep itself: its factories and any model or dataset
    name r2sweep does not define (a plugin's), as ``field 'reference'`` texts. Pure: nothing imported."""
    from r2sweep.core.data import DATASETS
    from r2sweep.core.models import MODELS

    named = []
    for section, registry in (("model", MODELS), ("data", DATASETS)):
        inputs = getattr(config, section)
        if inputs.factory is not None:
            named.append(f"{section}.factory {inputs.factory!r}")
        elif registry.own(inputs.name) is None:
            named.append(f"{section}.name {inputs.name!r} (a plugin's)")
    return named


def check_trial_environment(config: TrialConfig, *, build: bool = True) -> list[str]:
    """:func:`resolve_inputs`, then (``build``) the user's code built and run on one batch;
    the notes a person should read (what a non-strict ``init_from`` left as initialised)."""
    from r2sweep.core.build import check_inputs, uses_outside_code  # torch and the models: only here

    resolve_inputs(config)
    return check_inputs(config) if build and uses_outside_code(config) else []


def check_sweep_environment(spec: SweepSpec, *, local: bool) -> SweepSpec:
    """Everything a sweep's trials will need from this machine, checked before anything starts;
    the spec with its inputs resolved (what the sweep's record keeps and its trials receive).

    ``local``: the trials run here (no cluster to join): the data roots must exist here, and the
    user's code is built and run on one batch. On a cluster the roots are the workers' to hold
    (checked on the nodes once Ray is joined), and the data is not built here when it has roots.

    Raises:
        ConfigError: naming the field, or ``search.PATH`` for a value the search can draw.
    """
    if local:
        for root in spec.data_roots():
            if not os.path.exists(root):
                raise ConfigError("data.root", root, "an existing folder on this machine (r2sweep never "
                                  "downloads); on a cluster whose workers hold it, pass --address")
    trial = resolve_inputs(spec.trial)
    # Every value the search can draw for a model or data field, resolved in a trial config of its own.
    validate_values(spec.base, {p.path: p for p in spec.params}, sections=_OUTSIDE_SECTIONS, then=resolve_inputs)
    if local or not spec.data_roots():
        check_trial_environment(trial)
    return dataclasses.replace(spec, base=_resolved_base(spec, trial), trial=trial)


def _resolved_base(spec: SweepSpec, trial: TrialConfig) -> Mapping[str, Any]:
    """The base with each section's resolved form (defaults filled in, ``init_from`` pinned to the
    bytes checked here, so a file changed mid-sweep is refused on the worker), for each section
    whose builder the search does not change."""
    searched = {p.path for p in spec.params}
    base = dict(spec.base)
    for section in _OUTSIDE_SECTIONS:
        if {f"{section}.name", f"{section}.factory"} & searched:
            continue  # another builder's options would not fit this one's defaults
        resolved = getattr(trial, section).to_mapping()
        if section == "model" and "model.init_from" in searched:
            for key in ("init_from", "init_from_strict", "init_from_sha256"):
                resolved.pop(key, None)
        # A searched option keeps its place in the base (the search writes over it).
        base[section] = {**dict(base.get(section) or {}), **resolved}
    return base
