"""From hand-made metric results to verdicts: exact bounds, zero-failure demonstrations, Holm."""

from __future__ import annotations

import pytest
from scipy import stats as st

from robust_cert import Policy
from robust_cert.metrics.base import MetricResult, Proportion
from robust_cert.verdict import FAIL, INCONCLUSIVE, PASS, decide

METRICS = {
    "accuracy": {},
    "robust_accuracy": {"eps": [0.1], "attacks": ["fgsm"]},
    "probabilistic_robustness": {"eps": [0.1], "samples": 10},
}


def _policy(*requirements: dict, confidence: float = 0.95) -> Policy:
    return Policy.from_dict({"name": "t", "confidence": confidence, "metrics": METRICS,
                             "requirements": list(requirements)})


def _result(metric: str, k: int, n: int, params: dict | None = None, *,
            status: str = "ok", reason: str = "") -> MetricResult:
    props = [] if status != "ok" else [Proportion(params or {}, k, n)]
    return MetricResult(metric=metric, kind="statistical", quantity="q", higher_is_better=True,
                        description="", config={}, proportions=props, status=status,
                        reason=reason)


def _acc(k: int, n: int) -> MetricResult:
    return _result("accuracy", k, n)


def _rob(k: int, n: int) -> MetricResult:
    return _result("robust_accuracy", k, n, {"eps": 0.1})


def _prob(k: int, n: int) -> MetricResult:
    return _result("probabilistic_robustness", k, n, {"eps": 0.1})


ACC = {"metric": "accuracy"}
ROB = {"metric": "robust_accuracy", "eps": 0.1}
PROB = {"metric": "probabilistic_robustness", "eps": 0.1}


def _one(req: dict, result: MetricResult, confidence: float = 0.95):
    overall, outcomes = decide(_policy(req, confidence=confidence), {result.metric: result})
    assert len(outcomes) == 1
    return overall, outcomes[0]


# --------------------------------------------------------------------------- single requirements


def test_all_correct_299_clears_099() -> None:
    overall, o = _one({**ACC, "at_least": 0.99}, _acc(299, 299))
    assert o.verdict == PASS
    assert overall == PASS
    assert o.level == pytest.approx(0.05)
    assert o.bound == pytest.approx(0.05 ** (1 / 299), rel=1e-12)
    assert o.bound > 0.99
    assert o.k == 299
    assert o.n == 299
    assert o.estimate == 1.0
    assert o.p_value == pytest.approx(0.99**299, rel=1e-9)
    assert o.reason == ""


def test_all_correct_298_is_inconclusive() -> None:
    overall, o = _one({**ACC, "at_least": 0.99}, _acc(298, 298))
    assert o.bound == pytest.approx(0.05 ** (1 / 298), rel=1e-12)
    assert o.bound < 0.99
    assert o.verdict == INCONCLUSIVE
    assert overall == INCONCLUSIVE
    assert o.reason


def test_zero_failures_in_2995_demonstrate_1e3() -> None:
    overall, o = _one({**PROB, "at_most": 1e-3}, _prob(0, 2995))
    assert o.direction == "at_most"
    assert o.verdict == PASS
    assert overall == PASS
    assert o.bound == pytest.approx(1 - 0.05 ** (1 / 2995), rel=1e-9)
    assert o.bound < 1e-3


def test_zero_failures_in_2994_do_not_demonstrate_1e3() -> None:
    overall, o = _one({**PROB, "at_most": 1e-3}, _prob(0, 2994))
    assert o.verdict != PASS
    assert o.verdict == INCONCLUSIVE  # 0 failures can never refute an upper threshold
    assert o.bound > 1e-3
    assert overall == INCONCLUSIVE


def test_at_least_fail_when_upper_bound_below_threshold() -> None:
    overall, o = _one({**ACC, "at_least": 0.9}, _acc(80, 100))
    assert o.verdict == FAIL
    assert overall == FAIL
    upper = st.beta.ppf(1 - 0.05, 81, 20)
    assert upper < 0.9
    assert f"{upper:.4g}" in o.reason
    assert "below" in o.reason
    # both one-sided bounds are recorded: the FAIL was decided by the upper one
    assert o.upper_bound == pytest.approx(upper, rel=1e-12)
    assert o.lower_bound == pytest.approx(st.beta.ppf(0.05, 80, 21), rel=1e-12)
    assert o.bound == o.lower_bound


def test_at_most_fail_when_lower_bound_above_threshold() -> None:
    overall, o = _one({**PROB, "at_most": 0.01}, _prob(10, 100))
    assert o.verdict == FAIL
    assert overall == FAIL
    lower = st.beta.ppf(0.05, 10, 91)
    assert lower > 0.01
    assert "above" in o.reason
    assert o.lower_bound == pytest.approx(lower, rel=1e-12)
    assert o.bound == o.upper_bound


def test_estimate_at_threshold_is_inconclusive() -> None:
    _, o = _one({**ACC, "at_least": 0.9}, _acc(90, 100))
    assert o.verdict == INCONCLUSIVE
    _, o = _one({**PROB, "at_most": 0.1}, _prob(10, 100))
    assert o.verdict == INCONCLUSIVE


@pytest.mark.parametrize(
    ("req", "result"),
    [
        ({**ACC, "at_least": 0.9}, _acc(95, 100)),
        ({**ACC, "at_least": 0.9}, _acc(80, 100)),
        ({**ACC, "at_least": 0.5}, _acc(0, 10)),
        ({**PROB, "at_most": 0.05}, _prob(1, 200)),
        ({**PROB, "at_most": 0.05}, _prob(30, 200)),
        ({**PROB, "at_most": 0.2}, _prob(200, 200)),
        ({**ROB, "at_least": 0.6}, _rob(70, 100)),
    ],
)
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_bound_matches_scipy(req: dict, result: MetricResult, confidence: float) -> None:
    _, o = _one(req, result, confidence)
    k, n, level = o.k, o.n, o.level
    assert level == pytest.approx(1 - confidence)
    if o.direction == "at_least":
        ref = 0.0 if k == 0 else st.beta.ppf(level, k, n - k + 1)
        assert o.p_value == pytest.approx(st.binom.sf(k - 1, n, o.threshold), rel=1e-9, abs=1e-300)
    else:
        ref = 1.0 if k == n else st.beta.ppf(1 - level, k + 1, n - k)
        assert o.p_value == pytest.approx(st.binom.cdf(k, n, o.threshold), rel=1e-9, abs=1e-300)
    assert o.bound == pytest.approx(ref, rel=1e-12, abs=1e-15)
    # the verdict agrees with the bound
    clears = o.bound > o.threshold if o.direction == "at_least" else o.bound < o.threshold
    assert (o.verdict == PASS) == clears
    # two-sided display interval at the policy's confidence
    lo = 0.0 if k == 0 else st.beta.ppf((1 - confidence) / 2, k, n - k + 1)
    hi = 1.0 if k == n else st.beta.ppf(1 - (1 - confidence) / 2, k + 1, n - k)
    assert o.ci == pytest.approx((lo, hi), rel=1e-12, abs=1e-15)


# --------------------------------------------------------------------------- Holm


def _k_with_pvalue_between(n: int, p0: float, lo: float, hi: float) -> int:
    """A success count whose one-sided 'greater' p-value lies in (lo, hi)."""
    for k in range(n, -1, -1):
        p = st.binom.sf(k - 1, n, p0)
        if lo < p < hi:
            return k
    raise AssertionError("no such k")


def test_holm_two_marginal_requirements_both_lose_their_pass() -> None:
    # Two p-values in (alpha/2, alpha): each passes alone at 0.05, neither survives Holm,
    # whose smallest p-value is tested at alpha/2.
    ka = _k_with_pvalue_between(200, 0.9, 0.025, 0.05)
    kb = _k_with_pvalue_between(300, 0.8, 0.025, 0.05)
    pa, pb = st.binom.sf(ka - 1, 200, 0.9), st.binom.sf(kb - 1, 300, 0.8)
    ra, rb = _acc(ka, 200), _rob(kb, 300)
    req_a, req_b = {**ACC, "at_least": 0.9}, {**ROB, "at_least": 0.8}

    assert _one(req_a, ra)[1].verdict == PASS
    assert _one(req_b, rb)[1].verdict == PASS

    overall, (oa, ob) = decide(_policy(req_a, req_b), {"accuracy": ra, "robust_accuracy": rb})
    assert oa.verdict != PASS
    assert ob.verdict != PASS
    assert overall == INCONCLUSIVE
    smaller, larger = (oa, ob) if pa <= pb else (ob, oa)
    assert smaller.level == pytest.approx(0.025)
    assert larger.level <= 0.05 + 1e-12
    assert smaller.adjusted_p_value == pytest.approx(2 * min(pa, pb), rel=1e-9)
    assert larger.adjusted_p_value == pytest.approx(max(2 * min(pa, pb), max(pa, pb)), rel=1e-9)
    # the reported bound is the one at the Holm level, and it no longer clears
    assert smaller.bound == pytest.approx(
        st.beta.ppf(0.025, smaller.k, smaller.n - smaller.k + 1), rel=1e-12)
    assert smaller.bound < smaller.threshold


def test_holm_step_down_passes_second_at_full_alpha() -> None:
    # One strong requirement (p << alpha/2) lets the marginal one be tested at alpha itself:
    # Holm passes both where Bonferroni (alpha/2 for each) would not pass the marginal one.
    kb = _k_with_pvalue_between(300, 0.8, 0.025, 0.05)
    req_a, req_b = {**ACC, "at_least": 0.9}, {**ROB, "at_least": 0.8}
    ra, rb = _acc(199, 200), _rob(kb, 300)
    overall, (oa, ob) = decide(_policy(req_a, req_b), {"accuracy": ra, "robust_accuracy": rb})
    assert oa.verdict == PASS
    assert ob.verdict == PASS
    assert overall == PASS
    assert oa.level == pytest.approx(0.025)
    assert ob.level == pytest.approx(0.05)
    assert ob.bound == pytest.approx(st.beta.ppf(0.05, kb, 300 - kb + 1), rel=1e-12)
    assert ob.bound > 0.8
    assert st.beta.ppf(0.025, kb, 300 - kb + 1) < 0.8  # Bonferroni would not pass it


def test_holm_counts_a_missing_result_in_the_family() -> None:
    # A requirement that cannot be tested still takes a share of alpha.
    ka = _k_with_pvalue_between(200, 0.9, 0.025, 0.05)
    req_a, req_b = {**ACC, "at_least": 0.9}, {**ROB, "at_least": 0.8}
    overall, (oa, ob) = decide(_policy(req_a, req_b), {"accuracy": _acc(ka, 200)})
    assert oa.level == pytest.approx(0.025)
    assert oa.verdict != PASS
    assert ob.verdict == INCONCLUSIVE
    assert "did not run" in ob.reason
    assert overall == INCONCLUSIVE


# --------------------------------------------------------------------------- overall verdict


@pytest.mark.parametrize(
    ("acc", "rob", "prob", "expected"),
    [
        ((299, 299), (95, 100), (0, 2995), PASS),
        ((299, 299), (95, 100), (30, 100), FAIL),  # one FAIL
        ((50, 100), (95, 100), (0, 10), FAIL),  # FAIL wins over INCONCLUSIVE
        ((299, 299), (95, 100), (0, 10), INCONCLUSIVE),  # no FAIL, one INCONCLUSIVE
        ((50, 100), (10, 100), (90, 100), FAIL),  # all FAIL
    ],
)
def test_overall_verdict_rules(acc, rob, prob, expected: str) -> None:
    pol = _policy({**ACC, "at_least": 0.9}, {**ROB, "at_least": 0.5},
                  {**PROB, "at_most": 0.01})
    results = {"accuracy": _acc(*acc), "robust_accuracy": _rob(*rob),
               "probabilistic_robustness": _prob(*prob)}
    overall, outcomes = decide(pol, results)
    assert overall == expected
    verdicts = [o.verdict for o in outcomes]
    if expected == PASS:
        assert set(verdicts) == {PASS}
    elif expected == FAIL:
        assert FAIL in verdicts
    else:
        assert FAIL not in verdicts
        assert INCONCLUSIVE in verdicts
    assert [o.id for o in outcomes] == [r.id for r in pol.requirements]


def test_not_applicable_metric_is_inconclusive_with_reason() -> None:
    pol = _policy({**ACC, "at_least": 0.9}, {**ROB, "at_least": 0.5})
    results = {
        "accuracy": _acc(299, 299),
        "robust_accuracy": _result("robust_accuracy", 0, 0, status="not_applicable",
                                   reason="no gradients: the model format (onnx) gives none"),
    }
    overall, (oa, ob) = decide(pol, results)
    assert oa.verdict == PASS
    assert ob.verdict == INCONCLUSIVE
    assert "not applicable" in ob.reason
    assert "no gradients" in ob.reason
    assert ob.k is None
    assert ob.n is None
    assert ob.bound is None
    assert overall == INCONCLUSIVE


def test_result_without_the_requested_params_is_inconclusive() -> None:
    pol = _policy({**ROB, "at_least": 0.5})
    wrong = _result("robust_accuracy", 90, 100, {"eps": 0.2})
    overall, (o,) = decide(pol, {"robust_accuracy": wrong})
    assert o.verdict == INCONCLUSIVE
    assert "no result" in o.reason
    assert overall == INCONCLUSIVE


def test_outcome_to_dict_has_everything_to_recheck() -> None:
    _, o = _one({**ACC, "at_least": 0.99}, _acc(299, 299))
    d = o.to_dict()
    for key in ("id", "metric", "params", "direction", "threshold", "k", "n", "estimate", "ci",
                "p_value", "adjusted_p_value", "level", "bound", "verdict", "reason"):
        assert key in d
    assert d["verdict"] == PASS
    assert d["threshold"] == 0.99


def test_reported_bound_agrees_with_verdict_under_holm() -> None:
    """The decision rule: PASS exactly when the one-sided bound at the reported Holm level
    clears the threshold. A requirement blocked by Holm's step-down (an earlier, smaller
    p-value was not rejected) must not be reported with a bound that clears its threshold."""
    ka = _k_with_pvalue_between(200, 0.9, 0.025, 0.05)
    kb = _k_with_pvalue_between(300, 0.8, 0.025, 0.05)
    pol = _policy({**ACC, "at_least": 0.9}, {**ROB, "at_least": 0.8})
    _, outcomes = decide(pol, {"accuracy": _acc(ka, 200), "robust_accuracy": _rob(kb, 300)})
    for o in outcomes:
        ref = st.beta.ppf(o.level, o.k, o.n - o.k + 1)
        assert o.bound == pytest.approx(ref, rel=1e-12)
        assert (o.verdict == PASS) == (o.bound > o.threshold), o


def test_a_failed_check_its_metric_does_not_explain_still_decides() -> None:
    """A check decides, it never only warns: a failed check without a finding makes the
    metric's PASS requirements INCONCLUSIVE (and leaves other metrics alone)."""
    from robust_cert.verdict import apply_sanity

    policy = _policy({**ACC, "at_least": 0.9}, {**ROB, "at_least": 0.5})
    rob = _rob(290, 300)
    rob.diagnostics["sanity"] = {"some_new_check": "failed", "gradients_nonzero": "passed"}
    results = {"accuracy": _acc(299, 300), "robust_accuracy": rob}
    overall, outcomes = decide(policy, results)
    assert overall == PASS
    overall, outcomes, records = apply_sanity(policy, results, outcomes)
    assert overall == INCONCLUSIVE
    by = {o.metric: o for o in outcomes}
    assert by["accuracy"].verdict == PASS
    assert by["robust_accuracy"].verdict == INCONCLUSIVE
    assert "some_new_check failed" in by["robust_accuracy"].reason
    (rec,) = [r for r in records if r["check"] == "some_new_check"]
    assert rec["action"] == "inconclusive"
