"""Bad input: every malformed search-space file is refused in full before anything exists.

Each case is a real file given to ``r2sweep sweep``: it must exit 2 with one line
that names the field, the bad value and what is allowed (the exact line is
pinned here), print no traceback, and leave nothing behind (no MLflow database,
no results folder, no Ray session). ``--set`` overrides go through the same checks.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from ray.runtime_env import RuntimeEnv
import yaml

from r2sweep.cli.app import main

BASE = {
    "name": "bad",
    "data": {"name": "digits"},
    "model": {"name": "small_cnn"},
    "train": {"epochs": 2, "lr": 0.05},
    "r2": {"kind": "linf", "strength": 0.01},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]}],
    "objective": {"metric": "ptq_rtn_w4a8/top1", "mode": "max"},
    "search": {
        "r2.kind": {"choice": ["none", "linf"]},
        "r2.strength": {"loguniform": [1.0e-3, 1.0], "when": {"r2.kind": ["linf"]}},
    },
    "sweep": {"num_samples": 4, "max_concurrent": 2},
}
DELETE = object()


def with_(path: str, value) -> str:
    """BASE as YAML with the value at ``a/b/0/c`` replaced."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split("/")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


CASES = {
    "yaml_syntax": "name: x\ntrain: {epochs: 2\n",
    "top_level_list": "- a\n- b\n",
    "empty": "",
    "unknown_section": with_("sweeps", {}),
    "unknown_data_key": with_("data/rooot", "/x"),
    "unknown_model_key": with_("model/widht", 0.5),
    "unknown_train_key": with_("train/epoch", 3),
    "unknown_r2_key": with_("r2/strenght", 0.1),
    "unknown_downstream_key": with_("downstream/0/weight_bit", [2]),
    "unknown_objective_key": with_("objective/metirc", "x"),
    "unknown_sweep_key": with_("sweep/num_sample", 4),
    "runtime_env_unknown_key": with_("sweep/runtime_env", {"env_var": {"A": "1"}}),
    "runtime_env_missing_working_dir": with_("sweep/runtime_env", {"working_dir": "no_such_dir"}),
    "runtime_env_bad_pip": with_("sweep/runtime_env", {"pip": ["torchvision>=>0.19"]}),
    "unknown_distribution": with_("search/r2.strength", {"logunifrom": [0.001, 1.0]}),
    "epochs_text": with_("train/epochs", "ten"),
    "epochs_zero": with_("train/epochs", 0),
    "batch_size_zero": with_("train/batch_size", 0),
    "lr_negative": with_("train/lr", -0.1),
    "bits_out_of_range": with_("downstream/0/weight_bits", [0]),
    "bits_text": with_("downstream/0/weight_bits", "two"),
    "strength_negative": with_("r2/strength", -1),
    "concurrency_zero": with_("sweep/max_concurrent", 0),
    "samples_zero": with_("sweep/num_samples", 0),
    "cpu_negative": with_("sweep/resources_per_trial", {"cpu": -1}),
    "gpu_fraction_above_one": with_("sweep/resources_per_trial", {"cpu": 1, "gpu": 1.5}),
    "unknown_model": with_("model/name", "resnet19"),
    "unknown_dataset": with_("data/name", "mnist"),
    "unknown_loss_kind": with_("r2/kind", "l2"),
    "unknown_method": with_("downstream/0/method", "pruning"),
    "unknown_algorithm": with_("downstream/0/algorithm", "gptq"),
    "unknown_sampler": with_("sweep/sampler", "bayes"),
    "unknown_scheduler": with_("sweep/scheduler", "hyperband"),
    "baseline_not_bool": with_("sweep/baseline", "yes"),
    "start_point_not_searched": with_("sweep/start_points", [{"train.lr": 0.05}]),
    "start_point_outside_range": with_("sweep/start_points", [{"r2.kind": "linf", "r2.strength": 2.0}]),
    "start_point_not_a_choice": with_("sweep/start_points", [{"r2.kind": "margin"}]),
    "objective_not_produced": with_("objective/metric", "ptq_rtn_w2a8/top1"),
    "bad_mode": with_("objective/mode", "maximize"),
    "empty_choice": with_("search/r2.kind", {"choice": []}),
    "inverted_range": with_("search/train.lr", {"uniform": [0.1, 0.01]}),
    "non_positive_log_range": with_("search/r2.strength", {"loguniform": [0.0, 1.0]}),
    "two_distributions": with_("search/train.lr", {"uniform": [0.01, 0.1], "loguniform": [0.01, 0.1]}),
    "search_path_missing": with_("search/train.lrate", {"uniform": [0.01, 0.1]}),
    "when_not_searched": with_("search/r2.strength", {"loguniform": [0.001, 1.0], "when": {"r2.margin_init": ["max"]}}),
    "illegal_choice": with_("search/r2.kind", {"choice": ["linf", "l7"]}),
    "missing_data_root": with_("data", {"name": "cifar10", "root": "/nonexistent/cifar"}),
    # Constraints across fields (r2sweep/core/config/consistency.py): found before Ray starts.
    "cross_grace_period_past_epochs": with_("sweep/grace_period", 3),
    "cross_cuda_without_gpu": with_("train/device", "cuda"),
    "cross_r2_never_switches_on": with_("r2/start_epoch", 2),
    "cross_start_point_outside_its_condition": with_("sweep/start_points", [{"r2.kind": "none", "r2.strength": 0.1}]),
    "cross_start_points_exceed_samples": with_("sweep", {"num_samples": 2, "start_points": [{"r2.kind": "linf"}, {"r2.strength": 0.1}]}),
}

_RAY_RUNTIME_ENV_KEYS = sorted(key for key in RuntimeEnv.known_fields if not key.startswith("_"))

EXPECTED = {
    "yaml_syntax": "file='space.yaml' is not valid: valid YAML; expected ',' or '}', but got '<stream end>' at line 3, column 1",
    "top_level_list": "config='list' is not valid: a mapping with the sections ['name', 'seed', 'data', 'model', 'train', 'r2', 'downstream', 'proxy', 'objective', 'search', 'sweep']",
    "empty": "config='an empty file' is not valid: a mapping with the sections ['name', 'seed', 'data', 'model', 'train', 'r2', 'downstream', 'proxy', 'objective', 'search', 'sweep']",
    "unknown_section": "sweeps={} is not valid: unknown section; did you mean 'sweep'? known sections are ['name', 'seed', 'data', 'model', 'train', 'r2', 'downstream', 'proxy', 'objective', 'search', 'sweep']",
    "unknown_data_key": "data.rooot='/x' is not valid: unknown field; did you mean 'root'? known fields are ['name', 'root', 'val_fraction']",
    "unknown_model_key": "model.widht=0.5 is not valid: unknown field; did you mean 'width'? known fields are ['name', 'init_from', 'init_from_strict', 'init_from_sha256', 'width', 'stem']",
    "unknown_train_key": "train.epoch=3 is not valid: unknown field; did you mean 'epochs'? known fields are ['epochs', 'batch_size', 'optimizer', 'lr', 'momentum', 'weight_decay', 'schedule', 'step_epochs', 'step_gamma', 'num_workers', 'device', 'precision', 'workers']",
    "unknown_r2_key": "r2.strenght=0.1 is not valid: unknown field; did you mean 'strength'? known fields are ['kind', 'strength', 'reduction', 'granularity', 'skip_first_last', 'start_epoch', 'margin_init', 'alpha_init', 'eta']",
    "unknown_downstream_key": "downstream[0].weight_bit=[2] is not valid: unknown field; did you mean 'weight_bits'? known fields are ['method', 'algorithm', 'weight_bits', 'act_bits', 'granularity', 'keep_first_last_bits', 'tag', 'symmetric', 'range', 'act_observer', 'calib_samples', 'bn_fold', 'bn_reestimate', 'bn_batches', 'adaround_iters', 'adaround_lambda', 'adaround_lr', 'fisher', 'act_lr', 'drop_prob', 'epochs', 'lr', 'weight_decay', 'batch_size', 'optimizer', 'keep', 'quant_lr', 'delta', 'start', 'tau', 'dkm_iters', 'cluster_dim']",
    "unknown_objective_key": "objective.metirc='x' is not valid: unknown field; did you mean 'metric'? known fields are ['metric', 'mode']",
    "unknown_sweep_key": "sweep.num_sample=4 is not valid: unknown field; did you mean 'num_samples'? known fields are ['num_samples', 'max_concurrent', 'sampler', 'seed', 'scheduler', 'grace_period', 'reduction_factor', 'max_failures', 'resources_per_trial', 'baseline', 'start_points', 'runtime_env', 'pretrain_cache', 'optuna_storage', 'sampler_options']",
    # Ray decides its keys (they change between its releases): the message lists the installed Ray's.
    "runtime_env_unknown_key": "sweep.runtime_env.env_var={'A': '1'} is not valid: unknown key; did you mean "
                               f"'env_vars'? known keys are {_RAY_RUNTIME_ENV_KEYS}",
    "runtime_env_missing_working_dir": "sweep.runtime_env.working_dir='no_such_dir' is not valid: a folder or file that exists (a relative path is from the working directory) or a URI",
    "runtime_env_bad_pip": "sweep.runtime_env.pip='torchvision>=>0.19' is not valid: a pip requirement such as 'name>=1.0' (Expected semicolon (after name with no version specifier) or end)",
    "unknown_distribution": "search.r2.strength.logunifrom=[0.001, 1.0] is not valid: unknown key; a parameter takes one of ['choice', 'uniform', 'loguniform', 'int'] and optionally 'when'",
    "epochs_text": "train.epochs='ten' is not valid: an integer",
    "epochs_zero": 'train.epochs=0 is not valid: an integer >= 1',
    "batch_size_zero": 'train.batch_size=0 is not valid: an integer >= 1',
    "lr_negative": 'train.lr=-0.1 is not valid: a number > 0',
    "bits_out_of_range": 'downstream[0].weight_bits=0 is not valid: an integer from 1 to 8',
    "bits_text": "downstream[0].weight_bits='two' is not valid: an integer or a list",
    "strength_negative": 'r2.strength=-1.0 is not valid: a number >= 0 (0 switches the loss off)',
    "concurrency_zero": 'sweep.max_concurrent=0 is not valid: an integer >= 1',
    "samples_zero": 'sweep.num_samples=0 is not valid: an integer >= 1',
    "cpu_negative": 'sweep.resources_per_trial.cpu=-1 is not valid: a number >= 0',
    "gpu_fraction_above_one": 'sweep.resources_per_trial.gpu=1.5 is not valid: a fraction of one GPU (0-1) or a whole number of GPUs',
    "unknown_model": "model.name='resnet19' is not valid: one of ['mobilenet_v1', 'mobilenet_v2', 'resnet18', 'small_cnn'] (r2sweep list model), or model.factory: 'module:function'",
    "unknown_dataset": "data.name='mnist' is not valid: one of ['cifar10', 'cifar100', 'digits', 'distorted_digits', 'imagefolder', 'synthetic'] (r2sweep list data), or data.factory: 'module:function'",
    "unknown_loss_kind": "r2.kind='l2' is not valid: choose one of ['linf', 'margin', 'none', 'softminmax']",
    "unknown_method": "downstream[0].method='pruning' is not valid: one of ['ptq', 'qat', 'dkm']",
    "unknown_algorithm": "downstream[0].algorithm='gptq' is not valid: for method ptq: one of ['rtn', 'adaround', 'brecq', 'qdrop']",
    "unknown_sampler": "sweep.sampler='bayes' is not valid: one of ['tpe', 'gp', 'cmaes', 'random', 'nsga2']",
    "unknown_scheduler": "sweep.scheduler='hyperband' is not valid: one of ['asha', 'none']",
    "baseline_not_bool": "sweep.baseline='yes' is not valid: true or false",
    "start_point_not_searched": "sweep.start_points[0].train.lr=0.05 is not valid: a searched parameter: ['r2.kind', 'r2.strength']",
    "start_point_outside_range": "sweep.start_points[0].r2.strength=2.0 is not valid: a number in search.r2.strength's range [0.001, 1.0]",
    "start_point_not_a_choice": "sweep.start_points[0].r2.kind='margin' is not valid: one of search.r2.kind's choices ['none', 'linf']",
    "objective_not_produced": "objective.metric='ptq_rtn_w2a8/top1' is not valid: a metric the trial produces: ['fp/top1', 'ptq_rtn_w4a8/top1', 'ptq_rtn_w4a8/size_bytes', 'ptq_rtn_w4a8/size_ratio']",
    "bad_mode": "objective.mode='maximize' is not valid: one of ['max', 'min']",
    "empty_choice": 'search.r2.kind.choice=[] is not valid: a non-empty list',
    "inverted_range": 'search.train.lr.uniform=[0.1, 0.01] is not valid: [low, high] with low < high',
    "non_positive_log_range": 'search.r2.strength.loguniform=[0.0, 1.0] is not valid: [low, high] with 0 < low < high (a log range)',
    "two_distributions": "search.train.lr={'uniform': [0.01, 0.1], 'loguniform': [0.01, 0.1]} is not valid: exactly one distribution out of ['choice', 'uniform', 'loguniform', 'int']",
    "search_path_missing": "search.train.lrate=0.01 is not valid: train.lrate: unknown field; known fields are ['epochs', 'batch_size', 'optimizer', 'lr', 'momentum', 'weight_decay', 'schedule', 'step_epochs', 'step_gamma', 'num_workers', 'device', 'precision', 'workers']",
    "when_not_searched": "search.r2.strength.when.r2.margin_init=['max'] is not valid: a parameter searched above this one; searched so far: ['r2.kind']",
    "illegal_choice": "search.r2.kind='l7' is not valid: r2.kind: choose one of ['linf', 'margin', 'none', 'softminmax']",
    "missing_data_root": "data.root='/nonexistent/cifar' is not valid: an existing folder on this machine (r2sweep never downloads); on a cluster whose workers hold it, pass --address",
    "cross_grace_period_past_epochs": "sweep.grace_period=3 is not valid: at most train.epochs (2) with sweep.scheduler: asha (ASHA's first rung must come before a trial's last epoch); lower sweep.grace_period, raise train.epochs, or set sweep.scheduler: none",
    "cross_cuda_without_gpu": "train.device='cuda' is not valid: 'auto' or 'cpu' when sweep.resources_per_trial.gpu is 0 (Ray gives a trial no GPU unless it asks for one); set sweep.resources_per_trial.gpu (e.g. 1 or 0.5), or train.device: auto",
    "cross_r2_never_switches_on": "r2.start_epoch=2 is not valid: below train.epochs (2): R2 switches on at that epoch, so it would never act; lower r2.start_epoch or raise train.epochs",
    "cross_start_point_outside_its_condition": "sweep.start_points[0].r2.strength=0.1 is not valid: a parameter this point can use: search.r2.strength is sampled only when r2.kind is one of ['linf'], and the point sets r2.kind='none'; drop r2.strength from the point",
    "cross_start_points_exceed_samples": "sweep.num_samples=2 is not valid: at least 3: the trials run first (the no-R2 baseline and 2 sweep.start_points) must fit; raise sweep.num_samples or drop start points",
}


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, text: str, *extra: str) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "space.yaml").write_text(text)
    status = main(["sweep", "space.yaml", *extra])
    out, err = capsys.readouterr()
    assert status == 2
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r2sweep: error: space.yaml: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"], "nothing may be created"
    return lines[0].removeprefix("r2sweep: error: space.yaml: ")


def test_every_case_has_an_expected_message() -> None:
    assert set(CASES) == set(EXPECTED)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_file_is_refused_with_its_exact_message(case: str, tmp_path, monkeypatch, capsys) -> None:
    assert _run(tmp_path, monkeypatch, capsys, CASES[case]) == EXPECTED[case]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--set", "train.epochs=ten"], "train.epochs='ten' is not valid: an integer"),
        (["--set", "train.epoch=3"], "train.epoch=3 is not valid: unknown field; did you mean 'epochs'? known fields are "
         "['epochs', 'batch_size', 'optimizer', 'lr', 'momentum', 'weight_decay', 'schedule', 'step_epochs', "
         "'step_gamma', 'num_workers', 'device', 'precision', 'workers']"),
        (["--set", "epochs"], "--set='epochs' is not valid: PATH=VALUE, e.g. train.lr=0.1 or downstream.0.weight_bits=[2,4]"),
        (["--set", "search.r2.strength.loguniform=[1.0, 0.1]"],
         "search.r2.strength.loguniform=[1.0, 0.1] is not valid: [low, high] with low < high"),
        (["--num-samples", "0"], "sweep.num_samples=0 is not valid: an integer >= 1"),
        (["--max-concurrent", "-2"], "sweep.max_concurrent=-2 is not valid: an integer >= 1"),
        # The smoke run that used to die late in Ray ("grace_period must be <= max_t!").
        (["--set", "train.epochs=1", "--set", "sweep.grace_period=2"],
         "sweep.grace_period=2 is not valid: at most train.epochs (1) with sweep.scheduler: asha (ASHA's first "
         "rung must come before a trial's last epoch); lower sweep.grace_period, raise train.epochs, or set "
         "sweep.scheduler: none"),
    ],
)
def test_overrides_get_the_same_checks(override, message, tmp_path, monkeypatch, capsys) -> None:
    assert _run(tmp_path, monkeypatch, capsys, yaml.safe_dump(BASE), *override) == message


# A --set that no trial would feel: the search samples the field, or no trial reads it.
NO_EFFECT = {
    "searched_always": (["--set", "r2.kind=none"],
        "--set r2.kind='none' is not valid: a field the search leaves alone: search.r2.kind samples it in every "
        "trial, so this value is never used; change the distribution instead (--set search.r2.kind.choice=...) or "
        "take r2.kind out of search"),
    "searched_where_read": (["--set", "r2.strength=0.5"],
        "--set r2.strength=0.5 is not valid: a field some trial of the sweep reads; no trial it can draw uses this "
        "value (r2.kind=none never reads it; search.r2.strength samples it): drop the --set, or change that setting"),
    "kind_never_reads": (["--set", "r2.margin_init=3std"],
        "--set r2.margin_init='3std' is not valid: a field some trial of the sweep reads; no trial it can draw uses "
        "this value (r2.kind=linf never reads it; r2.kind=none never reads it): drop the --set, or change that setting"),
    "schedule_never_reads": (["--set", "train.step_gamma=0.5"],
        "--set train.step_gamma=0.5 is not valid: a field some trial of the sweep reads; no trial it can draw uses "
        "this value (train.schedule=cosine never reads it): drop the --set, or change that setting"),
    "algorithm_never_reads": (["--set", "downstream.0.adaround_iters=10"],
        "--set downstream.0.adaround_iters=10 is not valid: a field some trial of the sweep reads; no trial it can "
        "draw uses this value (downstream.0.algorithm=rtn never reads it): drop the --set, or change that setting"),
    "optimizer_never_reads": (["--set", "train.optimizer=adam", "--set", "train.momentum=0.5"],
        "--set train.momentum=0.5 is not valid: a field some trial of the sweep reads; no trial it can draw uses "
        "this value (train.optimizer=adam never reads it): drop the --set, or change that setting"),
}


@pytest.mark.parametrize("case", sorted(NO_EFFECT))
def test_an_override_without_effect_is_refused_with_the_fix(case, tmp_path, monkeypatch, capsys) -> None:
    override, message = NO_EFFECT[case]
    assert _run(tmp_path, monkeypatch, capsys, yaml.safe_dump(BASE), *override) == message


@pytest.mark.parametrize(("override", "reason"), [
    ("r2.margin_init=3std", "r2.kind=linf never reads it"),
    ("downstream.0.bn_batches=4", "downstream.0.bn_reestimate=false never reads it"),
])
def test_a_trial_override_without_effect_is_refused(override, reason, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    trial = {k: v for k, v in BASE.items() if k in ("data", "model", "train", "r2", "downstream")}
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(trial))
    assert main(["trial", "trial.yaml", "--out", "out", "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--set {override.split('=')[0]}=" in err[0] and reason in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial.yaml"]


def test_an_override_that_takes_effect_somewhere_passes() -> None:
    """r2.strength is searched only where R2 is on; with kind none searched too, a fixed base
    strength is still read nowhere, but a searched lr conditional on linf leaves 'none' trials
    reading the base lr: that override counts."""
    from r2sweep.core.config.consistency import refuse_ineffective_overrides
    from r2sweep.core.config.sweep import load_sweep_spec

    data = copy.deepcopy(BASE)
    data["search"]["train.lr"] = {"loguniform": [0.01, 0.1], "when": {"r2.kind": ["linf"]}}
    refuse_ineffective_overrides([("train.lr", 0.2), ("train.epochs", 3)], load_sweep_spec(data))


def test_the_quickstart_smoke_run_with_one_epoch_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys) -> None:
    """The README's quickstart shortened to one epoch: its ASHA grace period (5) cannot fit."""
    quickstart = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
    message = _run(tmp_path, monkeypatch, capsys, quickstart.read_text(), "--set", "train.epochs=1")
    assert message.startswith("sweep.grace_period=5 is not valid: at most train.epochs (1) with sweep.scheduler: asha")


def test_a_searched_epoch_count_gives_asha_room_up_to_its_largest_value() -> None:
    from r2sweep.core.config.sweep import load_sweep_spec

    data = copy.deepcopy(BASE)
    data["search"]["train.epochs"] = {"int": [1, 6]}
    data["sweep"]["grace_period"] = 4
    assert load_sweep_spec(data).max_epochs == 6
    data["sweep"]["grace_period"] = 7
    with pytest.raises(ValueError, match=r"sweep\.grace_period=7 .* at most train\.epochs \(6\)"):
        load_sweep_spec(data)


def test_a_usable_runtime_env_passes_the_check_untouched(tmp_path: Path) -> None:
    from r2sweep.core.errors import ConfigError
    from r2sweep.tune.runtime_env import check_runtime_env

    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "requirements.txt").write_text("numpy\n")
    for env in ({"working_dir": ".", "py_modules": ["my_pkg"], "env_vars": {"OMP_NUM_THREADS": "1"}},
                {"pip": ["numpy>=1.24", "./my_pkg", "-r requirements.txt", "https://example.org/x.whl"]},
                {"pip": {"packages": ["scipy"], "pip_check": False}}, {"pip": "requirements.txt"},
                {"working_dir": "s3://bucket/code.zip", "py_modules": ["gs://bucket/pkg.zip"]}):
        check_runtime_env(env, tmp_path)
    with pytest.raises(ConfigError, match=r"sweep\.runtime_env\.working_dir='requirements.txt'.*a folder, not a file"):
        check_runtime_env({"working_dir": "requirements.txt"}, tmp_path)
    with pytest.raises(ConfigError, match=r"sweep\.runtime_env\.env_vars"):
        check_runtime_env({"env_vars": {"OMP_NUM_THREADS": 1}}, tmp_path)
