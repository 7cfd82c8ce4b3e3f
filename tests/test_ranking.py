"""The one rule that picks the best trial (r2sweep/core/ranking.py), on plain metric mappings:
the same rule every reader, the selection and the console apply to MLflow runs and Tune results."""

from __future__ import annotations

import pickle

from r2sweep.core.config.record import sweep_record
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.ranking import best_of, pareto_front, ranked, top

SEARCH = {"train.lr": {"loguniform": [0.01, 0.1]}}
ONE = load_sweep_spec({"objective": {"metric": "fp/top1"}, "search": SEARCH})
TWO = load_sweep_spec({"downstream": [{"method": "ptq", "algorithm": "rtn", "weight_bits": [2, 4]}],
                       "objective": [{"metric": "ptq_rtn_w2a8/top1", "mode": "max"},
                                     {"metric": "ptq_rtn_w4a8/top1", "mode": "min"}],
                       "search": SEARCH, "sweep": {"sampler": "nsga2"}})


def test_one_objective_ranks_by_it_and_breaks_ties_on_the_float_accuracy() -> None:
    a, b, c = {"fp/top1": 80.0}, {"fp/top1": 90.0}, {"fp/top1": 85.0}
    assert ranked([a, b, c], ONE) == [b, c, a] and best_of([a, b, c], ONE) is b
    assert best_of([], ONE) is None
    tie_low, tie_high = {"fp/top1": 70.0, "x": 1}, {"fp/top1": 70.0, "x": 2}
    assert ranked([tie_low, tie_high], ONE) == [tie_low, tie_high]  # stable: equals keep their order


def test_several_objectives_rank_in_order_and_re_runs_come_from_the_front() -> None:
    w2, w4 = "ptq_rtn_w2a8/top1", "ptq_rtn_w4a8/top1"
    best = {w2: 60.0, w4: 70.0, "fp/top1": 80.0}
    cheaper = {w2: 50.0, w4: 40.0, "fp/top1": 80.0}  # worse first objective, better (lower) second: on the front
    dominated = {w2: 55.0, w4: 75.0, "fp/top1": 99.0}  # beaten by `best` on both
    trials = [dominated, cheaper, best]
    assert best_of(trials, TWO) is best
    assert pareto_front(trials, TWO) == [cheaper, best]
    assert top(trials, TWO, 3) == [best, cheaper]  # the dominated trial is never worth a re-run


def test_a_spec_pickles_as_its_record() -> None:
    copy = pickle.loads(pickle.dumps(TWO))
    assert sweep_record(copy) == sweep_record(TWO) and copy.objectives == TWO.objectives
