"""One rule for which weights are low-bit: R2 restricts exactly the weights the quantizers quantize.

Checked on structures where a per-module rule could drift apart: attention (an
``out_proj`` Linear subclass read as ``.weight``, a bare ``in_proj_weight``), a
weight computed by a parametrization (weight norm), a classifier registered before
its stem, and weight tying. ``skip_first_last`` leaves out the layers the quantizers
keep at ``keep_first_last_bits``: the edges of the data flow, not of module order.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from r2sweep.core.graph import edge_layers, graph_notes, low_bit_layers
from r2sweep.core.losses import make_r2_loss, regularized_layers
from r2sweep.core.quant import DKMConfig, QATConfig, dkm_compress, quantization_aware_train
from r2sweep.core.quant.layers import quant_layers

CPU = torch.device("cpu")


class HeadFirst(nn.Module):
    """Classifier registered before the stem; a weight-normed middle layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1))
        self.body = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.body(torch.relu(self.mid(torch.relu(self.stem(x))))))
        return self.head(x.mean(dim=(2, 3)))


class TinyAttention(nn.Module):
    """Patch embedding, one attention layer, a head tied to a second projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.proj.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(self.proj(attended)).mean(dim=1)


MODELS = {"head_first": HeadFirst, "attention": TinyAttention}


def _quantized_names(model: nn.Module, method: str) -> set[str]:
    images = torch.randn(8, 3, 8, 8)
    labels = torch.randint(0, 3, (8,))
    loader = [(images, labels)]
    if method == "qat":
        quantized = quantization_aware_train(model, QATConfig(weight_bits=[4], epochs=1), 4, loader, images, CPU)
    else:
        quantized = dkm_compress(model, DKMConfig(weight_bits=[2], epochs=1), 2, loader, CPU)
    return {name for name, _ in quant_layers(quantized)}


@pytest.mark.parametrize("method", ["qat", "dkm"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_r2_restricts_exactly_the_layers_the_quantizers_wrap(name: str, method: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    restricted = {layer for layer, _ in regularized_layers(model)}
    assert restricted == {layer for layer, _ in low_bit_layers(model)}
    assert restricted == _quantized_names(model, method)
    if name == "head_first":  # the weight-normed layer is neither, and the trial says so
        assert "mid" not in restricted and "stem" in restricted
        assert any("computed weight (mid" in note and "stay float" in note for note in graph_notes(model))
    else:  # out_proj is a Linear read as .weight: both; the bare in_proj_weight: neither, said
        assert "attention.out_proj" in restricted
        assert any("in_proj_weight" in note for note in graph_notes(model))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_skip_first_last_skips_the_layers_kept_at_high_bits_by_data_flow(name: str) -> None:
    model = MODELS[name]()
    edges = edge_layers(model)
    kept = {layer for layer, _ in regularized_layers(model, skip_first_last=True)}
    everything = {layer for layer, _ in regularized_layers(model)}
    assert kept == {layer for layer in everything if not edges.first_or_last(layer)}
    if name == "head_first":  # module order would have skipped the head and the body, not the stem
        assert kept == {"body"} and "stem" in edges.first and "head" in edges.last
    loss = make_r2_loss(model, "linf", 0.1, skip_first_last=True)
    assert loss.layer_names == [layer for layer, _ in regularized_layers(model) if layer in kept]
    loss().backward()
    grads = {layer for layer, module in low_bit_layers(model) if module.weight.grad is not None}
    tied = {"head"} if name == "attention" else set()  # the head's weight is proj's: restricted through proj
    assert grads == kept | tied
