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


def test_the_dense_grid_covers_every_choice_and_respects_conditions() -> None:
    spec = load_sweep_spec(yaml.safe_load(search_finds_it.SPACE.read_text()))
    points = search_finds_it.grid(spec, 3)
    # none: 3 lr; linf, softminmax: 3 strengths x 3 lr; margin: x 3 margins.
    assert len(points) == 3 + 9 + 27 + 9
    assert all(("r2.strength" in p) == (p["r2.kind"] != "none") for p in points)
    assert all(("r2.margin_init" in p) == (p["r2.kind"] == "margin") for p in points)
    assert sorted({p["train.lr"] for p in points}) == pytest.approx([0.01, (0.01 * 0.2) ** 0.5, 0.2])  # log-spaced
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
