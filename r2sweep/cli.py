"""The ``r2sweep`` command line.

Sub-commands arrive with the capabilities they expose; today: ``list`` (the
registered names a YAML file may use). ``trial`` and ``sweep`` come with the
trial and sweep issues (see the README's status table).
"""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2sweep", description="Tune R2-Loss for 1-2-bit quantization.")
    parser.add_argument("--version", action="version", version=f"r2sweep {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("list", help="registered R2 kinds, models and datasets")
    listing.add_argument("what", nargs="?", choices=["r2", "model", "data"], help="only this registry")
    listing.set_defaults(run=_cmd_list)
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
