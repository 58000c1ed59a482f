"""Paired comparison of two certified versions on the same evaluation data.

Both versions were evaluated on the same points (and, for noise metrics, the same seeded
draws), so each quantity is a pair of per-point outcomes. The exact McNemar test asks whether
the discordant pairs split evenly; Holm's procedure runs across all compared quantities, so
the chance of calling any difference significant when there is none is at most 1 − confidence.

The interval for Δ (B's rate minus A's) is Tango's (1998) score interval for a paired difference
of proportions (:func:`robust_cert.stats.tango_interval`): unconditional (it does not condition
on the number of discordant points, so it is not the single value 0 when the versions never
disagree), for the population the evaluation points were drawn from, at ``confidence`` for each
quantity on its own (not adjusted for multiplicity). A difference is called significant only
when both hold: Holm rejects the McNemar null *and* the interval excludes 0 on the same side;
otherwise the verdict is "no detectable difference" (with a ``note`` when the two disagree), so
the wording never contradicts the interval.

Noise failure rates pair *draws*, several per point (clustered): there the draws are not
independent samples of the population, so neither McNemar nor Tango on the draws holds for
it. Instead the per-point differences d_i = (draws only B survives − draws only A survives) / m_i
of the points with m_i ≥ 1 draws are independent in [−1, 1] with mean Δ, and the betting
e-value test and interval of :class:`robust_cert.stats.BettingBound` on (d_i + 1)/2 replace
them (``method`` says which was used).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from robust_cert import catalog, stats
from robust_cert.errors import RobustCertError

BETTER, WORSE, SAME = "significantly better", "significantly worse", "no detectable difference"
#: ``QuantityComparison.method`` values
PAIRED_POINTS = "exact McNemar test, Tango score interval (one outcome per point)"
PAIRED_CLUSTERS = ("betting e-value test and interval on per-point differences (several draws "
                   "per point)")


@dataclass(frozen=True)
class PairedOutcomes:
    """Per-point success (True = good) of one quantity for both versions."""

    key: str  # e.g. "robust_accuracy.eps_0.1"
    higher_is_better: bool  # of the reported rate (a failure rate is lower-is-better)
    a_good: np.ndarray
    b_good: np.ndarray
    index: np.ndarray | None = None  # the point of each outcome, for several draws per point


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
    note: str = ""  # why SAME although one of the test (Holm) and the interval shows a difference
    method: str = PAIRED_POINTS  # the test and interval used

    def to_dict(self) -> dict:
        out = asdict(self)
        out["delta_ci"] = list(self.delta_ci)
        return out


def paired_outcomes(per_point: dict[str, np.ndarray], body: dict) -> dict[str, tuple]:
    """Per-point outcomes by quantity key from a certificate's per-point arrays.

    Returns ``{key: (good array, higher_is_better)}``, ``higher_is_better`` the family's in
    the catalog (:mod:`robust_cert.catalog`); a failure-rate quantity's good array is
    "did not fail", and its rate is reported as the failure rate. Noise failure rates add a
    third item, the evaluation point of each draw (several draws per point), or None.
    """
    out = {}
    configs = {r["metric"]: r["config"] for r in body["results"]}
    better = {name: catalog.entry(name).higher_is_better
              for name in ("accuracy", "robust_accuracy", "probabilistic_robustness")}
    if "accuracy/correct" in per_point:
        out["accuracy"] = (np.asarray(per_point["accuracy/correct"], bool), better["accuracy"])
    if "robust_accuracy/robust" in per_point and "robust_accuracy" in configs:
        robust = np.asarray(per_point["robust_accuracy/robust"], bool)
        for j, eps in enumerate(configs["robust_accuracy"]["eps"]):
            out[f"robust_accuracy.eps_{eps:g}"] = (robust[:, j], better["robust_accuracy"])
    for name, arr in per_point.items():
        if name.startswith("probabilistic_robustness/failed@"):
            eps = name.split("@", 1)[1]
            idx = per_point.get(f"probabilistic_robustness/index@{eps}")
            out[f"probabilistic_robustness.eps_{eps}"] = (
                ~np.asarray(arr, bool), better["probabilistic_robustness"], idx)
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
        index = idx_a[0] if idx_a and idx_a[0] is not None else None
        pairs.append(PairedOutcomes(key, hib, good_a, good_b, index))
    alpha = 1 - confidence
    raw = []
    for p in pairs:
        a_only = int((p.a_good & ~p.b_good).sum())
        b_only = int((~p.a_good & p.b_good).sum())
        if p.index is None:
            pval = stats.mcnemar_exact(a_only, b_only)
            ci = _delta_ci(a_only, b_only, p.a_good.shape[0], confidence)
        else:
            pval, ci = _clustered_delta(p, confidence)
        raw.append((a_only, b_only, pval, ci))
    holm = stats.holm([r[2] for r in raw], alpha)
    out = []
    for i, (p, (a_only, b_only, pval, (lo, hi))) in enumerate(zip(pairs, raw, strict=True)):
        n = p.a_good.shape[0]
        test = "McNemar" if p.index is None else "the betting test"
        good_a, good_b = p.a_good.mean(), p.b_good.mean()
        rate_a = good_a if p.higher_is_better else 1 - good_a
        rate_b = good_b if p.higher_is_better else 1 - good_b
        # (lo, hi) is for the good rate, B − A
        ci = (lo, hi) if p.higher_is_better else (-hi, -lo)
        excludes = 1 if lo > 0 else -1 if hi < 0 else 0  # B better / worse / neither
        note = ""
        if holm.rejected[i] and excludes == 0:
            verdict = SAME
            note = (f"{test} rejects after Holm, but the {100 * confidence:g}% interval "
                    "contains 0")
        elif holm.rejected[i]:
            verdict = BETTER if excludes > 0 else WORSE
        else:
            verdict = SAME
            if excludes:
                note = (f"the {100 * confidence:g}% interval excludes 0, but {test} does not "
                        f"reject after Holm's correction across {len(pairs)} quantities")
        out.append(QuantityComparison(
            p.key, n, float(rate_a), float(rate_b), float(rate_b - rate_a), ci, a_only,
            b_only, pval, holm.adjusted[i], verdict, note,
            PAIRED_POINTS if p.index is None else PAIRED_CLUSTERS))
    return out


def _clustered_delta(p: PairedOutcomes, confidence: float
                     ) -> tuple[float, tuple[float, float]]:
    """Two-sided p-value of H0 Δ = 0 and the interval for Δ (good rate, B − A) from draws
    clustered by point. y_i = (d_i + 1)/2 with d_i the per-point difference of good rates,
    so E y_i = (Δ + 1)/2. p = min(1, 1/E) with E the average of the two one-sided betting
    e-values at 1/2 (an e-value under H0); the interval is the two-sided betting interval,
    both with bets tuned for (1 − confidence)/2."""
    assert p.index is not None  # clustered draws: the caller checked
    draws = np.bincount(p.index)
    seen = draws > 0
    diff = np.bincount(p.index, weights=p.b_good.astype(float) - p.a_good.astype(float),
                       minlength=draws.size)
    y = np.clip((diff[seen] / draws[seen] + 1.0) / 2.0, 0.0, 1.0)
    bb = stats.BettingBound(y, tune_alpha=(1.0 - confidence) / 2)
    log_e = [bb.log_evalue(0.5, side) for side in ("upper", "lower")]
    top = max(log_e)
    log_mean = top + math.log(sum(math.exp(v - top) for v in log_e) / 2)
    pval = 1.0 if log_mean <= 0 else float(math.exp(-log_mean))
    lo, hi = bb.interval(confidence)
    return pval, (2.0 * lo - 1.0, 2.0 * hi - 1.0)


def _delta_ci(a_only: int, b_only: int, n: int, confidence: float) -> tuple[float, float]:
    """Tango's score interval for the paired difference of success rates, B − A
    = P(only B succeeds) − P(only A succeeds), unconditional on the discordant count
    (:func:`robust_cert.stats.tango_interval`)."""
    return stats.tango_interval(b_only, a_only, n, confidence)
