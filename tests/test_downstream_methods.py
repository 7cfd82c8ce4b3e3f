"""Conformance of every registered downstream method (``downstream.N.method``).

Parametrized over the registry, so a method joins these tests by registering:
its config round-trips through its mapping, it refuses unknown and other methods'
fields naming the entry, it validates when built in Python, and the results its
handler produces in a real (tiny) trial are exactly the ones its config names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml
from torch import nn

from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.data import create_data
from r2sweep.core.errors import ConfigError
from r2sweep.core.models import create_model
from r2sweep.core.quant.methods import (
    DOWNSTREAM_METHODS,
    DownstreamContext,
    MethodConfig,
    downstream_fields,
    load_downstream,
    method_config,
    register_method,
)
from r2sweep.core.trial import run_trial

METHODS = DOWNSTREAM_METHODS.names()
# Keep the known methods' slow knobs small; a new method runs at its defaults.
FAST = {"ptq": {"adaround_iters": 5, "calib_samples": 32}, "qat": {"epochs": 1, "batch_size": 32},
        "dkm": {"epochs": 1, "batch_size": 32}}
TINY = {"data": {"name": "synthetic", "num_samples": 64}, "model": {"name": "small_cnn", "width": 0.25},
        "train": {"epochs": 1, "batch_size": 32}}
CPU = torch.device("cpu")


def _entry(method: str, **fields) -> dict:
    return {"method": method, **FAST.get(method, {}), **fields}


def test_the_registry_lists_today_s_methods_in_their_order() -> None:
    assert METHODS[:3] == ["ptq", "qat", "dkm"]


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trips_through_its_mapping(method: str) -> None:
    (entry,) = load_downstream([_entry(method, weight_bits=[2, 4], tag="t")])
    mapping = entry.to_mapping()
    assert type(entry) is method_config(method) and entry.method == mapping["method"] == method
    assert list(mapping) == list(method_config(method).field_names())
    assert load_downstream(yaml.safe_load(yaml.safe_dump(mapping))) == [entry]
    assert load_downstream(method_config(method)().to_mapping()) == [method_config(method)()]


@pytest.mark.parametrize("method", METHODS)
def test_an_unknown_field_is_refused_naming_the_entry(method: str) -> None:
    with pytest.raises(ConfigError, match="unknown field; did you mean 'weight_bits'") as caught:
        load_downstream([{"method": method}, {"method": method, "weight_bit": 2, "tag": "b"}])
    assert caught.value.field == "downstream[1].weight_bit"


@pytest.mark.parametrize("method", METHODS)
def test_another_method_s_field_is_refused_naming_its_users(method: str) -> None:
    own = set(method_config(method).field_names())
    foreign = [name for name in downstream_fields() if name not in own]
    for name in foreign:
        users = [m for m in METHODS if name in method_config(m).field_names()]
        value = getattr(method_config(users[0])(), name)
        with pytest.raises(ConfigError) as caught:
            load_downstream([{"method": method, name: value}])
        assert caught.value.field == f"downstream[0].{name}"
        assert f"not used by method {method} (only by {users})" in str(caught.value)


def test_a_qat_entry_refuses_adaround_iters() -> None:
    with pytest.raises(ConfigError, match=r"downstream\[0\]\.adaround_iters=10 is not valid: not used by method qat \(only by \['ptq'\]\)"):
        load_downstream([{"method": "qat", "adaround_iters": 10}])


@pytest.mark.parametrize("method", METHODS)
def test_a_config_built_in_python_is_validated_like_one_read(method: str) -> None:
    cls = method_config(method)
    with pytest.raises(ConfigError) as caught:
        cls(weight_bits=[9])
    assert caught.value.field == "downstream.weight_bits"
    with pytest.raises(ConfigError) as caught:
        cls(algorithm="no-such-algorithm")
    assert caught.value.field == "downstream.algorithm"
    assert caught.value.allowed == f"for method {method}: one of {list(cls.algorithms)}"


@pytest.mark.parametrize("method", METHODS)
def test_unused_fields_are_the_method_s_own(method: str) -> None:
    cls = method_config(method)
    for algorithm in cls.algorithms:
        unused = cls(algorithm=algorithm).unused_fields("downstream.3")
        assert {name.removeprefix("downstream.3.") for name in unused} <= set(cls.field_names()) - {"method", "algorithm"}
        assert all(why.startswith("downstream.3.") for why in unused.values())


def test_an_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        load_downstream([{"method": "pruning"}])
    assert caught.value.field == "downstream[0].method" and caught.value.allowed == f"one of {METHODS}"


@pytest.mark.parametrize("method", METHODS)
def test_the_handler_leaves_the_model_alone_and_returns_a_low_bit_copy(method: str) -> None:
    torch.manual_seed(0)
    data = create_data("synthetic", seed=0, num_samples=64)
    model = create_model("small_cnn", num_classes=data.num_classes, in_channels=data.in_channels,
                         input_size=data.input_size, width=0.25).eval()
    before = copy.deepcopy(model.state_dict())
    (entry,) = load_downstream([_entry(method)])
    quantized = DOWNSTREAM_METHODS.get(method).quantize(model, entry, entry.weight_bits[0], DownstreamContext(data, 0, CPU, 32))
    assert quantized is not model and not quantized.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    images = torch.stack([data.val[i][0] for i in range(4)])
    assert quantized(images).shape == (4, data.num_classes)


@pytest.mark.parametrize("method", METHODS)
def test_a_trial_reports_exactly_the_results_the_config_names(method: str) -> None:
    config = load_trial_config({**TINY, "downstream": [_entry(method, weight_bits=[4, 2]), _entry(method, weight_bits=3, tag="x")]})
    final = run_trial(config, device=CPU)
    reported = [key.removesuffix("/top1") for key in final if key.endswith("/top1") and key not in ("fp/top1", "proxy/top1")]
    assert reported == config.result_names() and len(set(reported)) == 3
    assert all(f"time/{name}_s" in final for name in reported)
    assert all(name.startswith(method) for name in reported) and reported[-1].endswith("_x")


def test_result_names_keep_today_s_spelling() -> None:
    entries = load_downstream([{"method": "ptq", "algorithm": "adaround", "weight_bits": 2},
                               {"method": "ptq", "algorithm": "rtn", "weight_bits": 4, "tag": "mse"},
                               {"method": "qat", "algorithm": "lsq", "weight_bits": 2, "act_bits": 2},
                               {"method": "dkm", "weight_bits": 1}])
    assert [e.result_names()[0] for e in entries] == ["ptq_adaround_w2a8", "ptq_rtn_w4a8_mse", "qat_lsq_w2a2", "dkm_w1"]
    assert [e.result_name("*") for e in entries] == ["ptq_adaround_w*a8", "ptq_rtn_w*a8_mse", "qat_lsq_w*a2", "dkm_w*"]


@dataclass
class _CopyConfig(MethodConfig):
    """A method with nothing to tune: the float model, copied (weights only, one algorithm)."""

    method: ClassVar[str] = "copy"
    algorithms: ClassVar[tuple[str, ...]] = ("identity",)
    default_algorithm: ClassVar[str] = "identity"
    weights_only: ClassVar[bool] = True


def test_a_registered_method_is_a_legal_entry_of_a_trial() -> None:
    def quantize(model: nn.Module, entry: _CopyConfig, weight_bits: int, context: DownstreamContext) -> nn.Module:
        return copy.deepcopy(model).eval()

    register_method(_CopyConfig)(quantize)
    try:
        config = load_trial_config({**TINY, "downstream": [{"method": "copy", "weight_bits": 4}]})
        assert config.result_names() == ["copy_w4"]
        final = run_trial(config, device=CPU)
        assert final["copy_w4/top1"] == final["fp/top1"]
        with pytest.raises(ConfigError, match=r"one of \['ptq', 'qat', 'dkm', 'copy'\]"):
            load_downstream([{"method": "nope"}])
    finally:
        DOWNSTREAM_METHODS.unregister("copy")
    assert "copy" not in DOWNSTREAM_METHODS
