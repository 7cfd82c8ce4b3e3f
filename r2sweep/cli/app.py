"""The ``r2sweep`` command line.

Sub-commands: ``list`` (the registered names a YAML file may use), ``trial``
(one trial from a YAML file), ``sweep`` (Ray Tune + Optuna over a search-space
file, every trial in MLflow), and the readers of a sweep in MLflow: ``best``
(pick and export the best trial), ``compare`` (one row per sweep or R2 kind)
and ``report`` (an HTML page with the figures); ``confirm`` re-runs a sweep's
top trials on fresh seeds.

Every error a user can cause by bad input ends the command with exit status 2
and a one-line message naming the field, before anything is written; the
options are checked first (:mod:`r2sweep.api.options`). An unreachable
tracking server or Ray cluster ends it with 1, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from r2sweep import __version__

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from r2sweep.core.data import list_datasets
    from r2sweep.core.losses import list_r2_losses
    from r2sweep.core.models import list_models

    registries = {"r2.kind": list_r2_losses(), "model.name": list_models(), "data.name": list_datasets()}
    for field, names in registries.items():
        if args.what in (None, field.split(".")[0]):
            print(f"{field}: {', '.join(names)}")
    return 0


def _error(message: str, status: int = 2) -> int:
    """Print a one-line error; 2 means bad input (nothing was created), 1 any other failure."""
    print(f"r2sweep: error: {message}", file=sys.stderr)
    return status


def _cmd_trial(args: argparse.Namespace) -> int:
    import yaml

    from r2sweep.api import options as check
    from r2sweep.core.config.trial import apply_overrides, load_trial_config, parse_override, read_yaml, refuse_unused_overrides
    from r2sweep.core.errors import ConfigError, DataNotFoundError, TrialDiverged

    try:
        out = check.output_folder(args.out, what="the trial's metrics.json, config.yaml and checkpoints")
    except ConfigError as error:
        return _error(str(error))
    try:
        raw = read_yaml(args.file)
        overrides = [parse_override(text) for text in args.set]
        config = load_trial_config(apply_overrides(raw, overrides) if overrides else raw)
        refuse_unused_overrides(overrides, [config])
    except ConfigError as error:
        return _error(f"{args.file}: {error}")

    from r2sweep.core.checkpoint import write_text_atomic
    from r2sweep.core.trial import check_out_dir, run_trial, summarize

    try:
        check_out_dir(config, out)  # before config.yaml is overwritten
    except ConfigError as error:
        return _error(str(error))

    started = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {line}", file=sys.stderr, flush=True)

    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(config.to_mapping(), sort_keys=False))
        metrics = run_trial(config, out_dir=out, progress=progress)
    except (ConfigError, DataNotFoundError) as error:
        return _error(f"{args.file}: {error}")
    except TrialDiverged as error:
        return _error(f"trial diverged: {error}")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print("\n".join(summarize(metrics, config)))
    print(f"metrics: {out / 'metrics.json'}")
    return 0


def _load_spec(args: argparse.Namespace):
    """(spec, the file as resolved with overrides); raises ConfigError before anything is created."""
    from r2sweep.core.config.consistency import refuse_ineffective_overrides
    from r2sweep.core.config.sweep import load_sweep_spec
    from r2sweep.core.config.trial import apply_overrides, parse_override, read_yaml

    raw = read_yaml(args.file)
    overrides = [parse_override(text) for text in args.set]
    if args.num_samples is not None:
        overrides.append(("sweep.num_samples", args.num_samples))
    if args.max_concurrent is not None:
        overrides.append(("sweep.max_concurrent", args.max_concurrent))
    if overrides:
        if not isinstance(raw, dict):
            raw = {}  # load_sweep_spec names the real problem
        raw = apply_overrides(raw, overrides)
    default_name = Path(args.file).stem
    spec = load_sweep_spec(raw, default_name=default_name)
    refuse_ineffective_overrides([parse_override(text) for text in args.set], spec)
    return spec, raw


def _check_local_data_roots(spec) -> None:
    from r2sweep.core.errors import ConfigError

    for root in spec.data_roots():
        if not Path(root).exists():
            raise ConfigError("data.root", root, "an existing folder on this machine (r2sweep never downloads); "
                              "on a cluster whose workers hold it, pass --address")


def _cmd_sweep(args: argparse.Namespace) -> int:
    import yaml

    from r2sweep.api import options as check
    from r2sweep.core.errors import ConfigError
    from r2sweep.tune.ray_address import ClusterUnreachable, reach_ray

    uri_storage = "://" in (args.storage or "")
    try:
        check.storage(args.storage)
        check.tracking_uri(args.tracking_uri)
        check.ray_address(args.address)
        check.sweep_name(args.name, uri_storage=uri_storage)
    except ConfigError as error:
        return _error(str(error))
    try:
        spec, raw = _load_spec(args)
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            _check_local_data_roots(spec)  # on a cluster the workers are checked instead, once joined
        if args.name is None:
            check.sweep_name(spec.name, uri_storage=uri_storage, in_file=True)
    except ConfigError as error:
        return _error(f"{args.file}: {error}")
    name = args.name or spec.name
    import logging

    from r2sweep.analysis.select import select_best
    from r2sweep.tracking.store import Tracker, TrackingError
    from r2sweep.tune.callbacks import ProgressCallback, TrackingCallback
    from r2sweep.tune.tuner import DEFAULT_STORAGE, experiment_path, run_sweep

    # After importing MLflow, which sets its own loggers up on import: without this
    # a new store prints its schema migration line by line.
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    tracker = Tracker(args.tracking_uri)
    storage = args.storage or DEFAULT_STORAGE
    spec_text = yaml.safe_dump(raw, sort_keys=False)
    tracking = TrackingCallback(tracker, spec, spec_text, name=name, experiment_path=experiment_path(storage, name))
    callbacks = [tracking, ProgressCallback(spec)]
    try:
        tracker.check_access()  # a refused password fails here, before Ray starts or anything is logged
        if args.resume:
            tracking.check_resume()
        else:
            tracking.check_new()  # a name MLflow holds without its Tune state would merge two sweeps
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:  # an unreachable cluster: its one line, in seconds (connect probes it again to join)
            reach_ray(address)
        # Announced once the store and the cluster answered (run_sweep's own checks can still refuse after it).
        print(f"sweep {name}: {spec.settings.num_samples} trials, {spec.settings.max_concurrent} at a time, "
              f"objective {spec.objective.metric} ({spec.objective.mode}); tracking {tracker.display_uri}",
              file=sys.stderr)
        outcome = run_sweep(spec, storage=storage, name=name, resume=args.resume, address=args.address, callbacks=callbacks)
        # Next to the sweep's results when they are local, else in the working directory.
        best_path = Path(outcome.path) / "best.yaml" if "://" not in outcome.path else Path(f"{name}-best.yaml")
        best = select_best(tracker, name, out=best_path)
    except (FileNotFoundError, FileExistsError, ConfigError) as error:
        return _error(str(error))
    except (TrackingError, ClusterUnreachable) as error:
        return _error(str(error), status=1)
    except Exception as error:  # Ray and friends: one clear line, not a traceback
        return _error(f"sweep {name} failed: {type(error).__name__}: {error}", status=1)
    _print_top(outcome, spec)
    print(f"best: {spec.objective.metric} = {best.metrics[spec.objective.metric]:.2f} (trial {best.trial_id}, "
          f"fp/top1 {best.metrics.get('fp/top1', float('nan')):.2f}); champion model version {best.model_version}")
    print(f"best config: {best.config_path}   (re-run: r2sweep trial {best.config_path} --out runs/best)")
    uri = "" if args.tracking_uri is None else f" --tracking-uri {tracker.display_uri}"
    print(f"report: r2sweep report {name}{uri} --out {name}-report   (figures and an HTML page)")
    print(f"confirm: r2sweep confirm {name}{uri} --top 3 --seeds 1 2 3   (re-run the best trials on fresh seeds)")
    if tracker.tracking_uri.startswith(("http://", "https://")):
        print(f"browse: {tracker.display_uri}")
    else:
        print(f"browse: mlflow ui --backend-store-uri {tracker.display_uri}")
    return 0


def _print_top(outcome, spec, count: int = 5) -> None:
    metric = spec.objective.metric
    finished = sorted(outcome.finished(), key=lambda r: r.metrics[metric], reverse=spec.objective.mode == "max")
    print(f"{'trial':<10} {metric:>24} {'fp/top1':>8}  params")
    for result in finished[:count]:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.config.items())
        print(f"{result.metrics.get('trial_id', ''):<10} {result.metrics[metric]:>24.2f} {result.metrics.get('fp/top1', float('nan')):>8.2f}  {params}")


def _existing_store(uri: str | None):
    """A Tracker for reading; a local SQLite store that does not exist is an error, not a new file.

    A tracking server is asked first whether it is there at all (one quick try):
    a wrong address fails in seconds instead of after MLflow's minutes of retries.
    """
    from r2sweep.core.errors import R2SweepError
    from r2sweep.tracking.store import Tracker

    tracker = Tracker(uri)
    if tracker.tracking_uri.startswith("sqlite:///"):
        path = Path(tracker.tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise R2SweepError(f"no MLflow store at {path} (run a sweep here first, or pass --tracking-uri)")
    tracker.check_access()  # TrackingError; nothing to check for a local store
    return tracker


def _cmd_compare(args: argparse.Namespace) -> int:
    from r2sweep.analysis.compare import compare_sweeps, render
    from r2sweep.api import options as check
    from r2sweep.core.errors import R2SweepError
    from r2sweep.tracking.store import TrackingError

    try:
        for name in args.names:
            check.sweep_to_read(name)
        check.key(args.by, "--by", example="r2.kind")
        for metric in args.metric:
            check.key(metric, "--metric", example="ptq_rtn_w2a8/top1")
        check.tracking_uri(args.tracking_uri)
        rows = compare_sweeps(_existing_store(args.tracking_uri), args.names, metrics=args.metric, by=args.by)
    except TrackingError as error:
        return _error(str(error), status=1)
    except R2SweepError as error:
        return _error(str(error))
    print(render(rows, args.format))
    return 0


def _cmd_best(args: argparse.Namespace) -> int:
    from r2sweep.analysis.select import select_best
    from r2sweep.api import options as check
    from r2sweep.core.errors import R2SweepError
    from r2sweep.tracking.store import TrackingError

    try:
        check.sweep_to_read(args.name, register=not args.no_register)
        check.output_file(args.out)
        check.tracking_uri(args.tracking_uri)
        best = select_best(_existing_store(args.tracking_uri), args.name, out=args.out, register=not args.no_register)
    except TrackingError as error:
        return _error(str(error), status=1)
    except R2SweepError as error:
        return _error(str(error))
    print(f"best run {best.run_id} (trial {best.trial_id}): " + ", ".join(f"{k}={v:.2f}" for k, v in sorted(best.metrics.items()) if k.endswith("/top1")))
    if best.config_path:
        print(f"config: {best.config_path}")
    if best.model_version:
        print(f"champion: models:/r2sweep-{args.name}@champion (version {best.model_version})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from r2sweep.analysis.report import build_report
    from r2sweep.api import options as check
    from r2sweep.core.errors import R2SweepError
    from r2sweep.tracking.store import TrackingError

    try:
        check.sweep_to_read(args.name)
        check.output_folder(args.out, what="the report's index.html and figures")
        check.tracking_uri(args.tracking_uri)
        report = build_report(_existing_store(args.tracking_uri), args.name, args.out, log_to_run=not args.no_log)
    except TrackingError as error:
        return _error(str(error), status=1)
    except R2SweepError as error:
        return _error(str(error))
    for note in report.notes:
        print(f"note: {note}")
    for advice in report.advice:
        print(f"worth checking: {advice}")
    print(f"report: {report.page} ({len(report.figures)} figures: {', '.join(p.name for p in report.figures)})")
    if report.logged_to_run:
        print(f"logged to the sweep's parent run {report.logged_to_run} under report/")
    return 0


def _cmd_confirm(args: argparse.Namespace) -> int:
    from r2sweep.analysis.confirm import confirm_top, render
    from r2sweep.api import options as check
    from r2sweep.core.errors import R2SweepError
    from r2sweep.tracking.store import TrackingError

    try:
        check.sweep_to_read(args.name)
        check.count(args.top, "--top", what="how many of the best trials to re-run")
        check.seeds(args.seeds)
        out = check.output_file(f"{args.name}-confirmed.yaml" if args.out is None else args.out,
                                example=f"{args.name}-confirmed.yaml")
        check.tracking_uri(args.tracking_uri)
        check.ray_address(args.address)
        tracker = _existing_store(args.tracking_uri)
        confirmations = confirm_top(tracker, args.name, top=args.top, seeds=args.seeds, out=out, address=args.address,
                                    progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (TrackingError, check.ClusterUnreachable) as error:
        return _error(str(error), status=1)
    except R2SweepError as error:
        return _error(str(error))
    from r2sweep.analysis.select import load_sweep

    _, spec = load_sweep(tracker, args.name)
    print(render(confirmations, spec.objective.metric))
    winner = confirmations[0]
    if winner.mean is None:
        print("every re-run diverged or failed: nothing confirmed")
        return 1
    print(f"confirmed best: trial {winner.trial_id}, {spec.objective.metric} {winner.mean:.2f} +- {winner.sd:.2f} "
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
    confirm.set_defaults(run=_cmd_confirm)
    report = commands.add_parser("report", help="a sweep as an HTML page with figures, read from MLflow")
    report.add_argument("name", help="sweep name")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    report.add_argument("--out", required=True, help="folder for index.html and the PNG figures (created if missing)")
    report.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    report.set_defaults(run=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow draws a progress bar for every artifact it downloads (the spec, a
    # config): noise on a terminal, and it breaks "one line per error".
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
