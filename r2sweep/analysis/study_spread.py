"""A study's figures over its search replicates: a mean, and an uncertainty that counts both noises.

A study's figure for one arm (the tuned accuracy of a kind, its gain over the tuned
baseline) is measured once per replicate search ``r``: the confirmed winner's mean over
the confirmation seeds, ``x_r``, with the standard error of that mean from the seeds,
``s_r`` (for a gain: the standard error of the difference of two means). Two sources
move ``x_r``: which configuration the search found (recorded studies: 3 to 13 points
between two searches of one space), and the seeds (about 1 point). Modelled as
``x_r = mu + b_r + e_r``, search effect ``b_r`` of variance ``tau^2`` and seed noise
``e_r`` of variance ``s_r^2``:

* the figure is the mean over replicates, ``m = mean(x_r)``;
* the spread between replicates, ``S^2 = var(x_r)`` (sample variance, ``R - 1``
  degrees of freedom), estimates ``tau^2 + mean(s_r^2)``: both noises at once;
* its standard error is ``sqrt(max(S^2, mean(s_r^2)) / R)``: the replicates' own
  spread, never less than the seeds alone give (with two replicates ``S`` rests on one
  degree of freedom and can come out near zero by chance);
* the search's own spread is reported as ``tau = sqrt(max(0, S^2 - mean(s_r^2)))``.

With one replicate there is no ``S``: the uncertainty is the seeds' ``s_1`` alone, and
the study says so in words rather than calling a gain clear.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["AcrossSearches"]


@dataclass(frozen=True)
class AcrossSearches:
    """One figure of one arm, per replicate search: its value and the seeds' standard error of it."""

    values: tuple[float, ...]
    seed_se: tuple[float, ...]
    seeds_each: int  # the fewest confirmation seeds behind one value (one seed: no spread at all)

    @property
    def searches(self) -> int:
        return len(self.values)

    @property
    def searched(self) -> bool:
        """Whether the spread between searches is measured (two replicates or more)."""
        return self.searches > 1

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def seed_variance(self) -> float:
        """``mean(s_r^2)``: what the seeds alone put into one replicate's value."""
        return statistics.fmean(s * s for s in self.seed_se)

    @property
    def between_variance(self) -> float:
        """``S^2``: the sample variance of the values over replicates (0 with one)."""
        return statistics.variance(self.values) if self.searched else 0.0

    @property
    def se(self) -> float:
        """The standard error of :attr:`mean`: both noises with replicates, the seeds' alone without."""
        if not self.searched:
            return self.seed_se[0]
        return math.sqrt(max(self.between_variance, self.seed_variance) / self.searches)

    @property
    def search_sd(self) -> float | None:
        """``tau``: how far searches land apart beyond what the seeds explain; None with one replicate."""
        if not self.searched:
            return None
        return math.sqrt(max(0.0, self.between_variance - self.seed_variance))

    def clear(self, sign: int) -> bool:
        """Beyond twice its uncertainty in the objective's better direction: only with the search's
        spread measured (two replicates or more) and a spread over seeds behind each value."""
        return self.searched and self.seeds_each > 1 and sign * self.mean > 2 * self.se

    def text(self, signed: bool = False) -> str:
        return f"{self.mean:+.1f} +- {self.se:.1f}" if signed else f"{self.mean:.1f} +- {self.se:.1f}"

    def detail(self) -> str:
        """What the uncertainty is made of, in words a table cell holds."""
        if not self.searched:
            return "seeds only, 1 search"
        return f"search sd {self.search_sd:.1f}, seeds {math.sqrt(self.seed_variance):.1f}, {self.searches} searches"

    @classmethod
    def of(cls, values: list[float], seed_se: list[float], seeds_each: int) -> AcrossSearches | None:
        """None when no replicate measured it (every one missing, diverged, or without its control)."""
        if not values:
            return None
        return cls(tuple(values), tuple(seed_se), seeds_each)
