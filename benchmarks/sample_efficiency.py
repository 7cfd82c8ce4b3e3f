"""Sample efficiency: how many trials TPE needs on the quickstart space.

The reference is the best of 64 random-search trials on the quickstart space
(``search_spaces/quickstart.yaml``: R2 kind, strength, margin and learning rate,
MobileNet-V2 w0.25 on digits, 4-bit per-tensor PTQ). The question is how many
trials r2sweep's TPE sampler needs to come within 0.5 points of that reference,
over several sweep seeds; random search's own curve (the expected best of n of
its 64 trials, averaged over orderings) is drawn beside it.

Both searches run through the product (``run_sweep``: real Ray Tune, Optuna,
concurrency 2) with early stopping off, so every trial reports its final value
and the curves measure the sampler, not ASHA. Trials are counted in the order
Tune created them. Each finished sweep is saved to the JSON file at once, so an
interrupted run keeps what it finished and a re-run skips it.

    .venv/bin/python benchmarks/sample_efficiency.py --tpe-seeds 0 1 2
    (~45 min on 2 cores: 64 + 3 x 32 trials of ~16 s, two at a time, then the
    best configuration of each search re-run with 3 more seeds)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import yaml

import r2sweep
from r2sweep.core.config.sweep import load_sweep_spec

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
WITHIN = 0.5  # points below the random reference that count as "reached"


def save_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically: a run killed mid-write keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _trial_index(result) -> int:
    """Tune's creation order: the counter after the trial id in the trial's folder
    name (``trainable_c83fd620_7_r2_kind=...``)."""
    return int(Path(result.path).name.split("_")[2])


def run_search(sampler: str, seed: int, trials: int, concurrency: int, space: Path = QUICKSTART,
               baseline: bool = False) -> list[dict]:
    """One sweep of ``space`` (default the quickstart's) with ASHA off; the trials in creation order.

    ``baseline`` off by default: the curve measures the sampler alone (an enqueued
    no-R2 first trial would be the same for every search). The recorded quickstart
    runs predate the baseline setting.
    """
    data = yaml.safe_load(space.read_text())
    data["name"] = f"efficiency-{sampler}-{seed}"
    data["sweep"].update(sampler=sampler, seed=seed, num_samples=trials, max_concurrent=concurrency,
                         scheduler="none", baseline=baseline)
    spec = load_sweep_spec(data)
    metric = spec.objectives[0].metric
    with tempfile.TemporaryDirectory() as tmp:
        swept = r2sweep.run_sweep(data, tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}", storage=Path(tmp) / "results",
                                  num_cpus=concurrency, progress=False, register=False)
    rows = []
    for result in swept.tune_results:
        metrics = result.metrics or {}
        config = {k: v for k, v in (result.config or {}).items()}
        rows.append({"index": _trial_index(result), "value": metrics.get(metric), "config": config})
    return sorted(rows, key=lambda r: r["index"])


def reseeded(config: dict, seeds: list[int], concurrency: int) -> list[float]:
    """The objective of one sampled configuration re-run with other seeds (the noise floor)."""
    from concurrent.futures import ProcessPoolExecutor

    data = yaml.safe_load(QUICKSTART.read_text())
    spec = load_sweep_spec(data)
    mappings = [{**spec.trial_mapping(config), "seed": seed} for seed in seeds]
    with ProcessPoolExecutor(concurrency) as pool:
        finals = list(pool.map(_run_one, mappings))
    return [f[spec.objectives[0].metric] for f in finals]


def _run_one(mapping: dict) -> dict:
    import torch

    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.trial import run_trial

    torch.set_num_threads(1)
    return run_trial(load_trial_config(mapping))


def best_so_far(values: list[float | None]) -> list[float | None]:
    """Running maximum; ``None`` until the first trial that reported a value."""
    curve, best = [], None
    for v in values:
        if v is not None and (best is None or v > best):
            best = v
        curve.append(best)
    return curve


def trials_to_reach(values: list[float | None], target: float) -> int | None:
    """How many trials until the running best is at least ``target`` (None: never)."""
    for n, best in enumerate(best_so_far(values), start=1):
        if best is not None and best >= target:
            return n
    return None


def expected_random_curve(values: list[float | None], length: int, orderings: int = 2000) -> list[float]:
    """Mean best-of-n over random orderings of the random-search trials."""
    rng = random.Random(0)
    finite = [v if v is not None else float("-inf") for v in values]
    totals = [0.0] * length
    for _ in range(orderings):
        order = rng.sample(finite, len(finite))
        best = float("-inf")
        for n in range(length):
            best = max(best, order[n])
            totals[n] += best
    return [t / orderings for t in totals]


def summarize(store: dict) -> str:
    random_values = [r["value"] for r in store["random"]["trials"]]
    reference = max(v for v in random_values if v is not None)
    target = reference - WITHIN
    lines = [f"random search: best of {len(random_values)} trials = {reference:.2f}; target {target:.2f}"]
    needed = []
    for seed, run in sorted(store["tpe"].items(), key=lambda kv: int(kv[0])):
        values = [r["value"] for r in run["trials"]]
        n = trials_to_reach(values, target)
        needed.append(n)
        curve = best_so_far(values)
        marks = ", ".join(f"{k}: {curve[k - 1]:.2f}" for k in (8, 16, 24, 32) if k <= len(curve) and curve[k - 1])
        lines.append(f"TPE seed {seed}: reached after {n if n else 'never (>' + str(len(values)) + ')'} trials "
                     f"(best so far {marks})")
    random_n = trials_to_reach(expected_random_curve(random_values, len(random_values)), target)
    lines.append(f"random search, expected over orderings: reaches the target after {random_n} trials")
    late = [r["value"] for run in store["tpe"].values() for r in run["trials"][16:] if r["value"] is not None]
    if late:
        median = sorted(late)[len(late) // 2]
        random_median = sorted(v for v in random_values if v is not None)[len(random_values) // 2]
        lines.append(f"median trial: TPE trials 17+ {median:.2f}, random {random_median:.2f}")
    for label, entry in store.get("noise", {}).items():
        values = [entry["seed0"], *entry["reseeded"]]
        lines.append(f"noise: best of {label} ({entry['seed0']:.2f} at seed 0) re-run with other seeds: "
                     + ", ".join(f"{v:.2f}" for v in entry["reseeded"])
                     + f"; mean of all {sum(values) / len(values):.2f}")
    reached = sorted(n for n in needed if n)
    if reached:
        median = reached[len(reached) // 2] if len(reached) == len(needed) else None
        lines.append(f"TPE: {len(reached)}/{len(needed)} seeds reached the target; trials needed {reached}"
                     + (f", median {median}" if median else ""))
    return "\n".join(lines)


def plot(store: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    random_values = [r["value"] for r in store["random"]["trials"]]
    reference = max(v for v in random_values if v is not None)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    length = max([len(random_values)] + [len(r["trials"]) for r in store["tpe"].values()])
    ax.plot(range(1, len(random_values) + 1), expected_random_curve(random_values, len(random_values)),
            color="grey", lw=2, label="random search (expected best of n)")
    for seed, run in sorted(store["tpe"].items(), key=lambda kv: int(kv[0])):
        curve = best_so_far([r["value"] for r in run["trials"]])
        xs = [n for n, v in enumerate(curve, start=1) if v is not None]
        ax.step(xs, [curve[n - 1] for n in xs], where="post", label=f"TPE seed {seed}")
    ax.axhline(reference - WITHIN, color="black", ls="--", lw=1, label=f"best of 64 random - {WITHIN}")
    ax.axvline(16, color="red", ls=":", lw=1, label="target: 16 trials")
    ax.set_xlim(1, length)
    ax.set_ylim(max(reference - 15, 0), reference + 1)
    ax.set_xlabel("trials")
    ax.set_ylabel("best W4 PTQ top-1 so far (%)")
    ax.set_title("Quickstart space: TPE against random search")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random-trials", type=int, default=64)
    parser.add_argument("--tpe-trials", type=int, default=32)
    parser.add_argument("--tpe-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_efficiency.json")
    parser.add_argument("--summary-only", action="store_true", help="print the saved results, run nothing")
    parser.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2, 3],
                        help="re-run the random-search best and each TPE best with these seeds")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    store = json.loads(args.out.read_text()) if args.out.exists() else {"random": None, "tpe": {}}

    def save() -> None:
        save_json(args.out, store)

    if not args.summary_only:
        if store["random"] is None:
            print(f"random search: {args.random_trials} trials", file=sys.stderr)
            store["random"] = {"seed": args.random_seed,
                               "trials": run_search("random", args.random_seed, args.random_trials, args.concurrency)}
            save()
        for seed in args.tpe_seeds:
            if str(seed) in store["tpe"]:
                continue
            print(f"TPE seed {seed}: {args.tpe_trials} trials", file=sys.stderr)
            store["tpe"][str(seed)] = {"trials": run_search("tpe", seed, args.tpe_trials, args.concurrency)}
            save()
        if args.noise_seeds and "noise" not in store:
            bests = {"random": store["random"]["trials"], **{f"tpe {k}": v["trials"] for k, v in store["tpe"].items()}}
            store["noise"] = {}
            for label, trials in bests.items():
                best = max((t for t in trials if t["value"] is not None), key=lambda t: t["value"])
                print(f"noise: re-running the best of {label} with seeds {args.noise_seeds}", file=sys.stderr)
                store["noise"][label] = {"config": best["config"], "seed0": best["value"],
                                         "reseeded": reseeded(best["config"], args.noise_seeds, args.concurrency)}
            save()
    print(summarize(store))
    plot(store, args.out.with_suffix(".png"))
    print(f"figure: {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
