"""From metric results to a verdict: one exact one-sided test per requirement, Holm across them.

Guarantee: with α = 1 − confidence, the probability that *any* requirement is declared PASS
while its true proportion violates the threshold is at most α (Holm's step-down procedure
controls the family-wise error rate under any dependence between the tests). FAIL means the
opposite one-sided bound, at the same level, excludes the threshold; INCONCLUSIVE means the
data can show neither (more points or draws are needed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from robust_cert import stats
from robust_cert.metrics.base import MetricResult
from robust_cert.policy import Policy, Requirement

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


@dataclass(frozen=True)
class RequirementOutcome:
    """The test of one requirement, with everything needed to recheck it by hand."""

    id: str
    metric: str
    params: dict
    direction: str  # "at_least" | "at_most"
    threshold: float
    k: int | None
    n: int | None
    estimate: float | None
    ci: tuple[float, float] | None  # two-sided, at the policy's confidence (for display)
    p_value: float | None  # one-sided exact binomial test of "requirement violated"
    adjusted_p_value: float | None  # Holm
    level: float | None  # the Holm level this requirement was tested at
    bound: float | None  # one-sided CP bound at ``level``: lower for at_least, upper for at_most
    verdict: str
    reason: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: the CI as a list, as it reads back from the certificate."""
        out = asdict(self)
        if out["ci"] is not None:
            out["ci"] = list(out["ci"])
        return out


def _counts(req: Requirement, results: dict[str, MetricResult]):
    res = results.get(req.metric)
    if res is None:
        return None, f"metric {req.metric} did not run"
    if res.status != "ok":
        return None, f"{req.metric} {res.status.replace('_', ' ')}: {res.reason}"
    prop = res.find(req.params)
    if prop is None or prop.n == 0:
        return None, f"{req.metric} produced no result for {req.params}"
    return prop, ""


def decide(
    policy: Policy, results: dict[str, MetricResult]
) -> tuple[str, list[RequirementOutcome]]:
    """Test every requirement of ``policy`` on ``results``; return (overall verdict, outcomes)."""
    alpha = 1.0 - policy.confidence
    found = [_counts(r, results) for r in policy.requirements]
    pvals = []
    for req, (prop, _) in zip(policy.requirements, found, strict=True):
        if prop is None:
            pvals.append(1.0)  # cannot be demonstrated; still counts in the family
            continue
        alt = "greater" if req.direction == "at_least" else "less"
        pvals.append(stats.binom_test_pvalue(prop.k, prop.n, req.threshold, alt))
    holm = stats.holm(pvals, alpha)
    # Step-down stops at the first non-rejected rank; every later hypothesis is effectively
    # tested at that rank's level, so report that level (and the bound at it).
    levels = list(holm.levels)
    blocked = [j for j in range(len(pvals)) if not holm.rejected[j]]
    if blocked:
        stop = min(blocked, key=lambda j: (pvals[j], j))
        for j in blocked:
            levels[j] = min(levels[j], holm.levels[stop])

    outcomes = []
    for i, (req, (prop, why)) in enumerate(zip(policy.requirements, found, strict=True)):
        if prop is None:
            outcomes.append(RequirementOutcome(
                req.id, req.metric, dict(req.params), req.direction, req.threshold,
                None, None, None, None, None, None, levels[i], None, INCONCLUSIVE, why))
            continue
        level = levels[i]
        lower, upper = stats.clopper_pearson(prop.k, prop.n, 1 - level, "lower")[0], \
            stats.clopper_pearson(prop.k, prop.n, 1 - level, "upper")[1]
        at_least = req.direction == "at_least"
        if holm.rejected[i]:
            verdict, reason = PASS, ""
        elif (upper < req.threshold) if at_least else (lower > req.threshold):
            verdict = FAIL
            reason = (f"{'upper' if at_least else 'lower'} bound "
                      f"{upper if at_least else lower:.4g} is "
                      f"{'below' if at_least else 'above'} the threshold {req.threshold:g}")
        else:
            verdict = INCONCLUSIVE
            reason = "the data neither demonstrate nor refute the requirement at this level"
        outcomes.append(RequirementOutcome(
            id=req.id, metric=req.metric, params=dict(req.params), direction=req.direction,
            threshold=req.threshold, k=prop.k, n=prop.n, estimate=prop.estimate,
            ci=stats.clopper_pearson(prop.k, prop.n, policy.confidence),
            p_value=pvals[i], adjusted_p_value=holm.adjusted[i], level=level,
            bound=lower if at_least else upper, verdict=verdict, reason=reason))

    verdicts = {o.verdict for o in outcomes}
    overall = FAIL if FAIL in verdicts else INCONCLUSIVE if INCONCLUSIVE in verdicts else PASS
    return overall, outcomes
