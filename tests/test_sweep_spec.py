"""The search-space file: validated in full, conditions as real define-by-run conditionals."""

from __future__ import annotations

import copy
import os
import pickle

import optuna
import pytest

from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.errors import ConfigError
from r2sweep.tune.space import make_sampler, make_space

SPEC = {
    "name": "unit",
    "data": {"name": "digits"},
    "model": {"name": "small_cnn"},
    "train": {"epochs": 2},
    "r2": {"kind": "none"},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2, 4]}],
    "objective": {"metric": "ptq_rtn_w2a8/top1", "mode": "max"},
    "search": {
        "r2.kind": {"choice": ["none", "linf", "margin"]},
        "r2.strength": {"loguniform": [1e-4, 1.0], "when": {"r2.kind": ["linf", "margin"]}},
        "r2.margin_init": {"choice": ["max", "3std"], "when": {"r2.kind": "margin"}},
        "train.lr": {"loguniform": [0.01, 0.2]},
        "train.epochs": {"int": [1, 3]},
    },
    "sweep": {"num_samples": 8, "max_concurrent": 2, "sampler": "tpe", "seed": 0},
}


def _with(path: str, value, spec=SPEC) -> dict:
    data = copy.deepcopy(spec)
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(parts[-1])
    else:
        node[parts[-1]] = value
    return data


_DELETE = object()


def test_a_good_spec_loads() -> None:
    spec = load_sweep_spec(SPEC)
    assert spec.name == "unit" and spec.objective.metric == "ptq_rtn_w2a8/top1"
    assert [p.path for p in spec.params] == ["r2.kind", "r2.strength", "r2.margin_init", "train.lr", "train.epochs"]
    assert spec.settings.num_samples == 8 and spec.settings.scheduler == "asha"
    config = spec.trial_config({"r2.kind": "margin", "r2.strength": 0.01, "r2.margin_init": "3std", "train.epochs": 3})
    assert config.r2.kind == "margin" and config.r2.margin_init == "3std" and config.train.epochs == 3


def _search(path: str, body) -> dict:
    data = copy.deepcopy(SPEC)
    data["search"] = {"r2.kind": SPEC["search"]["r2.kind"], path: body}
    return data


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({**SPEC, "serach": {}}, "serach", "did you mean 'search'"),
        (_with("objective.metric", "ptq_adaround_w2a8/top1"), "objective.metric", "ptq_rtn_w2a8/top1"),
        (_with("objective.mode", "maximize"), "objective.mode", "['max', 'min']"),
        (_with("objective", _DELETE), "objective", "metric"),
        (_with("sweep.num_samples", 0), "sweep.num_samples", ">= 1"),
        (_with("sweep.max_concurrent", "two"), "sweep.max_concurrent", "integer"),
        (_with("sweep.sampler", "bayes"), "sweep.sampler", "tpe"),
        (_with("sweep.scheduler", "hyperband"), "sweep.scheduler", "asha"),
        (_with("sweep.num_sample", 3), "sweep.num_sample", "did you mean 'num_samples'"),
        (_with("sweep.resources_per_trial", {"cpu": 0}), "sweep.resources_per_trial.cpu", "> 0"),
        (_with("sweep.resources_per_trial", {"cpu": 1, "gpu": 1.5}), "sweep.resources_per_trial.gpu", "fraction"),
        (_with("train.epochs", 0), "train.epochs", ">= 1"),
        (_search("r2.strength", {"loguniform": [1.0, 1e-4]}), "search.r2.strength.loguniform", "low < high"),
        (_search("r2.strength", {"loguniform": [0.0, 1.0]}), "search.r2.strength.loguniform", "0 < low"),
        (_search("r2.strength", {"uniform": [0.1]}), "search.r2.strength.uniform", "[low, high]"),
        (_search("r2.strength", {"uniform": [0, 1], "loguniform": [0.1, 1]}), "search.r2.strength", "exactly one"),
        (_search("r2.strength", {"choice": []}), "search.r2.strength.choice", "non-empty"),
        (_search("r2.strength", {"normal": [0, 1]}), "search.r2.strength.normal", "unknown key"),
        (_search("r2.strenght", {"uniform": [0, 1]}), "search.r2.strenght", "did you mean 'strength'"),
        (_search("r2.strength", {"uniform": [0, 1], "when": {"train.lr": [0.1]}}), "search.r2.strength.when.train.lr", "searched above"),
        (_search("r2.strength", {"uniform": [0, 1], "when": {"r2.kind": ["l2"]}}), "search.r2.strength.when.r2.kind", "['none', 'linf', 'margin']"),
        (_search("r2.margin_init", {"choice": ["max", "wide"], "when": {"r2.kind": "margin"}}), "search.r2.margin_init", "r2.margin_init"),
        (_search("train.epochs", {"int": [0, 3]}), "search.train.epochs", "train.epochs"),
        (_search("downstream.0.weight_bits", {"choice": [2, 9]}), "search.downstream.0.weight_bits", "1 to 8"),
        (_search("downstream.3.weight_bits", {"choice": [2]}), "search.downstream.3.weight_bits", "index below 1"),
    ],
)
def test_bad_specs_name_the_field(data: dict, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_sweep_spec(data)
    assert caught.value.field == field, str(caught.value)
    assert fragment in str(caught.value)


def test_empty_or_non_mapping_file() -> None:
    with pytest.raises(ConfigError, match="an empty file"):
        load_sweep_spec(None)
    with pytest.raises(ConfigError, match="a mapping"):
        load_sweep_spec([1])


def test_multi_objective_needs_a_multi_objective_sampler() -> None:
    data = _with("objective", [{"metric": "ptq_rtn_w2a8/top1", "mode": "max"}, {"metric": "fp/top1", "mode": "max"}])
    assert load_sweep_spec(data).multi_objective
    with pytest.raises(ConfigError, match="sweep.sampler"):
        load_sweep_spec(_with("sweep.sampler", "gp", data))


def test_space_samples_conditionals_only_where_they_apply() -> None:
    spec = load_sweep_spec(SPEC)
    space = make_space(spec.params)
    pickle.loads(pickle.dumps(space))  # OptunaSearch pickles it with the searcher state
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(spec.settings), direction="maximize")
    study.optimize(lambda t: (space(t), 0.0)[1], n_trials=30)
    kinds = set()
    for trial in study.trials:
        kind = trial.params["r2.kind"]
        kinds.add(kind)
        assert ("r2.strength" in trial.params) == (kind in ("linf", "margin"))
        assert ("r2.margin_init" in trial.params) == (kind == "margin")
        assert 1 <= trial.params["train.epochs"] <= 3
        assert 0.01 <= trial.params["train.lr"] <= 0.2
        spec.trial_config(trial.params)  # every sample is a valid trial
    assert kinds == {"none", "linf", "margin"}


def test_seeded_sampler_repeats_its_proposals() -> None:
    spec = load_sweep_spec(SPEC)

    def proposals() -> list[dict]:
        study = optuna.create_study(sampler=make_sampler(spec.settings), direction="maximize")
        space = make_space(spec.params)
        study.optimize(lambda t: (space(t), t.params.get("train.lr", 0))[1], n_trials=6)
        return [t.params for t in study.trials]

    assert proposals() == proposals()


def test_sampler_options_reach_the_sampler_and_a_wrong_one_names_the_field() -> None:
    import copy

    raw = copy.deepcopy(SPEC)
    raw["sweep"] = {**raw.get("sweep", {}), "sampler_options": {"n_startup_trials": 5, "constant_liar": True,
                                                                "multivariate": False}}
    sampler = make_sampler(load_sweep_spec(raw).settings)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert (sampler._n_startup_trials, sampler._constant_liar, sampler._multivariate, sampler._group) == (5, True, False, False)
    default = make_sampler(load_sweep_spec(SPEC).settings)
    assert (default._constant_liar, default._multivariate, default._group) == (True, True, True)  # Optuna 4's defaults
    for options, message in (({"n_startup": 5}, r"^sweep.sampler_options.n_startup=5 is not valid: an option of the tpe "
                                                r"sampler: one of \['n_startup_trials', 'constant_liar', 'multivariate'\]"),
                             ({"constant_liar": "yes"}, r"^sweep.sampler_options.constant_liar='yes' is not valid: true or false"),
                             ({"n_startup_trials": -1}, r"^sweep.sampler_options.n_startup_trials=-1 is not valid")):
        raw["sweep"]["sampler_options"] = options
        with pytest.raises(ConfigError, match=message):
            load_sweep_spec(raw)
    raw["sweep"] = {"sampler": "random", "sampler_options": {"n_startup_trials": 5}}
    with pytest.raises(ConfigError, match=r"no options for the random sampler"):
        load_sweep_spec(raw)


def test_every_shipped_search_space_validates() -> None:
    from pathlib import Path

    import yaml

    spaces = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))
    sweeps = [p for p in spaces if not p.name.startswith("trial_")]
    assert {p.stem for p in sweeps} >= {"quickstart", "mnv2_ptq_w2a8", "mnv1_qat_w2a2", "resnet18_dkm_w1"}
    for path in sweeps:
        spec = load_sweep_spec(yaml.safe_load(path.read_text()), default_name=path.stem)
        assert spec.params, path
    quickstart = load_sweep_spec(yaml.safe_load((spaces[0].parent / "quickstart.yaml").read_text()))
    assert {"r2.kind", "r2.strength", "r2.margin_init", "train.lr"} <= {p.path for p in quickstart.params}
    assert quickstart.trial.data.name == "digits"


def test_relative_data_roots_become_absolute_where_the_sweep_starts(tmp_path, monkeypatch) -> None:
    # Trials run in their own directories (and on other nodes): a relative root
    # must be resolved once, on the driver.
    monkeypatch.chdir(tmp_path)
    data = {**copy.deepcopy(SPEC), "data": {"name": "cifar10", "root": "datasets/cifar"}}
    data["search"] = {"data.root": {"choice": ["a", "/abs/b", "~/c"]}}
    spec = load_sweep_spec(data)
    assert spec.trial.data.root == str(tmp_path / "datasets" / "cifar")
    assert spec.params[0].values == (str(tmp_path / "a"), "/abs/b", os.path.expanduser("~/c"))
    assert spec.trial_config({"data.root": str(tmp_path / "a")}).data.root == str(tmp_path / "a")
    assert data["data"]["root"] == "datasets/cifar"  # the caller's mapping is left alone


def test_overrides_reach_search_parameters_whose_names_hold_dots() -> None:
    from r2sweep.core.config.overrides import apply_overrides

    data = apply_overrides(SPEC, [("search.r2.strength.loguniform", [0.01, 0.1]), ("search.train.lr.when", None)])
    assert data["search"]["r2.strength"] == {"loguniform": [0.01, 0.1], "when": {"r2.kind": ["linf", "margin"]}}
    assert "r2" not in data["search"]  # not a new nested mapping
    assert load_sweep_spec(data).params[1].values == (0.01, 0.1)


def test_the_no_r2_baseline_applies_only_where_the_search_can_draw_no_r2() -> None:
    assert load_sweep_spec(SPEC).baseline_point == {"r2.kind": "none"}
    off = copy.deepcopy(SPEC)
    off["sweep"]["baseline"] = False
    assert load_sweep_spec(off).baseline_point is None
    only_r2 = copy.deepcopy(SPEC)
    only_r2["search"]["r2.kind"] = {"choice": ["linf", "margin"]}
    assert load_sweep_spec(only_r2).baseline_point is None
    unsearched = copy.deepcopy(SPEC)
    unsearched["r2"] = {"kind": "linf", "strength": 0.1}
    unsearched["search"] = {"train.lr": {"loguniform": [0.01, 0.2]}}
    assert load_sweep_spec(unsearched).baseline_point is None
