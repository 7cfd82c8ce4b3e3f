"""The benchmark scripts build valid sweeps: a config change that breaks them fails here, not hours into a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
import yaml

from r2sweep.core.config.strict_yaml import load_file
from r2sweep.core.config.study import load_study_spec
from r2sweep.core.config.sweep import load_sweep_spec

# The scripts are imported as they are: one that no longer imports fails here, never skips.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_effect  # noqa: E402
import qat_recipe  # noqa: E402
import reconstruction  # noqa: E402
import scale  # noqa: E402
import search_finds_it  # noqa: E402


@pytest.mark.parametrize("setting", paper_effect.SETTINGS)
def test_every_paper_effect_setting_is_a_valid_study(setting: str) -> None:
    study = load_study_spec(load_file(paper_effect.STUDIES / f"{setting}.yaml"))
    assert study.name == setting and [s.kind for s in study.sweeps] == ["none", "linf", "margin", "softminmax"]
    for sweep in study.sweeps:
        spec = sweep.spec
        assert spec.objective.metric in spec.trial.metric_names()
        searched = {p.path for p in spec.params}
        # Baseline and R2 alike tune learning rate and weight decay; each R2 kind also its strength.
        assert searched >= {"train.lr", "train.weight_decay"} | (set() if sweep.kind == "none" else {"r2.strength"})
        assert spec.trial.r2.kind == sweep.kind and spec.baseline_point is None
    assert study.seeds == (1, 2, 3) and study.start_top == 1


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_the_scale_benchmark_is_a_valid_sweep_of_cheap_trials(sampler: str) -> None:
    spec = load_sweep_spec(scale.trial_spec(10_000, 2, sampler))
    assert spec.settings.num_samples == 10_000 and spec.settings.sampler == sampler
    assert spec.trial.train.epochs == 1 and spec.settings.pretrain_cache is False  # every trial trains, once


def test_the_four_settings_are_the_papers() -> None:
    assert paper_effect.SETTINGS == ["dkm-mbv2", "dkm-r18", "ptq-mbv2", "qat-mbv1"]
    # Every shipped study is one of them, or the quickstart's (not a paper setting).
    assert {p.stem for p in paper_effect.STUDIES.glob("*.yaml")} == {*paper_effect.SETTINGS, "quickstart"}
    qat = load_study_spec(load_file(paper_effect.STUDIES / "qat-mbv1.yaml"))
    # EWGS's fine-tuning lr is searched on both sides (a range-restricted model needs it lower).
    assert all("downstream.0.lr" in {p.path for p in s.spec.params} for s in qat.sweeps)


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


def test_qat_recipe_measures_init_and_fine_tuning_as_a_trial_does_and_reports_divergence(tmp_path: Path) -> None:
    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.data import create_data
    from r2sweep.core.build import model_from_pretrained
    from r2sweep.core.trial import run_trial

    data_options = {"num_samples": 128, "input_size": 8}

    def config(downstream: list[dict]):
        return load_trial_config({
            "seed": 0, "data": {"name": "synthetic", **data_options}, "model": {"name": "small_cnn", "width": 0.25},
            "train": {"epochs": 1, "batch_size": 32, "device": "cpu"}, "r2": {"kind": "none"}, "downstream": downstream,
        })

    def trial(downstream: list[dict], out: Path | None = None) -> dict[str, float]:
        return run_trial(config(downstream), out_dir=out)

    # The same recipes as trials run them. lr 1e30: the first step overflows the quantizers'
    # steps and the loss turns non-finite, which the trial reports as <result>/diverged.
    qat = {"method": "qat", "weight_bits": [2], "act_bits": 2, "epochs": 1}
    tuned = trial([{**qat, "algorithm": "ewgs", "lr": 0.1}, {**qat, "algorithm": "lsq", "lr": 1e30}], tmp_path / "trial")
    assert tuned["qat_lsq_w2a2/diverged"] == 1 and "qat_lsq_w2a2/top1" not in tuned
    # The same pre-training (seeded), then no fine-tuning: the accuracy right after initialization.
    initialized = trial([{**qat, "algorithm": "ewgs", "epochs": 0}, {**qat, "algorithm": "lsq", "epochs": 0}])

    model = model_from_pretrained(config([]), tmp_path / "trial" / "pretrained.pt")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    data = create_data("synthetic", seed=0, **data_options)
    row = qat_recipe.one_recipe(model, "ewgs", 2, 2, data, argparse.Namespace(epochs=1, finetune_lr=0.1))
    assert (row["algorithm"], row["weight_bits"], row["act_bits"]) == ("ewgs", 2, 2) and "diverged" not in row
    # The script measures what a trial at seed 0 would: its two numbers are the trials' results.
    assert row["initialized"] == initialized["qat_ewgs_w2a2/top1"]
    assert row["fine_tuned"] == tuned["qat_ewgs_w2a2/top1"]
    assert row["fine_tuned"] != row["initialized"]  # fine-tuning moved it: the two cannot be swapped unseen
    diverged = qat_recipe.one_recipe(model, "lsq", 2, 2, data, argparse.Namespace(epochs=1, finetune_lr=1e30))
    assert "fine_tuned" not in diverged and diverged["initialized"] == initialized["qat_lsq_w2a2/top1"]
    assert diverged["diverged"] == ("non-finite loss in qat fine-tuning, epoch 1, also at 0.01 x the lr with clipped "
                                    "gradients: lower downstream.lr")
    # The model is left as it was: no quantizer on it, every weight unchanged.
    assert not [name for name, _ in model.named_parameters() if "_quantizer." in name]
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())

    lines = qat_recipe.table([row, diverged], epochs=1).splitlines()
    assert lines[0] == "| algorithm | W/A bits | top-1 after init | top-1 after 1 epochs |" and len(lines) == 4
    assert lines[2] == f"| ewgs | W2A2 | {row['initialized']:.1f} | {row['fine_tuned']:.1f} |"
    assert lines[3] == (f"| lsq | W2A2 | {diverged['initialized']:.1f} | diverged (non-finite loss in qat fine-tuning, "
                        "epoch 1, also at 0.01 x the lr with clipped gradients) |")


@pytest.mark.parametrize("setting", reconstruction.SETTINGS)
def test_the_reconstruction_benchmark_runs_every_algorithm_on_one_pre_trained_model(setting: str) -> None:
    from r2sweep.core.config.trial import load_trial_config

    _, knobs, bit_pairs = reconstruction.SETTINGS[setting]
    config = load_trial_config(reconstruction.trial_config(setting, 2, argparse.Namespace(
        iters=300, round_lr=0.01, algorithms=list(reconstruction.ALGORITHMS), bits=None)))
    assert config.seed == 2 and (config.train.lr, config.train.weight_decay) == (knobs["lr"], knobs["weight_decay"])
    assert config.result_names() == [f"ptq_{a}_w{w}a{b}" for w, b in bit_pairs for a in reconstruction.ALGORITHMS]
    assert {(e.adaround_iters, e.adaround_lr, e.bn_reestimate) for e in config.downstream} == {(300, 0.01, True)}
    w, a = bit_pairs[0]  # --bits keeps only the pairs named
    only = load_trial_config(reconstruction.trial_config(setting, 2, argparse.Namespace(
        iters=300, round_lr=0.01, algorithms=["brecq"], bits=[f"{w}/{a}"])))
    assert only.result_names() == [f"ptq_brecq_w{w}a{a}"]


def test_the_reconstruction_summary_groups_seeds_and_draws_a_panel_per_setting_and_bits(tmp_path) -> None:
    knobs = "iters500/lr0.01"
    results = {
        f"mbv2/seed{seed}/{knobs}": {"ptq_adaround_w2a8/top1": a8, "ptq_brecq_w2a8/top1": b8, "ptq_brecq_w2a4/top1": b4,
                                      "time/ptq_brecq_w2a8_s": 200.0 + seed}
        for seed, a8, b8, b4 in ((1, 70.0, 80.0, 50.0), (2, 74.0, 84.0, 52.0))}
    results[f"r18/seed1/{knobs}"] = {"ptq_qdrop_w2a4/top1": 60.0, "fp/top1": 75.0}
    results[f"mbv2/seed1/{knobs}"]["time/ptq_adaround_w2a8_s"] = 100.0  # one seed's cost only
    rows = reconstruction.summary(results)
    brecq = rows[f"mbv2 ({knobs})", "ptq_brecq_w2a8"]
    assert brecq["values"] == [80.0, 84.0] and brecq["mean"] == 82.0 and brecq["cost"] == 201.5
    assert brecq["sd"] == pytest.approx(2 ** 0.5 * 2)
    assert rows[f"r18 ({knobs})", "ptq_qdrop_w2a4"]["sd"] == 0.0  # one seed: no spread
    assert rows[f"mbv2 ({knobs})", "ptq_adaround_w2a8"]["cost"] == 100.0  # over the seeds that hold a cost
    assert rows[f"mbv2 ({knobs})", "ptq_brecq_w2a4"]["cost"] != rows[f"mbv2 ({knobs})", "ptq_brecq_w2a4"]["cost"]  # none: nan
    by_panel = reconstruction.panels(results)
    assert list(by_panel) == [f"mbv2\nW2A4 ({knobs})", f"mbv2\nW2A8 ({knobs})", f"r18\nW2A4 ({knobs})"]
    assert set(by_panel[f"mbv2\nW2A8 ({knobs})"]) == {"adaround", "brecq"}
    assert by_panel[f"r18\nW2A4 ({knobs})"]["fp"]["mean"] == 75.0  # the float line, where results hold it
    assert "| mbv2 (iters500/lr0.01) | ptq_adaround_w2a8 | 72.0 +- 2.8 | 2 | 100 |" in reconstruction.table(results)
    # Paired: each seed's BRECQ against its own AdaRound at the same bits; W2A4 has no AdaRound to pair with.
    assert reconstruction.paired(results) == {(f"mbv2 ({knobs})", "ptq_brecq_w2a8"): [10.0, 10.0]}
    assert "| mbv2 (iters500/lr0.01) | ptq_brecq_w2a8 | +10.0 +- 0.0 | +10.0, +10.0 |" in reconstruction.paired_table(results)
    png = reconstruction.plot(results, tmp_path / "bars.png")
    assert png.read_bytes().startswith(b"\x89PNG")
