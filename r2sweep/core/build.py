"""A trial's data and model, built from its config; and the check the driver makes before anything starts.

One way for every source of a model or a dataset: the package's own, an
installed plugin's, or the user's factory (``model.factory``, or a callable from
Python) go through the same contract (:mod:`r2sweep.core.factories`).
:func:`check_inputs` is what a sweep or a trial runs first, on the driver: the
factories import, build, return the right things, the checkpoint loads, and one
batch goes through the model with the right output shape. Its failures are
:class:`~r2sweep.core.errors.ConfigError` naming the field, so a user's bug is one
line before Ray starts, not a stack trace from a worker.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r2sweep.core.checkpoint import load_state
from r2sweep.core.config.trial import TrialConfig
from r2sweep.core.data import DATASETS, DataSplits
from r2sweep.core.data.registry import build_data
from r2sweep.core.environment import resolve_inputs
from r2sweep.core.errors import ConfigError
from r2sweep.core.factories import resolve_reference
from r2sweep.core.models import MODELS, build_model
from r2sweep.core.pretrained_file import load_pretrained
from r2sweep.core.graph import graph_notes
from r2sweep.core.warm_start import load_weights

__all__ = ["build_trial_data", "build_trial_model", "check_inputs", "check_output", "model_field", "model_from_pretrained",
           "uses_outside_code"]

_PROBE_BATCH = 4  # samples in the driver's one forward pass: enough for BatchNorm, cheap for any model


def model_field(config: TrialConfig) -> str:
    """The field an error about the trial's model names: ``model.factory`` or ``model.name``."""
    return "model.factory" if config.model.factory is not None else "model.name"


def _model_source(config: TrialConfig) -> tuple[str, Any]:
    model = config.model
    if model.factory is not None:
        return model_field(config), resolve_reference("model.factory", model.factory)
    return model_field(config), MODELS.get(model.name)


def build_trial_data(config: TrialConfig) -> DataSplits:
    """The train and validation splits of ``config.data``, seeded by ``config.seed``."""
    data = config.data
    if data.factory is not None:
        field, factory = "data.factory", resolve_reference("data.factory", data.factory)
    else:
        field, factory = "data.name", DATASETS.get(data.name)
    return build_data(factory, field=field, reference=data.reference, seed=config.seed, root=data.root,
                      val_fraction=data.val_fraction, options=data.options)


def build_trial_model(config: TrialConfig, data: DataSplits) -> tuple[nn.Module, list[str]]:
    """The model of ``config.model`` for ``data``, started from ``model.init_from`` when set,
    and the notes a person should read (what a non-strict load left as initialised)."""
    field, factory = _model_source(config)
    model = build_model(factory, field=field, reference=config.model.reference, num_classes=data.num_classes,
                        in_channels=data.in_channels, input_size=data.input_size, options=config.model.options)
    notes = []
    if config.model.init_from is not None:
        report = load_weights(model, config.model.init_from, strict=config.model.init_from_strict)
        if not report.complete:
            notes.append(f"init_from: {report.loaded} tensors loaded from {Path(config.model.init_from).name}; "
                         f"left as initialised: {report.describe()}")
    return model, notes


def model_from_pretrained(config: TrialConfig, path: str | Path) -> nn.Module:
    """The model of ``config``, the caller's own config (its factory is imported here), with the weights
    of a trial's ``pretrained.pt`` (eval mode, CPU). The file's shapes and class count size the model."""
    saved = load_pretrained(path)
    config.model.resolve()
    field, factory = _model_source(config)
    shape = saved.input_shape
    model = build_model(factory, field=field, reference=config.model.reference, num_classes=saved.num_classes,
                        in_channels=shape[0], input_size=shape[-1], options=config.model.options)
    load_state(model, saved.state)
    return model.eval()


def uses_outside_code(config: TrialConfig) -> bool:
    """Whether the trial builds from code or weights the package's own tests have not seen:
    a factory, a plugin, or a checkpoint. Those are what :func:`check_inputs` exists for."""
    model, data = config.model, config.data
    return bool(model.factory or data.factory or model.init_from or MODELS.origin(model.name)
                or DATASETS.origin(data.name))


@torch.no_grad()
def check_output(model: nn.Module, data: DataSplits, field: str, reference: str) -> None:
    """One batch of validation samples through ``model`` (eval mode): it must run and return
    ``(batch, num_classes)`` logits.

    Raises:
        ConfigError: naming ``field`` (``model.factory`` or ``model.name``), the batch's shape and what came back.
    """
    count = min(_PROBE_BATCH, len(data.val))
    batch = torch.stack([data.val[i][0] for i in range(count)]).to(next(model.parameters(), torch.empty(0)).device)
    was_training = model.training
    model.eval()
    try:
        out = model(batch)
    except Exception as error:  # noqa: BLE001 - the user's forward may raise anything; name the field
        raise ConfigError(field, reference, f"a model that runs on this data: a batch of shape "
                          f"{tuple(batch.shape)} raised {type(error).__name__}: {error}") from None
    finally:
        model.train(was_training)
    wanted = (count, data.num_classes)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != wanted:
        raise ConfigError(field, reference, f"a model that returns (batch, num_classes) = {wanted} logits "
                          f"for a batch of shape {tuple(batch.shape)}; it returned {shape} (the data has "
                          f"{data.num_classes} classes: a factory receives num_classes when its signature names it)")


@torch.no_grad()
def _check_train_output(model: nn.Module, data: DataSplits, field: str, reference: str) -> None:
    """Training calls the model in train mode, where some return more than logits (auxiliary heads).
    Run on a copy (a train-mode forward moves BatchNorm's statistics) with the RNG put back (dropout
    draws); a train-mode failure is training's to report, not this check's."""
    batch = torch.stack([data.val[i][0] for i in range(min(_PROBE_BATCH, len(data.val)))])
    with torch.random.fork_rng(devices=[]):
        try:
            out = copy.deepcopy(model).cpu().train()(batch)
        except Exception:  # noqa: BLE001 - e.g. BatchNorm on a batch of one: not what this check is about
            return
    if not isinstance(out, torch.Tensor):
        raise ConfigError(field, reference, f"a model that returns its logits in training mode too; in training "
                          f"mode it returned {type(out).__name__} (a model with auxiliary heads: turn them off, "
                          "for torchvision's googlenet and inception_v3 with aux_logits: false)")


def check_inputs(config: TrialConfig) -> list[str]:
    """Build the data and the model, load the checkpoint, run one batch; return the notes for the trial's log.

    Raises:
        ConfigError: naming the field: a factory that does not import or build or
            returns the wrong thing; a checkpoint that does not fit; a model that
            fails on a batch of this data or does not return ``(batch, num_classes)`` logits
            (in train mode: a tensor, not auxiliary heads).
        DataNotFoundError: a dataset's files are missing.
    """
    resolve_inputs(config)  # the factories' options against their signatures, init_from hashed
    data = build_trial_data(config)
    model, notes = build_trial_model(config, data)
    check_output(model, data, model_field(config), config.model.reference)
    _check_train_output(model, data, model_field(config), config.model.reference)
    return notes + graph_notes(model)
