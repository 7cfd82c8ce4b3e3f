"""The ``r2sweep`` command line.

Sub-commands: ``list`` (the registered names a YAML file may use) and
``trial`` (one trial from a YAML file). ``sweep`` comes with the sweep issue
(see the README's status table).

Every error a user can cause by bad input ends the command with exit status 2
and a one-line message naming the field, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from r2sweep import __version__

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from r2sweep.data import list_datasets
    from r2sweep.losses import list_r2_losses
    from r2sweep.models import list_models

    registries = {"r2.kind": list_r2_losses(), "model.name": list_models(), "data.name": list_datasets()}
    for field, names in registries.items():
        if args.what in (None, field.split(".")[0]):
            print(f"{field}: {', '.join(names)}")
    return 0


def _error(message: str) -> int:
    print(f"r2sweep: error: {message}", file=sys.stderr)
    return 2


def _cmd_trial(args: argparse.Namespace) -> int:
    import yaml

    from r2sweep.errors import ConfigError, DataNotFoundError, TrialDiverged
    from r2sweep.trial_config import apply_overrides, load_trial_config, parse_override, read_yaml

    try:
        raw = read_yaml(args.file)
        overrides = [parse_override(text) for text in args.set]
        config = load_trial_config(apply_overrides(raw, overrides) if overrides else raw)
    except ConfigError as error:
        return _error(f"{args.file}: {error}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {out}: exists and is not a directory")

    from r2sweep.checkpoint import write_text_atomic
    from r2sweep.trial import run_trial, summarize

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
