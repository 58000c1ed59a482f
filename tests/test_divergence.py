"""Known-answer tests of the divergence bound (Family H) on a linear binary model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.divergence import DivergenceBound, DivergenceConfig, kl_softmax
from tests.linear_models import binary_linear

CPU = torch.device("cpu")
W = np.array([1.0, -2.0, 0.5, 1.5])
B = 0.3


def _binary() -> nn.Linear:
    return binary_linear(W, B)


def _bern_kl(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """KL(Bern σ(g) ‖ Bern σ(h)) = softplus(h) − softplus(g) − σ(g)(h − g)."""
    p = 1 / (1 + np.exp(-g))
    return np.logaddexp(0, h) - np.logaddexp(0, g) - p * (h - g)


def _run(x, y, seed=0, **cfg):
    data = robust_cert.load_data((x, y), input_range=(-50.0, 50.0))
    clf = robust_cert.load_model(_binary(), input_shape=(4,))
    return DivergenceBound(DivergenceConfig(**cfg)).run(clf, data,
                                                        RunContext(CPU, batch_size=16, seed=seed))


@pytest.mark.parametrize(("norm", "dual"), [("linf", np.abs(W).sum()),
                                            ("l2", np.linalg.norm(W))])
def test_kl_maximum_of_a_linear_binary_model(norm, dual) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(40, 4)).astype(np.float32)
    g = x.astype(np.float64) @ W + B
    y = (g > 0).astype(np.int64)
    eps = [0.1, 0.4]
    res = _run(x, y, eps=eps, norm=norm, thresholds=[0.05], steps=20)
    for e in eps:
        r = e * dual
        expected = np.maximum(_bern_kl(g, g - r), _bern_kl(g, g + r))
        # the end towards the boundary is always the larger one
        np.testing.assert_array_equal(expected, _bern_kl(g, g - np.sign(g) * r))
        found = res.per_point[f"kl@{e:g}"]
        assert (found <= expected * (1 + 1e-4) + 1e-6).all()  # a lower bound on the maximum
        np.testing.assert_allclose(found, expected, rtol=1e-3, atol=1e-6)
        prop = res.find({"eps": e, "kl_at_most": 0.05})
        assert prop.k == int((found <= 0.05).sum())
        assert prop.n == 40
        assert res.diagnostics["distribution"][f"{e:g}"]["max"] == pytest.approx(found.max())


def test_decision_surface_data() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, size=(20, 4)).astype(np.float32)
    g = x.astype(np.float64) @ W + B
    y = (g > 0).astype(np.int64)
    res = _run(x, y, eps=[0.3], surface_points=3, surface_grid=5, seed=2)
    surf = res.diagnostics["surface"]
    assert len(surf) == 3
    kl = res.per_point["kl@0.3"]
    assert [s["index"] for s in surf] == np.argsort(-kl, kind="stable")[:3].tolist()
    for s in surf:
        i = s["index"]
        margin = np.array(s["margin"])
        assert margin.shape == (5, 5)
        # the centre of the grid is x itself: margin = |g|
        assert margin[2, 2] == pytest.approx(abs(g[i]), rel=1e-4, abs=1e-4)
        # along the ascent direction u (towards the boundary for a linear model) the margin
        # falls linearly: at a = 2ε it is |g| − 2ε|w·u|, u the unit L∞ corner direction
        u = -np.sign(g[i]) * np.sign(W) / 2.0  # ‖sign(w)‖₂ = 2
        expected = abs(g[i]) - 0.6 * abs(W @ u)
        assert margin[4, 2] == pytest.approx(expected, rel=1e-3, abs=1e-3)
        assert s["axis"] == pytest.approx([-0.6, -0.3, 0.0, 0.3, 0.6])
    again = _run(x, y, eps=[0.3], surface_points=3, surface_grid=5, seed=2)
    assert again.diagnostics == res.diagnostics


def test_kl_helper_and_config() -> None:
    p = torch.tensor([[0.0, 1.0]])
    q = torch.tensor([[0.0, -1.0]])
    assert float(kl_softmax(p, q)) == pytest.approx(float(_bern_kl(np.array(1.0),
                                                                   np.array(-1.0))))
    assert math.isclose(float(kl_softmax(p, p)), 0.0, abs_tol=1e-7)
    with pytest.raises(ValueError, match="ε must be > 0"):
        DivergenceConfig(eps=[0.0])
    with pytest.raises(ValueError, match="KL thresholds must be >= 0"):
        DivergenceConfig(eps=[0.1], thresholds=[-1])
