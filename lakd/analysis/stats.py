"""Pure statistics of ``lakd report``: summaries of a sample, paired differences, Student-t intervals, Holm.

- ``summarize``: n, mean, sample standard deviation (n - 1) and the 95% confidence interval of the mean,
  mean ± t(0.975, n - 1) · std / √n (Student's t, through ``scipy.stats``);
- ``paired_difference``: A − B over the seeds both rows have (same seed = same initialisation and data order):
  the mean of the per-seed differences d_s = A_s − B_s with the same t-interval on d, and the two-sided p-value
  of the paired t-test (``Paired.p_value``);
- ``holm``: Holm's step-down adjustment over one family of p-values (family-wise error 5%).

No file, run or table in here: numbers in, numbers out.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t critical value, e.g. 4.303 for df=2 at 95%."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass
class Summary:
    n: int
    mean: float | None
    std: float | None  # sample std (n - 1); None for n < 2
    ci: tuple[float, float] | None  # 95% interval of the mean; None for n < 2

    @property
    def half_width(self) -> float | None:
        return None if self.ci is None else (self.ci[1] - self.ci[0]) / 2


def summarize(values: Sequence[float], level: float | None = LEVEL) -> Summary:
    """n, mean, sample std and (unless ``level`` is None) the t-interval of the mean at ``level``."""
    v = [float(x) for x in values]
    if not v:
        return Summary(0, None, None, None)
    mean = statistics.fmean(v)
    if len(v) < 2:
        return Summary(1, mean, None, None)
    std = statistics.stdev(v)
    if level is None:
        return Summary(len(v), mean, std, None)
    h = t_quantile(len(v) - 1, level) * std / math.sqrt(len(v))
    return Summary(len(v), mean, std, (mean - h, mean + h))


@dataclass
class Paired:
    a: str
    b: str
    seeds: list[int]
    diffs: list[float]
    summary: Summary

    @property
    def verdict(self) -> str:
        s = self.summary
        if s.ci is None:
            return "cannot tell (fewer than 2 matched seeds)"
        if s.ci[0] > 0:
            return f"{self.a} > {self.b}"
        if s.ci[1] < 0:
            return f"{self.a} < {self.b}"
        return "cannot tell (interval holds 0)"

    @property
    def p_value(self) -> float | None:
        """Two-sided p-value of the paired t-test of mean difference 0 (consistent with the interval: p < 0.05
        exactly when the 95% interval excludes 0); None for fewer than 2 matched seeds."""
        s = self.summary
        if s.ci is None:
            return None
        if s.std == 0:  # every seed gave the same difference
            return 1.0 if s.mean == 0 else 0.0
        from scipy.stats import t

        return float(2 * t.sf(abs(s.mean) / (s.std / math.sqrt(s.n)), s.n - 1))


def holm(pvalues: Sequence[float | None], level: float = LEVEL) -> list[bool | None]:
    """Holm's step-down procedure over one family of tests: which p-values stay significant with family-wise
    error ``1 - level``. The smallest p is compared with alpha / m, the next with alpha / (m - 1), and so on,
    stopping at the first that fails. ``None`` entries (too few seeds) are not part of the family."""
    alpha = 1 - level
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out: list[bool | None] = [None if p is None else False for p in pvalues]
    for k, i in enumerate(order):
        if pvalues[i] > alpha / (len(order) - k):
            break
        out[i] = True
    return out


def paired_difference(a: dict[int, float], b: dict[int, float], name_a: str = "A", name_b: str = "B",
                      level: float = LEVEL) -> Paired:
    """A − B over the seeds present in both (per-seed values as {seed: value})."""
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    return Paired(name_a, name_b, seeds, diffs, summarize(diffs, level))
