"""The ``r2sweep`` command line.

Sub-commands: ``list`` (the registered names a YAML file may use), ``trial``
(one trial from a YAML file), ``sweep`` (Ray Tune + Optuna over a search-space
file, every trial in MLflow), and the readers of a sweep in MLflow: ``best``
(pick and export the best trial), ``compare`` (one row per sweep or R2 kind)
and ``report`` (an HTML page with the figures); ``confirm`` re-runs a sweep's
top trials on fresh seeds; ``study`` runs the whole "what does R2 buy?" workflow
(:mod:`r2sweep.api.study`); ``cache`` lists and prunes the pre-training cache.

Every error a user can cause by bad input ends the command with exit status 2
and a one-line message naming the field, before anything is written; the
options are checked first (:mod:`r2sweep.api.options`). An unreachable
tracking server or Ray cluster ends it with 1, in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from r2sweep import __version__
from r2sweep.cli.cache_cmd import add_cache_parser
from r2sweep.cli.errors import command_line
from r2sweep.cli.study_cmd import add_study_parser

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from r2sweep.core.data import list_datasets
    from r2sweep.core.losses import list_r2_losses
    from r2sweep.core.models import list_models

    from r2sweep.core.data import DATASETS
    from r2sweep.core.models import MODELS

    registries = {"r2.kind": list_r2_losses(), "model.name": list_models(), "data.name": list_datasets()}
    plugins = {"model.name": MODELS, "data.name": DATASETS}
    for field, names in registries.items():
        if args.what in (None, field.split(".")[0]):
            print(f"{field}: {', '.join(names)}")
            registry = plugins.get(field)
            for name in names if registry is not None else ():
                if registry.origin(name):
                    print(f"  {name}: {registry.origin(name)}")
            for name, problem in sorted((registry.problems() if registry is not None else {}).items()):
                print(f"  {name} (not usable): {problem}")
    return 0


def _error(message: str, status: int = 2) -> int:
    """Print a one-line error; 2 means bad input (nothing was created), 1 any other failure."""
    print(f"r2sweep: error: {message}", file=sys.stderr)
    return status


#: A reader's sweep is its positional argument: errors about it name it so.
READER_POSITIONAL = {"name": "sweep name", "names": "sweep name"}


def _progress(started: float):
    def write(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {line}", file=sys.stderr, flush=True)

    return write


def _cmd_trial(args: argparse.Namespace) -> int:
    from r2sweep.api.trial import run_trial
    from r2sweep.core.errors import ConfigError, DataNotFoundError, FileConfigError, TrialDiverged

    overrides = list(args.set)  # parsed by the loader, after run_trial has checked the output folder
    try:
        metrics = run_trial(args.file, overrides=overrides, out_dir=args.out, progress=_progress(time.perf_counter()),
                            pretrain_cache=args.pretrain_cache)
    except FileConfigError as error:
        return _error(command_line(error))
    except DataNotFoundError as error:
        return _error(f"{args.file}: {error}")
    except ConfigError as error:
        shown = command_line(error)
        return _error(shown if error.field in ("out_dir", "pretrain_cache") else f"{args.file}: {shown}")
    except TrialDiverged as error:
        return _error(f"trial diverged: {error}")
    from r2sweep.core.config.trial import load_trial_config
    from r2sweep.core.trial import summarize

    print("\n".join(summarize(metrics, load_trial_config(args.file, overrides))))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def _sweep_overrides(args: argparse.Namespace) -> list:
    """--set texts (parsed by the API, after the options are checked), then the two shorthands."""
    overrides: list = list(args.set)
    if args.num_samples is not None:
        overrides.append(("sweep.num_samples", args.num_samples))
    if args.max_concurrent is not None:
        overrides.append(("sweep.max_concurrent", args.max_concurrent))
    return overrides


def _sweep_failure(error: Exception, name: str) -> int:
    """Bad input exits 2 with its line; an unreachable store or cluster 1; anything else 1, in one line."""
    from r2sweep.core.errors import ConfigError
    from r2sweep.tune.ray_address import ClusterUnreachable

    if isinstance(error, (FileNotFoundError, FileExistsError, ConfigError)):
        return _error(command_line(error))
    # A TrackingError can only come once the tracking module is loaded (importing it loads MLflow).
    tracking = sys.modules.get("r2sweep.tracking.store")
    if isinstance(error, ClusterUnreachable) or (tracking is not None and isinstance(error, tracking.TrackingError)):
        return _error(str(error), status=1)
    return _error(f"sweep {name} failed: {type(error).__name__}: {error}", status=1)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from r2sweep.api.sweep import prepare_sweep

    try:
        prepared = prepare_sweep(args.file, overrides=_sweep_overrides(args), name=args.name,
                                 tracking_uri=args.tracking_uri, storage=args.storage, resume=args.resume,
                                 address=args.address, start_from=args.start_from, start_top=args.top)
    except Exception as error:  # noqa: BLE001  every refusal is one line
        return _sweep_failure(error, args.name or Path(args.file).stem)
    print(prepared.announcement(), file=sys.stderr)
    name, spec, tracker = prepared.name, prepared.spec, prepared.tracker
    try:
        result = prepared.run(register=not args.no_register)
    except Exception as error:  # noqa: BLE001  Ray and friends: one clear line, not a traceback
        return _sweep_failure(error, name)
    best = result.best
    _print_top(result, spec)
    if best is None:
        outcomes = result.trials["outcome"].value_counts().to_dict() if len(result.trials) else {}
        return _error(f"sweep {name}: no trial finished ({', '.join(f'{n} {k}' for k, n in outcomes.items()) or 'none ran'}); "
                      "nothing to select", status=1)
    print(f"best: {spec.objective.metric} = {best.metrics[spec.objective.metric]:.2f} (trial {best.trial_id}, "
          f"fp/top1 {best.metrics.get('fp/top1', float('nan')):.2f}); "
          + (f"champion model version {best.model_version}" if best.model_version
             else "; ".join(best.notes) or "not registered (--no-register)"))
    print(f"best config: {best.config_path}   (re-run: r2sweep trial {best.config_path} --out runs/best)")
    uri = "" if args.tracking_uri is None else f" --tracking-uri {tracker.display_uri}"
    print(f"report: r2sweep report {name}{uri} --out {name}-report   (figures and an HTML page)")
    print(f"confirm: r2sweep confirm {name}{uri} --top 3 --seeds 1 2 3   (re-run the best trials on fresh seeds)")
    if tracker.is_server:
        print(f"browse: {tracker.display_uri}")
    else:
        print(f"browse: mlflow ui --backend-store-uri {tracker.display_uri}")
    return 0


def _print_top(result, spec, count: int = 5) -> None:
    from r2sweep.core.ranking import ranked

    metric = spec.objective.metric
    trials = result.trials
    finished = trials[trials["outcome"] == "finished"].to_dict("records")
    params = [c for c in trials.columns if c.startswith("config/")]
    print(f"{'trial':<10} {metric:>24} {'fp/top1':>8}  params")
    for row in ranked(finished, spec)[:count]:  # the order `best` picks by
        shown = ", ".join(_param(c.removeprefix("config/"), row[c]) for c in params if row[c] is not None and row[c] == row[c])
        print(f"{row['trial_id']:<10} {row[metric]:>24.2f} {row.get('fp/top1', float('nan')):>8.2f}  {shown}")


def _param(path: str, value) -> str:
    return f"{path}={value:.3g}" if isinstance(value, float) else f"{path}={value}"


def _reading(command):
    """Run a reader; bad input exits 2 with its line, an unreachable store 1."""
    from r2sweep.core.errors import R2SweepError
    from r2sweep.tracking.store import TrackingError
    from r2sweep.tune.ray_address import ClusterUnreachable

    try:
        return command(), 0
    except (TrackingError, ClusterUnreachable) as error:
        return None, _error(str(error), status=1)
    except R2SweepError as error:
        return None, _error(command_line(error, positional=READER_POSITIONAL))


def _cmd_compare(args: argparse.Namespace) -> int:
    from r2sweep.analysis.compare import render
    from r2sweep.api.readers import compare

    rows, status = _reading(lambda: compare(args.names, tracking_uri=args.tracking_uri, metrics=args.metric, by=args.by))
    if status:
        return status
    print(render(rows, args.format))
    return 0


def _cmd_best(args: argparse.Namespace) -> int:
    from r2sweep.api.readers import best as pick

    best, status = _reading(lambda: pick(args.name, tracking_uri=args.tracking_uri, out=args.out,
                                         register=not args.no_register))
    if status:
        return status
    print(f"best run {best.run_id} (trial {best.trial_id}): " + ", ".join(f"{k}={v:.2f}" for k, v in sorted(best.metrics.items()) if k.endswith("/top1")))
    if best.config_path:
        print(f"config: {best.config_path}")
    if best.model_version:
        print(f"champion: models:/r2sweep-{args.name}@champion (version {best.model_version})")
    for note in best.notes:
        print(f"note: {note}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from r2sweep.api.readers import report as build

    report, status = _reading(lambda: build(args.name, args.out, tracking_uri=args.tracking_uri, log_to_run=not args.no_log))
    if status:
        return status
    for note in report.notes:
        print(f"note: {note}")
    for advice in report.advice:
        print(f"worth checking: {advice}")
    print(f"report: {report.page} ({len(report.figures)} figures: {', '.join(p.name for p in report.figures)})")
    if report.logged_to_run:
        print(f"logged to the sweep's parent run {report.logged_to_run} under report/")
    return 0


def _cmd_confirm(args: argparse.Namespace) -> int:
    from r2sweep.analysis.confirm import render
    from r2sweep.api.readers import confirm

    out = f"{args.name}-confirmed.yaml" if args.out is None else args.out
    confirmations, status = _reading(lambda: confirm(
        args.name, top=args.top, seeds=args.seeds, tracking_uri=args.tracking_uri, out=out, address=args.address,
        storage=args.storage, progress=lambda line: print(line, file=sys.stderr, flush=True)))
    if status:
        return status
    objective = confirmations[0].objective
    print(render(confirmations, objective))
    winner = confirmations[0]
    if winner.mean is None:
        print("every re-run diverged or failed: nothing confirmed")
        return 1
    print(f"confirmed best: trial {winner.trial_id}, {objective} {winner.mean:.2f} +- {winner.sd:.2f} "
          f"over seeds {sorted(winner.values)} (the sweep saw {winner.sweep_value:.2f}); config: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2sweep", description="Tune R2-Loss for 1-2-bit quantization.")
    parser.add_argument("--version", action="version", version=f"r2sweep {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("list", help="registered R2 kinds, models and datasets")
    listing.add_argument("what", nargs="?", choices=["r2", "model", "data"], help="only this registry")
    listing.set_defaults(run=_cmd_list)
    trial = commands.add_parser("trial", help="run one trial (pre-train with R2, then every downstream method)")
    trial.add_argument("file", help="trial YAML (sections seed, data, model, train, r2, downstream)")
    trial.add_argument("--out", required=True, help="directory for metrics.json, config.yaml and checkpoints")
    trial.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE",
        help="override a field, e.g. --set r2.kind=linf --set downstream.0.weight_bits=[2,4] (repeatable)",
    )
    trial.add_argument("--pretrain-cache", metavar="DIR|URI",
                       help="take pre-trained weights from this cache folder (or s3://BUCKET/PREFIX), or store them "
                            "there (e.g. r2sweep_results/pretrain_cache)")
    trial.set_defaults(run=_cmd_trial)
    sweep = commands.add_parser("sweep", help="run a Ray Tune + Optuna sweep from a search-space file")
    sweep.add_argument("file", help="search-space YAML (trial sections + objective, search, sweep)")
    sweep.add_argument("--name", help="sweep (and MLflow experiment) name; default: the file's 'name'")
    sweep.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    sweep.add_argument("--storage", help="Ray Tune storage path or URI (default ./r2sweep_results)")
    sweep.add_argument("--num-samples", type=int, help="override sweep.num_samples")
    sweep.add_argument("--max-concurrent", type=int, help="override sweep.max_concurrent")
    sweep.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a field (repeatable)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    sweep.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    sweep.add_argument("--start-from", metavar="SWEEP", help="an earlier sweep in the tracking store: its best "
                       "configurations run first (mapped onto this space), and its trials inform Optuna when the "
                       "spaces agree")
    sweep.add_argument("--top", type=int, default=3, help="with --start-from: how many of its best (default 3)")
    sweep.add_argument("--no-register", action="store_true", help="pick and export the best trial, but do not "
                       "register its model as the champion r2sweep-NAME")
    sweep.set_defaults(run=_cmd_sweep)
    best = commands.add_parser("best", help="pick a sweep's best trial from MLflow, write its config, tag it")
    best.add_argument("name", help="sweep name")
    best.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    best.add_argument("--out", default="best.yaml", help="where to write the best trial's config (default best.yaml)")
    best.add_argument("--no-register", action="store_true", help="do not register the model as the champion")
    best.set_defaults(run=_cmd_best)
    compare = commands.add_parser("compare", help="one row per sweep (or per sweep and R2 kind), read from MLflow")
    compare.add_argument("names", nargs="+", metavar="NAME", help="sweep names")
    compare.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    compare.add_argument("--metric", action="append", default=[], metavar="KEY",
                         help="also show the best trial's value of KEY, e.g. ptq_rtn_w2a8/top1 (repeatable)")
    compare.add_argument("--by", metavar="PARAM", help="one row per value of a parameter, e.g. r2.kind")
    compare.add_argument("--format", choices=("table", "csv", "json"), default="table")
    compare.set_defaults(run=_cmd_compare)
    confirm = commands.add_parser("confirm", help="re-run a sweep's top trials on fresh seeds; rank them on the mean")
    confirm.add_argument("name", help="the sweep (MLflow experiment) name")
    confirm.add_argument("--top", type=int, default=3, help="how many of the best trials to re-run (default 3)")
    confirm.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the re-runs (default 1 2 3)")
    confirm.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    confirm.add_argument("--out", help="the winner's trial config (default NAME-confirmed.yaml)")
    confirm.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    confirm.add_argument("--storage", help="the sweep's storage path or URI, whose pre-training cache the re-runs "
                                           "share (default: where the sweep ran, as MLflow recorded it)")
    confirm.set_defaults(run=_cmd_confirm)
    report = commands.add_parser("report", help="a sweep as an HTML page with figures, read from MLflow")
    report.add_argument("name", help="sweep name")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    report.add_argument("--out", required=True, help="folder for index.html and the PNG figures (created if missing)")
    report.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    report.set_defaults(run=_cmd_report)
    add_study_parser(commands)
    add_cache_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow's progress bars are turned off where MLflow is opened (api/stores.py: quiet_mlflow).
    # The working directory is importable, as under `python -m`: a model.factory such as
    # "my_nets:build" beside the sweep file imports from the `r2sweep` command too.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
