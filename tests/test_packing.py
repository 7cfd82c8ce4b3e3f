"""Packing a quantized weight into codes and grids (r2sweep.core.quant.packing): exact for every method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from r2sweep.core.data import create_data
from r2sweep.core.models import create_model
from r2sweep.core.quant.fake import QuantSpec, quantize_weight
from r2sweep.core.quant.layers import layer_bits, quant_layers
from r2sweep.core.quant.methods import DOWNSTREAM_METHODS, DownstreamContext, load_downstream
from r2sweep.core.quant.size import GRID_BYTES, model_size
from r2sweep.core.quant.packing import UNIFORM_GRID_BYTES, pack_codes, pack_weight, unpack_codes, unpack_weight

CPU = torch.device("cpu")


@pytest.mark.parametrize("width", range(1, 9))
def test_codes_pack_to_their_width_and_back(width: int) -> None:
    codes = np.random.default_rng(width).integers(0, 2 ** width, size=1001)
    data = pack_codes(codes, width)
    assert len(data) == math.ceil(1001 * width / 8)
    assert np.array_equal(unpack_codes(data, width, 1001), codes)
    with pytest.raises(ValueError, match=f"does not fit {width} bits"):
        pack_codes(np.array([2 ** width]), width)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_round_to_nearest_grids_pack_as_uniform_grids_bit_for_bit(bits: int, symmetric: bool, granularity: str) -> None:
    torch.manual_seed(bits)
    weight = quantize_weight(torch.randn(24, 16, 3, 3) * 0.1, QuantSpec(bits, symmetric, granularity, "mse"))
    packed = pack_weight(weight, bits)
    assert torch.equal(unpack_weight(packed), weight)
    # Uniform (8 bytes), or for two levels a table of two floats (8 bytes too).
    assert all(grid.table is None or grid.table.size <= 2 for grid in packed.grids)
    grids = 1 if granularity == "tensor" else 24
    assert packed.nbytes == math.ceil(weight.numel() * bits / 8) + UNIFORM_GRID_BYTES * grids


def test_a_palette_packs_as_one_table_and_too_many_values_are_refused() -> None:
    centroids = torch.tensor([-0.31, -0.04, 0.013, 0.29])
    weight = centroids[torch.randint(0, 4, (8, 5, 3, 3))]
    packed = pack_weight(weight, 2)
    assert torch.equal(unpack_weight(packed), weight)
    assert len(packed.grids) == 1 and packed.grids[0].table.tolist() == sorted(centroids.tolist())
    assert packed.nbytes == math.ceil(weight.numel() * 2 / 8) + 4 * 4
    with pytest.raises(ValueError, match="holds 9 distinct values: more than 3 bits"):
        pack_weight(torch.arange(9.0).reshape(1, 9), 3)


@pytest.mark.parametrize("method", DOWNSTREAM_METHODS.names())
def test_every_method_s_weights_pack_exactly_at_their_width(method: str) -> None:
    torch.manual_seed(0)
    data = create_data("synthetic", seed=0, num_samples=64)
    model = create_model("small_cnn", num_classes=data.num_classes, in_channels=data.in_channels,
                         input_size=data.input_size, width=0.25).eval()
    fast = {"ptq": {"algorithm": "adaround", "adaround_iters": 5, "calib_samples": 32},
            "qat": {"epochs": 1, "batch_size": 32}, "dkm": {"epochs": 1, "batch_size": 32}}.get(method, {})
    (entry,) = load_downstream([{"method": method, "weight_bits": [2], **fast}])
    quantized = DOWNSTREAM_METHODS.get(method).quantize(model, entry, 2, DownstreamContext(data, 0, CPU, 32))
    keep = entry.rounding().keep_first_last_bits
    width = lambda layer: layer_bits(layer.first_or_last, 2, keep)  # noqa: E731
    packed_bytes = 0
    for name, layer in quant_layers(quantized):
        weight = layer.quantized_weight().detach()
        packed = pack_weight(weight, width(layer))
        assert torch.equal(unpack_weight(packed), weight), name
        packed_bytes += packed.nbytes
    # The size a result logs (r2sweep.core.quant.size) is what these packed weights take, plus the activations' grids.
    size = model_size(quantized, widths=width)
    activations = sum(GRID_BYTES for _, layer in quant_layers(quantized) if not isinstance(layer.input_quantizer, nn.Identity))
    assert size.codes + size.grids == packed_bytes + activations
