"""Pre-training: real training on real (embedded) data, checkpoints, resume."""

from __future__ import annotations

import pytest
import torch

from r2sweep.core.checkpoint import load_checkpoint, save_atomic
from r2sweep.core.config.sections import R2Config, TrainConfig, from_dict
from r2sweep.core.data import create_data, make_loader
from r2sweep.core.errors import ConfigError, TrialDiverged
from r2sweep.core.models import create_model
from r2sweep.core.train import pretrain


@pytest.fixture(scope="module")
def digits():
    return create_data("digits", seed=0)


class Preempted(Exception):
    """Stands for a trial killed between epochs."""


def _run(
    data, r2: R2Config, train: TrainConfig, seed: int = 0, stop_after: int | None = None, init_seed=None, **kwargs
):
    def record(metrics):
        history.append(metrics)
        if metrics["epoch"] == stop_after:
            raise Preempted

    torch.manual_seed(seed if init_seed is None else init_seed)
    model = create_model("small_cnn", num_classes=data.num_classes, in_channels=data.in_channels, input_size=data.input_size)
    loss = r2.build(model)
    history: list[dict] = []
    final = pretrain(
        model,
        loss,
        make_loader(data.train, train.batch_size, shuffle=True, seed=seed),
        make_loader(data.val, 256, shuffle=False, seed=seed),
        train,
        on_epoch=record,
        device=torch.device("cpu"),
        **kwargs,
    )
    return model, loss, final, history


STRENGTHS = {"linf": 0.1, "margin": 0.05, "softminmax": 0.05}


def test_every_kind_shrinks_weight_ranges_on_digits(digits):
    train = TrainConfig(epochs=3, lr=0.05)
    _, _, baseline, _ = _run(digits, R2Config(kind="none"), train)
    assert baseline["val/top1"] > 90
    for kind, strength in STRENGTHS.items():
        _, _, final, _ = _run(digits, R2Config(kind=kind, strength=strength), train)
        assert final["weights/max_abs"] < 0.9 * baseline["weights/max_abs"], kind
        assert final["weights/range"] < 0.9 * baseline["weights/range"], kind
        assert final["val/top1"] > 85, kind


def test_epoch_callback_reports_the_documented_metrics(digits):
    _, _, final, history = _run(digits, R2Config(kind="linf", strength=0.1), TrainConfig(epochs=2))
    assert [m["epoch"] for m in history] == [0, 1]
    for key in ("train/loss", "train/r2", "val/top1", "weights/max_abs", "weights/range", "weights/kurtosis", "lr"):
        assert key in history[-1]
    assert history[-1] == final
    assert history[1]["lr"] < history[0]["lr"]  # cosine schedule
    assert all(m["train/r2"] > 0 for m in history)


def test_start_epoch_delays_the_loss(digits):
    _, loss, _, history = _run(digits, R2Config(kind="margin", strength=0.05, start_epoch=2), TrainConfig(epochs=3))
    assert [m["train/r2"] == 0 for m in history] == [True, True, False]
    assert bool(loss.initialized)


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    data = create_data("synthetic", seed=3, num_samples=256)
    r2 = R2Config(kind="softminmax", strength=0.05)
    whole, *_ = _run(data, r2, TrainConfig(epochs=3, lr=0.05), seed=3)
    checkpoint = tmp_path / "state.pt"
    # Killed after 2 of 3 epochs, then resumed in fresh objects.
    with pytest.raises(Preempted):
        _run(data, r2, TrainConfig(epochs=3, lr=0.05), seed=3, checkpoint_path=checkpoint, stop_after=1)
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 1
    # The resumed run starts from other initial weights: the state must come from the checkpoint.
    resumed, loss, _, history = _run(
        data, r2, TrainConfig(epochs=3, lr=0.05), seed=3, init_seed=99, checkpoint_path=checkpoint
    )
    assert [m["epoch"] for m in history] == [2]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_holds_the_full_state_and_loads_weights_only(tmp_path, digits):
    checkpoint = tmp_path / "ckpt" / "state.pt"
    _run(digits, R2Config(kind="margin", strength=0.05), TrainConfig(epochs=1), checkpoint_path=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    assert {"model", "r2", "optimizer", "scheduler", "rng", "epoch", "metrics"} <= set(state)
    assert any(key.startswith("margins.") for key in state["r2"])
    assert list(checkpoint.parent.iterdir()) == [checkpoint]  # no temporary files left


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_atomic({"epoch": 1}, path)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_divergence_is_reported_not_trained_through(digits):
    with pytest.raises(TrialDiverged, match="train.lr or r2.strength"):
        _run(digits, R2Config(kind="none"), TrainConfig(epochs=1, lr=1e6, momentum=0.0))


def test_adam_and_step_schedule_train(digits):
    _, _, final, history = _run(
        digits,
        R2Config(kind="linf", strength=0.01),
        TrainConfig(epochs=2, optimizer="adam", lr=3e-3, schedule="step", step_epochs=1, step_gamma=0.5),
    )
    assert final["val/top1"] > 80
    assert history[1]["lr"] == pytest.approx(history[0]["lr"] * 0.5)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"epochs": 0}, "train.epochs"),
        ({"optimizer": "lion"}, "train.optimizer"),
        ({"lr": -1}, "train.lr"),
        ({"lr": "fast"}, "train.lr"),
        ({"schedule": "linear"}, "train.schedule"),
        ({"momentum": 1.0}, "train.momentum"),
        ({"device": "tpu"}, "train.device"),
        ({"precision": "fp8"}, "train.precision"),
        ({"precision": 16}, "train.precision"),
        ({"epoch": 3}, "train.epoch"),
    ],
)
def test_train_config_is_strict(section, field):
    with pytest.raises(ConfigError) as caught:
        from_dict(TrainConfig, section)
    assert str(caught.value).startswith(field + "=")


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        from_dict(TrainConfig, {"epoch": 3})


