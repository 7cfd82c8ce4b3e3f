"""``r2sweep study FILE``: what does R2 buy for my model? The study's stages, then its answer.

The workflow lives in :mod:`r2sweep.api.study`; this module parses, calls and prints.
``--report-only`` runs nothing and rebuilds the answer from MLflow (on any machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_study_parser"]

#: ``--report-only``'s study is its positional argument: errors about it name it so.
STUDY_POSITIONAL = {"name": "study name"}


def _cmd_study(args: argparse.Namespace) -> int:
    from r2sweep.api.study import load_study, run_study

    try:
        if args.report_only:
            name = args.study
            if Path(args.study).is_file():  # the file names the study
                from r2sweep.api.study import read_study_file

                name = read_study_file(args.study, list(args.set))[0].name
            result = load_study(name, tracking_uri=args.tracking_uri, out=args.out or f"{name}-study")
        else:
            result = run_study(args.study, overrides=list(args.set), tracking_uri=args.tracking_uri,
                               storage=args.storage, address=args.address, out=args.out,
                               register=not args.no_register)
    except Exception as error:  # noqa: BLE001  every refusal is one line
        return _study_failure(error, args.study)
    table = result.table
    print(table.markdown())
    print(f"answer: {table.verdict()}")
    for warning in table.warnings():
        print(f"warning: {warning}")
    if result.recommended_path is not None:
        print(f"recommended config: {result.recommended_path}   (re-run: r2sweep trial {result.recommended_path} "
              "--out runs/recommended)")
    if result.model_uri:
        print(f"champion: {result.model_uri} (alias champion)")
    if result.page is not None:
        print(f"page: {result.page.page} ({len(result.page.figures)} figures)")
    for note in result.page.notes if result.page is not None else ():
        print(f"note: {note}")
    return 0


def _study_failure(error: Exception, study: str) -> int:
    """A study that cannot go on as asked (bad input, another file under its name) exits 2 with its line."""
    from r2sweep.cli.app import _error, _sweep_failure
    from r2sweep.cli.errors import command_line
    from r2sweep.core.errors import R2SweepError

    tracking = sys.modules.get("r2sweep.tracking.store")
    if isinstance(error, R2SweepError) and not (tracking is not None and isinstance(error, tracking.TrackingError)):
        return _error(command_line(error, positional=STUDY_POSITIONAL))
    return _sweep_failure(error, f"study {study}")


def add_study_parser(commands: argparse._SubParsersAction) -> None:
    study = commands.add_parser("study", help="what does R2 buy for my model: a tuned baseline, one sweep per R2 "
                                "kind, the winners re-run on fresh seeds, the controls, the answer")
    study.add_argument("study", metavar="FILE", help="study file (e.g. search_spaces/studies/dkm-r18.yaml); with "
                       "--report-only also a study name in the tracking store")
    study.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                       help="override a field of the study file, e.g. --set data.root=/data (repeatable)")
    study.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    study.add_argument("--storage", help="Ray Tune storage path or URI of every sweep (default ./r2sweep_results)")
    study.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    study.add_argument("--out", help="folder for the page, table.md and recommended.yaml (default NAME-study)")
    study.add_argument("--no-register", action="store_true", help="do not register the recommended model as "
                       "the champion r2sweep-study-NAME")
    study.add_argument("--report-only", action="store_true", help="run nothing: rebuild the answer and its page "
                       "from MLflow alone")
    study.set_defaults(run=_cmd_study)
