"""Block reconstruction against layer-wise AdaRound (issue 25): BRECQ and QDrop on the paper_effect models.

For each setting and seed, one trial: the setting's model pre-trained once without R2,
at the tuned baseline's training knobs recorded in benchmarks/RESULTS.md, then every
PTQ algorithm on that same pre-trained model, each result with its accuracy and its
cost (the trial's ``time/<result>_s``). The settings are the study files' models and
data (``search_spaces/studies/``): MobileNet-V2 at W2A8 and W2A4, ResNet-18 at W2A4,
MobileNet-V1 at W2A2.

    .venv/bin/python benchmarks/reconstruction.py --settings mbv2 --seeds 1 2 3
    .venv/bin/python benchmarks/reconstruction.py --settings r18 --round-lr 1e-2   # every algorithm's rounding lr
    .venv/bin/python benchmarks/reconstruction.py --table results/reconstruction_*.json --plot out.png

With ``--study NAME`` the models are instead a finished ``r2sweep study``'s confirmed
winners (the tuned baseline and each R2 kind, read from MLflow), on the study's seeds,
at its W bits and A8, pre-trained through the study storage's pre-training cache (the
study's re-runs stored them there): does R2 still pay when the PTQ is the strongest?

    .venv/bin/python benchmarks/reconstruction.py --study ptq-mbv2-linf --tracking-uri sqlite:///mlflow.db \
        --storage r2sweep_results --algorithms brecq qdrop --iters 500 --round-lr 1e-2

Writes ``results/reconstruction.json`` (``--out``): one entry per setting, seed and knobs,
filled one result at a time; a re-run skips the results it holds. The pre-trained models
are kept in ``results/reconstruction-cache/`` beside it (a pre-training cache), so other
knobs on the same seeds cost no pre-training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from r2sweep.core.config.strict_yaml import load_file
from r2sweep.core.config.study import load_study_spec
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.pretrain_cache import PretrainCache
from r2sweep.core.pretraining import HIT
from r2sweep.core.trial import run_trial

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ("adaround", "brecq", "qdrop")
# setting: (study file, the tuned no-R2 baseline's training knobs as recorded, (weight, activation) bits)
SETTINGS: dict[str, tuple[str, dict[str, float], tuple[tuple[int, int], ...]]] = {
    "mbv2": ("ptq-mbv2", {"lr": 0.027, "weight_decay": 3.0e-4}, ((2, 8), (2, 4))),
    "r18": ("dkm-r18", {"lr": 0.191, "weight_decay": 2.05e-3}, ((2, 4),)),
    "mbv1": ("qat-mbv1", {"lr": 0.064, "weight_decay": 3.8e-3}, ((2, 2),)),
}
# The PTQ grid every algorithm shares (the ptq-mbv2 study's): per channel, MSE range, BN re-estimated.
GRID = {"granularity": "channel", "range": "mse", "bn_reestimate": True, "calib_samples": 512}


def trial_config(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    study_file, knobs, bit_pairs = SETTINGS[setting]
    study = load_study_spec(load_file(ROOT / "search_spaces" / "studies" / f"{study_file}.yaml"))
    base = study.baseline.spec.trial.to_mapping()
    downstream = [{"method": "ptq", "algorithm": algorithm, "weight_bits": [w], "act_bits": a, **GRID, **_rounding(args)}
                  for w, a in bit_pairs if not args.bits or f"{w}/{a}" in args.bits for algorithm in args.algorithms]
    return {"data": base["data"], "model": base["model"], "seed": seed, "downstream": downstream,
            "train": {**base["train"], **knobs, "device": "cpu"}}


def _rounding(args: argparse.Namespace) -> dict[str, Any]:
    return {"adaround_iters": args.iters, **({"adaround_lr": args.round_lr} if args.round_lr else {})}


def setting_trials(args: argparse.Namespace):
    """(key, trial config mapping) per setting and seed, at the recorded baseline knobs."""
    for setting in args.settings:
        for seed in args.seeds:
            yield f"{setting}/seed{seed}/iters{args.iters}/lr{args.round_lr or 'default'}", trial_config(setting, seed, args)


def study_trials(args: argparse.Namespace):
    """(key, trial config mapping) per confirmed winner of study ``args.study`` and study seed."""
    import r2sweep
    from r2sweep.analysis.confirm import logged_trial_config
    from r2sweep.analysis.select import read_sweep
    from r2sweep.tracking.store import Tracker

    study = r2sweep.load_study(args.study, tracking_uri=args.tracking_uri)
    tracker = Tracker(args.tracking_uri)
    for row in study.table.rows:
        logged = logged_trial_config(read_sweep(tracker, row.sweep)[0], row.run_id)
        weight_bits = sorted({bits for method in logged["downstream"] for bits in method.get("weight_bits", [])})
        downstream = [{"method": "ptq", "algorithm": algorithm, "weight_bits": [weight_bits[0]], "act_bits": 8, **GRID,
                       **_rounding(args)} for algorithm in args.algorithms]
        for seed in [s for s in study.table.seeds if s in args.seeds]:  # --seeds splits the work between processes
            key = (f"study:{args.study}/{row.kind}-{row.trial_id}/seed{seed}/iters{args.iters}/"
                   f"lr{args.round_lr or 'default'}")
            yield key, {**logged, "seed": seed, "downstream": downstream}


def run(args: argparse.Namespace) -> None:
    """One trial per (model, seed, result), so that an interrupted run loses at most one
    result; each model's pre-training is paid once per seed, through a pre-training cache."""
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.study:
        cache = PretrainCache(Path(args.storage) / "pretrain_cache", user="reconstruction")
        trials = study_trials(args)
    else:
        cache = PretrainCache(args.out.parent / "reconstruction-cache", user="reconstruction")
        trials = setting_trials(args)
    torch.set_num_threads(args.threads)
    for key, mapping in trials:
        for method in mapping["downstream"]:
            # A study's trial config names its own result as the per-epoch proxy: this result
            # takes its place (the same grid, so the pre-training cache key is the same).
            (result,) = load_trial_config({**mapping, "downstream": [method], "proxy": {"result": "fp"}}).result_names()
            proxy = {"proxy": {**mapping["proxy"], "result": result}} if "proxy" in mapping else {}
            config = load_trial_config({**mapping, "downstream": [method], **proxy})
            done = results.setdefault(key, {})
            if f"{result}/top1" in done:
                continue
            final = run_trial(config, progress=lambda line: print(f"{key} {result}: {line}", flush=True),
                              device=torch.device("cpu"), cache=cache, cache_label=key)
            done.update({name: value for name, value in final.items()
                         if name.endswith("/top1") or name == f"time/{result}_s"})
            if final["pretrain_cache"] != HIT:  # the pre-training's own cost, not a cache hit's
                done["time/pretrain_s"] = final["time/pretrain_s"]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(table(results))


def _group(key: str) -> str:
    """A result key's group: its setting (or study winner) and knobs, without the seed."""
    setting, _, knobs = key.partition("/seed")
    return f"{setting} ({knobs.partition('/')[2]})"


def summary(results: dict[str, dict[str, float]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(group, result name) -> the seeds' values, mean, sd and mean cost; a group is one
    setting (or study winner) at one set of knobs, gathered over its seeds."""
    groups: dict[str, list[dict[str, float]]] = {}
    for key, metrics in results.items():
        groups.setdefault(_group(key), []).append(metrics)
    rows = {}
    for group, runs in sorted(groups.items()):
        for name in sorted({k.removesuffix("/top1") for run in runs for k in run if k.startswith("ptq_")}):
            values = [run[f"{name}/top1"] for run in runs if f"{name}/top1" in run]
            costs = [run[f"time/{name}_s"] for run in runs if f"time/{name}_s" in run]  # the seeds that hold it
            rows[group, name] = {
                "values": values, "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "cost": statistics.fmean(costs) if costs else float("nan")}
    return rows


def table(results: dict[str, dict[str, float]]) -> str:
    """Per setting and knobs: each result's mean +- sd over seeds, and its mean cost."""
    lines = ["| setting | result | top-1 (mean +- sd) | seeds | cost per result (s) |", "|---|---|---|---|---|"]
    for (group, name), row in summary(results).items():
        lines.append(f"| {group} | {name} | {row['mean']:.1f} +- {row['sd']:.1f} | {len(row['values'])} | {row['cost']:.0f} |")
    return "\n".join(lines)


def paired(results: dict[str, dict[str, float]], reference: str = "adaround") -> dict[tuple[str, str], list[float]]:
    """(group, result name) -> per seed, the result minus ``reference``'s at the same bits
    on the same pre-trained model: the comparison the seeds' spread does not blur."""
    differences: dict[tuple[str, str], list[float]] = {}
    for key, metrics in sorted(results.items()):
        group = _group(key)
        for name in sorted(k.removesuffix("/top1") for k in metrics if k.startswith("ptq_")):
            _, algorithm, bits = name.split("_", 2)
            against = metrics.get(f"ptq_{reference}_{bits}/top1")
            if algorithm != reference and against is not None:
                differences.setdefault((group, name), []).append(metrics[f"{name}/top1"] - against)
    return differences


def paired_table(results: dict[str, dict[str, float]], reference: str = "adaround") -> str:
    lines = [f"| setting | result | minus {reference} (mean +- sd) | each seed |", "|---|---|---|---|"]
    for (group, name), values in paired(results, reference).items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {group} | {name} | {statistics.fmean(values):+.1f} +- {sd:.1f} | "
                     + ", ".join(f"{v:+.1f}" for v in values) + " |")
    return "\n".join(lines)


def panels(results: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The figure's panels: one per setting, knobs and bit widths, each {algorithm: its summary row},
    and under "fp" the float model's top-1 over the same seeds where the results hold it."""
    fp: dict[str, list[float]] = {}
    for key, metrics in results.items():
        if "fp/top1" in metrics:
            fp.setdefault(_group(key), []).append(metrics["fp/top1"])
    by_panel: dict[str, dict[str, dict[str, Any]]] = {}
    for (group, name), row in summary(results).items():
        _, algorithm, bits = name.split("_", 2)  # ptq_<algorithm>_w<W>a<A>
        setting, _, knobs = group.removeprefix("study:").partition(" (")
        panel = by_panel.setdefault(f"{setting}\n{bits.upper()} ({knobs.rstrip(')')})", {})
        panel[algorithm] = row
        if group in fp:  # the float model the panel's results start from
            panel["fp"] = {"values": fp[group], "mean": statistics.fmean(fp[group])}
    return dict(sorted(by_panel.items()))


def plot(results: dict[str, dict[str, float]], path: Path) -> Path:
    """One panel per setting and bit widths: each algorithm's top-1, mean +- sd as a bar, each seed as a dot."""
    from r2sweep.core.plots import new_figure, save_png

    by_panel = panels(results)
    figure = new_figure(3.2 * len(by_panel), 3.6)
    for i, (title, rows) in enumerate(by_panel.items()):
        ax = figure.add_subplot(1, len(by_panel), i + 1)
        for x, algorithm in enumerate(a for a in ALGORITHMS if a in rows):
            row = rows[algorithm]
            ax.bar(x, row["mean"], yerr=row["sd"], color=f"C{ALGORITHMS.index(algorithm)}", alpha=0.8, capsize=4)
            ax.plot([x] * len(row["values"]), row["values"], "k.", markersize=4)
            ax.text(x, row["mean"] / 2, f"{row['mean']:.1f}", ha="center", fontsize=8)
        if "fp" in rows:
            ax.axhline(rows["fp"]["mean"], color="grey", linestyle="--", linewidth=1, label="float (mean)")
            if i == 0:
                ax.legend(loc="center right", fontsize=7)
        shown = [a for a in ALGORITHMS if a in rows]
        ax.set_xticks(range(len(shown)), shown)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 100)
        if i == 0:
            ax.set_ylabel("top-1 % (bar: mean +- sd; dots: seeds)")
    figure.suptitle("Layer-wise AdaRound against block reconstruction (BRECQ, QDrop)", fontsize=10)
    return save_png(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--iters", type=int, default=1000, help="rounding iterations per layer or block")
    parser.add_argument("--round-lr", type=float, default=None, help="the rounding's Adam lr (default: the field's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reconstruction.json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument("--bits", nargs="+", metavar="W/A",
                        help="only these of each setting's weight/activation bits, e.g. 2/8 (default: all)")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--study", help="measure this finished study's confirmed winners instead of --settings")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="the study's MLflow store")
    parser.add_argument("--storage", default="r2sweep_results", help="the study's storage (its pre-training cache)")
    parser.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                        help="print the table of these results files (merged); run nothing")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="with --table: draw the results as bars into PNG")
    args = parser.parse_args(argv)
    if args.plot and not args.table:
        parser.error("--plot draws results files: name them with --table JSON [JSON ...]")
    if args.table:
        results = {key: value for path in args.table for key, value in json.loads(path.read_text()).items()}
        print(table(results))
        print(paired_table(results))
        if args.plot:
            print(f"figure: {plot(results, args.plot)}")
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
