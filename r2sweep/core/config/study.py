"""A study file: "what does R2 buy for my model?" as a plan of ordinary sweeps.

The workflow the benchmarks found the hard way (benchmarks/RESULTS.md): tune the
no-R2 recipe first; run one R2 sweep per kind, started from that winner; re-run the
winners on fresh seeds; run the controls. This module reads the file and turns it into
the sweeps it stands for, each a search-space mapping that :func:`load_sweep_spec`
validates like any file, so every error names the study's own field::

    name: mbv2-ptq
    data: {name: digits}                     # the trial sections every sweep shares
    model: {name: mobilenet_v2, width: 0.25}
    train: {epochs: 15, lr: 0.02}
    downstream: [{method: ptq, algorithm: rtn, weight_bits: [4]}]
    objective: {metric: ptq_rtn_w4a8/top1, mode: max}
    baseline:                                # the no-R2 recipe, tuned first
      trials: 12
      search: {train.lr: {loguniform: [0.005, 0.05]}}
    kinds:                                   # one sweep per kind: its knobs + the baseline's
      linf: {trials: 12, search: {r2.strength: {loguniform: [1.0e-3, 1.0]}}}
      margin: {search: {r2.strength: {loguniform: [1.0e-3, 1.0]}, r2.margin_init: {choice: [max, 3std]}}}
    start_top: 1                             # each kind's sweep first tries the baseline's best 1
    confirm: {seeds: [1, 2, 3], top: 1}     # each sweep's top trials, re-run on these; the winner on the mean
    sweep: {max_concurrent: 2, scheduler: asha}   # settings every sweep shares
    replicates: 2                            # the baseline's and each kind's sweep, searched twice
    seed: 0                                  # the study's seed: every sweep's sampler seed derives from it

Each sweep gets its own sampler seed, derived from the study's seed, its name and the
sweep's, and written into its file (so it is recorded with the sweep in MLflow): sweeps of
one study never draw the same early configurations, and a study run again with another
``seed`` searches afresh.

``replicates: R`` runs the whole plan R times: replicate 1's sweeps are ``NAME-baseline``,
``NAME-<kind>``; replicate r's are ``NAME-baseline-r<r>``, ``NAME-<kind>-r<r>``, each kind
started from its own replicate's baseline. Two searches of one space can land points
apart; only replicates measure how far (:mod:`r2sweep.analysis.study_table`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from r2sweep.core.config.search import mapping_at
from r2sweep.core.config.sweep import SweepSpec, load_sweep_spec
from r2sweep.core.config.trial import TRIAL_SECTIONS
from r2sweep.core.errors import ConfigError
from r2sweep.core.validate import check, reject_unknown, require_int

__all__ = ["StudySpec", "StudySweep", "load_study_spec", "BASELINE"]

BASELINE = "baseline"
_TOP_LEVEL = ("name", *TRIAL_SECTIONS, "objective", "baseline", "kinds", "start_top", "confirm", "sweep", "replicates",
              "seed")
_STAGE_KEYS = ("trials", "search")
_CONFIRM_KEYS = ("seeds", "top")
# Fields of sweep: that the study decides for each of its sweeps.
_STUDY_DECIDES = ("num_samples", "seed", "baseline", "start_points")


@dataclass(frozen=True)
class StudySweep:
    """One sweep of a study: ``kind`` is ``none`` for the baseline."""

    name: str
    kind: str
    mapping: Mapping[str, Any]  # its search-space file
    spec: SweepSpec
    replicate: int = 1  # which search of the study's replicates (1-based)


@dataclass(frozen=True)
class StudySpec:
    """A validated study file: per replicate, the baseline sweep and one sweep per R2 kind; the confirmation."""

    name: str
    replicate_sweeps: tuple[tuple[StudySweep, ...], ...]  # per replicate: its baseline, then its kinds
    seeds: tuple[int, ...]
    start_top: int
    confirm_top: int = 1  # how many of each sweep's best trials are re-run on the seeds
    seed: int = 0  # the study's seed, from which every sweep's sampler seed derives

    @property
    def replicates(self) -> int:
        return len(self.replicate_sweeps)

    @property
    def baseline(self) -> StudySweep:
        """Replicate 1's baseline (the one every study has)."""
        return self.replicate_sweeps[0][0]

    @property
    def kinds(self) -> tuple[StudySweep, ...]:
        """Replicate 1's kinds."""
        return self.replicate_sweeps[0][1:]

    @property
    def sweeps(self) -> tuple[StudySweep, ...]:
        """In the order they run: replicate by replicate, each baseline first (its kinds start from its winner)."""
        return tuple(sweep for replicate in self.replicate_sweeps for sweep in replicate)

    def baseline_of(self, sweep: StudySweep) -> StudySweep:
        """The baseline of ``sweep``'s replicate: what that kind starts from and is compared against."""
        return self.replicate_sweeps[sweep.replicate - 1][0]


def sampler_seed(study: str, sweep: str, seed: int = 0) -> int:
    """A sweep's own sampler seed: fixed by the names and the study's seed, different for each sweep of a study.

    Seed 0 keeps the names alone (the studies recorded before ``seed`` existed)."""
    text = f"{study}/{sweep}" + (f"/{seed}" if seed else "")
    return zlib.crc32(text.encode()) % (2**31)


def replicate_name(study: str, arm: str, replicate: int) -> str:
    """``NAME-<arm>`` for replicate 1 (a study's sweeps before replicates existed), ``NAME-<arm>-r<k>`` after."""
    return f"{study}-{arm}" + (f"-r{replicate}" if replicate > 1 else "")


def _stage(data: Any, where: str) -> dict[str, Any]:
    stage = dict(mapping_at(data, where, "{trials: 12, search: {train.lr: {loguniform: [0.005, 0.05]}}}"))
    reject_unknown(stage, _STAGE_KEYS, lambda key: f"{where}.{key}")
    trials = stage.get("trials", 12)
    require_int(f"{where}.trials", trials, 1)
    search = dict(mapping_at(stage.get("search", {}), f"{where}.search", "{r2.strength: {loguniform: [1.0e-3, 1.0]}}"))
    return {"trials": trials, "search": search}


def _sweep(study: str, raw: Mapping[str, Any], kind: str, stage: Mapping[str, Any], search: dict[str, Any],
           where: str, replicate: int, seed: int) -> StudySweep:
    name = replicate_name(study, BASELINE if kind == "none" else kind, replicate)
    shared = dict(raw.get("sweep") or {})
    mapping = {
        "name": name,
        **{k: raw[k] for k in TRIAL_SECTIONS if k in raw},
        "r2": {**dict(raw.get("r2") or {}), "kind": kind},
        "objective": raw.get("objective"),
        "search": search,
        "sweep": {**shared, "num_samples": stage["trials"], "seed": sampler_seed(study, name, seed), "baseline": False},
    }
    try:
        spec = load_sweep_spec(mapping)
    except ConfigError as error:  # named as the study file names it
        field = error.field
        if field.startswith("search."):
            field = f"{where}.{field.removeprefix('search.')}"
        elif field.startswith("sweep.num_samples"):
            field = f"{where}.trials"
        raise ConfigError(field, error.value, error.allowed) from None
    return StudySweep(name=name, kind=kind, mapping=mapping, spec=spec, replicate=replicate)


def load_study_spec(raw: Any) -> StudySpec:
    """Validate a study file's mapping in full; every sweep it stands for is validated too.

    Raises:
        ConfigError: naming the first bad field as the study file names it.
    """
    from r2sweep.core.losses import list_r2_losses

    raw = dict(mapping_at(raw, "study", "{name: ..., baseline: {...}, kinds: {...}}"))
    check("search" not in raw, "search", list(dict(raw.get("search") or {})),
          "not a study's section: this looks like a search-space file (r2sweep sweep FILE); a study searches "
          "baseline.search and kinds.<kind>.search")
    reject_unknown(raw, _TOP_LEVEL, lambda key: key, what="section")
    name = raw.get("name")
    check(isinstance(name, str) and name.strip() != "", "name", name, "the study's name (its sweeps are NAME-baseline, NAME-<kind>)")
    check(raw.get("objective") is not None, "objective", None, "{metric: ptq_rtn_w4a8/top1, mode: max}")
    r2 = dict(mapping_at(raw.get("r2") or {}, "r2", "{granularity: tensor}"))
    check("kind" not in r2, "r2.kind", r2.get("kind"), "left to the study (the baseline has none, each kind its own)")
    shared = dict(mapping_at(raw.get("sweep") or {}, "sweep", "{max_concurrent: 2, scheduler: asha}"))
    for key in _STUDY_DECIDES:
        check(key not in shared, f"sweep.{key}", shared.get(key),
              "left to the study (trials: per sweep; the sampler seed: one per sweep; no baseline trial or start points)")

    replicates = raw.get("replicates", 1)
    require_int("replicates", replicates, 1)
    seed = raw.get("seed", 0)
    require_int("seed", seed, 0)

    base_stage = _stage(raw.get(BASELINE), BASELINE)
    check(bool(base_stage["search"]), "baseline.search", {}, "the no-R2 recipe's knobs to tune (train.lr, ...): a gain "
          "over an untuned baseline is not a gain")
    for path in base_stage["search"]:
        check(not str(path).startswith("r2."), f"baseline.search.{path}", base_stage["search"][path],
              "a knob of the recipe, not of R2 (the baseline trains without R2)")

    kinds_raw = dict(mapping_at(raw.get("kinds"), "kinds", "{linf: {search: {r2.strength: {loguniform: [1.0e-3, 1.0]}}}}"))
    check(bool(kinds_raw), "kinds", {}, f"at least one R2 kind: {[k for k in list_r2_losses() if k != 'none']}")
    kind_stages = {}
    for kind, data in kinds_raw.items():
        where = f"kinds.{kind}"
        check(kind in list_r2_losses() and kind != "none", "kinds", kind,
              f"R2 kinds: {[k for k in list_r2_losses() if k != 'none']}")
        stage = _stage(data if data is not None else {}, where)
        for path in stage["search"]:
            check(path != "r2.kind", f"{where}.search.r2.kind", stage["search"][path], "left to the study")
            check(path not in base_stage["search"], f"{where}.search.{path}", stage["search"][path],
                  "a knob the baseline does not search already (each kind's sweep searches the baseline's knobs too)")
        kind_stages[kind] = stage

    plan = []
    for replicate in range(1, replicates + 1):
        sweeps = [_sweep(name, raw, "none", base_stage, dict(base_stage["search"]), "baseline.search", replicate, seed)]
        for kind, stage in kind_stages.items():
            sweeps.append(_sweep(name, raw, kind, stage, {**stage["search"], **base_stage["search"]},
                                 f"kinds.{kind}.search", replicate, seed))
        plan.append(tuple(sweeps))

    confirm = dict(mapping_at(raw.get("confirm") or {}, "confirm", "{seeds: [1, 2, 3]}"))
    reject_unknown(confirm, _CONFIRM_KEYS, lambda key: f"confirm.{key}")
    seeds = confirm.get("seeds", [1, 2, 3])
    check(isinstance(seeds, list) and len(seeds) >= 2 and len(set(map(str, seeds))) == len(seeds), "confirm.seeds", seeds,
          "two or more distinct seeds, e.g. [1, 2, 3] (a gain needs its spread over seeds)")
    for i, value in enumerate(seeds):
        require_int(f"confirm.seeds[{i}]", value, 0)
    top = confirm.get("top", 1)
    require_int("confirm.top", top, 1)
    start_top = raw.get("start_top", 1)
    require_int("start_top", start_top, 1)
    return StudySpec(name=name, replicate_sweeps=tuple(plan), seeds=tuple(seeds), start_top=start_top,
                     confirm_top=top, seed=seed)
