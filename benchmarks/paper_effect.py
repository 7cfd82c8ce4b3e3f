"""The paper's four settings at embedded scale, each a study: ``r2sweep study search_spaces/studies/<setting>.yaml``.

Each setting (R2LOSS.md section 4) is a study file: the tuned no-R2 baseline's
sweep, one sweep per R2 kind started from its best, every winner re-run on seeds
1-3, the controls, and the answer (docs/studies.md). This script runs the ones
named, in one MLflow store under ``--work``, and prints each table::

    .venv/bin/python benchmarks/paper_effect.py --settings dkm-r18             # about 70 minutes on 2 cores
    .venv/bin/python benchmarks/paper_effect.py --settings ptq-mbv2 --set data.name=cifar10 \\
        --set data.root=/data/cifar10 --set model.width=1.0 --set train.epochs=100
    .venv/bin/python benchmarks/paper_effect.py --settings dkm-r18 --report-only   # the answer from MLflow

Running it again goes on where it stopped. The figures recorded before the study
command existed (``results/paper_effect_distorted_digits.json``, its PNGs) are in
benchmarks/RESULTS.md, with the re-run of ``dkm-r18`` through ``r2sweep study``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import r2sweep

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "search_spaces" / "studies"
# The paper's four settings (the study folder also holds quickstart.yaml, which is not one).
SETTINGS = ["dkm-mbv2", "dkm-r18", "ptq-mbv2", "qat-mbv1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a study field")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "paper_effect",
                        help="MLflow store, Tune's storage and each study's page (default results/paper_effect)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the answers from MLflow; run nothing")
    args = parser.parse_args(argv)
    tracking = f"sqlite:///{args.work.resolve() / 'mlflow.db'}"
    for setting in args.settings:
        out = args.work / f"{setting}-study"
        if args.report_only:
            result = r2sweep.load_study(setting, tracking_uri=tracking, out=out)
        else:
            args.work.mkdir(parents=True, exist_ok=True)
            result = r2sweep.run_study(STUDIES / f"{setting}.yaml", overrides=args.set, tracking_uri=tracking,
                                       storage=args.work / "sweeps", out=out)
        print(f"## {setting}\n\n{result.table.markdown()}\n\n{result.table.verdict()}\npage: {result.page.page}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
