"""The benchmark scripts build valid sweeps: a config change that breaks them fails here, not hours into a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import yaml

from r2sweep.sweep.spec import load_sweep_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
paper_effect = pytest.importorskip("paper_effect")
search_finds_it = pytest.importorskip("search_finds_it")


def _args(**overrides) -> argparse.Namespace:
    defaults = dict(root="/data/x", data_option=[], finetune=None, epochs=None, device="auto", trials=12, concurrency=2)
    return argparse.Namespace(**{**defaults, **overrides})


@pytest.mark.parametrize("data", sorted(paper_effect.SCALES))
@pytest.mark.parametrize("setting", sorted(paper_effect.SETTINGS))
def test_every_paper_effect_sweep_is_a_valid_spec(setting: str, data: str) -> None:
    scale = paper_effect.SCALES[data]
    base = paper_effect.trial_base(setting, scale, _args())
    for kind in ("none", *paper_effect.KINDS):
        spec = load_sweep_spec(paper_effect.sweep_spec(setting, kind, base, scale, _args()))
        assert spec.objective.metric == paper_effect.SETTINGS[setting]["objective"]
        assert spec.objective.metric in spec.trial.metric_names()
        searched = {p.path for p in spec.params}
        # Baseline and R2 alike tune learning rate and weight decay; each R2 kind also its strength.
        assert searched >= {"train.lr", "train.weight_decay"} | (set() if kind == "none" else {"r2.strength"})
        assert spec.trial.r2.kind == kind and spec.baseline_point is None


def test_qat_mbv1_sweeps_start_from_their_fixed_lr_winners_at_the_recipe_lr() -> None:
    import json

    results = json.loads((paper_effect.RESULTS / "paper_effect_distorted_digits.json").read_text())
    scale = paper_effect.SCALES["distorted_digits"]
    base = paper_effect.trial_base("qat-mbv1", scale, _args())
    earlier = results["superseded"][paper_effect.SETTINGS["qat-mbv1"]["start_from"]["run"]]["sweeps"]
    for kind in ("none", *paper_effect.KINDS):
        start = paper_effect.start_points(results, "qat-mbv1", kind)
        assert start == [{**earlier[kind]["config"], "downstream.0.lr": 0.01}]
        # Inside the searched ranges, or the sweep would refuse to start hours into a run.
        spec = load_sweep_spec(paper_effect.sweep_spec("qat-mbv1", kind, base, scale, _args(), start))
        assert spec.settings.start_points == tuple(start)
    assert paper_effect.start_points(results, "dkm-r18", "linf") == []


def test_the_dense_grid_covers_every_choice_and_respects_conditions() -> None:
    spec = load_sweep_spec(yaml.safe_load(search_finds_it.SPACE.read_text()))
    points = search_finds_it.grid(spec, 3)
    # none: 3 lr; linf, softminmax: 3 strengths x 3 lr; margin: x 3 margins.
    assert len(points) == 3 + 9 + 27 + 9
    assert all(("r2.strength" in p) == (p["r2.kind"] != "none") for p in points)
    assert all(("r2.margin_init" in p) == (p["r2.kind"] == "margin") for p in points)
    assert sorted({p["train.lr"] for p in points}) == pytest.approx([0.01, (0.01 * 0.2) ** 0.5, 0.2])  # log-spaced
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)


def _trial(kind: str, value: float | None, lr: float = 0.1) -> dict:
    config = {"r2.kind": kind, "train.lr": lr, **({"r2.strength": 0.1} if kind != "none" else {})}
    return {"config": config, "value": value}


def test_search_finds_it_scores_sweeps_against_the_grid_target(tmp_path: Path) -> None:
    grid = [_trial("none", 40.0), _trial("none", 30.0, lr=0.01), _trial("linf", 60.0), _trial("margin", None)]
    store = {
        "grid": grid,
        # Target: 40 + 0.9 * (60 - 40) = 58. Seed 0 reaches it on its third trial; seed 1 never does.
        "tpe": {"0": [_trial("none", 41.0), _trial("linf", 50.0), _trial("linf", 58.5)],
                "1": [_trial("none", 35.0), _trial("linf", None), _trial("linf", 57.9)]},
        "random": {"0": [_trial("none", 41.0), _trial("linf", 59.0), _trial("linf", 20.0)]},
    }
    base, best, goal = search_finds_it.target(store)
    assert (base, best) == (40.0, 60.0) and goal == pytest.approx(58.0)
    assert search_finds_it.reached_fraction(store["tpe"], goal, 3) == [0.0, 0.0, 0.5]
    assert search_finds_it.reached_fraction(store["random"], goal, 3) == [0.0, 1.0, 1.0]
    picks = search_finds_it.reseed_targets(store)
    assert picks["grid best R2"] == grid[2]["config"] and picks["grid best no-R2"] == grid[0]["config"]
    assert picks["tpe seed 1's pick"]["r2.kind"] == "linf" and picks["sweeps' best no-R2"]["r2.kind"] == "none"
    store["reseeded"] = {"grid best R2": {"config": {}, "seeds": [1, 2], "values": [56.0, 54.0]},
                         "grid best no-R2": {"config": {}, "seeds": [1, 2], "values": [45.0, 45.0]},
                         "tpe seed 0's pick": {"config": {}, "seeds": [1, 2], "values": [55.0, 54.0]}}
    summary = search_finds_it.summarize(store)
    assert "tpe seed 0: reached after 3 trials" in summary and "tpe seed 1: not reached in 3 trials" in summary
    assert "tpe: 1/2 seeds reached the target" in summary
    # Fresh seeds: 45 + 0.9 * (55 - 45) = 54; the pick's mean 54.5 reaches it.
    assert "the same target on fresh seeds: 54.00" in summary and "[reaches the fresh-seed target]" in summary
    search_finds_it.plot(store, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qat_recipe_measures_init_and_fine_tuning_and_reports_divergence() -> None:
    import torch

    from r2sweep.data import create_data
    from r2sweep.models import create_model

    qat_recipe = pytest.importorskip("qat_recipe")
    data = create_data("synthetic", num_samples=128, input_size=8)
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=data.num_classes, in_channels=data.in_channels,
                         input_size=data.input_size, width=0.25).eval()
    row = qat_recipe.one_recipe(model, "ewgs", 2, 2, data, argparse.Namespace(epochs=1, finetune_lr=0.01))
    assert (row["algorithm"], row["weight_bits"], row["act_bits"]) == ("ewgs", 2, 2)
    assert 0.0 <= row["initialized"] <= 100.0 and 0.0 <= row["fine_tuned"] <= 100.0 and "diverged" not in row
    assert not [name for name, _ in model.named_parameters() if "_quantizer." in name]  # the model is left as it was
    diverged = {**row, "diverged": "non-finite loss in qat fine-tuning, epoch 0: lower downstream.lr"}
    del diverged["fine_tuned"]
    lines = qat_recipe.table([row, diverged], epochs=1).splitlines()
    assert lines[0].endswith("| top-1 after 1 epochs |") and len(lines) == 4
    assert lines[2].startswith("| ewgs | W2A2 |") and lines[3].endswith("| diverged (non-finite loss in qat fine-tuning, epoch 0) |")
