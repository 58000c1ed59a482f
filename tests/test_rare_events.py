"""Known-answer tests of adaptive multilevel splitting on linear scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import stats as st
from torch import nn

import robust_cert
from robust_cert.metrics import REGISTRY
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.rare_events import RareEventConfig, RareEventProbability, ams_log_p
from tests.linear_models import binary_linear

CPU = torch.device("cpu")
D = 10
W = np.ones(D) / np.sqrt(D)  # ‖w‖ = 1
WIDE = (-100.0, 100.0)


def _ctx(seed: int = 0) -> RunContext:
    return RunContext(device=CPU, batch_size=64, seed=seed)


def _model(w: np.ndarray = W) -> nn.Linear:
    """logits [0, w·x]: class 1 iff w·x > 0."""
    return binary_linear(w)


def _run_spread(p: float, kill: float, particles: int) -> float:
    """Theoretical standard deviation of one run's log10 estimate (ideal AMS)."""
    rel_var = -math.log(p) * kill / ((1 - kill) * -math.log(1 - kill) * particles)
    return math.sqrt(rel_var) / math.log(10)


def test_gaussian_linear_score_matches_phi_of_minus_z() -> None:
    """z = 5: log10 Φ(−5) = −6.543, far below Monte Carlo reach."""
    z, runs, points = 5.0, 6, 3
    x = np.tile(W * z, (points, 1)).astype(np.float32)  # margin z·σ‖w‖ with σ = 1
    data = robust_cert.load_data((x, np.ones(points, np.int64)), input_range=WIDE)
    clf = robust_cert.load_model(_model(), input_shape=(D,))
    cfg = RareEventConfig(sigma=1.0, runs=runs, particles=1000, p_max=[1e-6, 1e-7])
    res = RareEventProbability(cfg).run(clf, data, _ctx())
    exact = math.log10(st.norm.cdf(-z))
    assert exact == pytest.approx(-6.543, abs=5e-4)
    all_runs = res.per_point["log10_p_runs"]
    assert all_runs.shape == (points, runs)
    sd = _run_spread(10 ** exact, 0.5, 1000)  # ≈ 0.064 in log10
    # the mean of 18 independent runs is within 4 standard errors of the exact value
    assert abs(all_runs.mean() - exact) < 4 * sd / math.sqrt(all_runs.size)
    # the reported run-to-run spread is of the size the theory predicts (MCMC mixes well)
    assert (res.per_point["log10_p_spread"] < 2.5 * sd).all()
    assert res.per_point["reached"].all()
    assert res.find({"p_max": 1e-6}).k == points
    assert res.find({"p_max": 1e-7}).k == 0
    assert (res.per_point["levels"] > 15).all()  # ≈ ln p / ln(1/2) = 21.7 levels


def test_moderate_probability_agrees_with_monte_carlo() -> None:
    z = 2.0
    x = torch.tensor(np.tile(W * z, (4, 1)), dtype=torch.float32)
    clf = robust_cert.load_model(_model(), input_shape=(D,))
    lp, levels, ok = ams_log_p(clf, x, torch.ones(4, dtype=torch.long), distribution="gaussian",
                               scale=1.0, input_range=WIDE, particles=1000,
                               generator=torch.Generator().manual_seed(1))
    l10 = lp.numpy() / math.log(10)
    exact = math.log10(st.norm.cdf(-z))
    assert abs(l10.mean() - exact) < 4 * _run_spread(10 ** exact, 0.5, 1000) / 2
    assert ok.all()


def test_uniform_ball_matches_the_closed_form() -> None:
    """One dimension, δ ~ U[−ε, ε], margin g: p = (ε − g) / (2ε) = 1e-4 for g = ε(1 − 2e-4)."""
    eps, p = 1.0, 1e-4
    x = np.full((3, 1), eps * (1 - 2 * p), np.float32)
    data = robust_cert.load_data((x, np.ones(3, np.int64)), input_range=WIDE)
    clf = robust_cert.load_model(_model(np.array([1.0])), input_shape=(1,))
    cfg = RareEventConfig(distribution="uniform_linf", eps=eps, runs=4, particles=500)
    res = RareEventProbability(cfg).run(clf, data, _ctx(2))
    sd = _run_spread(p, 0.5, 500)
    # float32 inputs shift g by up to 6e-8: negligible against p = 1e-4
    assert abs(res.per_point["log10_p_runs"].mean() - math.log10(p)) < 4 * sd / math.sqrt(12)


def test_mislabelled_point_fails_surely_and_same_seed_same_result() -> None:
    x = np.stack([W * 3, W * 3]).astype(np.float32)
    data = robust_cert.load_data((x, np.array([0, 1])), input_range=WIDE)
    clf = robust_cert.load_model(_model(), input_shape=(D,))
    cfg = RareEventConfig(sigma=1.0, runs=2, particles=200, mcmc_steps=5)
    a = RareEventProbability(cfg).run(clf, data, _ctx(3))
    # labelled 0, predicted 1 with margin 3σ: it fails unless the noise crosses the boundary
    assert a.per_point["log10_p"][0] == pytest.approx(math.log10(st.norm.cdf(3)), abs=2e-3)
    b = RareEventProbability(cfg).run(clf, data, _ctx(3))
    np.testing.assert_array_equal(a.per_point["log10_p_runs"], b.per_point["log10_p_runs"])


def test_subset_of_points_and_registry() -> None:
    assert REGISTRY["rare_event_probability"] is RareEventProbability
    x = np.tile(W * 2, (30, 1)).astype(np.float32)
    data = robust_cert.load_data((x, np.ones(30, np.int64)), input_range=WIDE)
    clf = robust_cert.load_model(_model(), input_shape=(D,))
    cfg = RareEventConfig(sigma=1.0, runs=2, particles=100, mcmc_steps=5, points=7)
    res = RareEventProbability(cfg).run(clf, data, _ctx())
    idx = res.per_point["index"]
    assert len(idx) == 7
    assert len(set(idx.tolist())) == 7
    assert res.proportions[0].n == 7


@pytest.mark.parametrize(("cfg", "key", "words"), [
    ({"sigma": 0.0}, "sigma", "greater than 0"),
    ({"sigma": 1.0, "kill": 1.0}, "kill", "less than 1"),
    ({"sigma": 1.0, "runs": 1}, "runs", "greater than or equal to 2"),
    ({"sigma": 1.0, "p_max": [0.0]}, "p_max", "(0, 1)"),
])
def test_bad_configs(cfg, key, words) -> None:
    with pytest.raises(ValidationError) as info:
        RareEventConfig(**cfg)
    err = info.value.errors()[0]
    assert err["loc"] == (key,)
    assert words in err["msg"]
