"""Fine-tuning that holds on a model it has never seen (issue 41).

QAT and DKM follow the pre-training's optimizer and a fifth of its lr unless told
otherwise; LSQ starts on PTQ's grid; the best epoch is kept, the start included, and a
result no better than its start says so; a non-finite loss is retried at a smaller lr
with clipped gradients before it is reported as diverged. Real training on tiny models.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import r2sweep
from r2sweep.core.quant import QATConfig
from r2sweep.core.quant.fake import QuantSpec, weight_qparams
from r2sweep.core.quant.fine_tune_loop import CLIP_NORM, RETRY_LR_FACTOR, Recipe, fine_tune
from r2sweep.core.quant.qat import LsqQuantizer

CPU = torch.device("cpu")


def test_an_unset_optimizer_and_lr_follow_the_pre_training() -> None:
    assert QATConfig().recipe("adam", 1e-3) == Recipe("adam", pytest.approx(2e-4), pytest.approx(2e-4),
                                                      "from the pre-training's optimizer (adam), 0.2 x its lr 0.001")
    assert QATConfig().recipe("sgd", 0.05).lr == pytest.approx(0.01)  # the package's recipe: as before
    chosen = QATConfig(optimizer="sgd", lr=0.003, quant_lr=0.001).recipe("adam", 1e-3)
    assert (chosen.optimizer, chosen.lr, chosen.quantizer_lr, chosen.source) == ("sgd", 0.003, 0.001, "as set")
    assert "adam at lr 0.0002" in QATConfig().recipe("adam", 1e-3).describe()


def test_a_bad_optimizer_or_start_names_the_field() -> None:
    from r2sweep.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"downstream\.optimizer.*'sgd', 'adam'"):
        QATConfig(optimizer="rmsprop")
    with pytest.raises(ConfigError, match=r"downstream\.start.*'ptq', 'paper'"):
        QATConfig(start="zero")


def test_lsq_started_from_ptq_has_ptqs_mse_step() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 2.0, 6)[:, None, None, None]
    quantizer = LsqQuantizer(4, True, 6, mse_start=True)
    quantizer(weight)
    scale, _ = weight_qparams(weight, QuantSpec(4, symmetric=True, granularity="channel", range="mse"))
    assert torch.allclose(quantizer.step, scale.reshape(-1), rtol=1e-6)
    paper = LsqQuantizer(4, True, 6)
    paper(weight)
    assert not torch.allclose(paper.step, quantizer.step)


class _OnceNonFinite:
    """A loader whose very first batch overflows (an unlucky batch), the rest clean."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.served = 0

    def __iter__(self):
        for x, y in self.batches:
            self.served += 1
            yield (x * math.inf if self.served == 1 else x), y


def test_a_non_finite_loss_restarts_the_epoch_at_a_smaller_lr_with_clipped_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    outcome = fine_tune(model, _OnceNonFinite(batches), QATConfig(epochs=2), CPU, recipe=Recipe("sgd", 0.1, 0.1),
                        on_epoch=lambda epoch, loss: losses.append(loss))
    assert len(outcome.remedies) == 1 and f"{RETRY_LR_FACTOR:g} x the lr" in outcome.remedies[0]
    assert f"norm {CLIP_NORM:g}" in outcome.remedies[0] and outcome.epochs == 2 and len(losses) == 2
    assert all(math.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # it did train


def _trial(qat: dict) -> dict:
    return r2sweep.run_trial({
        "data": {"name": "digits"}, "model": {"name": "small_cnn", "width": 0.25},
        "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.01},
        "proxy": {"result": "fp"},
        "downstream": [{"method": "qat", "algorithm": "lsq", "weight_bits": [4], "epochs": 1, **qat}],
    })


def test_a_fine_tuning_that_only_hurts_keeps_its_start_and_says_so() -> None:
    metrics = _trial({"optimizer": "sgd", "lr": 3.0})  # an lr that wrecks the network in one epoch
    assert metrics["qat_lsq_w4a8/kept_epoch"] == 0
    assert metrics["qat_lsq_w4a8/top1"] == metrics["qat_lsq_w4a8/start_top1"] > 50
    assert "qat_lsq_w4a8: no fine-tuning epoch beat its start" in metrics["notes"]


def test_the_default_recipe_fine_tunes_an_adam_model_and_keeps_an_epoch() -> None:
    metrics = _trial({})  # Adam at 0.2 x 0.01: the epoch improves on the PTQ-grid start
    assert metrics["qat_lsq_w4a8/kept_epoch"] == 1
    assert metrics["qat_lsq_w4a8/top1"] > metrics["qat_lsq_w4a8/start_top1"] > 50
    assert "no fine-tuning epoch beat" not in metrics.get("notes", "")


def test_keep_last_keeps_the_last_epoch_and_scores_nothing() -> None:
    metrics = _trial({"optimizer": "sgd", "lr": 3.0, "keep": "last"})  # the same wreck, kept
    assert "qat_lsq_w4a8/start_top1" not in metrics and "qat_lsq_w4a8/kept_epoch" not in metrics
    assert metrics["qat_lsq_w4a8/top1"] < 50
