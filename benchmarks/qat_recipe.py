"""Does the QAT recipe itself train at 2 bits, before R2 enters? (issue 8, qat-mbv1)

The qat-mbv1 study (``search_spaces/studies/qat-mbv1.yaml``) compares R2 against no R2 under EWGS and
LSQ at W2A2 on MobileNet-V1. Its first (no-R2) sweep recorded LSQ as diverged in every
trial, so this script isolates the recipe: one pre-trained no-R2 model (the qat-mbv1
setting's model, data and scale; or ``--checkpoint``), then for each algorithm and bit
pair, the accuracy right after the quantizers are initialized and after ``--epochs``
of fine-tuning, or the epoch it diverged in. Weights and activations are varied
apart, to say which one breaks.

    .venv/bin/python benchmarks/qat_recipe.py                              # ~8 min on 2 cores
    .venv/bin/python benchmarks/qat_recipe.py --finetune-lr 0.001 --out qat_lr.json
    .venv/bin/python benchmarks/qat_recipe.py --checkpoint run/pretrained.pt --bits 2/2   # any trial's model
    .venv/bin/python benchmarks/qat_recipe.py --seed 1 --algorithms lsqplus ewgs --bits 2/2   # another pre-trained model

Writes ``results/qat_recipe.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from r2sweep.core.config.strict_yaml import load_file  # noqa: E402
from r2sweep.core.config.study import load_study_spec  # noqa: E402
from r2sweep.core.config.trial import load_trial_config  # noqa: E402
from r2sweep.core.data import create_data, make_loader  # noqa: E402
from r2sweep.core.errors import TrialDiverged  # noqa: E402
from r2sweep.core.quant.finetune import quantization_aware_train  # noqa: E402
from r2sweep.core.quant.methods import QATConfig, calibration_images  # noqa: E402
from r2sweep.core.train import evaluate  # noqa: E402
from r2sweep.core.build import model_from_pretrained  # noqa: E402
from r2sweep.core.trial import run_trial  # noqa: E402

BIT_PAIRS = ((8, 8), (2, 8), (8, 2), (2, 2))


def pretrained_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``--checkpoint``, else the qat-mbv1 base model trained once without R2 (``--seed``)."""
    study = load_study_spec(load_file(Path(__file__).resolve().parent.parent / "search_spaces" / "studies" / "qat-mbv1.yaml"))
    base = study.baseline.spec.trial.to_mapping()
    base["train"]["device"] = "cpu"
    base.pop("proxy", None)  # the study's proxy names its QAT result, which this script's pre-training drops
    if args.checkpoint is None:
        out = args.work / ("pretrained-none" if args.seed == 0 else f"pretrained-none-seed{args.seed}")
        if not (out / "pretrained.pt").is_file():
            config = {**base, "seed": args.seed, "downstream": [],
                      "train": {**base["train"], "lr": args.lr, "weight_decay": args.weight_decay}}
            print(f"pre-training {config['model']} without R2 (lr {args.lr}, wd {args.weight_decay}) ...", flush=True)
            run_trial(load_trial_config(config), out_dir=out)
        args.checkpoint = out / "pretrained.pt"
    model = model_from_pretrained(load_trial_config({**base, "downstream": []}), args.checkpoint)
    return model, base


def one_recipe(model: torch.nn.Module, algorithm: str, weight_bits: int, act_bits: int, data, args) -> dict[str, Any]:
    """Accuracy after initialization and after fine-tuning (or where it diverged)."""
    cfg = QATConfig(algorithm=algorithm, weight_bits=[weight_bits], act_bits=act_bits,
                           epochs=args.epochs, lr=args.finetune_lr)
    loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=1)
    val = make_loader(data.val, 256, shuffle=False, seed=0)
    calibration = calibration_images(data, 512, seed=0)
    started = time.perf_counter()
    initial = quantization_aware_train(model, dataclasses.replace(cfg, epochs=0), weight_bits, loader, calibration, torch.device("cpu"))
    row: dict[str, Any] = {"algorithm": algorithm, "weight_bits": weight_bits, "act_bits": act_bits,
                           "initialized": evaluate(initial, val, torch.device("cpu"))}
    try:
        # As a trial does: the best epoch on the validation split is kept, the start included.
        tuned = quantization_aware_train(model, cfg, weight_bits, loader, calibration, torch.device("cpu"),
                                         score=lambda candidate: evaluate(candidate, val, torch.device("cpu")))
        row["fine_tuned"] = evaluate(tuned, val, torch.device("cpu"))
    except TrialDiverged as error:
        row["diverged"] = str(error)
    row["seconds"] = time.perf_counter() - started
    return row


def table(rows: list[dict[str, Any]], epochs: int) -> str:
    lines = [f"| algorithm | W/A bits | top-1 after init | top-1 after {epochs} epochs |", "|---|---|---|---|"]
    for r in rows:
        after = f"{r['fine_tuned']:.1f}" if "fine_tuned" in r else "diverged (" + r["diverged"].split(":")[0] + ")"
        lines.append(f"| {r['algorithm']} | W{r['weight_bits']}A{r['act_bits']} | {r['initialized']:.1f} | {after} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trial's pretrained.pt (default: train the qat-mbv1 model once)")
    parser.add_argument("--lr", type=float, default=0.0229, help="pre-training lr when no checkpoint (the no-R2 sweep's first trial)")
    parser.add_argument("--weight-decay", type=float, default=9e-4)
    parser.add_argument("--seed", type=int, default=0, help="the pre-training's seed when no checkpoint")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (the qat-mbv1 setting's)")
    parser.add_argument("--finetune-lr", type=float, default=QATConfig.lr, help="fine-tuning lr (the recipe's default)")
    parser.add_argument("--algorithms", nargs="+", default=["lsq", "ewgs"], choices=list(QATConfig.algorithms))
    parser.add_argument("--bits", nargs="+", type=lambda text: tuple(int(b) for b in text.split("/")), default=list(BIT_PAIRS),
                        metavar="W/A", help="weight/activation bit pairs (default 8/8 2/8 8/2 2/2)")
    parser.add_argument("--work", type=Path, default=Path("results/qat_recipe"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "qat_recipe.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, base = pretrained_model(args)
    data = create_data(base["data"]["name"], seed=0, **{k: v for k, v in base["data"].items() if k != "name"})
    fp = evaluate(model, make_loader(data.val, 256, shuffle=False, seed=0), torch.device("cpu"))
    print(f"FP top-1 {fp:.1f} ({args.checkpoint})", flush=True)
    rows = []
    for algorithm in args.algorithms:
        for weight_bits, act_bits in args.bits:
            rows.append(one_recipe(model, algorithm, weight_bits, act_bits, data, args))
            print(f"  {table(rows[-1:], args.epochs).splitlines()[-1]}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    print(table(rows, args.epochs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "fp": fp, "epochs": args.epochs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
