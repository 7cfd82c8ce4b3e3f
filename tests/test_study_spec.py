"""A study file becomes its sweeps: each one validated as a search-space file, errors named as the study names them."""

from __future__ import annotations

import copy

import pytest

from r2sweep.core.config.study import load_study_spec, sampler_seed
from r2sweep.core.errors import ConfigError

STUDY = {
    "name": "mbv2",
    "data": {"name": "digits"},
    "model": {"name": "small_cnn", "width": 0.25},
    "train": {"epochs": 2, "lr": 0.02},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "baseline": {"trials": 4, "search": {"train.lr": {"loguniform": [0.005, 0.05]}}},
    "kinds": {"linf": {"trials": 3, "search": {"r2.strength": {"loguniform": [1e-3, 1.0]}}},
              "margin": {"search": {"r2.strength": {"loguniform": [1e-3, 1.0]},
                                    "r2.margin_init": {"choice": ["max", "3std"]}}}},
    "start_top": 2,
    "confirm": {"seeds": [1, 2, 3]},
    "sweep": {"max_concurrent": 2, "scheduler": "none"},
}


def test_a_study_is_a_baseline_sweep_then_one_sweep_per_kind_each_searching_the_baselines_knobs() -> None:
    study = load_study_spec(STUDY)
    assert [s.name for s in study.sweeps] == ["mbv2-baseline", "mbv2-linf", "mbv2-margin"]
    baseline, linf, margin = study.sweeps
    assert baseline.spec.trial.r2.kind == "none" and [p.path for p in baseline.spec.params] == ["train.lr"]
    assert linf.spec.trial.r2.kind == "linf" and [p.path for p in linf.spec.params] == ["r2.strength", "train.lr"]
    assert {p.path for p in margin.spec.params} == {"r2.strength", "r2.margin_init", "train.lr"}
    assert [s.spec.settings.num_samples for s in study.sweeps] == [4, 3, 12]
    assert all(not s.spec.settings.baseline and s.spec.settings.max_concurrent == 2 for s in study.sweeps)
    # Each sweep its own sampler seed, recorded in its file; fixed by the names.
    seeds = [s.mapping["sweep"]["seed"] for s in study.sweeps]
    assert len(set(seeds)) == 3 and seeds[1] == sampler_seed("mbv2", "mbv2-linf")
    assert study.seeds == (1, 2, 3) and study.start_top == 2
    assert linf.spec.objective.metric == "ptq_rtn_w4a8/top1"
    assert study.replicates == 1 and study.seed == 0


def test_replicates_repeat_the_plan_with_their_own_sampler_seeds_and_a_study_seed_moves_them_all() -> None:
    study = load_study_spec({**STUDY, "replicates": 2})
    assert [s.name for s in study.sweeps] == ["mbv2-baseline", "mbv2-linf", "mbv2-margin",
                                              "mbv2-baseline-r2", "mbv2-linf-r2", "mbv2-margin-r2"]
    assert [s.replicate for s in study.sweeps] == [1, 1, 1, 2, 2, 2]
    assert study.baseline_of(study.sweeps[4]).name == "mbv2-baseline-r2"  # each kind starts from its own search's
    seeds = [s.mapping["sweep"]["seed"] for s in study.sweeps]
    assert len(set(seeds)) == 6
    # Replicate 1 is the study as it was before replicates: the same names and sampler seeds.
    assert seeds[:3] == [s.mapping["sweep"]["seed"] for s in load_study_spec(STUDY).sweeps]
    reseeded = load_study_spec({**STUDY, "replicates": 2, "seed": 7})
    assert reseeded.seed == 7 and not set(seeds) & {s.mapping["sweep"]["seed"] for s in reseeded.sweeps}
    assert reseeded.sweeps[1].mapping["sweep"]["seed"] == sampler_seed("mbv2", "mbv2-linf", 7)


def _with(path: str, value) -> dict:
    raw = copy.deepcopy(STUDY)
    node = raw
    *parents, last = path.split("/")
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize(("path", "value", "message"), [
    ("kinds/linf/search/r2.strength", {"loguniform": [1.0, 0.1]}, "^kinds.linf.search.r2.strength.loguniform="),
    ("kinds/linf/trials", 0, "^kinds.linf.trials=0 is not valid: an integer >= 1"),
    ("kinds/lnif", {}, "^kinds='lnif' is not valid: R2 kinds"),
    ("kinds/linf/search/train.lr", {"loguniform": [0.01, 0.1]}, "^kinds.linf.search.train.lr=.*the baseline does not search"),
    ("baseline/search", {}, "^baseline.search=.*an untuned baseline is not a gain"),
    ("baseline/search/r2.strength", {"loguniform": [1e-3, 1.0]}, "^baseline.search.r2.strength=.*not of R2"),
    ("baseline/trails", 3, "^baseline.trails=3 is not valid: unknown field; did you mean 'trials'"),
    ("sweep/num_samples", 8, "^sweep.num_samples=8 is not valid: left to the study"),
    ("r2", {"kind": "linf"}, "^r2.kind='linf' is not valid: left to the study"),
    ("confirm/seeds", [1], r"^confirm.seeds=\[1\] is not valid: two or more distinct seeds"),
    ("objective", {"metric": "ptq_rtn_w2a8/top1"}, "^objective.metric='ptq_rtn_w2a8/top1' is not valid"),
    ("kinds", None, "^kinds=None is not valid: a mapping"),
    ("benchmark", 1, "^benchmark=1 is not valid: unknown section"),
    ("replicates", 1.5, "^replicates=1.5 is not valid: an integer >= 1"),
    ("seed", -1, "^seed=-1 is not valid: an integer >= 0"),
])
def test_a_bad_study_is_refused_naming_its_own_field(path, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_study_spec(_with(path, value))


def test_a_search_space_file_given_as_a_study_is_named_for_what_it_is() -> None:
    sweep_file = {k: v for k, v in STUDY.items() if k not in ("baseline", "kinds", "start_top", "confirm")}
    with pytest.raises(ConfigError, match=r"^search=\['train.lr'\] is not valid: not a study's section: this looks "
                                          r"like a search-space file \(r2sweep sweep FILE\)"):
        load_study_spec({**sweep_file, "search": {"train.lr": {"loguniform": [0.01, 0.1]}}})


def test_every_shipped_study_validates_and_says_which_replicates_it_was_measured_with() -> None:
    from pathlib import Path

    from r2sweep.core.config.strict_yaml import load_file

    files = sorted((Path(__file__).parent.parent / "search_spaces" / "studies").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        raw = load_file(path)
        assert "replicates" in raw, f"{path.name}: say which replicates its figures were measured with"
        assert load_study_spec(raw).replicates == raw["replicates"]
        comments = [line for line in path.read_text().splitlines() if line.startswith("#") and "replicates" in line]
        assert comments and any(unit in " ".join(comments) for unit in ("hour", "minute")), f"{path.name}: and its cost"
