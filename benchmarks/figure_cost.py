"""The per-trial weight-histogram figure's CPU cost: fixed margins (now) against the constrained layout it replaced.

Every trial draws this figure, so its cost is paid once per trial (and was most of a
tiny trial's in the test suite). One process, the two layouts alternated, CPU time:

    .venv/bin/python benchmarks/figure_cost.py --models small_cnn mobilenet_v2 --pairs 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import r2sweep.core.plots as plots
from r2sweep.core.build import build_trial_data, build_trial_model
from r2sweep.core.config.trial import load_trial_config


def constrained_grid(count: int, title: str, title_lines: int = 2):
    """The grid as it was before: matplotlib's constrained layout decides the margins."""
    columns = min(2, count)
    rows = math.ceil(count / columns)
    figure = plots.new_figure(5.6 * columns, 3.6 * rows + 0.5)  # new_figure: layout="constrained"
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    figure.suptitle(title, fontsize=12)
    return figure, axes[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "mobilenet_v2"])
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args(argv)
    grids = {"constrained": constrained_grid, "fixed": plots._grid}
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "weights.png"
        for name in args.models:
            config = load_trial_config({"data": {"name": "synthetic", "num_samples": 128},
                                        "model": {"name": name, "width": 0.25 if name == "small_cnn" else 0.5}})
            model, _ = build_trial_model(config, build_trial_data(config))
            times: dict[str, list[float]] = {label: [] for label in grids}
            for pair in range(args.pairs + 1):  # the first pair warms up
                for label, grid in grids.items():
                    plots._grid = grid
                    started = time.process_time()
                    plots.weight_histograms(model, png)
                    if pair:
                        times[label].append(time.process_time() - started)
            plots._grid = grids["fixed"]
            ratio = statistics.median(f / c for f, c in zip(times["fixed"], times["constrained"]))
            print(f"{name}: constrained {statistics.median(times['constrained']):.3f} s CPU, "
                  f"fixed {statistics.median(times['fixed']):.3f} s (median of {args.pairs}), paired ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
