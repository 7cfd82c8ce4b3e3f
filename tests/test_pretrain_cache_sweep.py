"""The pre-training cache in real sweeps (Ray Tune, Optuna, MLflow): a search over downstream knobs
(the proxied result's grid included) pre-trains once, a second sweep of the same model reuses the first one's entry, and every trial's
result equals the same trial run with the cache off. (Corrupt entries, locks, keys: tests/test_pretrain_cache.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from conftest import new_mlflow_store

import r2sweep
from r2sweep.core.config.sweep import PRETRAIN_CACHE_FOLDER
from r2sweep.core.pretrain_cache import PretrainCache
from r2sweep.tracking.store import TAG_ROLE

pytestmark = pytest.mark.ray

SEARCHED = ("downstream.0.adaround_iters", "downstream.0.granularity")  # the second changes the proxy's grid
OBJECTIVE = "ptq_adaround_w2a8/top1"


def counting_model(markers: Path):
    """A model factory whose models leave one marker file the first time they train (train mode, with
    gradients): the count of markers is the count of pre-trainings. A copy of a trained model (each
    downstream result starts from one) carries the flag and leaves none; PTQ never trains."""

    def counted_cnn(*, num_classes, in_channels):
        class CountedNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
                self.bn = torch.nn.BatchNorm2d(8)
                self.head = torch.nn.Linear(8 * 16, num_classes)
                self.marked = False

            def forward(self, x):
                if self.training and torch.is_grad_enabled() and not self.marked:
                    self.marked = True
                    markers.mkdir(parents=True, exist_ok=True)
                    (markers / f"{os.getpid()}-{id(self)}").touch()
                x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4)
                return self.head(x.flatten(1))

        return CountedNet()

    return counted_cnn


def _spec(name: str, factory, **sweep) -> dict:
    return {
        "name": name,
        "data": {"name": "digits"},
        "model": {"factory": factory},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
        "r2": {"kind": "linf", "strength": 0.01},
        "downstream": [{"method": "ptq", "algorithm": "adaround", "weight_bits": [2], "adaround_iters": 4,
                        "calib_samples": 32}],
        "objective": {"metric": OBJECTIVE, "mode": "max"},
        "search": {SEARCHED[0]: {"choice": [2, 4, 8]}, SEARCHED[1]: {"choice": ["channel", "tensor"]}},
        # Random draws do not depend on results, so the cache-off sweep runs the same trials.
        # The start point makes sure both grids are drawn.
        "sweep": {"num_samples": 4, "max_concurrent": 2, "seed": 3, "sampler": "random", "scheduler": "none",
                  "start_points": [{SEARCHED[0]: 2, SEARCHED[1]: "channel"}],
                  "resources_per_trial": {"cpu": 1}, **sweep},
    }


def _runs(tracking_uri: str, name: str) -> list:
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")


def _by_config(runs: list) -> dict[tuple, dict]:
    return {tuple(run.data.params[p] for p in SEARCHED): run.data.metrics for run in runs}


def test_downstream_sweeps_pretrain_once_and_match_the_cache_off_trials(tmp_path: Path) -> None:
    markers, storage, uri = tmp_path / "markers", tmp_path / "results", new_mlflow_store(tmp_path / "mlflow.db")
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        factory = counting_model(markers)  # one callable: a name given from Python names one function

        def sweep(name: str, **settings) -> list:
            r2sweep.run_sweep(_spec(name, factory, **settings), tracking_uri=uri, storage=storage, progress=False,
                              register=False)
            return _runs(uri, name)

        first = sweep("cached")
        assert len(list(markers.iterdir())) == 1  # four trials, one pre-training
        # Three checkpoints per trial (two epochs, the end), the newest two kept (r2sweep.tune.checkpoints).
        trial_dirs = [d for d in (storage / "cached").iterdir() if d.is_dir() and list(d.glob("checkpoint_*"))]
        assert len(trial_dirs) == 4
        for trial_dir in trial_dirs:
            kept = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
            assert kept == ["checkpoint_000001", "checkpoint_000002"], (trial_dir.name, kept)
            assert (trial_dir / kept[-1] / "trial_config.yaml").is_file()  # the final one, with the trial's files
        tags = sorted(run.data.tags["r2sweep.pretrain_cache"] for run in first)
        assert tags == ["hit", "hit", "hit", "stored"]
        owner = next(run for run in first if run.data.tags["r2sweep.pretrain_cache"] == "stored")
        source = owner.data.tags["r2sweep.pretrain_source"]
        assert source == f"cached/{owner.data.tags['r2sweep.trial_id']}"
        assert {run.data.tags["r2sweep.pretrain_key"] for run in first} == {owner.data.tags["r2sweep.pretrain_key"]}
        hits = [run for run in first if run is not owner]
        assert all(run.data.tags["r2sweep.pretrain_source"] == source for run in hits)
        # A trial that started beside the owner waited for it (nothing saved on the clock); later ones saved.
        saved = sorted(run.data.metrics["time/pretrain_saved_s"] for run in hits)
        assert saved[0] >= 0 and saved[1] > 0.5, saved
        client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        def history(run, metric: str) -> list[tuple[int, float]]:
            return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))

        for run in hits:  # the per-epoch history is replayed: the scheduler and MLflow see both epochs
            for metric in ("train/loss", "val/top1"):
                assert history(run, metric) == history(owner, metric)
            assert {step for step, _ in history(run, "train/loss")} == {0, 1}
            # The proxy too on the owner's grid; on another grid only epoch 1's (step 1), measured on its own
            # grid, and the final report's (step 0).
            proxies = history(run, "proxy/top1")
            if run.data.params[SEARCHED[1]] == owner.data.params[SEARCHED[1]]:
                assert proxies == history(owner, "proxy/top1")
            else:
                assert proxies == [(0, run.data.metrics["proxy/top1"]), (1, run.data.metrics["proxy/top1"])]
        assert any(r.data.params[SEARCHED[1]] != owner.data.params[SEARCHED[1]] for r in hits)  # both grids drawn

        # The same draws with the cache off (the first two: random draws do not depend on results).
        off = sweep("uncached", pretrain_cache=False, num_samples=2)
        assert len(list(markers.iterdir())) == 1 + 2
        assert {run.data.tags["r2sweep.pretrain_cache"] for run in off} == {"off"}
        cached, fresh = _by_config(first), _by_config(off)
        assert fresh.keys() <= cached.keys()
        for config, metrics in fresh.items():  # bit-identical on the CPU: equal, not close
            for name in (OBJECTIVE, "fp/top1", "proxy/top1", "weights/max_abs", "weights/kurtosis"):
                assert cached[config][name] == metrics[name], (config, name)

        second = sweep("again", num_samples=2)  # a second sweep of the same model, in the same storage
        assert len(list(markers.iterdir())) == 3
        assert {run.data.tags["r2sweep.pretrain_cache"] for run in second} == {"hit"}
        assert {run.data.tags["r2sweep.pretrain_source"] for run in second} == {source}
        assert all(cached[config][OBJECTIVE] == m[OBJECTIVE] for config, m in _by_config(second).items())
        (entry,) = PretrainCache(storage / PRETRAIN_CACHE_FOLDER).entries()
        assert sorted(entry.used_by) == ["again", "cached"] and entry.source == source
    finally:
        ray.shutdown()
