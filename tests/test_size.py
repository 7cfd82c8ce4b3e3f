"""A result's size in bytes at its bit width (r2sweep.core.quant.size), on real quantized models."""

from __future__ import annotations

import math

import pytest
import torch

from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.errors import ConfigError
from r2sweep.core.models import create_model
from r2sweep.core.quant.layers import quant_layers, wrap_layers
from r2sweep.core.quant.size import GRID_BYTES, fp32_bytes, model_size
from r2sweep.core.trial import run_trial
from torch import nn

from conftest import tiny_sweep

CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, in_channels=1, input_size=8, width=0.5).eval()


class _Grid(nn.Module):
    """A weight quantizer: per-tensor (``channel=False``) or per-channel uniform grid, or a lookup table."""

    def __init__(self, bits: int, channel: bool = False, table: list[float] | None = None) -> None:
        super().__init__()
        self.bits, self.channel, self.table = bits, channel, table

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            values = torch.tensor(self.table)
            return values[(w.unsqueeze(-1) - values).abs().argmin(-1)]
        top = w.abs().flatten(1).amax(1).view(-1, *[1] * (w.dim() - 1)) if self.channel else w.abs().max()
        step = top / (2 ** (self.bits - 1) - 0.5)
        return ((w / step - 0.5).round().clamp(-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) + 0.5) * step


def _quantized(**grid) -> nn.Module:
    return wrap_layers(_model(), lambda info: _Grid(**grid), lambda info: nn.Identity())


def _float_rest(model: nn.Module) -> int:
    """Bytes of everything but the quantized layers' weights, counted directly."""
    weights = {id(q.layer.weight) for _, q in quant_layers(model)}
    tensors = [t for m in model.modules() if not isinstance(m, _Grid)
               for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
    return 4 * sum(t.numel() for t in tensors if t.is_floating_point() and id(t) not in weights)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_a_per_tensor_grid_costs_its_codes_and_one_scale_per_layer(bits: int) -> None:
    model = _quantized(bits=bits)
    size = model_size(model, reference=_model(), widths=lambda layer: bits)
    layers = quant_layers(model)
    assert size.codes == sum(math.ceil(q.layer.weight.numel() * bits / 8) for _, q in layers)
    assert size.grids == GRID_BYTES * len(layers)
    assert size.floats == _float_rest(model)
    assert size.fp32 == fp32_bytes(_model()) == 4 * sum(p.numel() for p in _model().state_dict().values()
                                                        if p.is_floating_point())
    assert size.total == size.codes + size.grids + size.floats and size.ratio == size.total / size.fp32


def test_sizes_grow_with_the_bit_width_and_the_float_model_is_its_own_reference() -> None:
    sizes = [model_size(_quantized(bits=b), reference=_model(), widths=lambda layer, b=b: b).total for b in (1, 2, 4, 8)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    plain = model_size(_model())
    assert plain.codes == plain.grids == 0 and plain.total == plain.fp32 and plain.ratio == 1


def test_per_channel_grids_and_lookup_tables_are_counted_as_a_runtime_holds_them() -> None:
    per_channel = model_size(_quantized(bits=4, channel=True), widths=lambda layer: 4)
    layers = quant_layers(_quantized(bits=4, channel=True))
    assert per_channel.grids == sum(GRID_BYTES * q.layer.weight.shape[0] for _, q in layers)
    # Four non-uniform centroids shared by every channel (DKM's shape): one table of 4 floats per layer.
    palettized = _quantized(bits=2, table=[-0.1, -0.02, 0.01, 0.08])
    assert all(torch.unique(q.quantized_weight()).numel() == 4 for _, q in quant_layers(palettized))
    table = model_size(palettized, widths=lambda layer: 2)
    assert table.grids == 4 * 4 * len(layers)
    assert table.codes == sum(math.ceil(q.layer.weight.numel() * 2 / 8) for _, q in layers)


def test_every_result_of_a_trial_reports_its_size_and_an_objective_may_minimize_it() -> None:
    config = load_trial_config({"data": {"name": "synthetic", "num_samples": 128}, "model": {"width": 0.25},
                                "train": {"epochs": 1, "batch_size": 32},
                                "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2, 8]},
                                               {"method": "dkm", "weight_bits": [1], "epochs": 1}]})
    final = run_trial(config, device=CPU)
    for name in config.result_names():
        assert 0 < final[f"{name}/size_ratio"] < 1, name
        assert final[f"{name}/size_bytes"] == pytest.approx(final[f"{name}/size_ratio"] * final["fp/size_bytes"])
    assert final["ptq_rtn_w2a8/size_bytes"] < final["ptq_rtn_w8a8/size_bytes"]
    # DKM keeps the first and last layers at 8 bits as palettes: 256 centroids, a 1 KB table each.
    assert final["dkm_w1/size_bytes"] > 2 * 256 * 4

    data = tiny_sweep("sizes")
    data["objective"] = [{"metric": "ptq_rtn_w4a8/top1", "mode": "max"}, {"metric": "ptq_rtn_w4a8/size_bytes", "mode": "min"}]
    data["sweep"]["sampler"] = "nsga2"
    assert [o.metric for o in load_sweep_spec(data).objectives][1] == "ptq_rtn_w4a8/size_bytes"
    data["objective"][1]["metric"] = "ptq_rtn_w3a8/size_bytes"
    with pytest.raises(ConfigError, match=r"objective\[1\]\.metric.*ptq_rtn_w4a8/size_bytes"):
        load_sweep_spec(data)
