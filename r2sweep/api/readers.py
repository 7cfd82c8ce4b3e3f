"""Reading finished sweeps from Python: each function returns data; the CLI prints it.

Every function checks its arguments first (a bad one is a ConfigError naming
it by its keyword, before anything is read or written; the command line shows
its flag instead) and opens the store for reading
(:func:`r2sweep.api.stores.open_store`: a missing local store is an error, an
unreachable server fails in seconds).

>>> import r2sweep
>>> chosen = r2sweep.best("quickstart", out="best.yaml")              # doctest: +SKIP
>>> rows = r2sweep.compare(["quickstart"], by="r2.kind")              # doctest: +SKIP
>>> page = r2sweep.report("quickstart", "quickstart-report").page     # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from r2sweep.api import options as check
from r2sweep.api.stores import open_store

__all__ = ["best", "compare", "confirm", "report"]


def best(name: str, *, tracking_uri: str | None = None, out: str | os.PathLike[str] | None = "best.yaml",
         register: bool = True) -> Any:
    """Pick sweep ``name``'s best trial, write its config to ``out``, tag it, register its model as the champion.

    Returns a :class:`~r2sweep.analysis.select.BestTrial`. ``out=None`` writes no file.
    """
    from r2sweep.analysis.select import select_best

    check.sweep_to_read(name, "name", register=register)
    if out is not None:
        check.output_file(out, "out")
    store = open_store(tracking_uri, "tracking_uri")
    return select_best(store, name, out=out, register=register)


def compare(names: Sequence[str], *, tracking_uri: str | None = None, metrics: Sequence[str] = (),
            by: str | None = None) -> list[Any]:
    """One :class:`~r2sweep.analysis.compare.ComparisonRow` per sweep (or per sweep and value of ``by``)."""
    from r2sweep.analysis.compare import compare_sweeps

    if isinstance(names, str):
        names = [names]
    for name in names:
        check.sweep_to_read(name, "names")
    check.key(by, "by", example="r2.kind")
    for metric in metrics:
        check.key(metric, "metrics", example="ptq_rtn_w2a8/top1")
    store = open_store(tracking_uri, "tracking_uri")
    return compare_sweeps(store, list(names), metrics=list(metrics), by=by)


def confirm(name: str, *, top: int = 3, seeds: Sequence[int] = (1, 2, 3), tracking_uri: str | None = None,
            out: str | os.PathLike[str] | None = None, address: str | None = None,
            storage: str | os.PathLike[str] | None = None,
            progress: Callable[[str], None] | None = None) -> list[Any]:
    """Re-run the ``top`` trials of sweep ``name`` on fresh ``seeds`` (on Ray) and rank them on the mean.

    Returns :class:`~r2sweep.analysis.confirm.Confirmation` rows, best mean first; the
    winner's trial config goes to ``out`` (default ``NAME-confirmed.yaml``). ``storage``:
    the sweep's storage (default: where the sweep ran, as MLflow recorded it), whose
    pre-training cache the re-runs share, unless the sweep turned it off.
    """
    from r2sweep.analysis.confirm import confirm_top

    check.sweep_to_read(name, "name")
    check.count(top, "top", what="how many of the best trials to re-run")
    check.seeds(list(seeds), "seeds")
    target = check.output_file(f"{name}-confirmed.yaml" if out is None else out, "out", example=f"{name}-confirmed.yaml")
    check.ray_address(address, "address")
    storage_text = None if storage is None else os.fspath(storage)
    check.storage(storage_text, "storage")
    return confirm_top(open_store(tracking_uri, "tracking_uri"), name, top=top,
                       seeds=list(seeds), out=target, address=address, progress=progress or (lambda line: None),
                       storage=storage_text)


def report(name: str, out: str | os.PathLike[str], *, tracking_uri: str | None = None, log_to_run: bool = True) -> Any:
    """Write sweep ``name``'s HTML page and PNG figures to folder ``out``; log them to its parent run.

    Returns a :class:`~r2sweep.analysis.report.Report` (``page``, ``figures``, ``notes``, ``advice``).
    """
    from r2sweep.analysis.report import build_report

    check.sweep_to_read(name, "name")
    folder: Path = check.output_folder(out, "out", what="the report's index.html and figures")
    return build_report(open_store(tracking_uri, "tracking_uri"), name, folder,
                        log_to_run=log_to_run)
