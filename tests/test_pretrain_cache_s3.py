"""The pre-training cache on an S3 prefix (``PretrainCache("s3://bucket/prefix")``), against moto's
standalone S3 server: a hit bit-identical to a fresh trial, corrupt entries recomputed, leases (exclusive,
renewed, broken when their owner is dead), ``r2sweep cache list|prune``, and the errors that say what to do.
(The same cache on a folder: tests/test_pretrain_cache.py, whose trial helpers these tests reuse.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import torch
from conftest import serve_moto
from test_pretrain_cache import CPU, _config, _run, _same_results, _untimed

from r2sweep.cli.app import main
from r2sweep.core.errors import ConfigError
from r2sweep.core.pretrain_cache import CacheKey, PretrainCache, pretrain_key
from r2sweep.core.pretrain_cache.store import Epochs
from r2sweep.core.pretraining import proxy_grid

boto3 = pytest.importorskip("boto3")  # the s3 extra; the dev extra installs it

pytestmark = pytest.mark.server  # moto's server runs as a process

BUCKET = "r2sweep-cache"
FAST = {"downstream.1.epochs": 0}  # no QAT epoch: the cache's behaviour, not the downstream's


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """moto's S3 server, the environment pointing at it, one bucket; yields a boto3 client."""
    with serve_moto(tmp_path_factory.mktemp("moto"), BUCKET) as client:
        yield client


@pytest.fixture
def uri(s3) -> str:
    """A prefix of the bucket no other test uses."""
    return f"s3://{BUCKET}/caches/{uuid.uuid4().hex[:8]}"


def _prefix(uri: str) -> str:
    return uri.split("/", 3)[3] + "/"


def _objects(s3, uri: str, folder: str = "") -> dict[str, int]:
    """The objects under ``uri``'s ``folder``: name (relative to the cache) -> size."""
    answer = s3.list_objects_v2(Bucket=BUCKET, Prefix=_prefix(uri) + folder)
    return {o["Key"][len(_prefix(uri)):]: o["Size"] for o in answer.get("Contents", ())}


def _get(s3, uri: str, name: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=_prefix(uri) + name)["Body"].read()


def _put(s3, uri: str, name: str, data: bytes) -> None:
    s3.put_object(Bucket=BUCKET, Key=_prefix(uri) + name, Body=data)


# --- a trial served from the cache ----------------------------------------------------


def test_a_hit_from_s3_is_the_trial_trained_afresh_bit_for_bit(s3, uri: str) -> None:
    config = _config()
    fresh, fresh_reports, fresh_rng = _run(config)
    stored, _, _ = _run(config, PretrainCache(uri, user="s"), label="s/first")
    hit, hit_reports, hit_rng = _run(config, PretrainCache(uri, user="t"), label="t/second")  # another client
    assert (fresh["pretrain_cache"], stored["pretrain_cache"], hit["pretrain_cache"]) == ("off", "stored", "hit")
    _same_results(fresh, stored)
    _same_results(fresh, hit)
    assert hit["pretrain_source"] == "s/first"
    # What the hit saved: the entry's pre-training time less the download, never below 0. With
    # this tiny model a busy machine's download can cost as much as the training (CI saw 0.0).
    assert 0 <= hit["time/pretrain_saved_s"] <= stored["time/pretrain_s"]
    assert fresh_rng.equal(hit_rng)  # the RNG after pre-training came back from the entry
    assert _untimed(hit_reports) == _untimed(fresh_reports) and [r["pretrain_cache"] for r in hit_reports] == ["hit"] * 3

    # The entry: weights under a writer's own name, the manifest naming them; lease and progress gone.
    key = stored["pretrain_key"]
    manifest = json.loads(_get(s3, uri, f"entries/{key}/manifest.json"))
    assert manifest["weights"].startswith("weights-")
    assert sorted(_objects(s3, uri)) == sorted(f"entries/{key}/{name}" for name in
                                               ("manifest.json", manifest["weights"], "used_by/s", "used_by/t"))


def test_a_corrupt_entry_on_s3_is_recomputed_never_used(s3, uri: str) -> None:
    config = _config(**FAST)
    cache = PretrainCache(uri)
    first, _, _ = _run(config, cache)
    key = first["pretrain_key"]

    def manifest() -> dict:
        return json.loads(_get(s3, uri, f"entries/{key}/manifest.json"))

    def weights() -> str:
        return f"entries/{key}/{manifest()['weights']}"

    for damage in ("weights", "hash", "manifest"):
        if damage == "weights":  # torn
            _put(s3, uri, weights(), _get(s3, uri, weights())[:1000])
        elif damage == "hash":
            _put(s3, uri, f"entries/{key}/manifest.json", json.dumps({**manifest(), "weights_sha256": "0" * 64}).encode())
        else:
            _put(s3, uri, f"entries/{key}/manifest.json", b'{"format": 1, "key":')
        again, _, _ = _run(config, cache)
        assert again["pretrain_cache"] == "stored"  # trained again, and the entry written anew
        _same_results(first, again)
        assert cache.lookup(key) is not None
        assert [n for n in _objects(s3, uri) if "weights-" in n] == [weights()]  # the damaged entry went whole


def test_of_two_writers_of_one_key_the_first_manifest_wins(s3, uri: str) -> None:
    # Two trials that both pre-trained the key (the first one's lease was judged dead while it still ran).
    key = CacheKey("f" * 64, {"test": "two writers"})
    for value in (1.0, 2.0):
        PretrainCache(uri).store(key, model_state={"w": torch.full((4,), value)}, rng_state={}, epochs=Epochs([]),
                                 pretrain_s=1.0, source=f"writer {value:.0f}", summary="")
    entry = PretrainCache(uri).lookup(key.digest)
    assert entry is not None and entry.source == "writer 1" and entry.model_state["w"].eq(1.0).all()
    assert len([n for n in _objects(s3, uri) if "weights-" in n]) == 1  # the loser's weights went


def test_a_waiting_trial_follows_the_owner_then_breaks_a_dead_owners_lease(s3, uri: str) -> None:
    config = _config(**FAST)
    reference, reference_reports, _ = _run(config)
    epochs = _untimed(reference_reports)
    key = pretrain_key(config, CPU).digest
    # Another host's trial took the key, finished epoch 0, and stopped renewing its lease.
    cache = PretrainCache(uri, stale_after_s=2.0, poll_s=0.1)
    past = time.time() - 100
    _put(s3, uri, f"locks/{key}.lock", json.dumps({"token": "x", "host": "elsewhere", "pid": 1, "label": "other/trial",
                                                   "started": past, "expires": past + 2}).encode())
    cache.publish_progress(key, Epochs(epochs[:1], proxy_grid(config)))
    assert cache.holder(key) == "other/trial"
    started = time.perf_counter()
    final, reports, _ = _run(config, cache)
    # It waited until the lease had not been renewed for 2 s on the store's clock (whole seconds there).
    assert time.perf_counter() - started > 1.0
    assert final["pretrain_cache"] == "stored"
    assert _untimed(reports) == epochs and [r["epoch"] for r in epochs] == [0, 1]  # epoch 0 followed, not repeated
    assert [r["pretrain_cache"] for r in reports] == ["hit", "miss", "stored"]
    _same_results(reference, final)
    assert cache.holder(key) == "" and not _objects(s3, uri, "progress/")


def test_an_unreachable_bucket_never_costs_the_trial(s3) -> None:
    final, reports, _ = _run(_config(**FAST), PretrainCache("s3://no-such-bucket/cache"))
    assert final["pretrain_cache"] == "uncacheable" and "s3://no-such-bucket/cache" in final["notes"]
    assert "ptq_rtn_w4a8/top1" in final and [r["epoch"] for r in reports if "final" not in r] == [0, 1]


# --- leases ---------------------------------------------------------------------------


def test_of_four_claims_at_once_exactly_one_wins(uri: str) -> None:
    key = "c" * 64
    caches = [PretrainCache(uri) for _ in range(4)]  # four clients, as four trials have
    start, claims = threading.Barrier(len(caches)), [None] * len(caches)

    def claim(i: int) -> None:
        start.wait()
        claims[i] = caches[i].claim(key, f"trial {i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(caches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, c in enumerate(claims) if c is not None]
    assert len(winners) == 1 and caches[0].holder(key) == f"trial {winners[0]}"
    claims[winners[0]].release()
    assert caches[0].holder(key) == ""
    again = caches[1].claim(key, "later")
    assert again is not None
    again.release()


def test_a_lease_is_renewed_and_its_owner_learns_when_it_was_broken(s3, uri: str) -> None:
    key = "d" * 64
    lease_name = f"locks/{key}.lock"
    owner = PretrainCache(uri, heartbeat_s=0.1, stale_after_s=60)
    lease = owner.claim(key, "a")
    assert lease is not None and PretrainCache(uri).claim(key, "b") is None
    first = json.loads(_get(s3, uri, lease_name))
    time.sleep(0.5)
    assert json.loads(_get(s3, uri, lease_name))["expires"] > first["expires"] and not lease.lost  # renewed

    # A waiter judged it dead: the lease is deleted and taken by another trial.
    s3.delete_object(Bucket=BUCKET, Key=_prefix(uri) + lease_name)
    other = PretrainCache(uri).claim(key, "b")
    assert other is not None
    deadline = time.monotonic() + 5
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.lost
    lease.release()  # leaves the new owner's lease alone
    assert owner.holder(key) == "b"
    other.release()

    # An owner on this host whose process is gone: stale at once, however recent its lease.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _put(s3, uri, lease_name, json.dumps({"token": "t", "host": socket.gethostname(), "pid": int(dead.stdout)}).encode())
    taken = PretrainCache(uri, stale_after_s=3600).claim(key, "c")
    assert taken is not None and owner.holder(key) == "c"
    taken.release()


# --- the command line, and what it says when S3 cannot be used ------------------------


def test_cache_list_and_prune_on_s3(s3, uri: str, capsys: pytest.CaptureFixture) -> None:
    old, _, _ = _run(_config(**FAST), PretrainCache(uri))  # used by no sweep since it was made
    cache = PretrainCache(uri, user="sweep-a")
    new, _, _ = _run(_config(**{**FAST, "train.lr": 0.1}), cache)
    manifest = f"entries/{old['pretrain_key']}/manifest.json"
    _put(s3, uri, manifest, json.dumps({**json.loads(_get(s3, uri, manifest)), "created": time.time() - 40 * 86400}).encode())
    _put(s3, uri, "entries/" + "e" * 64 + "/weights-x.pt", b"on its way up")  # a writer's upload in progress

    listed = {e.key: e for e in cache.entries()}
    assert sorted(listed) == sorted([old["pretrain_key"], new["pretrain_key"]])
    for key, entry in listed.items():
        assert entry.size_bytes == sum(_objects(s3, uri, f"entries/{key}/").values())
        assert entry.path == f"{uri}/entries/{key}"
    assert listed[new["pretrain_key"]].used_by == ["sweep-a"] and listed[old["pretrain_key"]].used_by == []
    assert main(["cache", "list", "--cache", uri]) == 0
    listing = capsys.readouterr().out
    assert "2 entries" in listing and old["pretrain_key"][:12] in listing and "sweep-a" in listing and uri in listing
    # --storage s3://...: the cache a sweep there uses by default, <storage>/pretrain_cache (empty here).
    assert main(["cache", "list", "--storage", f"{uri}-storage"]) == 0
    assert "0 entries" in capsys.readouterr().out

    assert main(["cache", "prune", "--cache", uri, "--older-than", "30d", "--dry-run"]) == 0
    assert "would delete 1 entries" in capsys.readouterr().out and _objects(s3, uri, f"entries/{old['pretrain_key']}/")
    assert main(["cache", "prune", "--cache", uri, "--older-than", "30d"]) == 0
    assert "deleted 1 entries" in capsys.readouterr().out and not _objects(s3, uri, f"entries/{old['pretrain_key']}/")
    assert cache.lookup(new["pretrain_key"]) is not None
    assert [e.key for e in cache.prune(keep_bytes=0)] == [new["pretrain_key"]] and cache.entries() == []
    assert list(_objects(s3, uri, "entries/")) == ["entries/" + "e" * 64 + "/weights-x.pt"]  # young: left to its writer


def test_an_s3_cache_without_boto3_or_credentials_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(ConfigError, match=r"^pretrain_cache='gs://bucket/p' is not valid: .*s3://bucket/prefix"):
        PretrainCache("gs://bucket/p")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no role to find here: boto3's chain ends empty
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        PretrainCache("s3://bucket/p")
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 fails, as where it is not installed
    with pytest.raises(ConfigError, match=r"needs boto3: pip install 'r2sweep\[s3\]'"):
        PretrainCache("s3://bucket/p")
    assert main(["cache", "list", "--cache", "s3://bucket/p"]) == 2
    assert "pip install 'r2sweep[s3]'" in capsys.readouterr().err
