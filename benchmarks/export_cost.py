"""What the champion's format costs a trial: ``torch.export`` of the pre-trained model, saved.

Every trial with an output folder writes ``pretrained.pt2`` (r2sweep/core/pretrained_file.py),
so a sweep can register its champion without building the model where it is read. This
times that step per model: the first export in a fresh process (torch.export's own
imports and set-up, what a trial actor pays once) and the median of later ones, against
the same model's one evaluation pass over the validation split (a cost every trial pays
anyway). CPU, one thread:

    for m in small_cnn mobilenet_v2 resnet18; do .venv/bin/python benchmarks/export_cost.py --models $m --repeats 5; done
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from r2sweep.core.build import build_trial_data, build_trial_model
from r2sweep.core.config.trial import load_trial_config
from r2sweep.core.data import make_loader
from r2sweep.core.pretrained_file import export_archive
from r2sweep.core.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn", "mobilenet_v2"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | first export + save in this process | later ones (median) | one validation pass |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            config = load_trial_config({"data": {"name": "digits"}, "model": {"name": name}})
            data = build_trial_data(config)
            model, _ = build_trial_model(config, data)
            example = torch.stack([data.train[0][0], data.train[1][0]])
            times = []
            for _ in range(1 + args.repeats):
                started = time.perf_counter()
                why = export_archive(model, example, Path(tmp) / f"{name}.pt2")
                times.append(time.perf_counter() - started)
                assert why is None, why
            started = time.perf_counter()
            evaluate(model.eval(), make_loader(data.val, 256, shuffle=False, seed=0), torch.device("cpu"))
            evaluation = time.perf_counter() - started
            print(f"| {name} | {times[0]:.2f} s | {statistics.median(times[1:]):.2f} s | {evaluation:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
