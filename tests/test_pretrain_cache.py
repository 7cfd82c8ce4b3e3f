"""The pre-training cache without Ray: its key, its entries (atomic, verified), its locks, the trial
served from it (bit-identical to the trial trained afresh), and ``r2sweep cache list|prune``.
(The cache in real sweeps: tests/test_pretrain_cache_sweep.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r2sweep.cli.app import main
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.errors import ConfigError
from r2sweep.core.pretrain_cache import PretrainCache, pretrain_key
from r2sweep.core.pretrain_cache.lock import try_claim
from r2sweep.core.pretrain_cache.store import Epochs
from r2sweep.core.pretraining import proxy_grid
from r2sweep.core.sweep_files import SweepFiles
from r2sweep.core.trial import run_trial

CPU = torch.device("cpu")


def dropout_net(*, num_classes, in_channels, width=8):
    """Dropout draws from the global RNG during pre-training: a cache hit must restore that RNG."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(width * 4, num_classes))


BASE = {
    "data": {"name": "synthetic", "num_samples": 96},
    "model": {"factory": dropout_net},
    "train": {"epochs": 2, "batch_size": 32},
    "r2": {"kind": "linf", "strength": 0.01},
    "downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [4]},
                   {"method": "qat", "algorithm": "lsq", "weight_bits": [2], "epochs": 1, "batch_size": 32}],
}


def _config(**changes):
    data = {**BASE}
    for path, value in changes.items():
        section, key = path.split(".", 1)
        if section == "downstream":
            index, field = key.split(".")
            entries = [dict(e) for e in data["downstream"]]
            entries[int(index)][field] = value
            data["downstream"] = entries
        else:
            data[section] = {**data.get(section, {}), key: value}
    return load_trial_config(data)


def _key(**changes) -> str:
    return pretrain_key(_config(**changes), CPU).digest


# --- the key ------------------------------------------------------------------------


def test_the_key_holds_what_pretraining_reads_and_nothing_else(tmp_path: Path) -> None:
    base = _key()
    assert _key() == base
    # Downstream knobs (the proxied result's grid included), speed-only and never-read fields: the same
    # pre-training.
    for same in ({"downstream.1.lr": 0.5}, {"downstream.1.epochs": 3}, {"train.num_workers": 2},
                 {"train.step_gamma": 0.5}, {"r2.margin_init": "max"}, {"downstream.0.weight_bits": [2]},
                 {"downstream.0.granularity": "tensor"}, {"downstream.0.range": "mse"}):
        assert _key(**same) == base, same
    for other in ({"train.lr": 0.1}, {"train.epochs": 3}, {"r2.strength": 0.02}, {"seed": None},
                  {"data.num_samples": 64}, {"model.width": 4}):
        if "seed" in other:
            assert pretrain_key(load_trial_config({**BASE, "seed": 1}), CPU).digest != base
            continue
        assert _key(**other) != base, other
    assert pretrain_key(_config(), torch.device("cuda")).digest != base  # GPU weights are not the CPU's

    # init_from: the content decides, not the path.
    first, moved, changed = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.manual_seed(0)
    torch.save(dropout_net(num_classes=10, in_channels=3).state_dict(), first)
    moved.write_bytes(first.read_bytes())
    torch.save(dropout_net(num_classes=10, in_channels=3).state_dict(), changed)
    keys = [_key(**{"model.init_from": str(p)}) for p in (first, moved, changed)]
    assert keys[0] == keys[1] != keys[2] and base not in keys


def test_the_key_follows_a_user_modules_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cache_user_net.py").write_text(
        "import torch\n\ndef build(*, num_classes, in_channels):\n    return torch.nn.Sequential(torch.nn.Flatten(),"
        " torch.nn.LazyLinear(num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_trial_config({**BASE, "model": {"factory": "cache_user_net:build"}})
    before = pretrain_key(config, CPU)
    assert before.material["model_code"].startswith("source ")
    with open(tmp_path / "cache_user_net.py", "a") as handle:
        handle.write("# an edit changes what the factory may build\n")
    assert pretrain_key(config, CPU).digest != before.digest


# --- a trial served from the cache ----------------------------------------------------


def _run(config, cache=None, label="t", out=None):
    reports: list[dict] = []
    final = run_trial(config, reports.append, out_dir=out, cache=cache, cache_label=label, device=CPU)
    return final, reports, torch.get_rng_state()


def _untimed(reports: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "pretrain_cache"}
            for r in reports if "final" not in r]


def _same_results(a: dict, b: dict) -> None:
    for key, value in a.items():
        if not key.startswith("time/") and not key.startswith("pretrain_"):
            assert b[key] == value, key  # equal, not close


def test_a_cache_hit_is_the_trial_trained_afresh_bit_for_bit(tmp_path: Path) -> None:
    config = _config()
    fresh, fresh_reports, fresh_rng = _run(config, out=tmp_path / "fresh")
    cache = PretrainCache(tmp_path / "cache", user="s")
    stored, _, _ = _run(config, cache, label="s/first")
    hit, hit_reports, hit_rng = _run(config, cache, label="s/second", out=tmp_path / "hit")
    assert (fresh["pretrain_cache"], stored["pretrain_cache"], hit["pretrain_cache"]) == ("off", "stored", "hit")
    _same_results(fresh, stored)
    _same_results(fresh, hit)
    assert hit["pretrain_source"] == "s/first" and hit["pretrain_key"] == stored["pretrain_key"]
    assert hit["time/pretrain_saved_s"] > 0
    assert torch.equal(fresh_rng, hit_rng)  # the RNG after pre-training was restored, so downstream drew the same
    # The scheduler sees the same epochs: every per-epoch report is replayed.
    replayed = _untimed(hit_reports)
    assert [r["epoch"] for r in replayed] == [0, 1] and replayed == _untimed(fresh_reports)
    assert [r["pretrain_cache"] for r in hit_reports] == ["hit", "hit", "hit"]  # every epoch says so, and the end
    assert {r["pretrain_cache"] for r in fresh_reports} == {"off"}
    for name in ("pretrained.pt", "qat_lsq_w2a8.pt"):
        a = torch.load(tmp_path / "fresh" / name, weights_only=True)["model"]
        b = torch.load(tmp_path / "hit" / name, weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_trial_proxied_on_another_grid_takes_the_entry_and_measures_its_own_proxy(tmp_path: Path) -> None:
    cache = PretrainCache(tmp_path / "cache")
    # Digits, for accuracies off the floor; the entry's proxy rounds per channel at 4 bits, this trial's
    # per tensor at 2.
    rtn = {**BASE["downstream"][0], "keep_first_last_bits": None}  # the net has only a first and a last layer
    entry = {**BASE, "data": {"name": "digits"}, "downstream": [rtn]}
    stored, _, _ = _run(load_trial_config(entry), cache, label="s/first")
    other = load_trial_config({**entry, "downstream": [{**rtn, "granularity": "tensor", "weight_bits": [2]}]})
    fresh, fresh_reports, _ = _run(other)
    hit, hit_reports, _ = _run(other, cache, label="s/second")
    assert hit["pretrain_cache"] == "hit" and hit["pretrain_key"] == stored["pretrain_key"]
    _same_results(fresh, hit)  # proxy/top1 and every downstream result as if it had trained
    assert hit["proxy/top1"] != stored["proxy/top1"]  # its own grid, not the entry's
    # Past epochs cannot be re-measured on its grid: they carry no proxy, the last one its own.
    fresh_epochs, hit_epochs = _untimed(fresh_reports), _untimed(hit_reports)
    assert "proxy/top1" not in hit_epochs[0] and hit_epochs[1] == fresh_epochs[1]
    assert {k: v for k, v in fresh_epochs[0].items() if k != "proxy/top1"} == hit_epochs[0]

    # A float proxy is val/top1: derived on every replayed epoch, whatever grid the entry holds.
    as_fp = load_trial_config({**other.to_mapping(), "proxy": {"result": "fp"}})
    fp_hit, fp_reports, _ = _run(as_fp, cache, label="s/third")
    assert fp_hit["pretrain_cache"] == "hit"
    assert [r["proxy/top1"] for r in _untimed(fp_reports)] == [r["val/top1"] for r in fresh_epochs]


@pytest.mark.parametrize("damage", ["weights", "manifest", "hash"])
def test_a_corrupt_entry_is_recomputed_never_used(tmp_path: Path, damage: str) -> None:
    config = _config(**{"downstream.1.epochs": 0})
    cache = PretrainCache(tmp_path / "cache")
    first, _, _ = _run(config, cache)
    folder = tmp_path / "cache" / "entries" / first["pretrain_key"]
    if damage == "weights":
        data = (folder / "weights.pt").read_bytes()
        (folder / "weights.pt").write_bytes(data[: len(data) // 2])  # torn
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{\"format\": 1, \"key\":")
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "weights_sha256": "0" * 64}))
    again, _, _ = _run(config, cache)
    assert again["pretrain_cache"] == "stored"  # trained again, and the entry rewritten whole
    _same_results(first, again)
    assert cache.lookup(first["pretrain_key"]) is not None


def test_a_waiting_trial_follows_the_owner_then_takes_over_from_a_dead_one(tmp_path: Path) -> None:
    config = _config(**{"downstream.1.epochs": 0})
    reference, reference_reports, _ = _run(config, PretrainCache(tmp_path / "first"))
    epochs = _untimed(reference_reports)
    # Another host's trial holds the key and has finished epoch 0, then stops beating.
    cache = PretrainCache(tmp_path / "cache", stale_after_s=1.5, poll_s=0.1)
    key = reference["pretrain_key"]
    lock = tmp_path / "cache" / "locks" / f"{key}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"token": "x", "host": "elsewhere", "pid": 1, "label": "other/trial"}))
    cache.publish_progress(key, Epochs(epochs[:1], proxy_grid(config)))
    started = time.perf_counter()
    final, reports, _ = _run(config, cache)
    assert time.perf_counter() - started > 1.5  # it waited for the heartbeat to go stale
    assert final["pretrain_cache"] == "stored"
    assert _untimed(reports) == epochs and [r["epoch"] for r in epochs] == [0, 1]  # epoch 0 followed, not repeated
    assert [r["pretrain_cache"] for r in reports] == ["hit", "miss", "stored"]
    _same_results(reference, final)


@pytest.mark.slow  # two Python processes start
def test_two_trials_of_one_key_at_once_pretrain_once(tmp_path: Path) -> None:
    # Two processes, as a sweep's trials are: the first to claim the key trains, the other takes its entry.
    spec = {**BASE, "model": {"name": "small_cnn", "width": 0.25}, "train": {"epochs": 3, "batch_size": 32},
            "downstream": BASE["downstream"][:1]}
    (tmp_path / "trial.yaml").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "r2sweep.cli", "trial", str(tmp_path / "trial.yaml"), "--pretrain-cache",
               str(tmp_path / "cache"), "--out"]
    trials = [subprocess.Popen([*command, str(tmp_path / name)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) for name in ("a", "b")]
    for trial in trials:
        assert trial.wait(240) == 0, trial.stderr.read()[-2000:]
    finals = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b")]
    assert sorted(f["pretrain_cache"] for f in finals) == ["hit", "stored"]
    assert finals[0]["ptq_rtn_w4a8/top1"] == finals[1]["ptq_rtn_w4a8/top1"]
    assert len(PretrainCache(tmp_path / "cache").entries()) == 1


# --- locks ----------------------------------------------------------------------------


def test_a_lock_is_exclusive_kept_fresh_and_broken_when_its_owner_is_dead(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    claim = try_claim(path, label="a", heartbeat_s=0.05, stale_after_s=0.5)
    assert claim is not None and try_claim(path, label="b", stale_after_s=0.5) is None
    time.sleep(0.8)  # longer than stale_after_s: only the heartbeat keeps it live
    assert time.time() - path.stat().st_mtime < 0.5 and try_claim(path, label="b", stale_after_s=0.5) is None
    claim.release()
    assert not path.exists()

    # An owner on this host whose process is gone: stale at once, whatever its heartbeat.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"token": "t", "host": socket.gethostname(), "pid": int(dead.stdout)}))
    taken = try_claim(path, label="c", stale_after_s=3600)
    assert taken is not None and json.loads(path.read_text())["label"] == "c"
    taken.release()
    # Another host's lock: live while its heartbeat is recent, stale after.
    path.write_text(json.dumps({"token": "t", "host": "elsewhere", "pid": 1}))
    assert try_claim(path, label="d", stale_after_s=60) is None
    old = time.time() - 120
    os.utime(path, (old, old))
    assert try_claim(path, label="d", stale_after_s=60) is not None


# --- settings and the command line ----------------------------------------------------


def test_the_sweep_setting_and_where_the_cache_lives(tmp_path: Path) -> None:
    spec = {"objective": {"metric": "fp/top1"}, "search": {"train.lr": {"loguniform": [0.01, 0.1]}}}
    settings = load_sweep_spec(spec).settings
    assert settings.pretrain_cache is True
    assert SweepFiles(str(tmp_path), "s", settings).pretrain_cache == str(tmp_path / "pretrain_cache")
    assert SweepFiles("s3://bucket/sweeps", "s", settings).pretrain_cache == "s3://bucket/sweeps/pretrain_cache"
    assert SweepFiles("gs://bucket/sweeps", "s", settings).pretrain_cache is None  # no backend there: off unless named
    named = load_sweep_spec({**spec, "sweep": {"pretrain_cache": str(tmp_path / "shared")}}).settings
    assert SweepFiles("gs://bucket/sweeps", "s", named).pretrain_cache == str(tmp_path / "shared")
    on_s3 = load_sweep_spec({**spec, "sweep": {"pretrain_cache": "s3://team/cache"}}).settings
    assert SweepFiles(str(tmp_path), "s", on_s3).pretrain_cache == "s3://team/cache"
    assert SweepFiles(str(tmp_path), "s", load_sweep_spec({**spec, "sweep": {"pretrain_cache": False}}).settings).pretrain_cache is None
    for bad in ("", "gs://bucket/cache", 3):
        with pytest.raises(ConfigError, match=r"sweep\.pretrain_cache"):
            load_sweep_spec({**spec, "sweep": {"pretrain_cache": bad}})


def test_cache_list_and_prune(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = PretrainCache(tmp_path / "results" / "pretrain_cache", user="sweep-a")
    old, _, _ = _run(_config(**{"downstream.1.epochs": 0}), cache)
    new, _, _ = _run(_config(**{"downstream.1.epochs": 0, "train.lr": 0.1}), cache)
    entry = tmp_path / "results" / "pretrain_cache" / "entries" / old["pretrain_key"]
    long_ago = time.time() - 40 * 86400
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "created": long_ago}))
    os.utime(entry / "used_by" / "sweep-a", (long_ago, long_ago))

    assert main(["cache", "list", "--storage", str(tmp_path / "results")]) == 0
    listing = capsys.readouterr().out
    assert "2 entries" in listing and old["pretrain_key"][:12] in listing and "sweep-a" in listing
    assert "synthetic" in listing  # what the entry is: model, data, R2, epochs, seed
    assert main(["cache", "prune", "--storage", str(tmp_path / "results"), "--older-than", "30d", "--dry-run"]) == 0
    assert "would delete 1 entries" in capsys.readouterr().out and entry.is_dir()
    assert main(["cache", "prune", "--storage", str(tmp_path / "results"), "--older-than", "30d"]) == 0
    assert "deleted 1 entries" in capsys.readouterr().out and not entry.exists()
    assert cache.lookup(new["pretrain_key"]) is not None
    assert main(["cache", "prune", "--cache", str(tmp_path / "results" / "pretrain_cache"), "--keep-size", "0"]) == 0
    assert cache.entries() == []
    assert main(["cache", "prune", "--storage", str(tmp_path / "results")]) == 2  # says what to delete
    assert main(["cache", "list", "--cache", str(tmp_path / "nowhere")]) == 2
    assert "--cache=" in capsys.readouterr().err


@pytest.mark.slow  # three trials; the fast loop keeps the in-process hit test above
def test_one_trial_from_the_command_line_takes_the_cache_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = {**BASE, "model": {"name": "small_cnn", "width": 0.25}, "downstream": BASE["downstream"][:1]}
    (tmp_path / "trial.yaml").write_text(json.dumps(spec))
    cache = tmp_path / "cache"
    for out in ("first", "second"):
        assert main(["trial", str(tmp_path / "trial.yaml"), "--out", str(tmp_path / out), "--pretrain-cache", str(cache)]) == 0
    first, second = (json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("first", "second"))
    assert (first["pretrain_cache"], second["pretrain_cache"]) == ("stored", "hit")
    assert second["ptq_rtn_w4a8/top1"] == first["ptq_rtn_w4a8/top1"]
    (tmp_path / "file").write_text("")
    assert main(["trial", str(tmp_path / "trial.yaml"), "--out", str(tmp_path / "third"),
                 "--pretrain-cache", str(tmp_path / "file")]) == 2
    assert "--pretrain-cache" in capsys.readouterr().err and not (tmp_path / "third").exists()


def test_a_cache_folder_that_cannot_be_used_never_costs_the_trial(tmp_path: Path) -> None:
    (tmp_path / "not_a_folder").write_text("")
    final, reports, _ = _run(_config(**{"downstream.1.epochs": 0}), PretrainCache(tmp_path / "not_a_folder"))
    assert final["pretrain_cache"] == "uncacheable" and "pre-training cache not used" in final["notes"]
    assert "ptq_rtn_w4a8/top1" in final and [r["epoch"] for r in reports if "final" not in r] == [0, 1]


def test_a_sweep_naming_an_unusable_cache_folder_is_refused_before_it_starts(tmp_path: Path) -> None:
    import r2sweep

    (tmp_path / "file").write_text("")
    spec = {"model": {"name": "small_cnn"}, "objective": {"metric": "fp/top1"},
            "search": {"train.lr": {"loguniform": [0.01, 0.1]}}, "sweep": {"pretrain_cache": str(tmp_path / "file" / "c")}}
    with pytest.raises(ConfigError, match=r"^sweep\.pretrain_cache="):
        r2sweep.prepare_sweep(spec, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", storage=tmp_path / "results")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no store, no results
