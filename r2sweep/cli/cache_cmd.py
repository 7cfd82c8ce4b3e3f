"""``r2sweep cache list|prune``: what the pre-training cache holds, and making room in it.

The cache is a folder (``<storage>/pretrain_cache`` by default, or the folder
``sweep.pretrain_cache`` names); ``--cache`` points at it directly (a folder, or
an S3 prefix ``s3://bucket/prefix``), ``--storage`` at the sweep storage holding it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["add_cache_parser"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _quantity(text: str, units: dict[str, int], bare: int, example: str) -> float:
    """``text`` as a number with an optional unit suffix (a bare number counts ``bare`` each)."""
    clean = text.strip().lower()
    unit = clean[-1:] if clean[-1:] in units else ""
    try:
        value = float(clean[: len(clean) - len(unit)]) * (units[unit] if unit else bare)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {example}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: {example}, >= 0")
    return value


def _duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` (a bare number: days)."""
    return _quantity(text, _UNITS, _UNITS["d"], "a duration such as 30d, 12h or 90m")


def _size(text: str) -> int:
    """``500M``, ``20G``, ``1.5T`` (bytes without a suffix)."""
    return int(_quantity(text.strip().lower().removesuffix("b"), _SIZES, 1, "a size such as 500M or 20G"))


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"


def _folder(args: argparse.Namespace) -> Path | str | None:
    from r2sweep.core.config.sweep import PRETRAIN_CACHE_FOLDER, SweepSettings
    from r2sweep.core.locations import is_uri
    from r2sweep.core.sweep_files import DEFAULT_STORAGE, SweepFiles

    # A sweep's default cache, where SweepFiles puts it (the cache is shared by every sweep of a storage).
    default = SweepFiles(args.storage or DEFAULT_STORAGE, "", SweepSettings()).pretrain_cache
    chosen = args.cache or default
    if chosen and is_uri(chosen):
        return chosen  # an S3 prefix: PretrainCache checks it (an empty one lists no entries)
    folder = Path(args.cache) if args.cache else Path(default) if default else None
    if folder is None or not folder.is_dir():
        print(f"r2sweep: error: --cache={folder or args.storage} is not valid: no pre-training cache there (a sweep makes "
              f"<storage>/{PRETRAIN_CACHE_FOLDER}); give the folder with --cache, or the sweep storage with --storage",
              file=sys.stderr)
        return None
    return folder


def _one_line(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with a refused or unreachable cache (an S3 prefix: no boto3, no credentials, no bucket) said in one line."""
    def command(args: argparse.Namespace) -> int:
        from r2sweep.core.errors import ConfigError

        try:
            return run(args)
        except (ConfigError, OSError) as error:
            print(f"r2sweep: error: {error}", file=sys.stderr)
            return 2 if isinstance(error, ConfigError) else 1
    return command


def _cmd_list(args: argparse.Namespace) -> int:
    from r2sweep.core.pretrain_cache import PretrainCache

    folder = _folder(args)
    if folder is None:
        return 2
    entries = PretrainCache(folder).entries()
    now = time.time()
    print(f"{'key':<12}  {'size':>9}  {'age':>6}  {'last use':>8}  {'saves':>7}  used by / what")
    for e in entries:
        print(f"{e.key[:12]:<12}  {_human(e.size_bytes):>9}  {_age(now - e.created):>6}  {_age(now - e.last_used):>8}  "
              f"{e.pretrain_s:6.1f}s  {', '.join(e.used_by) or '-'} / {e.summary}")
    print(f"{len(entries)} entries, {_human(sum(e.size_bytes for e in entries))} in {folder}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from r2sweep.core.pretrain_cache import PretrainCache

    if args.older_than is None and args.keep_size is None and not args.all:
        print("r2sweep: error: prune needs --older-than DURATION, --keep-size SIZE or --all (what to delete)",
              file=sys.stderr)
        return 2
    folder = _folder(args)
    if folder is None:
        return 2
    cache = PretrainCache(folder)
    doomed = cache.prune(older_than_s=0.0 if args.all else args.older_than, keep_bytes=args.keep_size,
                         dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for e in doomed:
        print(f"{verb} {e.key[:12]} ({_human(e.size_bytes)}, last used {_age(time.time() - e.last_used)} ago): {e.summary}")
    print(f"{verb} {len(doomed)} entries, {_human(sum(e.size_bytes for e in doomed))}; "
          f"{len(cache.entries())} left in {folder}")
    return 0


def add_cache_parser(commands: argparse._SubParsersAction) -> None:
    cache = commands.add_parser("cache", help="list or prune the pre-training cache")
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, run, text in (("list", _cmd_list, "entries: size, age, last use, the sweeps that used them"),
                            ("prune", _cmd_prune, "delete entries by age or to fit a size")):
        action = actions.add_parser(name, help=text)
        where = action.add_mutually_exclusive_group()
        where.add_argument("--cache", help="the cache folder (sweep.pretrain_cache when it names one), or s3://bucket/prefix")
        where.add_argument("--storage", help="the sweep storage holding pretrain_cache/ (default ./r2sweep_results)")
        action.set_defaults(run=_one_line(run))
        if name == "prune":
            action.add_argument("--older-than", type=_duration, metavar="DURATION",
                                help="delete entries unused for this long (30d, 12h, 90m)")
            action.add_argument("--keep-size", type=_size, metavar="SIZE",
                                help="then delete the least recently used until the rest fit (500M, 20G)")
            action.add_argument("--all", action="store_true", help="delete every entry")
            action.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
