"""Fine-tuning with R2 from a trained no-R2 checkpoint against R2 from scratch, at 1-bit weights.

The setting is ``search_spaces/distorted_r18_w1.yaml``'s, where R2 pays
(``benchmarks/RESULTS.md``, "Does the sweep find it?"): ResNet-18 width 0.125 on
``distorted_digits`` (severity 1, 2 renders), 8 epochs SGD cosine, batch 64,
weight decay 5e-4, then per-channel round-to-nearest on an MSE grid with BN
re-estimated at 1 and 2 bits (A8). Per seed, four arms, each a real trial
(``r2sweep.run_trial`` with its own output folder):

1. **source**: no R2 from scratch (8 epochs, lr 0.2); its ``pretrained.pt`` is the
   checkpoint the fine-tunes start from;
2. **R2 from scratch**: L-inf 0.18, lr 0.2, 8 epochs (the grid's best R2 point);
3. **R2 fine-tune**: ``model.init_from`` = the source's ``pretrained.pt``, L-inf R2
   for a few epochs at a small lr (cosine schedule);
4. **control**: the same fine-tune with R2 off, so a gain is R2's and not the
   extra epochs'.

The fine-tuning recipe (epochs x lr x strength, ``--ft-epochs``, ``--ft-lrs``,
``--ft-strengths``) is picked on ``--select-seed`` (0) only, by its 1-bit top-1
there (ties: fewer epochs); arms 1-4 are then reported on ``--seeds`` (1 2 3), fresh
seeds (a trial's ``seed`` seeds its init and its data split), so the pick's
winner's curse does not inflate the result. A fine-tune always starts from the
source trained on its own seed (same train / validation split).

Wall time per arm is the trial's own ``time/total_s`` (data, training, both
PTQ results, its checkpoint files); "from nothing" adds, for the fine-tunes, the
source's ``time/pretrain_s`` (its data and training). Trials run one at a time,
``--threads`` torch threads each, every output folder emptied first (a trial never
resumes). Everything is saved to JSON as it finishes; re-running resumes.

    .venv/bin/python benchmarks/finetune_vs_scratch.py                 # ~11 min on 2 cores (32 trials)
    .venv/bin/python benchmarks/finetune_vs_scratch.py --summary-only  # table and figure from the JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "search_spaces" / "distorted_r18_w1.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
W1, W2, FP = "ptq_rtn_w1a8/top1", "ptq_rtn_w2a8/top1", "fp/top1"
ARMS = {  # key: (label in the table and figure, colour)
    "source": ("no R2 from scratch (the source)", "0.45"),
    "r2_scratch": ("R2 from scratch", "tab:green"),
    "r2_finetune": ("R2 fine-tune from the source", "tab:blue"),
    "control": ("fine-tune without R2 (control)", "tab:orange"),
}
KEPT = (FP, W1, W2, "time/total_s", "time/pretrain_s", "weights/max_abs", "weights/kurtosis")


def save_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically: a run killed mid-write keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def base_mapping(space: Path) -> Any:
    """The space's fixed trial config (its ``search``, ``sweep`` and ``objective`` set aside)."""
    from r2sweep.core.config.sweep import load_sweep_spec

    return load_sweep_spec(yaml.safe_load(space.read_text()))


def scratch_overrides(args: argparse.Namespace, seed: int, r2: bool) -> dict[str, Any]:
    values = {"seed": seed, "train.epochs": args.epochs, "train.lr": args.lr, "r2.kind": "none"}
    if r2:
        values.update({"r2.kind": "linf", "r2.strength": args.strength})
    return values


def finetune_overrides(seed: int, source: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """A fine-tune from ``source``; ``recipe["strength"]`` None is the no-R2 control."""
    values = {"seed": seed, "model.init_from": str(source), "train.epochs": recipe["epochs"],
              "train.lr": recipe["lr"], "train.schedule": "cosine", "r2.kind": "none"}
    if recipe.get("strength") is not None:
        values.update({"r2.kind": "linf", "r2.strength": recipe["strength"]})
    return values


def run_one(spec: Any, overrides: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """One trial in an emptied ``out_dir``: the metrics this benchmark keeps, and its wall time."""
    import r2sweep

    shutil.rmtree(out_dir, ignore_errors=True)  # never resume: the wall time must be a whole trial's
    load = os.getloadavg()[0]
    started, cpu = time.perf_counter(), time.process_time()
    final = r2sweep.run_trial(spec.trial_mapping(overrides), out_dir=out_dir)
    record = {key: final.get(key) for key in KEPT}
    record["wall_s"] = time.perf_counter() - started
    record["cpu_s"] = time.process_time() - cpu  # this process's CPU seconds, all threads: less hurt by other load
    record["load_before"] = load  # 1-minute load average as the trial started: another job on the cores shows here
    record["overrides"] = overrides
    if "model.init_from" in overrides:
        record["init_from_sha256"] = yaml.safe_load((out_dir / "config.yaml").read_text())["model"]["init_from_sha256"]
    return record


def describe(record: dict) -> str:
    return (f"FP {record[FP]:.1f}, W1 {record[W1]:.1f}, W2 {record[W2]:.1f}, "
            f"{record['time/total_s']:.1f} s")


def recipe_name(recipe: dict) -> str:
    r2 = f"L-inf {recipe['strength']:g}" if recipe.get("strength") is not None else "R2 off"
    return f"{recipe['epochs']} epoch{'s' if recipe['epochs'] > 1 else ''}, lr {recipe['lr']:g}, {r2}"


def ensure_source(spec: Any, args: argparse.Namespace, store: dict, seed: int, save) -> Path:
    """The seed's no-R2 source trial (run unless recorded with its checkpoint still in place)."""
    entry = store.setdefault("runs", {}).setdefault(str(seed), {})
    folder = args.work_dir / f"seed{seed}" / "source"
    checkpoint = folder / "pretrained.pt"
    if "source" not in entry or not checkpoint.is_file():
        if "source" in entry:  # the checkpoint is gone: the fine-tunes recorded from it no longer match
            print(f"seed {seed}: source checkpoint missing, re-running the source and its fine-tunes",
                  file=sys.stderr, flush=True)
            for key in ("r2_finetune", "control"):
                entry.pop(key, None)
            if seed == args.select_seed:
                store.pop("selection", None)
        entry["source"] = run_one(spec, scratch_overrides(args, seed, r2=False), folder)
        save()
        print(f"seed {seed} source: {describe(entry['source'])}", file=sys.stderr, flush=True)
    return checkpoint


def run_arm(spec: Any, args: argparse.Namespace, store: dict, seed: int, arm: str, save,
            recipe: dict | None = None) -> None:
    entry = store["runs"][str(seed)]
    wanted = None if recipe is None else (recipe if arm == "r2_finetune" else {**recipe, "strength": None})
    if arm in entry and entry[arm].get("recipe") == wanted:
        return
    folder = args.work_dir / f"seed{seed}" / arm
    if arm == "r2_scratch":
        overrides = scratch_overrides(args, seed, r2=True)
    else:
        source = ensure_source(spec, args, store, seed, save)
        overrides = finetune_overrides(seed, source, wanted)
    entry[arm] = run_one(spec, overrides, folder)
    if wanted is not None:
        entry[arm]["recipe"] = wanted
    save()
    print(f"seed {seed} {arm}: {describe(entry[arm])}", file=sys.stderr, flush=True)


def select_recipe(spec: Any, args: argparse.Namespace, store: dict, save) -> dict:
    """Every fine-tuning recipe on the selection seed; the best by 1-bit top-1 (ties: fewer epochs)."""
    seed = args.select_seed
    source = ensure_source(spec, args, store, seed, save)
    rows = store.setdefault("selection", [])
    for epochs, lr, strength in itertools.product(args.ft_epochs, args.ft_lrs, args.ft_strengths):
        recipe = {"epochs": epochs, "lr": lr, "strength": strength}
        if any(r["recipe"] == recipe for r in rows):
            continue
        folder = args.work_dir / f"seed{seed}" / f"select_e{epochs}_lr{lr:g}_s{strength:g}"
        record = run_one(spec, finetune_overrides(seed, source, recipe), folder)
        record["recipe"] = recipe
        rows.append(record)
        save()
        print(f"select seed {seed}: {recipe_name(recipe)} -> {describe(record)}", file=sys.stderr, flush=True)
    return chosen(store)


def chosen(store: dict) -> dict:
    best = max(store["selection"], key=lambda r: (r[W1], -r["recipe"]["epochs"]))
    return best["recipe"]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def arm_values(store: dict, seeds: list[int], arm: str, key: str) -> list[float]:
    return [store["runs"][str(s)][arm][key] for s in seeds if arm in store["runs"].get(str(s), {})]


def from_nothing(store: dict, seed: int, arm: str) -> float:
    """Seconds from no model to this arm's results: a fine-tune also pays its source's training."""
    runs = store["runs"][str(seed)]
    own = runs[arm]["time/total_s"]
    return own + runs["source"]["time/pretrain_s"] if arm in ("r2_finetune", "control") else own


def summarize(store: dict) -> str:
    seeds = store["seeds"]
    recipe = chosen(store)
    head = (f"Selection on seed {store['select_seed']} ({len(store['selection'])} fine-tuning recipes, "
            f"by W1 top-1; source there: {describe(store['runs'][str(store['select_seed'])]['source'])}):")
    lines = [head, "",
             "| recipe | W1 | W2 | FP | trial s |", "|---|---|---|---|---|"]
    for row in sorted(store["selection"], key=lambda r: (r["recipe"]["strength"], r["recipe"]["epochs"], r["recipe"]["lr"])):
        mark = "**" if row["recipe"] == recipe else ""
        lines.append(f"| {mark}{recipe_name(row['recipe'])}{mark} | {mark}{row[W1]:.1f}{mark} | {row[W2]:.1f} | "
                     f"{row[FP]:.1f} | {row['time/total_s']:.1f} |")
    seed0 = store["runs"][str(store["select_seed"])]
    if "r2_scratch" in seed0:
        lines.append(f"\nseed {store['select_seed']} R2 from scratch: {describe(seed0['r2_scratch'])}")
    lines += ["", f"Chosen recipe: {recipe_name(recipe)}. Seeds {', '.join(map(str, seeds))}, mean +- sd:", "",
              "| arm | W1 top-1 | W2 top-1 | FP top-1 | trial wall s | trial CPU s | from nothing s | per seed W1 |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, (label, _) in ARMS.items():
        cells = []
        for key in (W1, W2, FP):
            m, s = mean_sd(arm_values(store, seeds, arm, key))
            cells.append(f"{m:.1f} +- {s:.1f}")
        wall = mean_sd(arm_values(store, seeds, arm, "time/total_s"))
        cpu = mean_sd(arm_values(store, seeds, arm, "cpu_s"))
        total = mean_sd([from_nothing(store, s, arm) for s in seeds])
        per_seed = ", ".join(f"{v:.1f}" for v in arm_values(store, seeds, arm, W1))
        lines.append(f"| {label} | {' | '.join(cells)} | {wall[0]:.1f} +- {wall[1]:.1f} | {cpu[0]:.1f} | "
                     f"{total[0]:.1f} | {per_seed} |")
    lines.append("")
    for a, b in (("r2_finetune", "r2_scratch"), ("r2_finetune", "control"), ("r2_finetune", "source"),
                 ("r2_scratch", "source"), ("control", "source")):
        diffs = [x - y for x, y in zip(arm_values(store, seeds, a, W1), arm_values(store, seeds, b, W1))]
        m, s = mean_sd(diffs)
        lines.append(f"W1 {ARMS[a][0]} - {ARMS[b][0]}: {m:+.1f} +- {s:.1f} (paired, per seed "
                     f"{', '.join(f'{d:+.1f}' for d in diffs)})")
    return "\n".join(lines)


def plot(store: dict, path: Path) -> None:
    """Left: 1-bit top-1 per arm (mean +- sd over the report seeds, each seed a dot). Middle: wall
    time per arm (a fine-tune's bar stacked on its source's training). Right: the selection grid."""
    from r2sweep.core.plots import new_figure, save_png

    seeds = store["seeds"]
    figure = new_figure(15.5, 4.6)
    acc, wall, grid = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    labels = [label.replace(" (", "\n(").replace(" from the", "\nfrom the") for label, _ in ARMS.values()]
    for i, (arm, (_, color)) in enumerate(ARMS.items()):
        values = arm_values(store, seeds, arm, W1)
        m, s = mean_sd(values)
        acc.bar(i, m, yerr=s, color=color, alpha=0.85, capsize=5)
        acc.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        acc.text(i + 0.08, m + 0.4, f"{m:.1f}", ha="left", va="bottom", fontsize=9)
        own = statistics.fmean(arm_values(store, seeds, arm, "time/total_s"))
        if arm in ("r2_finetune", "control"):
            base = statistics.fmean(arm_values(store, seeds, "source", "time/pretrain_s"))
            wall.bar(i, base, color=ARMS["source"][1], alpha=0.35, hatch="//", label="the source's training" if arm == "r2_finetune" else None)
            wall.bar(i, own, bottom=base, color=color, alpha=0.85)
            wall.text(i, base + own + 0.3, f"{own:.1f} (+{base:.1f})", ha="center", fontsize=9)
        else:
            wall.bar(i, own, color=color, alpha=0.85)
            wall.text(i, own + 0.3, f"{own:.1f}", ha="center", fontsize=9)
    low = min(min(arm_values(store, seeds, arm, W1)) for arm in ARMS)
    acc.set_ylim(max(0, low - 8), None)
    acc.set_ylabel("W1 RTN top-1 (%)")
    acc.set_title(f"1-bit weights, seeds {', '.join(map(str, seeds))} (recipe: {recipe_name(chosen(store))})", fontsize=10)
    wall.set_ylim(0, wall.get_ylim()[1] * 1.12)
    wall.set_ylabel("wall time per trial (s)")
    wall.set_title("Wall time (2 threads; fine-tunes on top of their source)", fontsize=10)
    wall.legend(fontsize=8, loc="upper right")
    for ax in (acc, wall):
        ax.set_xticks(range(len(ARMS)), labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    rows = store["selection"]
    lrs = sorted({r["recipe"]["lr"] for r in rows})
    strengths = sorted({r["recipe"]["strength"] for r in rows})
    epochs_all = sorted({r["recipe"]["epochs"] for r in rows})
    for strength, color in zip(strengths, itertools.cycle(["tab:blue", "tab:purple", "tab:red"])):
        for epochs, style in zip(epochs_all, itertools.cycle([":o", "--s", "-^", "-.v"])):
            ys = [next((r[W1] for r in rows if r["recipe"] == {"epochs": epochs, "lr": lr, "strength": strength}), None)
                  for lr in lrs]
            grid.plot(lrs, ys, style, color=color, alpha=0.8, label=f"L-inf {strength:g}, {epochs} ep")
    seed0 = store["runs"][str(store["select_seed"])]
    grid.axhline(seed0["source"][W1], color="0.45", linestyle=":", label=f"source, seed {store['select_seed']}")
    if "r2_scratch" in seed0:
        grid.axhline(seed0["r2_scratch"][W1], color="tab:green", linestyle=":", label=f"R2 from scratch, seed {store['select_seed']}")
    grid.set_xscale("log")
    grid.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    grid.minorticks_off()
    grid.set_xlabel("fine-tuning lr (cosine)")
    grid.set_ylabel("W1 RTN top-1 (%)")
    grid.set_title(f"Recipe selection, seed {store['select_seed']} only", fontsize=10)
    grid.grid(True, alpha=0.3)
    grid.legend(fontsize=7, ncol=2)
    save_png(figure, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", type=Path, default=SPACE, help="the setting (its fixed trial config)")
    parser.add_argument("--epochs", type=int, default=8, help="from-scratch epochs (source and R2)")
    parser.add_argument("--lr", type=float, default=0.2, help="from-scratch lr (source and R2)")
    parser.add_argument("--strength", type=float, default=0.18, help="L-inf strength of R2 from scratch")
    parser.add_argument("--ft-epochs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ft-lrs", type=float, nargs="+", default=[0.005, 0.02, 0.05])
    parser.add_argument("--ft-strengths", type=float, nargs="+", default=[0.18, 0.5])
    parser.add_argument("--select-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="fresh seeds the arms are reported on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "r2sweep_finetune_vs_scratch",
                        help="trial output folders (the sources' pretrained.pt)")
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune_vs_scratch.json")
    parser.add_argument("--summary-only", action="store_true", help="table and figure from the JSON")
    args = parser.parse_args()
    store = json.loads(args.out.read_text()) if args.out.exists() else {}

    if not args.summary_only:
        import torch

        torch.set_num_threads(args.threads)
        spec = base_mapping(args.space)
        store.update(space=args.space.name, select_seed=args.select_seed, seeds=args.seeds, threads=args.threads,
                     torch=torch.__version__, scratch={"epochs": args.epochs, "lr": args.lr, "strength": args.strength})

        def save() -> None:
            save_json(args.out, store)

        recipe = select_recipe(spec, args, store, save)
        print(f"chosen on seed {args.select_seed}: {recipe_name(recipe)}", file=sys.stderr, flush=True)
        run_arm(spec, args, store, args.select_seed, "r2_scratch", save)  # context only: the pick's seed
        for seed in args.seeds:
            ensure_source(spec, args, store, seed, save)
            run_arm(spec, args, store, seed, "r2_scratch", save)
            run_arm(spec, args, store, seed, "r2_finetune", save, recipe)
            run_arm(spec, args, store, seed, "control", save, recipe)
    print(summarize(store))
    plot(store, args.out.with_suffix(".png"))
    print(f"figure: {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
