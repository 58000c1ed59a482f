"""Known-answer tests of randomized smoothing on a linear binary model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import stats as st
from torch import nn

import robust_cert
from robust_cert import stats
from robust_cert.errors import PolicyError
from robust_cert.metrics import REGISTRY
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.smoothing import (
    ABSTAIN,
    RandomizedSmoothing,
    SmoothingConfig,
    certify,
    p_lower_bound,
    predict,
    radius_cap,
    smoothed_counts,
    smoothing_draws_needed,
)
from robust_cert.verdict import PASS
from tests.linear_models import binary_linear

CPU = torch.device("cpu")
W = np.array([1.0, -2.0, 0.5, 1.5])
B = 0.3
WIDE = (-10.0, 10.0)
SIGMA = 0.5


def _ctx(seed: int = 0, batch_size: int = 64) -> RunContext:
    return RunContext(device=CPU, batch_size=batch_size, seed=seed)


def _binary_linear(w: np.ndarray = W, b: float = B) -> nn.Linear:
    return binary_linear(w, b)


def _points(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
    g = x.astype(np.float64) @ W + B
    return x, g


def _clf():
    return robust_cert.load_model(_binary_linear(), input_shape=(4,))


def test_smoothed_probability_and_radius_match_the_closed_form() -> None:
    """For f = sign(w·x + b), P[f(x+δ) = sign(g)] = Φ(|g|/(σ‖w‖)), so the smoothed classifier
    is f itself and its exact certified radius is |g|/‖w‖."""
    x, g = _points()
    norm = np.linalg.norm(W)
    p_a = st.norm.cdf(np.abs(g) / (SIGMA * norm))
    n, alpha = 4000, 0.001
    gen = torch.Generator().manual_seed(0)
    counts = smoothed_counts(_clf(), torch.from_numpy(x), SIGMA, n, gen, max_forward_images=5000)
    top = counts[np.arange(len(x)), (g > 0).astype(np.int64)].numpy()
    for k, p in zip(top, p_a, strict=True):
        lo, hi = stats.clopper_pearson(int(k), n, 0.999)
        assert lo <= p <= hi
    pred, radius, p_low, n_a = certify(_clf(), torch.from_numpy(x), SIGMA, 100, n, alpha,
                                       torch.Generator().manual_seed(1), 3000)
    ok = pred != ABSTAIN
    assert ok.sum() > len(x) // 2
    np.testing.assert_array_equal(pred[ok], (g[ok] > 0).astype(np.int64))
    exact = np.abs(g) / norm
    # the certified radius never exceeds the true one (each point fails w.p. ≤ α) ...
    assert (radius[ok] <= exact[ok] + 1e-9).all()
    # ... and is close to it with 4,000 draws where p_A is not extreme
    mid = ok & (p_a < 0.99)
    assert np.abs(radius[mid] - exact[mid]).max() < 0.15
    np.testing.assert_allclose(p_low, p_lower_bound(n_a, n, alpha))
    np.testing.assert_allclose(p_low[ok], st.beta.ppf(alpha, n_a[ok], n - n_a[ok] + 1))
    assert np.isnan(radius[~ok]).all()
    assert (p_low[~ok] < 0.5).all()


def test_radius_cap_invariant() -> None:
    """No radius exceeds σ·Φ⁻¹(α^{1/n}); a point with n_A = n reaches it exactly."""
    x = np.array([[5.0, -5.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0], [-0.4, 0.1, 0.0, 0.0]],
                 np.float32)
    for n, alpha in ((200, 0.01), (1000, 0.001)):
        pred, radius, _, n_a = certify(_clf(), torch.from_numpy(x), SIGMA, 20, n, alpha,
                                       torch.Generator().manual_seed(n))
        cap = radius_cap(SIGMA, n, alpha)
        assert cap == pytest.approx(SIGMA * st.norm.ppf(alpha ** (1 / n)))
        assert (np.nan_to_num(radius, nan=0.0) <= cap + 1e-12).all()
        assert n_a[0] == n
        assert radius[0] == pytest.approx(cap, rel=1e-9)


def test_draws_needed_for_a_radius() -> None:
    for r, alpha in ((0.0, 0.001), (0.25, 0.001), (1.0, 0.01)):
        n = smoothing_draws_needed(r, SIGMA, alpha)
        assert alpha ** (1 / n) >= st.norm.cdf(r / SIGMA)
        assert n == 1 or alpha ** (1 / (n - 1)) < st.norm.cdf(r / SIGMA)
        assert radius_cap(SIGMA, n, alpha) >= r - 1e-12
    assert smoothing_draws_needed(0.0, 1.0, 0.001) == 10  # 0.5^10 < 0.001 ≤ 0.5^9


def test_predict_abstains_on_the_boundary() -> None:
    x = np.array([[3.0, 0.0, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0]] + [[-0.3, 0.0, 0.0, 0.0]] * 30,
                 np.float32)  # the last 30 have g = 0 exactly: p = 1/2 for both classes
    pred = predict(_clf(), torch.from_numpy(x), SIGMA, 1000, 0.01, torch.Generator().manual_seed(2))
    assert pred[:2].tolist() == [1, 0]
    assert (pred[2:] == ABSTAIN).mean() > 0.9  # abstains w.p. ≥ 1 − α


def test_metric_certified_accuracy_curve() -> None:
    x, g = _points(n=50, seed=3)
    y = (g > 0).astype(np.int64)
    y[:5] = 1 - y[:5]  # mislabelled: never certified correct
    data = robust_cert.load_data((x, y), input_range=WIDE)
    cfg = SmoothingConfig(sigma=SIGMA, n0=50, n=2000, alpha=0.001, radii=[0.5, 0, 0.25])
    res = RandomizedSmoothing(cfg).run(_clf(), data, _ctx(batch_size=16))
    assert [p.params for p in res.proportions] == [{"radius": 0.0}, {"radius": 0.25},
                                                   {"radius": 0.5}]
    radius, pred = res.per_point["radius"], res.per_point["prediction"]
    for p in res.proportions:
        ok = (pred == y) & (np.nan_to_num(radius, nan=-1) >= p.params["radius"])
        assert p.k == int(ok.sum())
        assert p.n == 50
    ks = [p.k for p in res.proportions]
    assert ks == sorted(ks, reverse=True)
    assert ks[0] > 0
    assert not res.per_point["correct"][:5].any()
    assert res.diagnostics["abstained"] == int((pred == ABSTAIN).sum())
    assert res.diagnostics["radius_cap"] == pytest.approx(radius_cap(SIGMA, 2000, 0.001))
    # batching does not change the result
    again = RandomizedSmoothing(cfg).run(_clf(), data, _ctx(batch_size=16))
    np.testing.assert_array_equal(again.per_point["n_a"], res.per_point["n_a"])


@pytest.mark.parametrize(("cfg", "key", "words"), [
    ({"sigma": 0.0}, "sigma", "greater than 0"),
    ({"sigma": 0.5, "alpha": 1.0}, "alpha", "less than 1"),
    ({"sigma": 0.5, "radii": [-0.1]}, "radii", ">= 0"),
    # Φ(3) = 0.99865: n ≥ ln(0.001) / ln(0.99865) = 5113.5
    ({"sigma": 0.25, "n": 100, "radii": [0.0, 0.75]}, "radii", "needs n ≥ 5114"),
])
def test_bad_configs(cfg, key, words) -> None:
    with pytest.raises(ValidationError) as info:
        SmoothingConfig(**cfg)
    err = info.value.errors()[0]
    assert err["loc"] == (key,)
    assert words in err["msg"]


def test_policy_requirement_on_certified_accuracy() -> None:
    assert REGISTRY["randomized_smoothing"] is RandomizedSmoothing
    x = np.array([[2.0, -1.0, 0.0, 0.0], [-2.0, 1.0, 0.0, 0.0]] * 15, np.float32)
    y = (x.astype(np.float64) @ W + B > 0).astype(np.int64)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    pol = {"name": "rs", "metrics": {"randomized_smoothing": {"sigma": 0.5, "n": 500,
                                                              "radii": [0.25]}},
           "requirements": [{"metric": "randomized_smoothing", "radius": 0.25,
                             "at_least": 0.6}]}
    cert = robust_cert.certify(_binary_linear(), data, pol, progress=False)
    assert cert.verdict == PASS
    bad = {**pol, "metrics": {"randomized_smoothing": {"sigma": 0.5, "n": 5, "radii": [1.0]}}}
    with pytest.raises(PolicyError, match=r"randomized_smoothing\.radii.*needs n ≥"):
        robust_cert.load_policy(bad)
