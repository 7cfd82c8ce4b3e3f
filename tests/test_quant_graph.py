"""Models the package has never seen: first/last layers by data flow, BN folding, every method runs.

The models are defined here, unlike the registry's: a classifier registered before
its stem, a residual block, grouped and depthwise convs, SiLU, an ``amax`` pooling
head, Conv1d and Conv3d, and a forward fx cannot trace.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from r2sweep.core.quant import (
    ActivationQuantizer,
    DKMConfig,
    PTQConfig,
    QATConfig,
    bake_weights,
    conv_bn_pairs,
    dkm_compress,
    edge_layers,
    fold_batchnorm,
    graph_notes,
    post_training_quantize,
    quantization_aware_train,
)
from r2sweep.core.graph import QUANTIZABLE_TYPES
from r2sweep.core.quant.layers import quant_layers, wrap_layers
from r2sweep.core.quant.ptq import round_to_nearest

CPU = torch.device("cpu")
LOW, HIGH = 2, 8  # weight bits of the middle layers and of the first/last ones


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.bn(self.conv(x)))


class HeadFirstNet(nn.Module):
    """The classifier is registered first: module order says it is the first layer."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.classifier = nn.Linear(8, classes)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block = Residual(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.grouped_bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.stem_bn(self.stem(x)))
        x = self.block(x)
        x = self.act(self.grouped_bn(self.grouped(x)))
        x = self.act(self.depthwise_bn(self.depthwise(x)))
        return self.classifier(torch.amax(x, dim=(2, 3)))


class KeywordNet(nn.Module):
    """Keyword spotting: ``(N, features, time)`` through Conv1d, a depthwise Conv1d, mean over time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(10, 16, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.depthwise = nn.Conv1d(16, 16, 3, padding=1, groups=16, bias=False)
        self.depthwise_bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.depthwise_bn(self.depthwise(x)))
        return self.fc(x.mean(-1))


class Moody(nn.Module):
    """Branches on its data: ``torch.fx`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        if x.mean() > 0:
            x = x * 2
        return self.head(self.mid(x).mean((2, 3)))


def _with_stats(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``model`` in eval mode, its BNs given non-trivial affine parameters and running statistics."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape) * 2 + 0.5)
    return model.eval()


def _head_first() -> nn.Module:
    return _with_stats(HeadFirstNet(), (3, 8, 8))


def _inputs(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _distinct(model: nn.Module) -> dict[str, int]:
    return {name: torch.unique(w.layer.weight).numel() for name, w in quant_layers(model)}


def _assert_edges_high(distinct: dict[str, int], edges: set[str]) -> None:
    """Per-tensor grids: the edge layers hold more than ``2^LOW`` values, the others at most that."""
    assert set(distinct) >= edges
    for name, count in distinct.items():
        if name in edges:
            assert count > 2**LOW, (name, count)
        else:
            assert count <= 2**LOW, (name, count)


def _ptq(algorithm: str, **fields) -> PTQConfig:
    fields = {"granularity": "tensor", "act_bits": 4, **fields}
    return PTQConfig(algorithm=algorithm, weight_bits=[LOW], keep_first_last_bits=HIGH, calib_samples=32,
                     adaround_iters=5, **fields)


def _loader(shape: tuple[int, ...], classes: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, *shape, generator=g), torch.randint(classes, (8,), generator=g)) for _ in range(2)]


# --- edge layers --------------------------------------------------------------------


def test_edge_layers_follow_the_data_flow_not_the_module_order() -> None:
    model = HeadFirstNet()
    order = [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)]
    assert (order[0], order[-1]) == ("classifier", "depthwise")  # what module order would keep at 8 bits
    edges = edge_layers(model)
    assert edges.first == {"stem"} and edges.last == {"classifier"}
    assert edges.traced and edges.reason is None and graph_notes(model) == []
    wrap_layers(model, lambda info: nn.Identity(), lambda info: nn.Identity())
    marked = {name for name, w in quant_layers(model) if w.first_or_last}
    assert marked == {"stem", "classifier"}


def test_a_two_branch_stem_has_both_branches_first() -> None:
    class TwoStems(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 2)
            self.left = nn.Conv2d(3, 4, 3, padding=1)
            self.right = nn.Conv2d(3, 4, 1)
            self.mix = nn.Conv2d(8, 8, 1)

        def forward(self, x: Tensor) -> Tensor:
            x = torch.cat([self.left(x), self.right(x)], dim=1)
            return self.head(self.mix(x).mean((2, 3)))

    edges = edge_layers(TwoStems())
    assert edges.first == {"left", "right"} and edges.last == {"head"}


def test_tracing_leaves_the_model_as_it_was_and_is_cached_until_modules_change() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            # A tensor made in forward: fx stores it on the root as _tensor_constant0.
            return self.fc(self.drop(self.conv(x + torch.ones(1))).mean((2, 3)))

    model = Constant().train()
    before = set(vars(model))
    edges = edge_layers(model)
    assert set(vars(model)) == before and all(m.training for m in model.modules())
    assert edge_layers(model) is edges  # cached
    model.fc = nn.Linear(2, 2)  # a replaced module: traced again
    assert edge_layers(model) is not edges and edge_layers(model) == edges


# --- BatchNorm folding --------------------------------------------------------------


def test_fold_batchnorm_folds_every_pair_and_keeps_the_output() -> None:
    model = _head_first()
    pairs = conv_bn_pairs(model)
    assert sorted(pairs) == sorted([("stem", "stem_bn"), ("block.conv", "block.bn"), ("grouped", "grouped_bn"),
                                    ("depthwise", "depthwise_bn")])
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = _inputs(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_conv_subclass_with_its_own_forward_is_an_edge_but_never_folded() -> None:
    class Standardized(nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            w = self.weight
            return self._conv_forward(x, (w - w.mean()) / (w.std() + 1e-5), self.bias)

    model = _with_stats(nn.Sequential(Standardized(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2)),
                        (3, 8, 8))
    assert edge_layers(model).first == {"0"} and conv_bn_pairs(model) == []


def test_conv1d_and_conv3d_models_fold_and_quantize() -> None:
    kws = _with_stats(KeywordNet(), (10, 20))
    cube = _with_stats(nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                                     nn.Conv3d(4, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(4 * 64, 2)),
                       (1, 4, 4, 4))
    for model, shape, edges in ((kws, (10, 20), {"conv", "fc"}), (cube, (1, 4, 4, 4), {"0", "5"})):
        assert len(conv_bn_pairs(model)) == (2 if model is kws else 1)
        x = _inputs(4, *shape)
        with torch.no_grad():
            torch.testing.assert_close(fold_batchnorm(model)(x), model(x), rtol=1e-5, atol=1e-5)
        assert edge_layers(model).first | edge_layers(model).last == edges
        calibration = _inputs(32, *shape, seed=3)
        for cfg in (_ptq("rtn"), _ptq("adaround"), _ptq("adaround", bn_fold=False)):
            quantized = post_training_quantize(model, cfg, LOW, calibration)
            _assert_edges_high(_distinct(quantized), edges)
            with torch.no_grad():
                assert torch.isfinite(quantized(x)).all()


# --- every method on the head-first model -------------------------------------------


@pytest.mark.parametrize("cfg", [_ptq("rtn"), _ptq("adaround"), _ptq("adaround", bn_fold=False)],
                         ids=["rtn", "adaround", "adaround-unfolded"])
def test_ptq_keeps_the_stem_and_the_classifier_at_8_bits(cfg: PTQConfig) -> None:
    model = _head_first()
    quantized = post_training_quantize(model, cfg, LOW, _inputs(32, 3, 8, 8, seed=3))
    _assert_edges_high(_distinct(quantized), {"stem", "classifier"})
    bits = {name: w.input_quantizer.bits for name, w in quant_layers(quantized)}
    assert all(isinstance(w.input_quantizer, ActivationQuantizer) for _, w in quant_layers(quantized))
    assert bits == {"stem": 8, "block.conv": 4, "grouped": 4, "depthwise": 4, "classifier": 8}
    with torch.no_grad():
        assert torch.isfinite(quantized(_inputs(4, 3, 8, 8))).all()


def test_the_proxy_rounds_the_same_layers_as_ptq() -> None:
    model = _head_first()
    cfg = _ptq("rtn", act_bits=32)
    proxy = dict(round_to_nearest(model, cfg, LOW).named_modules())
    quantized = post_training_quantize(model, cfg, LOW, _inputs(32, 3, 8, 8, seed=3))
    for name, wrapper in quant_layers(quantized):
        assert torch.equal(proxy[name].weight, wrapper.layer.weight), name


@pytest.mark.parametrize("method", ["lsq", "dkm"])
def test_qat_and_dkm_keep_the_stem_and_the_classifier_at_8_bits(method: str) -> None:
    model = _head_first()
    loader = _loader((3, 8, 8), 3)
    if method == "lsq":
        cfg = QATConfig(algorithm="lsq", weight_bits=[LOW], act_bits=4, granularity="tensor", epochs=1,
                        keep_first_last_bits=HIGH)
        quantized = quantization_aware_train(model, cfg, LOW, loader, _inputs(16, 3, 8, 8), CPU)
    else:
        cfg = DKMConfig(weight_bits=[LOW], epochs=1, keep_first_last_bits=HIGH)
        quantized = dkm_compress(model, cfg, LOW, loader, CPU)
    bits = {name: w.weight_quantizer.bits for name, w in quant_layers(quantized)}
    assert bits == {"stem": 8, "block.conv": 2, "grouped": 2, "depthwise": 2, "classifier": 8}
    bake_weights(quantized)
    _assert_edges_high(_distinct(quantized), {"stem", "classifier"})


def test_qat_on_a_keyword_spotting_model() -> None:
    model = _with_stats(KeywordNet(), (10, 20))
    cfg = QATConfig(algorithm="ewgs", weight_bits=[LOW], act_bits=4, granularity="channel", epochs=1)
    quantized = quantization_aware_train(model, cfg, LOW, _loader((10, 20), 4), _inputs(16, 10, 20), CPU)
    assert {name for name, w in quant_layers(quantized) if w.first_or_last} == {"conv", "fc"}
    with torch.no_grad():
        assert torch.isfinite(quantized(_inputs(4, 10, 20))).all()


# --- a model fx cannot trace --------------------------------------------------------


def test_an_untraceable_model_falls_back_to_module_order_and_still_quantizes() -> None:
    model = _with_stats(Moody(), (3, 8, 8))
    edges = edge_layers(model)
    assert not edges.traced and edges.first == {"stem"} and edges.last == {"head"}
    assert edges.reason and "\n" not in edges.reason and len(edges.reason) <= 160
    notes = graph_notes(model)
    assert len(notes) == 1 and notes[0].startswith("model is not torch.fx-traceable (") and "\n" not in notes[0]
    assert "BatchNorm left unfolded" in notes[0]

    assert conv_bn_pairs(model) == []
    unfolded = fold_batchnorm(model)
    assert isinstance(unfolded.bn, nn.BatchNorm2d) and not unfolded.training and unfolded is not model
    x = _inputs(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(unfolded(x), model(x))

    calibration = _inputs(32, 3, 8, 8, seed=3)
    for cfg in (_ptq("rtn"), _ptq("adaround"), _ptq("adaround", bn_fold=False)):
        quantized = post_training_quantize(model, cfg, LOW, calibration)
        _assert_edges_high(_distinct(quantized), {"stem", "head"})
    proxy = round_to_nearest(model, _ptq("rtn"), LOW)
    assert torch.unique(proxy.mid.weight).numel() <= 2**LOW < torch.unique(proxy.stem.weight).numel()
