"""One record of a sweep: its resolved spec as YAML text, written once, read back as it is.

A sweep is stored in one canonical form, everywhere it is stored: the MLflow parent
run's ``sweep.yaml`` (what readers read), the same file in Tune's experiment folder
(what a resume is compared with), and every pickled copy of the spec (Tune's saved
callbacks, the trainable shipped to the workers), which pickles as this text. The
form is explicit: every field of the trial sections with its value (defaults
written out, the user's factories' options as the sweep's start resolved them,
``init_from`` pinned), the objectives, the search and the ``sweep:`` settings.
Reading it is :func:`~r2sweep.core.config.sweep.load_sweep_spec` on the text:
pure (nothing it names is imported) and the same spec on any machine.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import yaml

from r2sweep.core.config import strict_yaml
from r2sweep.core.config.search import SearchParam
from r2sweep.core.config.start_from import StartFrom
from r2sweep.core.config.sweep import SweepSpec, load_sweep_spec
from r2sweep.core.config.trial import TRIAL_SECTIONS

__all__ = ["RECORD_FILE", "sweep_record", "sweep_mapping", "read_record", "spec_from_record"]

#: The record's file name, as an MLflow artifact and in Tune's experiment folder.
RECORD_FILE = "sweep.yaml"


def _plain(value: Any) -> Any:
    """Tuples as lists and mappings as dicts: what YAML writes and reads back alike."""
    return json.loads(json.dumps(value))


def _param(param: SearchParam) -> dict[str, Any]:
    body: dict[str, Any] = {param.kind: list(param.values)}
    if param.when:
        body["when"] = {name: list(allowed) for name, allowed in param.when}
    return body


def sweep_mapping(spec: SweepSpec) -> dict[str, Any]:
    """The record as a mapping (see the module docstring)."""
    trial = spec.trial.to_mapping()
    mapping: dict[str, Any] = {"name": spec.name}
    for section in TRIAL_SECTIONS:
        # model: and data: as the base holds them: the sweep's start resolved them there, except
        # where the search changes the builder or the checkpoint (r2sweep.core.environment).
        own = section in ("model", "data") and section in spec.base
        mapping[section] = spec.base[section] if own else trial[section]
    objectives = [dataclasses.asdict(o) for o in spec.objectives]
    mapping["objective"] = objectives if spec.multi_objective else objectives[0]
    mapping["search"] = {p.path: _param(p) for p in spec.params}
    mapping["sweep"] = dataclasses.asdict(spec.settings)
    return _plain(mapping)


def sweep_record(spec: SweepSpec) -> str:
    """The record's text."""
    return yaml.safe_dump(sweep_mapping(spec), sort_keys=False)


def read_record(text: str, *, name: str | None = None) -> SweepSpec:
    """The spec a record holds, read strictly (``name``: the sweep's, when the record has none)."""
    return load_sweep_spec(strict_yaml.loads(text), default_name=name)


def spec_from_record(text: str, start_from: StartFrom | None = None) -> SweepSpec:
    """Unpickling a :class:`SweepSpec`: its record read back, with what an earlier sweep lent it."""
    spec = read_record(text)
    return dataclasses.replace(spec, start_from=start_from) if start_from is not None else spec
