"""Does the sweep find R2's gain without a human? TPE and random search against a dense grid.

The space is quickstart-like (R2 kind, strength, margin, learning rate) on the
harder embedded benchmark (``search_spaces/distorted_r18_w1.yaml`` by default),
where the model without R2 has headroom. Three things are measured on the same
objective (every trial at seed 0, so all three optimise the same function):

1. a **dense grid** over the space (every choice; ``--grid-points`` log- or
   linearly spaced values per range; conditions respected), run trial by trial:
   its best no-R2 value, its best R2 value, and so the best R2 gain;
2. **TPE sweeps** (the product: ``run_sweep`` with r2sweep's TPE sampler and its
   default no-R2 baseline first trial, ASHA off) of ``--trials`` trials for
   several sweep seeds;
3. **random-search sweeps** of the same length and seeds (with the same seed, TPE's
   random start-up trials are random search's first trials: the pair is matched);
4. the configurations that decide the result (the grid's best with and without
   R2, the best no-R2 trial any sweep found) **re-run on other seeds**, to see how
   much of the grid's gain is one lucky seed-0 draw.

The target is the grid's best no-R2 value plus 90% of the grid's best R2 gain;
the result is how many trials each sweep needed to reach it (the trials-to-target
curve, one line per sweep seed, in ``benchmarks/results/search_finds_it.png``).
Everything is saved to JSON as it finishes; re-running resumes.

    .venv/bin/python benchmarks/search_finds_it.py --grid-points 5 --seeds 0 1 2 3 4 --trials 32
    (~1 h on 2 cores: 130 grid points and 10 sweeps of 32 trials at ~13 s each, 2 at a time)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_efficiency import _run_one, best_so_far, run_search, save_json, trials_to_reach  # noqa: E402

from r2sweep.core.config.search import SearchParam  # noqa: E402
from r2sweep.core.config.sweep import SweepSpec, load_sweep_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "search_spaces" / "distorted_r18_w1.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
SHARE = 0.9  # of the grid's best R2 gain


def _values(param: SearchParam, points: int) -> list[Any]:
    if param.kind == "choice":
        return list(param.values)
    low, high = param.values
    if param.kind == "int":
        return sorted({round(low + (high - low) * i / (points - 1)) for i in range(points)})
    if param.kind == "loguniform":
        return [float(low * (high / low) ** (i / (points - 1))) for i in range(points)]
    return [float(low + (high - low) * i / (points - 1)) for i in range(points)]


def grid(spec: SweepSpec, points: int) -> list[dict[str, Any]]:
    """Every point of the dense grid, conditions respected (a parameter whose
    condition fails is simply absent, as in a define-by-run sweep)."""
    configs: list[dict[str, Any]] = [{}]
    for param in spec.params:
        grown = []
        for config in configs:
            if param.applies(config):
                grown += [{**config, param.path: value} for value in _values(param, points)]
            else:
                grown.append(config)
        configs = grown
    return configs


def run_grid(spec: SweepSpec, configs: list[dict], done: list[dict], concurrency: int, save) -> list[dict]:
    """Every grid point not in ``done``, saved as each finishes (an interrupted grid resumes)."""
    metric = spec.objectives[0].metric
    todo = [c for c in configs if c not in [d["config"] for d in done]]
    with ProcessPoolExecutor(concurrency) as pool:
        for config, final in zip(todo, pool.map(_run_one, [spec.trial_mapping(c) for c in todo])):
            done.append({"config": config, "value": final.get(metric), "fp": final.get("fp/top1")})
            save()
            print(f"grid {len(done)}/{len(configs)}: {config} -> {final.get(metric)}", file=sys.stderr, flush=True)
    return done


def _best_row(rows: list[dict], r2: bool) -> dict:
    return max((r for r in rows if r["value"] is not None and (r["config"].get("r2.kind", "none") != "none") == r2),
               key=lambda r: r["value"])


def reseed_targets(store: dict) -> dict[str, dict]:
    """The configurations whose values decide the result: the grid's best with and without
    R2, the best no-R2 trial any sweep found (the grid's lr axis is coarse), and each
    sweep's pick (does what the sweep chose hold up on seeds it never saw?)."""
    swept = [t for runs in (store.get("tpe", {}), store.get("random", {})) for trials in runs.values() for t in trials]
    targets = {"grid best R2": _best_row(store["grid"], True)["config"],
               "grid best no-R2": _best_row(store["grid"], False)["config"],
               "sweeps' best no-R2": _best_row(swept, False)["config"] if swept else None}
    for sampler in ("tpe", "random"):
        for seed, trials in sorted(store.get(sampler, {}).items(), key=lambda kv: int(kv[0])):
            best = max((t for t in trials if t["value"] is not None), key=lambda t: t["value"])
            targets[f"{sampler} seed {seed}'s pick"] = best["config"]
    return targets


def run_reseeds(spec: SweepSpec, store: dict, seeds: list[int], concurrency: int, save) -> None:
    """Re-run the deciding configurations on other seeds: how much of the grid's
    gain is the winner's curse of a single seed-0 draw."""
    metric = spec.objectives[0].metric
    done = store.setdefault("reseeded", {})
    for label, config in reseed_targets(store).items():
        if config is None or label in done:
            continue
        mappings = [{**spec.trial_mapping(config), "seed": seed} for seed in seeds]
        with ProcessPoolExecutor(concurrency) as pool:
            finals = list(pool.map(_run_one, mappings))
        done[label] = {"config": config, "seeds": seeds, "values": [f.get(metric) for f in finals]}
        save()


def target(store: dict) -> tuple[float, float, float]:
    """(best no-R2 on the grid, best R2 on the grid, the target value)."""
    rows = [r for r in store["grid"] if r["value"] is not None]
    base = max(r["value"] for r in rows if r["config"].get("r2.kind", "none") == "none")
    best = max(r["value"] for r in rows if r["config"].get("r2.kind", "none") != "none")
    return base, best, base + SHARE * (best - base)


def summarize(store: dict) -> str:
    base, best, goal = target(store)
    lines = [f"grid: {len(store['grid'])} points; best no-R2 {base:.2f}, best R2 {best:.2f}, gain {best - base:+.2f}; "
             f"target (no-R2 + {SHARE:.0%} of the gain) {goal:.2f}"]
    rows = [r for r in store["grid"] if r["value"] is not None]
    per_kind = {}
    for r in rows:
        kind = r["config"].get("r2.kind", "none")
        per_kind[kind] = max(per_kind.get(kind, -math.inf), r["value"])
    above = sum(1 for r in rows if r["value"] >= goal)
    lines.append("grid best per kind: " + ", ".join(f"{k} {v:.2f}" for k, v in per_kind.items())
                 + f"; {above} of {len(rows)} grid points reach the target")
    for sampler in ("tpe", "random"):
        needed = []
        for seed, trials in sorted(store.get(sampler, {}).items(), key=lambda kv: int(kv[0])):
            values = [t["value"] for t in trials]
            n = trials_to_reach(values, goal)
            needed.append(n)
            curve = best_so_far(values)
            lines.append(f"{sampler} seed {seed}: {'reached after ' + str(n) if n else 'not reached in ' + str(len(values))}"
                         f" trials; best {max(v for v in curve if v is not None):.2f}")
        if needed:
            reached = [n for n in needed if n]
            median = statistics.median([n if n else math.inf for n in needed])
            lines.append(f"{sampler}: {len(reached)}/{len(needed)} seeds reached the target, median trials "
                         f"{median if median != math.inf else '> ' + str(len(store[sampler]['0']) if '0' in store[sampler] else '?')}")
    reseeded = store.get("reseeded", {})
    means = {label: statistics.fmean([v for v in e["values"] if v is not None]) for label, e in reseeded.items()}
    fresh_goal = None
    if "grid best R2" in means and "grid best no-R2" in means:
        fresh_base, fresh_best = means["grid best no-R2"], means["grid best R2"]
        fresh_goal = fresh_base + SHARE * (fresh_best - fresh_base)
        lines.append(f"on fresh seeds the grid's gain is {fresh_best - fresh_base:+.2f} "
                     f"({fresh_base:.2f} -> {fresh_best:.2f}); the same target on fresh seeds: {fresh_goal:.2f}")
    for label, entry in reseeded.items():
        values = [v for v in entry["values"] if v is not None]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        verdict = ""
        if fresh_goal is not None and label.endswith("pick"):
            verdict = " [reaches the fresh-seed target]" if means[label] >= fresh_goal else " [below the fresh-seed target]"
        lines.append(f"{label} re-run on seeds {entry['seeds']}: {means[label]:.2f} +- {spread:.2f} "
                     f"({', '.join(f'{v:.1f}' for v in values)}){verdict}; config {entry['config']}")
    return "\n".join(lines)


def reached_fraction(runs: dict[str, list[dict]], goal: float, length: int) -> list[float]:
    """The trials-to-target curve: after n trials, the share of sweeps whose best has reached ``goal``."""
    needed = [trials_to_reach([t["value"] for t in trials], goal) for trials in runs.values()]
    return [sum(1 for k in needed if k is not None and k <= n) / len(needed) for n in range(1, length + 1)]


def plot(store: dict, path: Path) -> None:
    """Left: best objective so far per sweep seed against the grid's lines. Right: the
    trials-to-target curve, the share of sweep seeds that reached the target by trial n."""
    from r2sweep.core.plots import new_figure, save_png

    base, best, goal = target(store)
    figure = new_figure(12.5, 4.6)
    ax, reach = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    styles = {"tpe": ("tab:blue", "-", "TPE"), "random": ("0.45", "--", "random")}
    length = max([len(t) for s in styles for t in store.get(s, {}).values()] or [1])
    for sampler, (color, style, name) in styles.items():
        runs = store.get(sampler, {})
        for i, (seed, trials) in enumerate(sorted(runs.items(), key=lambda kv: int(kv[0]))):
            curve = best_so_far([t["value"] for t in trials])
            xs = [n for n, v in enumerate(curve, start=1) if v is not None]
            ax.step(xs, [curve[n - 1] for n in xs], where="post", color=color, linestyle=style, alpha=0.8,
                    label=f"{name} sweeps ({len(runs)} seeds)" if i == 0 else None)
        if runs:
            share = reached_fraction(runs, goal, length)
            reach.step(range(1, length + 1), [100 * f for f in share], where="post", color=color, linestyle=style,
                       linewidth=2, label=f"{name} ({len(runs)} sweep seeds)")
    ax.axhline(goal, color="tab:green", linewidth=1.2, label=f"target: no-R2 + {SHARE:.0%} of the grid's R2 gain ({goal:.1f})")
    ax.axhline(best, color="tab:green", linestyle=":", linewidth=1, label=f"grid best with R2 ({best:.1f})")
    ax.axhline(base, color="black", linestyle=":", linewidth=1, label=f"grid best without R2 ({base:.1f})")
    ax.set_xlim(1, length)
    ax.set_xlabel("trials")
    ax.set_ylabel("best objective so far (%)")
    ax.set_title(f"Best so far per sweep against the {len(store['grid'])}-point grid", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    reach.set_xlim(1, length)
    reach.set_ylim(-3, 103)
    reach.set_xlabel("trials")
    reach.set_ylabel("sweeps that reached the target (%)")
    reach.set_title("Trials to target", fontsize=11)
    reach.grid(True, alpha=0.3)
    reach.legend(fontsize=8, loc="upper left")
    save_png(figure, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", type=Path, default=SPACE)
    parser.add_argument("--grid-points", type=int, default=5, help="values per numeric range in the grid")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"], choices=["tpe", "random"])
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "search_finds_it.json")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--reseeds", type=int, nargs="*", default=[1, 2, 3],
                        help="seeds to re-run the grid's best configurations with (none: skip)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    spec = load_sweep_spec(yaml.safe_load(args.space.read_text()))
    store = json.loads(args.out.read_text()) if args.out.exists() else {"space": str(args.space.name)}

    def save() -> None:
        save_json(args.out, store)

    if not args.summary_only:
        configs = grid(spec, args.grid_points)
        if len(store.get("grid", [])) < len(configs):
            print(f"grid: {len(configs)} points", file=sys.stderr, flush=True)
            store["grid"] = run_grid(spec, configs, store.setdefault("grid", []), args.concurrency, save)
        for seed, sampler in itertools.product(args.seeds, args.samplers):
            if str(seed) in store.get(sampler, {}):
                continue
            print(f"{sampler} seed {seed}: {args.trials} trials", file=sys.stderr, flush=True)
            trials = run_search(sampler, seed, args.trials, args.concurrency, space=args.space, baseline=True)
            store.setdefault(sampler, {})[str(seed)] = trials
            save()
        if args.reseeds:
            print(f"re-running the deciding configurations on seeds {args.reseeds}", file=sys.stderr, flush=True)
            run_reseeds(spec, store, args.reseeds, args.concurrency, save)
    print(summarize(store))
    plot(store, args.out.with_suffix(".png"))
    print(f"figure: {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
