"""Paired comparison of two certified versions on the same evaluation data.

Both versions were evaluated on the same points (and, for noise metrics, the same seeded
draws), so each quantity is a pair of per-point outcomes. The exact McNemar test asks whether
the discordant pairs split evenly; Holm's procedure runs across all compared quantities, so
the chance of calling any difference significant when there is none is at most 1 − confidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from robust_cert import stats
from robust_cert.errors import RobustCertError

BETTER, WORSE, SAME = "significantly better", "significantly worse", "no detectable difference"


@dataclass(frozen=True)
class PairedOutcomes:
    """Per-point success (True = good) of one quantity for both versions."""

    key: str  # e.g. "robust_accuracy.eps_0.1"
    higher_is_better: bool  # of the reported rate (a failure rate is lower-is-better)
    a_good: np.ndarray
    b_good: np.ndarray


@dataclass(frozen=True)
class QuantityComparison:
    key: str
    n: int
    rate_a: float
    rate_b: float
    delta: float  # rate_b − rate_a, in the reported rate's own sense
    delta_ci: tuple[float, float]
    a_only: int  # points where only A succeeds
    b_only: int
    p_value: float
    adjusted_p_value: float
    verdict: str  # BETTER / WORSE / SAME, for B relative to A

    def to_dict(self) -> dict:
        out = asdict(self)
        out["delta_ci"] = list(self.delta_ci)
        return out


def paired_outcomes(per_point: dict[str, np.ndarray], body: dict) -> dict[str, tuple]:
    """Per-point outcomes by quantity key from a certificate's per-point arrays.

    Returns ``{key: (good array, higher_is_better)}``; a failure-rate quantity's good array is
    "did not fail", and its rate is reported as the failure rate.
    """
    out = {}
    configs = {r["metric"]: r["config"] for r in body["results"]}
    if "accuracy/correct" in per_point:
        out["accuracy"] = (np.asarray(per_point["accuracy/correct"], bool), True)
    if "robust_accuracy/robust" in per_point and "robust_accuracy" in configs:
        robust = np.asarray(per_point["robust_accuracy/robust"], bool)
        for j, eps in enumerate(configs["robust_accuracy"]["eps"]):
            out[f"robust_accuracy.eps_{eps:g}"] = (robust[:, j], True)
    for name, arr in per_point.items():
        if name.startswith("probabilistic_robustness/failed@"):
            eps = name.split("@", 1)[1]
            idx = per_point.get(f"probabilistic_robustness/index@{eps}")
            out[f"probabilistic_robustness.eps_{eps}"] = (~np.asarray(arr, bool), False, idx)
    return out


def compare(a: dict[str, tuple], b: dict[str, tuple], *, confidence: float = 0.95
            ) -> list[QuantityComparison]:
    """Compare B against A on every quantity both have, with Holm across quantities."""
    stats.validate_confidence(confidence)
    pairs = []
    for key in sorted(set(a) & set(b)):
        good_a, hib, *idx_a = a[key]
        good_b, _, *idx_b = b[key]
        if good_a.shape != good_b.shape:
            raise RobustCertError(f"{key}: the versions were evaluated on different numbers of "
                                  f"points ({good_a.shape[0]} vs {good_b.shape[0]})")
        if idx_a and idx_b and idx_a[0] is not None and not np.array_equal(idx_a[0], idx_b[0]):
            continue  # noise draws differ (another seed): not paired, not compared
        pairs.append(PairedOutcomes(key, hib, good_a, good_b))
    alpha = 1 - confidence
    raw = []
    for p in pairs:
        a_only = int((p.a_good & ~p.b_good).sum())
        b_only = int((~p.a_good & p.b_good).sum())
        raw.append((a_only, b_only, stats.mcnemar_exact(a_only, b_only)))
    holm = stats.holm([r[2] for r in raw], alpha)
    out = []
    for i, (p, (a_only, b_only, pval)) in enumerate(zip(pairs, raw, strict=True)):
        n = p.a_good.shape[0]
        sign = 1.0 if p.higher_is_better else -1.0  # failure rates: rate = 1 − good rate
        good_a, good_b = p.a_good.mean(), p.b_good.mean()
        rate_a = good_a if p.higher_is_better else 1 - good_a
        rate_b = good_b if p.higher_is_better else 1 - good_b
        lo, hi = _delta_ci(a_only, b_only, n, confidence)
        ci = (lo, hi) if p.higher_is_better else (-hi, -lo)
        if holm.rejected[i]:
            verdict = BETTER if sign * (rate_b - rate_a) > 0 else WORSE
        else:
            verdict = SAME
        out.append(QuantityComparison(p.key, n, float(rate_a), float(rate_b),
                                      float(rate_b - rate_a), ci, a_only, b_only, pval,
                                      holm.adjusted[i], verdict))
    return out


def _delta_ci(a_only: int, b_only: int, n: int, confidence: float) -> tuple[float, float]:
    """CI for the paired difference of success rates (B − A), conditional on the number of
    discordant pairs m: b_only ~ Binomial(m, π) and Δ = (m/n)(2π − 1); π gets an exact
    Clopper–Pearson interval. With no discordant pairs the difference is exactly 0 here."""
    m = a_only + b_only
    if m == 0:
        return 0.0, 0.0
    lo, hi = stats.clopper_pearson(b_only, m, confidence)
    return m / n * (2 * lo - 1), m / n * (2 * hi - 1)
