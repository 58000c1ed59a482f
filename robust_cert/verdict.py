"""From metric results to a verdict: one exact one-sided test per requirement, Holm across them.

Each requirement's proportion supplies its own test and bounds (:class:`Proportion`): the exact
binomial test and Clopper–Pearson bounds for one outcome per point, the betting e-value test
and bounds on the per-point rates for several draws per point (clustered), so every PASS is a
statement about the population the evaluation points were drawn from.

Guarantee: with α = 1 − confidence, the probability that *any* requirement is declared PASS
while its true proportion violates the threshold is at most α (Holm's step-down procedure
controls the family-wise error rate under any dependence between the tests). FAIL means the
opposite one-sided bound, at the same level, excludes the threshold; INCONCLUSIVE means the
data can show neither (more points or draws are needed).

Verdicts are :class:`Verdict` members (defined in :mod:`robust_cert.verdicts`, torch-free, and
re-exported here with the aliases ``PASS``, ``FAIL``, ``INCONCLUSIVE``); certificates store
their plain strings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from robust_cert import stats
from robust_cert.metrics.base import MetricResult
from robust_cert.policy import Policy, Requirement
from robust_cert.verdicts import Verdict

PASS, FAIL, INCONCLUSIVE = Verdict.PASS, Verdict.FAIL, Verdict.INCONCLUSIVE


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
    p_value: float | None  # one-sided test of "requirement violated" (Proportion.p_value)
    adjusted_p_value: float | None  # Holm
    level: float | None  # the Holm level this requirement was tested at
    bound: float | None  # one-sided bound at ``level``: lower for at_least, upper for at_most
    verdict: Verdict
    reason: str = ""
    population: str = ""  # what ci, p_value and bound cover (Proportion.population)
    interval_method: str = ""  # how they were computed (Proportion.interval_method)
    lower_bound: float | None = None  # both one-sided bounds at ``level``: a FAIL is decided
    upper_bound: float | None = None  # by the opposite one (upper for at_least)

    def to_dict(self) -> dict:
        """JSON-ready, as it reads back from the certificate: the CI as a list, the verdict
        as its plain string."""
        out = asdict(self)
        if out["ci"] is not None:
            out["ci"] = list(out["ci"])
        out["verdict"] = Verdict(out["verdict"]).value
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
) -> tuple[Verdict, list[RequirementOutcome]]:
    """Test every requirement of ``policy`` on ``results``; return (overall verdict, outcomes)."""
    alpha = 1.0 - policy.confidence
    found = [_counts(r, results) for r in policy.requirements]
    pvals = []
    for req, (prop, _) in zip(policy.requirements, found, strict=True):
        if prop is None:
            pvals.append(1.0)  # cannot be demonstrated; still counts in the family
            continue
        alt = "greater" if req.direction == "at_least" else "less"
        # exact binomial test, or for clustered draws the betting e-value test (p = 1/e)
        # with bets tuned for the family level alpha
        pvals.append(prop.p_value(req.threshold, alt, tune_alpha=alpha))
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
        lower = prop.bound(level, "lower", tune_alpha=alpha)
        upper = prop.bound(level, "upper", tune_alpha=alpha)
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
            ci=prop.ci(policy.confidence),
            p_value=pvals[i], adjusted_p_value=holm.adjusted[i], level=level,
            bound=lower if at_least else upper, verdict=verdict, reason=reason,
            population=prop.population, interval_method=prop.interval_method,
            lower_bound=lower, upper_bound=upper))

    return Verdict.overall(o.verdict for o in outcomes), outcomes


# --------------------------------------------------------------------------- sanity checks

#: States of a sanity check (a check that did not run never reads as passed).
PASSED, FAILED, NOT_RUN = "passed", "failed", "not_run"


def check_state(value) -> str:
    """The state of a recorded sanity check: ``"passed"``, ``"failed"`` or ``"not_run"``.

    Merged shards that disagree are recorded as a list of states: failed if any failed, else
    passed if any passed. Booleans (certificates before schema change) read as passed/failed.
    """
    if isinstance(value, bool):
        return PASSED if value else FAILED
    if isinstance(value, list):
        states = {check_state(v) for v in value}
        return FAILED if FAILED in states else PASSED if PASSED in states else NOT_RUN
    if value in (PASSED, FAILED, NOT_RUN):
        return value
    raise ValueError(f"not a sanity-check state: {value!r}")


def apply_sanity(
    policy: Policy,
    results: dict[str, MetricResult],
    outcomes: list[RequirementOutcome],
    *,
    model_findings: dict[str, dict] | None = None,
) -> tuple[Verdict, list[RequirementOutcome], list[dict]]:
    """Let failed sanity checks decide: return (overall verdict, outcomes, check records).

    A metric lists its failed checks in ``diagnostics["sanity_findings"]`` (check ->
    ``detail``, ``undermines``: the parameter sets of the proportions it undermines,
    ``compensated_by``: what already makes up for it, or None). A failed check means the
    metric may look better than it is, so on an undermined requirement the verdict that
    relies on it not doing so becomes INCONCLUSIVE, with the reason: PASS of ``at_least``
    (FAIL of ``at_most``) when higher is better, the reverse otherwise. The opposite verdict
    stands (e.g. a FAIL of an upper bound on robust accuracy stays a FAIL). ``model_findings``
    are failed checks about the model itself (e.g. ``deterministic_forward``), keyed the
    same way, with ``undermines`` ``"all"``: every requirement becomes INCONCLUSIVE.

    A finding is not applied when it is compensated or when the policy waives its check
    (``waive: [{check, reason}]``). Demoting Holm rejections to INCONCLUSIVE only shrinks the
    set of PASS verdicts, so the family-wise error bound of :func:`decide` still holds.

    Records: one per (metric, check) with its state, plus, for a failed check, its detail,
    ``action`` (``"inconclusive"``, ``"compensated"``, ``"waived"`` or ``"none"``), the
    affected requirement ids and the waiver reason.
    """
    import dataclasses

    waivers = {w.check: w.reason for w in policy.waive}
    by_id = {o.id: i for i, o in enumerate(outcomes)}
    original, outcomes = list(outcomes), list(outcomes)
    records: list[dict] = []
    sources: list[tuple[str | None, dict, dict, bool]]
    sources = [(name, res.diagnostics.get("sanity") or {},
                res.diagnostics.get("sanity_findings") or {}, res.higher_is_better)
               for name, res in results.items()]
    sources.append((None, {c: FAILED for c in (model_findings or {})}, model_findings or {},
                    True))
    for metric, checks, findings, higher in sources:
        for check, raw in checks.items():
            state = check_state(raw)
            rec = {"check": check, "metric": metric, "state": state}
            records.append(rec)
            if state != FAILED:
                continue
            # a failed check that its metric does not explain undermines all of the metric's
            # requirements: a check decides, it never only warns
            finding = findings.get(check) or {
                "detail": "the check failed and its metric names no narrower consequence",
                "undermines": [dict(r.params) for r in policy.requirements
                               if r.metric == metric],
                "compensated_by": None}
            rec["detail"] = finding["detail"]
            hit = [r for r in policy.requirements if _undermined(r, metric, finding)]
            rec["requirements"] = [r.id for r in hit]
            if finding.get("compensated_by"):
                rec["action"], rec["compensated_by"] = "compensated", finding["compensated_by"]
                continue
            if check in waivers:
                rec["action"], rec["waiver"] = "waived", waivers[check]
                continue
            changed = []
            why = f"sanity check {check} failed: {finding['detail']}"
            for req in hit:
                i = by_id[req.id]
                o = outcomes[i]
                optimistic = PASS if (req.direction == "at_least") == higher else FAIL
                if finding["undermines"] == "all" or original[i].verdict == optimistic:
                    prev = o.reason if o.verdict != original[i].verdict else ""
                    outcomes[i] = dataclasses.replace(
                        o, verdict=INCONCLUSIVE, reason="; ".join(x for x in (prev, why) if x))
                    changed.append(req.id)
                else:  # the verdict stands whatever the check says; say it failed anyway
                    outcomes[i] = dataclasses.replace(
                        o, reason="; ".join(x for x in (o.reason, f"also {why}") if x))
            rec["action"] = "inconclusive" if changed else "none"
            rec["made_inconclusive"] = changed
    return Verdict.overall(o.verdict for o in outcomes), outcomes, records


def _undermined(req: Requirement, metric: str | None, finding: dict) -> bool:
    from robust_cert.metrics.base import params_match

    if finding["undermines"] == "all":
        return True
    return req.metric == metric and any(params_match(p, req.params)
                                        for p in finding["undermines"])
