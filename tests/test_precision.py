"""train.precision (bf16/fp16 autocast), channels-last and worker loaders: real training on tiny models."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from r2sweep.core import precision as precision_module
from r2sweep.core.checkpoint import load_checkpoint
from r2sweep.core.config.sections import R2Config, TrainConfig, from_dict
from r2sweep.core.data import create_data, make_loader
from r2sweep.core.errors import ConfigError
from r2sweep.core.models import create_model
from r2sweep.core.precision import Precision
from r2sweep.core.quant.dkm import DkmClusterer
from r2sweep.core.quant.fine_tune_loop import fine_tune
from r2sweep.core.quant.layers import quant_layers
from r2sweep.core.quant.methods import (
    DOWNSTREAM_METHODS,
    DownstreamContext,
    load_downstream,
)
from r2sweep.core.quant.qat import LsqQuantizer
from r2sweep.core.train import make_optimizer, make_scheduler, pretrain, resolve_device

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return create_data("synthetic", seed=3, num_samples=256)


def _model(data, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=data.num_classes, in_channels=data.in_channels,
                        input_size=data.input_size, width=0.5)


def _pretrain(data, train: TrainConfig, r2: R2Config | None = None, seed: int = 3, init_seed: int | None = None,
              stop_after: int | None = None, **kwargs):
    model = _model(data, seed if init_seed is None else init_seed)
    loss = (r2 or R2Config(kind="softminmax", strength=0.05)).build(model)

    def record(metrics):
        if metrics["epoch"] == stop_after:
            raise KeyboardInterrupt  # stands for a trial killed between epochs

    final = pretrain(model, loss, make_loader(data.train, train.batch_size, shuffle=True, seed=seed),
                     make_loader(data.val, 256, shuffle=False, seed=seed), train, on_epoch=record, device=CPU, **kwargs)
    return model, loss, final


def test_bf16_pretraining_on_the_cpu_learns():
    easy = create_data("synthetic", seed=3, num_samples=512)
    _, _, final = _pretrain(easy, TrainConfig(epochs=2, batch_size=32, lr=0.05, precision="bf16"))
    assert final["val/top1"] > 80  # chance is 10%


def test_the_forward_is_bf16_and_the_r2_term_float32(data):
    model = _model(data)
    r2 = R2Config(kind="margin", strength=0.05).build(model)
    seen: dict[str, object] = {}
    model.register_forward_hook(lambda m, args, out: seen.setdefault("logits", out.dtype) and None)
    plain_r2 = r2.forward

    def spy():
        seen["r2_autocast"] = torch.is_autocast_enabled("cpu")
        value = plain_r2()
        seen.setdefault("r2", value.dtype)
        return value

    r2.forward = spy
    pretrain(model, r2, make_loader(data.train, 64, shuffle=True, seed=0), make_loader(data.val, 256, shuffle=False, seed=0),
             TrainConfig(epochs=1, precision="bf16"), device=CPU)
    assert seen == {"logits": torch.bfloat16, "r2_autocast": False, "r2": torch.float32}


def test_parameters_and_optimizer_state_stay_float32(data, tmp_path):
    checkpoint = tmp_path / "state.pt"
    model, loss, _ = _pretrain(data, TrainConfig(epochs=1, precision="bf16"), checkpoint_path=checkpoint)
    assert {p.dtype for p in [*model.parameters(), *loss.parameters()]} == {torch.float32}
    state = load_checkpoint(checkpoint)["optimizer"]["state"]
    assert state and {t.dtype for s in state.values() for t in s.values() if torch.is_tensor(t)} == {torch.float32}
    assert "scaler" not in load_checkpoint(checkpoint)  # bf16 needs no loss scaling


def test_fp32_is_the_plain_loop_bit_for_bit(data):
    """fp32 must run exactly the loop of before this work: compared with it written out."""
    train = TrainConfig(epochs=2, lr=0.05)
    model, *_ = _pretrain(data, train)

    reference = _model(data)
    r2 = R2Config(kind="softminmax", strength=0.05).build(reference)
    optimizer = make_optimizer(reference, r2, train)
    scheduler = make_scheduler(optimizer, train)
    loader = make_loader(data.train, train.batch_size, shuffle=True, seed=3)
    for epoch in range(train.epochs):
        r2.set_epoch(epoch)
        loader.set_epoch(epoch)
        reference.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(reference(x), y) + r2()
            loss.backward()
            optimizer.step()
        scheduler.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_resume_ends_where_an_uninterrupted_run_does(data, tmp_path):
    train = TrainConfig(epochs=3, lr=0.05, precision="bf16")
    whole, *_ = _pretrain(data, train)
    checkpoint = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _pretrain(data, train, checkpoint_path=checkpoint, stop_after=1)
    resumed, *_ = _pretrain(data, train, init_seed=99, checkpoint_path=checkpoint)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_fp16_checkpoint_holds_the_loss_scale(data, tmp_path, monkeypatch):
    # fp16 is refused on the CPU; let it through to test the scaler's checkpointing path here.
    monkeypatch.setattr(precision_module, "check_precision", lambda name, device=None, field="": name)
    checkpoint = tmp_path / "state.pt"
    _pretrain(data, TrainConfig(epochs=1, precision="fp16"), checkpoint_path=checkpoint)
    scaler = load_checkpoint(checkpoint)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    amp = Precision("fp16", CPU)
    amp.load_state_dict(scaler)
    assert amp.scaler.get_scale() == scaler["scale"]


def test_fp16_on_the_cpu_is_refused_naming_the_field(data):
    with pytest.raises(ConfigError) as caught:
        _pretrain(data, TrainConfig(epochs=1, precision="fp16", device="cpu"))
    assert caught.value.field == "train.precision"
    assert "CUDA" in str(caught.value) and "bf16" in str(caught.value)
    with pytest.raises(ConfigError, match=r"^train\.precision='fp16'.*CUDA"):
        resolve_device("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.precision"):
            resolve_device("auto", "fp16")  # "auto" resolving to the CPU counts
    assert resolve_device("cpu", "bf16") == CPU


@pytest.mark.parametrize("value", ["fp8", "float16", 16, None])
def test_bad_precisions_are_refused(value):
    with pytest.raises(ConfigError) as caught:
        from_dict(TrainConfig, {"precision": value})
    assert str(caught.value).startswith("train.precision=")
    if isinstance(value, str):
        assert "['fp32', 'bf16', 'fp16']" in str(caught.value)


def test_channels_last_only_on_cuda_and_only_with_conv2d(data):
    model = _model(data)
    Precision("fp32", CPU).prepare(model)
    assert all(p.is_contiguous() for p in model.parameters())  # the CPU keeps NCHW
    cuda_plan = Precision("fp32", torch.device("cuda"))  # prepare only changes the memory format
    cuda_plan.prepare(model)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert cuda_plan.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    mlp_plan = Precision("fp32", torch.device("cuda"))
    mlp_plan.prepare(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    assert not mlp_plan.channels_last


def test_qat_fine_tuning_under_bf16_keeps_quantizers_float32(data, monkeypatch):
    (entry,) = load_downstream([{"method": "qat", "epochs": 1, "batch_size": 64, "weight_bits": 4}])
    model, *_ = _pretrain(data, TrainConfig(epochs=1))
    seen = set()
    quantize = LsqQuantizer._quantize

    def spy(self, x):
        seen.add((torch.is_autocast_enabled("cpu"), self.step.dtype))
        return quantize(self, x)

    monkeypatch.setattr(LsqQuantizer, "_quantize", spy)
    context = DownstreamContext(data, 0, CPU, 64, precision="bf16")
    quantized = DOWNSTREAM_METHODS.get("qat").quantize(model, entry, 4, context)
    assert seen == {(False, torch.float32)}  # every quantizer call, calibration and fine-tuning
    assert all(p.dtype == torch.float32 for p in quantized.parameters())
    images = torch.stack([data.val[i][0] for i in range(4)])
    assert quantized(images).dtype == torch.float32


def test_dkm_centroids_are_float32_and_unchanged_by_autocast():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    plain, amp = DkmClusterer(2), DkmClusterer(2)
    expected = plain(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = amp(w)
    assert got.dtype == torch.float32 and amp.centroids.dtype == torch.float32
    assert torch.equal(got, expected) and torch.equal(amp.centroids, plain.centroids)


def test_dkm_fine_tuning_runs_under_bf16(data):
    (entry,) = load_downstream([{"method": "dkm", "epochs": 1, "batch_size": 64, "weight_bits": 2}])
    model, *_ = _pretrain(data, TrainConfig(epochs=1))
    quantized = DOWNSTREAM_METHODS.get("dkm").quantize(model, entry, 2, DownstreamContext(data, 0, CPU, 64, precision="bf16"))
    for _, layer in quant_layers(quantized):
        assert layer.weight_quantizer.centroids.dtype == torch.float32
        assert torch.unique(layer.quantized_weight()).numel() <= 2 ** (8 if layer.first_or_last else 2)


def test_fp16_fine_tuning_on_the_cpu_is_refused(data):
    (entry,) = load_downstream([{"method": "qat", "epochs": 1}])
    with pytest.raises(ConfigError, match=r"train\.precision.*CUDA"):
        fine_tune(_model(data), make_loader(data.train, 64, shuffle=True, seed=0), entry, CPU, precision="fp16")


# --- loaders with worker processes ----------------------------------------------------------


class _Augmented(Dataset):
    """A file-dataset stand-in (not a TensorDataset): random augmentation from all three global RNGs."""

    def __init__(self, n: int = 40) -> None:
        self.images = torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        noise = torch.rand(()) + random.random() + float(np.random.rand())
        return self.images[index] + noise, index % 10


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_worker_loaders_repeat_batches_per_seed_and_epoch():
    dataset = _Augmented()
    first = make_loader(dataset, 8, shuffle=True, seed=5, num_workers=2, prefetch_factor=2)
    second = make_loader(dataset, 8, shuffle=True, seed=5, num_workers=2)
    epoch0 = _epoch(first, 0)
    assert _same(epoch0, _epoch(second, 0))  # two runs, the same batches
    epoch1 = _epoch(first, 1)
    assert not _same(epoch0, epoch1)
    # The persistent workers have already loaded epochs 0 and 1: a fresh loader at epoch 1 agrees.
    state = torch.get_rng_state()
    assert _same(_epoch(make_loader(dataset, 8, shuffle=True, seed=5, num_workers=2), 1), epoch1)
    assert _same(_epoch(first, 0), epoch0)  # and going back repeats epoch 0
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    # Any worker count gives the same batches; the sample order is the serial path's.
    assert _same(_epoch(make_loader(dataset, 8, shuffle=True, seed=5, num_workers=1), 1), epoch1)
    serial = _epoch(make_loader(dataset, 8, shuffle=True, seed=5), 1)
    assert [y.tolist() for _, y in serial] == [y.tolist() for _, y in epoch1]
