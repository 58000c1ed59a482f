"""Known-answer tests of the per-point SPRT (local probabilistic robustness)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import robust_cert
from robust_cert import engine, stats
from robust_cert.errors import PolicyError
from robust_cert.metrics import REGISTRY
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.local_probabilistic import (
    NOT_ROBUST,
    ROBUST,
    LocalProbabilisticConfig,
    LocalProbabilisticRobustness,
    draw_noise,
)
from robust_cert.metrics.probabilistic import draws_to_demonstrate, failure_rate_bands
from robust_cert.verdict import PASS

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
WIDE = (-10.0, 10.0)


def _ctx(seed: int = 0, batch_size: int = 256) -> RunContext:
    return RunContext(device=CPU, batch_size=batch_size, seed=seed)


def _scalar_model() -> nn.Linear:
    """logits [0, x]: class 1 iff x > 0."""
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0], [1.0]]))
        lin.bias.zero_()
    return lin


def _run(x, y, seed: int = 0, input_range=WIDE, **cfg):
    data = robust_cert.load_data((np.asarray(x, np.float32)[:, None], np.asarray(y)),
                                 input_range=input_range)
    clf = robust_cert.load_model(_scalar_model(), input_shape=(1,))
    metric = LocalProbabilisticRobustness(LocalProbabilisticConfig(**cfg))
    return metric.run(clf, data, _ctx(seed))


# Uniform noise in [-1, 1] on a point at x > 0 flips it with probability (1 - x) / 2, so
# x = 1 - 2p has p_fail = p exactly.
def _at(p: float) -> float:
    return 1.0 - 2.0 * p


def test_failure_free_points_are_robust_after_the_minimum_draws() -> None:
    res = _run([1.5, 2.0, -3.0], [1, 1, 0], eps=1.0)
    np.testing.assert_array_equal(res.per_point["decision"], [ROBUST] * 3)
    assert stats.SPRT(0.01, 0.001).draws_to_accept_h1_without_failures() == 326
    np.testing.assert_array_equal(res.per_point["draws"], [326] * 3)
    np.testing.assert_array_equal(res.per_point["failures"], [0] * 3)
    (prop,) = res.proportions
    assert (prop.params, prop.k, prop.n) == ({"p0": 0.01}, 3, 3)
    assert res.diagnostics["min_draws_to_decide_robust"] == 326
    assert res.diagnostics["forward_images"] == 3 * 326


def test_fragile_and_mislabelled_points_are_not_robust() -> None:
    # p_fail 0.3 and 0.1 (fragile), 1.0 (mislabelled far from the boundary)
    res = _run([_at(0.3), _at(0.1), 3.0], [1, 1, 0], eps=1.0)
    np.testing.assert_array_equal(res.per_point["decision"], [NOT_ROBUST] * 3)
    # each failure adds ln(p1/p0) = −2.30; ln(β/(1−α)) = −2.94 is crossed at the second
    assert res.per_point["draws"][2] == 2
    assert res.proportions[0].k == 0
    assert res.diagnostics["not_robust"] == 3
    # a sure failure costs one forward pass of the first 16-draw block, not a full block
    assert _run([3.0], [0], eps=1.0).diagnostics["forward_images"] == 16


def test_operating_characteristic_by_simulation() -> None:
    """At p_fail = p0 the SPRT says 'robust' with probability ≲ α; at p1, 'not robust' ≲ β."""
    alpha = beta = 0.05
    m = 1500
    at_p0 = _run([_at(0.01)] * m, [1] * m, eps=1.0, alpha=alpha, beta=beta, max_draws=20_000)
    at_p1 = _run([_at(0.001)] * m, [1] * m, eps=1.0, alpha=alpha, beta=beta, max_draws=20_000,
                 seed=1)
    wrong_robust = int((at_p0.per_point["decision"] == ROBUST).sum())
    wrong_not = int((at_p1.per_point["decision"] == NOT_ROBUST).sum())
    # Wald: P(accept H1 | p0) ≤ α/(1−β) and P(accept H0 | p1) ≤ β/(1−α). A 99.9% CP lower
    # bound above these would refute the implementation.
    assert stats.clopper_pearson(wrong_robust, m, 0.998)[0] <= alpha / (1 - beta)
    assert stats.clopper_pearson(wrong_not, m, 0.998)[0] <= beta / (1 - alpha)
    # and the test is not trivially conservative: it does say 'robust' at p1 most of the time
    assert (at_p1.per_point["decision"] == ROBUST).mean() > 0.9
    # the average sample number is far below the fixed-n test's
    assert at_p1.per_point["draws"].mean() < 1000


def test_budget_fallback_uses_clopper_pearson() -> None:
    # p_fail = 0.004 sits in the indifference zone: most points hit a small budget.
    m = 60
    res = _run([_at(0.004)] * m, [1] * m, eps=1.0, max_draws=400, seed=3)
    at_budget = res.per_point["decided_at_budget"]
    assert at_budget.any()
    assert (res.per_point["draws"][at_budget] == 400).all()
    for k, d, dec in zip(res.per_point["failures"][at_budget], res.per_point["draws"][at_budget],
                         res.per_point["decision"][at_budget], strict=True):
        upper = stats.clopper_pearson(int(k), int(d), 0.95, "upper")[1]
        lower = stats.clopper_pearson(int(k), int(d), 0.95, "lower")[0]
        expected = ROBUST if upper < 0.01 else NOT_ROBUST if lower > 0.001 else 0
        assert dec == expected
    assert res.diagnostics["decided_at_budget"] == int(at_budget.sum())


def test_budget_fallback_bounds_are_scipy_stats_beta_ppf_bit_for_bit() -> None:
    # _fallback reads its quantiles from scipy.special; scipy.stats.beta.ppf (an independent
    # entry point) must give the very same floats, so the decisions cannot move by a rounding
    from scipy import stats as st

    from robust_cert.metrics.local_probabilistic import _fallback

    cfg = LocalProbabilisticConfig(eps=0.1, p0=0.01, p1=0.001)
    rng = np.random.default_rng(0)
    seen = set()
    for n in (1, 2, 7, 100, 400, 4096, 100_000):
        draws = np.full(300, n, dtype=np.int64)
        failures = np.concatenate([np.arange(min(n, 149) + 1),
                                   rng.integers(0, n + 1, 299 - min(n, 149))])
        k, m = failures.astype(np.float64), draws.astype(np.float64)
        upper = np.where(k < m, st.beta.ppf(1 - cfg.alpha, k + 1, np.maximum(m - k, 1)), 1.0)
        lower = np.where(k > 0, st.beta.ppf(cfg.beta, np.maximum(k, 1), m - k + 1), 0.0)
        expected = np.where(upper < cfg.p0, ROBUST,
                            np.where(lower > cfg.p1, NOT_ROBUST, 0)).astype(np.int8)
        np.testing.assert_array_equal(_fallback(failures, draws, cfg), expected)
        seen |= set(expected.tolist())
    assert seen == {ROBUST, NOT_ROBUST, 0}  # every decision is exercised


def test_digits_policy_loads_without_scipy_stats() -> None:
    # scipy.stats costs about a second to import, in every process of a sharded run
    import subprocess
    import sys

    code = ("import sys\nfrom robust_cert.policy import load_policy\n"
            f"p = load_policy({str(REPO / 'examples' / 'policies' / 'digits.yaml')!r})\n"
            "[p.metric(n) for n in p.metrics]\n"
            "from robust_cert.metrics import REGISTRY\nREGISTRY['local_probabilistic_robustness']\n"
            "print(sorted(m for m in sys.modules if m.startswith('scipy.stats')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_draw_counts_do_not_depend_on_block_size() -> None:
    # deterministic outcomes (p_fail 0 or 1) make the draw counts exact whatever the blocks
    x, y = [2.0, -2.0, 3.0], [1, 0, 0]
    a = _run(x, y, eps=1.0, block_size=7)
    b = _run(x, y, eps=1.0)
    for key in ("decision", "draws", "failures"):
        np.testing.assert_array_equal(a.per_point[key], b.per_point[key])
    assert a.diagnostics["forward_images"] >= a.diagnostics["draws_used"]


def test_gaussian_and_l2_distributions() -> None:
    # Gaussian: p_fail = Φ(−x/σ); x = 3σ gives 0.00135 (robust side), x = σ gives 0.16.
    res = _run([3.5, 1.0], [1, 1], distribution="gaussian", sigma=1.0, max_draws=5000)
    assert res.per_point["decision"][1] == NOT_ROBUST
    res = _run([2.0, 0.5], [1, 1], distribution="uniform_l2", eps=1.0)
    assert res.per_point["decision"].tolist() == [ROBUST, NOT_ROBUST]


def test_noise_samplers() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 2, 2)
    linf = draw_noise(x, 4000, "uniform_linf", 0.3, g)
    assert linf.shape == (3, 4000, 2, 2)
    assert linf.abs().max() <= 0.3
    assert linf.mean().abs() < 0.01
    l2 = draw_noise(x, 4000, "uniform_l2", 0.5, g)
    norms = l2.flatten(2).norm(dim=2)
    assert norms.max() <= 0.5 + 1e-6
    # uniform in a 4-d ball: P(‖δ‖ ≤ r/2) = 2^-4
    frac = (norms <= 0.25).float().mean().item()
    assert abs(frac - 1 / 16) < 0.015
    gauss = draw_noise(x, 4000, "gaussian", 0.2, g)
    assert abs(gauss.std().item() - 0.2) < 0.005


def test_perturbed_inputs_are_clipped_to_the_range() -> None:
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append((x.min().item(), x.max().item()))
            return torch.stack([torch.zeros(len(x)), x.sum(1) - 0.5], 1)

    data = robust_cert.load_data((np.array([[0.02], [0.99]], np.float32), np.array([0, 1])))
    clf = robust_cert.load_model(Recorder(), input_shape=(1,))
    LocalProbabilisticRobustness(LocalProbabilisticConfig(eps=0.3)).run(clf, data, _ctx())
    assert min(s[0] for s in seen) >= 0.0
    assert max(s[1] for s in seen) <= 1.0


def test_same_seed_same_result() -> None:
    x, y = [_at(0.004)] * 20, [1] * 20
    a = _run(x, y, eps=1.0, seed=5)
    b = _run(x, y, eps=1.0, seed=5)
    for key in a.per_point:
        np.testing.assert_array_equal(a.per_point[key], b.per_point[key])


@pytest.mark.parametrize(("cfg", "key", "words"), [
    ({"eps": 0.0}, "eps", "greater than 0"),
    ({"distribution": "gaussian", "sigma": -1.0}, "sigma", "greater than 0"),
    ({"eps": 0.1, "alpha": 0.0}, "alpha", "greater than 0"),
    ({"eps": 0.1, "beta": 1.0}, "beta", "less than 1"),
    ({"eps": 0.1, "p0": 0.01, "p1": 0.01}, "p1", "p1 must be < p0"),
    ({"eps": 0.1, "max_draws": 325}, "max_draws", "at least 326"),
])
def test_bad_configs_name_the_key(cfg, key, words) -> None:
    with pytest.raises(ValidationError) as info:
        LocalProbabilisticConfig(**cfg)
    err = info.value.errors()[0]
    assert err["loc"] == (key,)
    assert words in err["msg"]


def test_scale_must_match_the_distribution() -> None:
    with pytest.raises(ValidationError, match="gaussian takes sigma"):
        LocalProbabilisticConfig(distribution="gaussian", eps=0.1)
    with pytest.raises(ValidationError, match="takes eps"):
        LocalProbabilisticConfig()


def test_policy_requirement_and_budget_error() -> None:
    assert REGISTRY["local_probabilistic_robustness"] is LocalProbabilisticRobustness
    base = {"name": "local", "metrics": {"local_probabilistic_robustness": {"eps": 1.0}},
            "requirements": [{"metric": "local_probabilistic_robustness", "p0": 0.01,
                              "at_least": 0.5}]}
    pol = robust_cert.load_policy(base)
    x = np.array([[2.0], [-2.0], [3.0], [-4.0]] * 10, np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    cert = robust_cert.certify(_scalar_model(), data, pol, progress=False)
    assert cert.verdict == PASS
    bad = {**base, "metrics": {"local_probabilistic_robustness": {"eps": 1.0, "max_draws": 10}}}
    with pytest.raises(PolicyError, match=r"local_probabilistic_robustness\.max_draws.*326"):
        robust_cert.load_policy(bad)


# --------------------------------------------------------------------------- global: bands


def test_failure_rate_bands_zero_failures() -> None:
    b = failure_rate_bands(0, 2995, 0.95)
    assert b["demonstrated"] == [0.1, 0.01, 0.001]
    assert b["best_band"] == 0.001
    assert b["next_band"] == 1e-4
    assert b["more_failure_free_draws"] == 29956 - 2995
    b = failure_rate_bands(0, 299, 0.95)
    assert b["demonstrated"] == [0.1, 0.01]
    assert b["more_failure_free_draws"] == 2995 - 299
    assert failure_rate_bands(0, 10, 0.95)["best_band"] is None


def test_failure_rate_bands_with_failures() -> None:
    b = failure_rate_bands(3, 1000, 0.95)
    assert b["upper_bound"] == pytest.approx(stats.clopper_pearson(3, 1000, 0.95, "upper")[1])
    assert b["demonstrated"] == [0.1, 0.01]
    total = 1000 + b["more_failure_free_draws"]
    assert stats.clopper_pearson(3, total, 0.95, "upper")[1] <= 1e-3
    assert stats.clopper_pearson(3, total - 1, 0.95, "upper")[1] > 1e-3
    assert draws_to_demonstrate(3, 1000, 1e-3, 0.95) == total
    b = failure_rate_bands(0, 10**6, 0.95)
    assert b["next_band"] is None
    assert b["more_failure_free_draws"] is None


def test_global_metric_reports_bands_at_the_policy_confidence() -> None:
    x = np.array([[2.0], [-2.0], [3.0], [-4.0]], np.float32)
    data = robust_cert.load_data((x, (x[:, 0] > 0).astype(np.int64)), input_range=WIDE)
    pol = robust_cert.load_policy({
        "name": "bands", "confidence": 0.99,
        "metrics": {"probabilistic_robustness": {"eps": 0.5, "samples": 500}},
        "requirements": [{"metric": "probabilistic_robustness", "eps": 0.5, "at_most": 0.02}]})
    res = engine.run_suite(robust_cert.load_model(_scalar_model(), input_shape=(1,)), data, pol,
                           progress=False)["probabilistic_robustness"]
    bands = res.diagnostics["bands"]
    assert bands["confidence"] == 0.99
    cond = bands["by_eps"]["0.5"]["on_this_evaluation_set"]
    assert cond == failure_rate_bands(0, 500, 0.99)
    # zero failures in 500: 1e-2 needs 459 draws at 99%, 1e-3 needs 4,603 (on these 4 points)
    assert cond["demonstrated"] == [0.1, 0.01]
    assert cond["more_failure_free_draws"] == stats.zero_failure_sample_size(1e-3, 0.99) - 500
    # for the population, 4 failure-free points show nothing: the best capital,
    # (1 + 0.9)^4 ≈ 13, never reaches 1/α = 100, so the betting upper bound is 1
    pop = bands["by_eps"]["0.5"]["population"]
    assert pop["points"] == 4
    assert pop["upper_bound"] == 1.0
    assert pop["demonstrated"] == []
    assert pop["next_band"] == 0.1
    (prop,) = res.proportions
    assert prop.clustered
    assert prop.cluster_n.sum() == 500
    assert prop.cluster_k.sum() == 0


# --------------------------------------------------------------------------- end to end


def test_example_policy_certifies_the_digits_model(digits_model) -> None:
    """examples/policies/digits-probabilistic.yaml: every family of issue 6 in one run, the
    certificate JSON is valid (finite numbers) and the three gated requirements are decided."""
    policy = REPO / "examples" / "policies" / "digits-probabilistic.yaml"
    cert = robust_cert.certify(digits_model, "digits", policy, progress=False)
    assert cert.verdict == PASS
    results = {r["metric"]: r for r in cert.body["results"]}
    assert set(results) == {"probabilistic_robustness", "local_probabilistic_robustness",
                            "randomized_smoothing", "analytical_robustness",
                            "rare_event_probability"}
    assert all(r["status"] == "ok" for r in results.values())
    kinds = {m: r["kind"] for m, r in results.items()}
    assert kinds == {"probabilistic_robustness": "statistical",
                     "local_probabilistic_robustness": "statistical",
                     "randomized_smoothing": "certified", "analytical_robustness": "estimate",
                     "rare_event_probability": "estimate"}
    assert "bands" in results["probabilistic_robustness"]["diagnostics"]
    assert results["analytical_robustness"]["diagnostics"]["validation"]["taylor"]["mae"] < 0.02
    assert [o["verdict"] for o in cert.body["requirements"]] == [PASS] * 3


def test_a_model_random_at_eval_time_is_flagged() -> None:
    class Noisy(nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros(len(x)), x.sum(1) + 0.01 * torch.randn(len(x))], 1)

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger("robust_cert").addHandler(handler)
    try:
        x = np.array([[2.0], [-2.0]] * 5, np.float32)
        data = robust_cert.load_data((x, (x[:, 0] > 0).astype(np.int64)), input_range=WIDE)
        pol = {"name": "noisy", "metrics": {"local_probabilistic_robustness": {"eps": 0.5}},
               "requirements": [{"metric": "local_probabilistic_robustness", "p0": 0.01,
                                 "at_least": 0.1}]}
        cert = robust_cert.certify(Noisy(), data, pol, progress=False)
    finally:
        logging.getLogger("robust_cert").removeHandler(handler)
    assert any("random at evaluation time" in r for r in records)
    assert cert.body["sanity"]["deterministic_forward"] == "failed"


def test_population_statement_of_the_fraction_decided_robust() -> None:
    """One decision per point, never pooled draws: the proportion is a plain binomial one (the
    exact Clopper–Pearson interval holds for inputs drawn like the evaluation points), and the
    robust share of that population is at least the CP lower bound minus the per-point
    wrong-robust probability α/(1 − β) + α."""
    x = np.r_[np.full(40, 2.0), np.full(10, _at(0.5))]  # 40 never fail, 10 fail half the time
    res = _run(x, np.ones(50, int), eps=1.0)
    (prop,) = res.proportions
    assert not prop.clustered
    assert "one decision per point" in prop.population
    assert prop.k == 40
    diag = res.diagnostics["robust_population_fraction_at_least"]
    e = 0.05 / 0.95 + 0.05
    assert diag["value"] == pytest.approx(stats.clopper_pearson(40, 50, 0.95, "lower")[0] - e)
    assert diag["confidence"] == 0.95
