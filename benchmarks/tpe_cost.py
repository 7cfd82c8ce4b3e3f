"""What one suggestion costs the driver as the search's history grows, per Optuna sampler.

Optuna's TPE fits its density estimators on every finished trial at each
suggestion, so its cost grows with the history by design. This measures it on
the quickstart's search space (R2 kind, then strength and the margin's knobs
only where they apply: define-by-run, as sweeps sample it): a study is given H
finished trials (random points, a smooth made-up objective), then the time of
the next ``--asks`` suggestions (ask, sample the space, tell) is averaged.
Samplers: r2sweep's default TPE (multivariate, grouped), TPE with
``constant_liar`` off (Optuna 4's default is on), independent TPE, TPE with ``n_startup_trials`` at H (still
random), and the random sampler.

    PYTHONPATH=. .venv/bin/python benchmarks/tpe_cost.py --history 100 1000 3000 10000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.tune.space import distributions_of, sample

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"


def samplers(history: int) -> dict[str, optuna.samplers.BaseSampler]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return {
            "tpe (r2sweep's: multivariate, group)": optuna.samplers.TPESampler(
                seed=0, multivariate=True, group=True, n_startup_trials=8),
            # Optuna 4 turns constant_liar on by default (r2sweep's TPE above has it): this is it off.
            "tpe, constant_liar off": optuna.samplers.TPESampler(
                seed=0, multivariate=True, group=True, n_startup_trials=8, constant_liar=False),
            "tpe, independent": optuna.samplers.TPESampler(seed=0, n_startup_trials=8),
            "tpe, n_startup_trials past the history": optuna.samplers.TPESampler(
                seed=0, multivariate=True, group=True, n_startup_trials=history + 1_000_000),
            "random": optuna.samplers.RandomSampler(seed=0),
        }


def _objective(params: dict[str, Any]) -> float:
    return 80 - 5 * abs(math.log10(params.get("r2.strength", 1e-3)) + 2) + random.random()


def fill(study: optuna.Study, params: Any, history: int) -> None:
    """``history`` finished trials drawn at random from the space, added without running a sampler."""
    filler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    distributions = distributions_of(params)
    for _ in range(history):
        trial = filler.ask()
        sample(trial, params)
        filler.tell(trial, 0.0)
        drawn = trial.params
        study.add_trial(optuna.trial.create_trial(
            params=drawn, distributions={k: distributions[k] for k in drawn}, value=_objective(drawn)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, nargs="+", default=[100, 1000, 3000, 10000])
    parser.add_argument("--asks", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = load_sweep_spec(SPACE).params
    rows = []
    for history in args.history:
        for name, sampler in samplers(history).items():
            study = optuna.create_study(direction="maximize", sampler=sampler)
            fill(study, params, history)
            started = time.perf_counter()
            for _ in range(args.asks):
                trial = study.ask()
                sample(trial, params)
                study.tell(trial, _objective(trial.params))
            ms = (time.perf_counter() - started) / args.asks * 1000
            rows.append({"history": history, "sampler": name, "ms_per_suggestion": round(ms, 2)})
            print(f"history {history:>6}  {name:<42} {ms:9.2f} ms per suggestion", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
