"""Does a study's answer reproduce? The same study run twice with other seeds, compared.

Each run gets its own study seed (so every sweep's sampler seed differs) and its own
confirmation seeds; both use search replicates, so each states an uncertainty that
counts the spread between searches (r2sweep.analysis.study_spread). Two answers
*agree* on a figure when they differ by at most twice the combined standard error,
``|a - b| <= 2 sqrt(se_a^2 + se_b^2)``. Prints per arm each run's tuned accuracy and
gain over the tuned baseline, and the agreement; ``--json`` writes it all. Running it
again resumes the studies from MLflow and Tune's state under ``--work``.

    PYTHONPATH=. .venv/bin/python benchmarks/study_reproduction.py --work runs/repro \\
        --json benchmarks/results/study_reproduction.json          # ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_one(study: Path, seed: int, confirm_seeds: list[int], work: Path) -> dict[str, Any]:
    import r2sweep

    name = f"{study.stem}-seed{seed}"
    started = time.perf_counter()
    result = r2sweep.run_study(study, overrides={"name": name, "seed": seed, "confirm.seeds": confirm_seeds},
                               tracking_uri=f"sqlite:///{work / 'mlflow.db'}", storage=work / "results",
                               out=work / name, register=False, progress=True)
    table = result.table
    arms = {}
    for arm in table.arms:
        entry: dict[str, Any] = {"picks": arm.picks, "winners": [r.trial_id for r in arm.rows if not r.missing]}
        for figure in ("objective", "gain"):
            value = getattr(arm, figure)
            if value is not None:
                entry[figure] = {"mean": value.mean, "se": value.se, "values": list(value.values),
                                 "seed_se": list(value.seed_se), "search_sd": value.search_sd}
        arms[arm.kind] = entry
    return {"name": name, "seed": seed, "confirm_seeds": confirm_seeds, "replicates": table.searches,
            "minutes": round((time.perf_counter() - started) / 60, 1), "verdict": table.verdict(),
            "recommended": table.recommended_arm.kind, "arms": arms, "table": table.markdown()}


def agreement(first: dict[str, Any], second: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind in first["arms"]:
        for figure in ("objective", "gain"):
            a, b = first["arms"][kind].get(figure), second["arms"].get(kind, {}).get(figure)
            if a is None or b is None:
                continue
            combined = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
            difference = a["mean"] - b["mean"]
            rows.append({"arm": kind, "figure": figure, "first": a["mean"], "first_se": a["se"], "second": b["mean"],
                         "second_se": b["se"], "difference": difference, "combined_se": combined,
                         "agree": abs(difference) <= 2 * combined})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", type=Path, default=ROOT / "search_spaces" / "studies" / "quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs=2, default=[1, 2], help="the two runs' study seeds")
    parser.add_argument("--confirm-seeds", default="1,2,3;4,5,6", help="the two runs' confirmation seeds")
    parser.add_argument("--work", type=Path, required=True, help="MLflow store, Tune storage and pages (resumable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    confirm = [[int(s) for s in group.split(",")] for group in args.confirm_seeds.split(";")]
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [run_one(args.study, seed, seeds, args.work) for seed, seeds in zip(args.seeds, confirm)]
    rows = agreement(*runs)
    for run in runs:
        print(f"\n{run['name']} (study seed {run['seed']}, confirmation seeds {run['confirm_seeds']}, "
              f"{run['replicates']} replicates, {run['minutes']} min):\n{run['verdict']}\n\n{run['table']}")
    print("\n| arm | figure | first | second | difference | 2 x combined se | agree |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['arm']} | {row['figure']} | {row['first']:.1f} +- {row['first_se']:.1f} | {row['second']:.1f} +- "
              f"{row['second_se']:.1f} | {row['difference']:+.1f} | {2 * row['combined_se']:.1f} | "
              f"{'yes' if row['agree'] else 'NO'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"study": args.study.name, "runs": runs, "agreement": rows}, indent=1))
    return 0 if all(row["agree"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
