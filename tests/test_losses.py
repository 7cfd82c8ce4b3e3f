"""R2-Loss: values and gradients against float64 formulas, and the module contract.

The conformance tests at the bottom are parametrized over the registry, so a new
kind registered with ``register_r2_loss`` is checked by all of them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from r2sweep.core.errors import ConfigError
from r2sweep.core.losses import R2_LOSSES, R2Loss, list_r2_losses, make_r2_loss, register_r2_loss
from r2sweep.core.losses import functional as F
from r2sweep.core.losses import native

# Every layer shape R2 meets: conv, first conv (3 input channels), depthwise,
# pointwise, linear.
LAYER_SHAPES = [(8, 4, 3, 3), (16, 3, 3, 3), (16, 1, 3, 3), (32, 16, 1, 1), (10, 64)]
GRANULARITIES = ["tensor", "channel"]
REL_TOL = 1e-4


def _rows(w: torch.Tensor, granularity: str) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if granularity == "channel" else w.reshape(1, -1)


def _squeeze(values: torch.Tensor, granularity: str) -> torch.Tensor:
    return values if granularity == "channel" else values.reshape(())


# --- float64 references: the formulas of R2LOSS.md section 2, written plainly ---
def ref_linf(w, granularity):
    return _squeeze(_rows(w, granularity).abs().amax(1), granularity)


def ref_margin(w, m, reduction, granularity):
    rows = _rows(w, granularity)
    hinge = (rows.abs() - m.abs().reshape(-1, 1)).clamp(min=0)
    reduced = hinge.mean(1) if reduction == "mean" else hinge.sum(1)
    return _squeeze(m.reshape(-1) ** 2 + reduced, granularity)


def ref_soft_min_max(w, alpha, eta, granularity):
    rows = _rows(w, granularity)
    a = alpha.reshape(-1, 1)
    smax = (rows * torch.softmax(a * rows, 1)).sum(1)
    smin = (rows * torch.softmax(-a * rows, 1)).sum(1)
    return _squeeze(smax - smin + eta * torch.exp(-alpha.reshape(-1)), granularity)


@pytest.fixture(params=["native", "eager"])
def smm_path(request):
    """Soft-Min-Max's two paths: the compiled kernel (CPU, float32) and eager PyTorch."""
    if request.param == "eager":
        with native.disabled():
            yield "eager"
        return
    if native.softminmax_library() is None:
        pytest.skip(f"no native Soft-Min-Max kernel here: {native.status()}")
    yield "native"


def _scalar_param(shape, granularity, value):
    size = (shape[0],) if granularity == "channel" else ()
    jitter = torch.rand(size, generator=torch.Generator().manual_seed(1))
    return torch.full(size, value, dtype=torch.float32) * (1 + 0.1 * jitter)


def _weights(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Heavy tails, like trained weights with outliers.
    w = torch.randn(shape, generator=generator) * 0.1
    w.view(-1)[torch.randint(w.numel(), (3,), generator=generator)] *= 8
    return w


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want).abs() / want.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_linf_value_and_gradient_match_float64(shape, granularity):
    w = _weights(shape).requires_grad_()
    w64 = w.detach().double().requires_grad_()
    got, want = F.linf(w, granularity=granularity), ref_linf(w64, granularity)
    assert _relative_error(got.detach(), want.detach()) < REL_TOL
    upstream = torch.rand(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    (got * upstream.float()).sum().backward()
    (want * upstream).sum().backward()
    assert torch.allclose(w.grad.double(), w64.grad, rtol=REL_TOL, atol=1e-7)


@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_margin_value_and_gradient_match_float64(shape, granularity, reduction):
    w = _weights(shape).requires_grad_()
    m = _scalar_param(shape, granularity, 0.15).requires_grad_()
    w64, m64 = (t.detach().double().requires_grad_() for t in (w, m))
    got = F.margin(w, m, reduction, granularity=granularity)
    want = ref_margin(w64, m64, reduction, granularity)
    assert _relative_error(got.detach(), want.detach()) < REL_TOL
    upstream = torch.rand(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    (got * upstream.float()).sum().backward()
    (want * upstream).sum().backward()
    assert torch.allclose(w.grad.double(), w64.grad, rtol=REL_TOL, atol=1e-7)
    assert torch.allclose(m.grad.double(), m64.grad, rtol=REL_TOL, atol=1e-6)


@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("alpha_times_max", [1.0, 5.0, 40.0, 200.0])
def test_soft_min_max_value_and_gradient_match_float64(shape, granularity, alpha_times_max, smm_path):
    w = _weights(shape).requires_grad_()
    alpha = _scalar_param(shape, granularity, alpha_times_max / float(w.detach().abs().max())).requires_grad_()
    w64, alpha64 = (t.detach().double().requires_grad_() for t in (w, alpha))
    got = F.soft_min_max(w, alpha, eta=0.7, granularity=granularity)
    want = ref_soft_min_max(w64, alpha64, 0.7, granularity)
    assert _relative_error(got.detach(), want.detach()) < REL_TOL
    upstream = torch.rand(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    (got * upstream.float()).sum().backward()
    (want * upstream).sum().backward()
    scale = w64.grad.abs().max()
    assert float((w.grad.double() - w64.grad).abs().max() / scale) < REL_TOL
    # alpha's gradient shrinks towards 0 as alpha grows; compare where it is not noise.
    assert torch.allclose(alpha.grad.double(), alpha64.grad, rtol=1e-2, atol=1e-9)


def test_linf_gradient_reaches_only_the_arg_max():
    w = _weights((16, 8, 3, 3)).requires_grad_()
    F.linf(w).backward()
    nonzero = w.grad.nonzero()
    assert len(nonzero) == 1
    assert tuple(nonzero[0]) == torch.unravel_index(w.detach().abs().argmax(), w.shape)
    assert float(w.grad.abs().sum()) == pytest.approx(1.0)


def test_linf_channel_gradient_reaches_one_weight_per_channel():
    w = _weights((16, 8, 3, 3)).requires_grad_()
    F.linf(w, granularity="channel").sum().backward()
    per_channel = (w.grad != 0).reshape(16, -1).sum(1)
    assert per_channel.tolist() == [1] * 16


def test_margin_gradient_reaches_only_weights_outside_the_margin_and_the_margin():
    w = _weights((16, 8, 3, 3)).requires_grad_()
    m = torch.tensor(0.2, requires_grad=True)
    F.margin(w, m).backward()
    outside = w.detach().abs() > 0.2
    assert outside.any() and (~outside).any()
    assert torch.equal(w.grad != 0, outside)
    assert torch.equal(w.grad[outside], torch.sign(w.detach()[outside]))
    # dR/dM = 2M - (number of weights outside |M|)
    assert float(m.grad) == pytest.approx(0.4 - int(outside.sum()))


def test_margin_sparse_and_dense_gradients_agree():
    w = _weights((8, 4, 3, 3))
    grads = []
    for sparse in (False, True):
        leaf = w.clone().requires_grad_()
        m = torch.tensor(0.1, requires_grad=True)
        F.margin(leaf, m, sparse_grad=sparse).backward()
        grads.append(leaf.grad.to_dense())
    assert torch.equal(grads[0], grads[1])


def test_soft_min_max_gradient_reaches_every_weight_most_at_the_extremes(smm_path):
    w = _weights((16, 8, 3, 3)).requires_grad_()
    alpha = torch.tensor(5.0 / float(w.detach().abs().max()), requires_grad=True)
    F.soft_min_max(w, alpha).backward()
    magnitude = w.grad.abs().reshape(-1)
    assert bool((magnitude > 0).all())
    flat = w.detach().reshape(-1)
    extremes = magnitude[[int(flat.argmax()), int(flat.argmin())]]
    assert bool((extremes > 10 * magnitude.median()).all())
    assert alpha.grad is not None and torch.isfinite(alpha.grad)


def test_soft_min_max_buffers_are_reused_and_guarded(smm_path):
    w = _weights((8, 4, 3, 3)).requires_grad_()
    alpha = torch.tensor(3.0, requires_grad=True)
    buffers = F.SoftMinMaxBuffers()
    F.soft_min_max(w, alpha, buffers=buffers).backward()
    def addresses():
        return {name: t.data_ptr() for name, t in {**buffers.saved, **buffers.scratch}.items()}

    kept = addresses()
    # The saved (rows, 2, K) exponentials; the eager backward adds two scratch buffers.
    assert len(kept) == (3 if smm_path == "eager" else 1)
    F.soft_min_max(w, alpha, buffers=buffers).backward()
    assert addresses() == kept
    # A second forward overwrites the saved buffers: the first graph must refuse to run.
    first = F.soft_min_max(w, alpha, buffers=buffers)
    F.soft_min_max(w, alpha * 2, buffers=buffers)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_soft_min_max_with_shared_buffers_matches_naive_autograd_on_several_layers(granularity, smm_path):
    # The fused path (both sides in one buffer, Python-float constants on one CPU row,
    # scratch shared by layers of different sizes, buffers reused across steps) against
    # the obvious float64 autograd formula, on random layers of the sizes a ResNet has.
    shapes = [(64, 32, 3, 3), (10, 512), (16, 3, 7, 7), (128, 64, 1, 1)]
    scratch: dict[str, torch.Tensor] = {}
    buffers = [F.SoftMinMaxBuffers(scratch=scratch) for _ in shapes]
    for step in range(2):  # the second step reuses every buffer with new weights
        for index, shape in enumerate(shapes):
            w = _weights(shape, seed=10 * step + index).requires_grad_()
            alpha = _scalar_param(shape, granularity, 5.0 / float(w.detach().abs().max())).requires_grad_()
            w64, alpha64 = (t.detach().double().requires_grad_() for t in (w, alpha))
            got = F.soft_min_max(w, alpha, granularity=granularity, buffers=buffers[index])
            want = ref_soft_min_max(w64, alpha64, 1.0, granularity)
            assert _relative_error(got.detach(), want.detach()) < REL_TOL
            upstream = torch.rand(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
            (got * upstream.float()).sum().backward()
            (want * upstream).sum().backward()
            assert float((w.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()) < REL_TOL
            assert torch.allclose(alpha.grad.double(), alpha64.grad, rtol=1e-4, atol=1e-9)


def test_functional_rejects_bad_arguments():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="granularity='row'"):
        F.linf(w, granularity="row")
    with pytest.raises(ValueError, match="reduction='max'"):
        F.margin(w, torch.tensor(0.1), reduction="max")
    with pytest.raises(ValueError, match="needs \\(4,\\)"):
        F.margin(w, torch.tensor(0.1), granularity="channel")


# --- the module --------------------------------------------------------------------
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 16, 1),  # pointwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


LEARNABLE = {"none": 0, "linf": 0, "margin": 1, "softminmax": 1}
# PyTorch initialises weights uniformly (max = 1.73 std): "1std" leaves weights outside.
OPTIONS = {"margin": {"margin_init": "1std"}, "softminmax": {"alpha_init": 4.0}}


def test_collects_conv_and_linear_weights_only():
    net = _net()
    r2 = make_r2_loss(net, "linf", 0.1)
    assert r2.layer_names == ["0", "3", "4", "7"]
    assert all(w.dim() > 1 for w in r2.weights)
    skipped = make_r2_loss(net, "linf", 0.1, skip_first_last=True)
    assert skipped.layer_names == ["3", "4"]


@pytest.mark.parametrize("kind", ["linf", "margin", "softminmax"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_module_equals_strength_times_sum_of_layer_penalties(kind, granularity):
    net = _net()
    r2 = make_r2_loss(net, kind, 0.3, granularity=granularity, reduction="sum", **OPTIONS.get(kind, {}))
    value = r2()
    expected = 0.0
    for i, w in enumerate(r2.weights):
        w64 = w.detach().double()
        if kind == "linf":
            expected += float(ref_linf(w64, granularity).sum())
        elif kind == "margin":
            expected += float(ref_margin(w64, r2.margins[i].detach().double(), "sum", granularity).sum())
        else:
            alpha = r2.alpha(i).detach().double()
            expected += float(ref_soft_min_max(w64, alpha, r2.eta, granularity).sum())
    assert value.item() == pytest.approx(0.3 * expected, rel=REL_TOL)


@pytest.mark.parametrize("kind", ["linf", "margin", "softminmax"])
def test_module_gradient_adds_to_the_task_gradient(kind):
    """Sparse or dense, what reaches .grad is task gradient + R2 gradient, dense."""
    net = _net()
    r2 = make_r2_loss(net, kind, 0.5, **OPTIONS.get(kind, {}))
    x = torch.randn(4, 3, 6, 6)
    r2().detach()  # initialise the learnable scalars
    task = net(x).square().mean()
    task_grads = torch.autograd.grad(task, r2.weights)
    for w in net.parameters():
        w.grad = None
    (net(x).square().mean() + r2()).backward()
    for w, task_grad in zip(r2.weights, task_grads):
        r2_only = w.grad - task_grad
        assert w.grad.layout == torch.strided
        assert r2_only.abs().sum() > 0


def test_r2_alone_leaves_dense_gradients_an_optimizer_accepts():
    net = _net()
    r2 = make_r2_loss(net, "margin", 0.5, margin_init="1std")
    optimizer = torch.optim.SGD(list(net.parameters()) + list(r2.parameters()), lr=0.1, weight_decay=1e-4, momentum=0.9)
    r2().backward()
    assert all(w.grad.layout == torch.strided for w in r2.weights)
    optimizer.step()


def test_margin_init_rules():
    net = _net()
    for rule, expected in [("max", lambda w: w.abs().max()), ("2.5std", lambda w: 2.5 * w.std()), (0.05, lambda w: 0.05)]:
        r2 = make_r2_loss(net, "margin", 0.1, margin_init=rule)
        r2()
        for w, m in zip(r2.weights, r2.margins):
            assert m.item() == pytest.approx(float(expected(w.detach())), rel=1e-5)


def test_alpha_init_sets_alpha_times_max_abs():
    net = _net()
    r2 = make_r2_loss(net, "softminmax", 0.1, alpha_init=5.0, granularity="channel")
    r2()
    for i, w in enumerate(r2.weights):
        max_abs = w.detach().reshape(w.shape[0], -1).abs().amax(1)
        assert torch.allclose(r2.alpha(i).detach() * max_abs, torch.full_like(max_abs, 5.0), rtol=1e-4)


def test_start_epoch_switches_the_loss_on_and_initialises_then():
    net = _net()
    r2 = make_r2_loss(net, "margin", 0.1, start_epoch=2)
    r2.set_epoch(1)
    assert r2().item() == 0.0 and not bool(r2.initialized)
    with torch.no_grad():
        net[0].weight.mul_(3)  # weights move before the switch-on
    r2.set_epoch(2)
    assert r2().item() > 0 and bool(r2.initialized)
    assert r2.margins[0].item() == pytest.approx(net[0].weight.abs().max().item())


# --- conformance: every registered kind ------------------------------------------
@pytest.fixture(params=list_r2_losses())
def kind(request):
    return request.param


def test_conformance_value_is_a_finite_scalar_and_zero_when_off(kind):
    net = _net()
    r2 = make_r2_loss(net, kind, 0.2)
    value = r2()
    assert value.shape == () and torch.isfinite(value)
    assert float(make_r2_loss(net, kind, 0.0)()) == 0.0
    late = make_r2_loss(net, kind, 0.2, start_epoch=3)
    assert float(late()) == 0.0


def test_conformance_parameters_are_only_its_own_scalars(kind):
    net = _net()
    for granularity in GRANULARITIES:
        r2 = make_r2_loss(net, kind, 0.2, granularity=granularity)
        model_params = {id(p) for p in net.parameters()}
        own = list(r2.parameters())
        assert not any(id(p) in model_params for p in own)
        expected_size = 1 if granularity == "tensor" else None
        for p in own:
            assert p.dim() <= 1 and (expected_size is None or p.numel() == expected_size)
        if kind in LEARNABLE:
            assert len(own) == LEARNABLE[kind] * len(r2.weights)


def test_conformance_state_dict_round_trip(kind):
    net = _net()
    r2 = make_r2_loss(net, kind, 0.2)
    value = r2()
    fresh = make_r2_loss(net, kind, 0.2)
    fresh.load_state_dict(r2.state_dict())
    assert bool(fresh.initialized) == bool(r2.initialized)
    assert fresh().item() == pytest.approx(value.item())


def test_conformance_training_step_changes_weights_and_scalars(kind):
    net = _net()
    r2 = make_r2_loss(net, kind, 1.0)
    optimizer = torch.optim.SGD(list(net.parameters()) + list(r2.parameters()), lr=0.01)
    r2()
    before = [p.detach().clone() for p in r2.parameters()]
    weights_before = [w.detach().clone() for w in r2.weights]
    # Two steps: a Margin initialised at max|W| has nothing outside it until M shrinks.
    for _ in range(2):
        optimizer.zero_grad()
        loss = r2()
        if loss.requires_grad:  # "none" is a constant zero
            loss.backward()
        optimizer.step()
    changed = [not torch.equal(a, w) for a, w in zip(weights_before, r2.weights)]
    assert all(changed) == (kind != "none")
    for old, new in zip(before, r2.parameters()):
        assert not torch.equal(old, new)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "l_inf"}, "r2.kind"),
        ({"kind": "linf", "strength": -0.1}, "r2.strength"),
        ({"kind": "linf", "strength": float("nan")}, "r2.strength"),
        ({"kind": "margin", "margin_init": "wide"}, "r2.margin_init"),
        ({"kind": "margin", "margin_init": -1.0}, "r2.margin_init"),
        ({"kind": "margin", "margin_init": "0std"}, "r2.margin_init"),
        ({"kind": "linf", "margin_init": "max"}, "r2.margin_init"),
        ({"kind": "softminmax", "alpha_init": 0}, "r2.alpha_init"),
        ({"kind": "softminmax", "eta": -1}, "r2.eta"),
        ({"kind": "linf", "reduction": "max"}, "r2.reduction"),
        ({"kind": "linf", "granularity": "row"}, "r2.granularity"),
        ({"kind": "linf", "start_epoch": -1}, "r2.start_epoch"),
        ({"kind": "linf", "skip_first_last": "yes"}, "r2.skip_first_last"),
    ],
)
def test_bad_options_name_the_field_the_value_and_what_is_allowed(kwargs, field):
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind")
    strength = kwargs.pop("strength", 0.1)
    with pytest.raises(ValueError) as caught:
        make_r2_loss(_net(), kind, strength, **kwargs)
    assert isinstance(caught.value, ConfigError)
    message = str(caught.value)
    assert message.startswith(field + "=")
    assert caught.value.allowed and caught.value.allowed in message


def test_a_fourth_kind_is_one_small_class():
    @register_r2_loss("l2range_test")
    class L2Range(R2Loss):
        def layer_penalty(self, index, weight):
            return weight.square().sum()

    try:
        assert "l2range_test" in list_r2_losses()
        net = _net()
        r2 = make_r2_loss(net, "l2range_test", 0.5)
        expected = 0.5 * sum(float(w.detach().square().sum()) for w in r2.weights)
        assert r2().item() == pytest.approx(expected, rel=1e-5)
    finally:
        R2_LOSSES.unregister("l2range_test")
