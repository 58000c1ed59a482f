"""Known-answer tests of the divergence bound (Family H) on a linear binary model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import engine
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.divergence import DivergenceBound, DivergenceConfig, kl_softmax
from robust_cert.models.base import CpuBatchSizer
from tests.linear_models import binary_linear
from tests.test_shard_misc import (
    BATCH,
    POINTS,
    assert_identical,
    assert_world_size_invariant,
    digits_points,
    policy_with,
    small_cnn,
)

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


def test_surface_grid_runs_in_the_models_pieces() -> None:
    """On a capped CPU model (as engine.device_capped makes it: at most max_batch images per
    call, of the size its batch sizer picks) the surface grid runs in pieces of at most that
    size, not in one G²-image call, and its margins are those of the uncapped model bit for
    bit."""
    data = digits_points(6)
    net = small_cnn()
    calls: list[int] = []
    net.register_forward_pre_hook(lambda _m, a: calls.append(a[0].shape[0]))
    cfg = DivergenceConfig(eps=[0.1], surface_points=2, surface_grid=9, steps=2, restarts=0)
    ctx = RunContext(CPU, batch_size=BATCH, seed=3)
    plain = robust_cert.load_model(net, input_shape=(1, 8, 8))
    whole = DivergenceBound(cfg).run(plain, data, ctx)
    assert 81 in calls  # uncapped: each 9×9 grid in one call
    calls.clear()
    capped = dataclasses.replace(plain, max_batch=16, batch_sizer=CpuBatchSizer(16))
    pieces = DivergenceBound(cfg).run(capped, data, ctx)
    assert max(calls) <= 16
    assert len(calls) > 10
    assert pieces.diagnostics["surface"] == whole.diagnostics["surface"]
    for key, arr in whole.per_point.items():
        np.testing.assert_array_equal(pieces.per_point[key], arr)


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


# --------------------------------------------------------------------------- sharding

LINEAR_RANGE = (-50.0, 50.0)


def _linear_blocks(n=60, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 4)).astype(np.float32)
    g = x.astype(np.float64) @ W + B
    y = (g > 0).astype(np.int64)
    data = robust_cert.load_data((x, y), input_range=LINEAR_RANGE)
    return data, g, robust_cert.load_model(_binary(), input_shape=(4,))


@pytest.mark.parametrize(("norm", "dual"), [("linf", np.abs(W).sum()),
                                            ("l2", np.linalg.norm(W))])
def test_blocked_run_keeps_the_known_answers(norm, dual) -> None:
    torch.set_num_threads(1)
    data, g, clf = _linear_blocks()
    cfg = {"eps": [0.1, 0.4], "norm": norm, "thresholds": [0.05], "steps": 20, "restarts": 1,
           "surface_points": 3, "surface_grid": 5}
    res = engine.run_suite(clf, data, policy_with("divergence", cfg), progress=False,
                           seed=4)["divergence"]
    assert len(engine.batch_blocks(60, BATCH)) == 4
    for e in cfg["eps"]:
        r = e * dual
        expected = _bern_kl(g, g - np.sign(g) * r)
        found = res.per_point[f"kl@{e:g}"]
        assert (found <= expected * (1 + 1e-4) + 1e-6).all()
        np.testing.assert_allclose(found, expected, rtol=1e-3, atol=1e-6)
        # the maximum is on the sphere of radius ε (no box in the way)
        np.testing.assert_allclose(res.per_point[f"direction_norm@{e:g}"], e, rtol=1e-5)
        prop = res.find({"eps": e, "kl_at_most": 0.05})
        assert (prop.k, prop.n) == (int((found <= 0.05).sum()), 60)
    kl = res.per_point["kl@0.4"]
    surf = res.diagnostics["surface"]
    assert [s["index"] for s in surf] == np.argsort(-kl, kind="stable")[:3].tolist()
    for s in surf:  # the surface of whole-set points, whichever block they were in
        i = s["index"]
        margin = np.array(s["margin"])
        assert s["kl"] == kl[i]
        assert margin[2, 2] == pytest.approx(abs(g[i]), rel=1e-4, abs=1e-4)
        # along u, the direction that reached ψ: the margin falls by 2ε·(dual norm of w)·…
        u = -np.sign(g[i]) * (np.sign(W) / 2.0 if norm == "linf" else W / np.linalg.norm(W))
        assert margin[4, 2] == pytest.approx(abs(g[i]) - 0.8 * abs(W @ u), rel=1e-3, abs=1e-3)


def test_blocked_run_without_random_starts_is_the_whole_run() -> None:
    """restarts=0 is deterministic: the blocks, merged and finalized, are the one-call run
    bit for bit, surfaces and distribution included."""
    torch.set_num_threads(1)
    data = digits_points()
    clf = robust_cert.load_model(small_cnn(1), input_shape=(1, 8, 8))
    cfg = {"eps": [0.05, 0.2], "steps": 4, "restarts": 0, "thresholds": [0.01, 0.1],
           "surface_points": 5, "surface_grid": 5}
    res = engine.run_suite(clf, data, policy_with("divergence", cfg), progress=False,
                           seed=2)["divergence"]
    whole = DivergenceBound(DivergenceConfig(**cfg)).run(
        clf, data, RunContext(CPU, batch_size=BATCH, seed=2))
    assert_identical(res, whole)
    # the most vulnerable points come from more than one block
    assert len({s["index"] // BATCH for s in res.diagnostics["surface"]}) > 1


def test_blocked_summaries_come_from_the_merged_points() -> None:
    torch.set_num_threads(1)
    data = digits_points()
    net = small_cnn(1)
    clf = robust_cert.load_model(net, input_shape=(1, 8, 8))
    cfg = {"eps": [0.05, 0.2], "norm": "l2", "steps": 3, "restarts": 2,
           "thresholds": [0.01], "surface_points": 4, "surface_grid": 3}
    res = engine.run_suite(clf, data, policy_with("divergence", cfg), progress=False,
                           seed=5)["divergence"]
    assert set(res.diagnostics) == {"norm", "distribution", "surface"}  # candidates gone
    assert res.diagnostics["norm"] == "l2"
    for e in cfg["eps"]:
        kl = res.per_point[f"kl@{e:g}"]
        assert len(kl) == POINTS
        q = np.quantile(kl, [0.1, 0.5, 0.9])
        assert res.diagnostics["distribution"][f"{e:g}"] == {
            "mean": float(kl.mean()), "p10": float(q[0]), "median": float(q[1]),
            "p90": float(q[2]), "max": float(kl.max())}
        assert (res.per_point[f"direction_norm@{e:g}"] <= e * (1 + 1e-5)).all()
        assert res.find({"eps": e, "kl_at_most": 0.01}).k == int((kl <= 0.01).sum())
    kl = res.per_point["kl@0.2"]
    surf = res.diagnostics["surface"]
    assert [s["index"] for s in surf] == np.argsort(-kl, kind="stable")[:4].tolist()
    with torch.no_grad():
        logits = net(data.x).double()
    for s in surf:
        i = s["index"]
        assert s["kl"] == float(kl[i])
        assert s["prediction"] == int(logits[i].argmax())
        top2 = logits[i].topk(2).values
        assert s["margin"][1][1] == pytest.approx(float(top2[0] - top2[1]), rel=1e-4, abs=1e-5)


def test_blocked_run_is_the_same_for_any_blocking_order() -> None:
    torch.set_num_threads(1)
    data = digits_points()
    clf = robust_cert.load_model(small_cnn(1), input_shape=(1, 8, 8))
    cfg = {"eps": [0.1], "steps": 3, "restarts": 2, "thresholds": [0.05],
           "surface_points": 3, "surface_grid": 3}
    res = engine.run_suite(clf, data, policy_with("divergence", cfg), progress=False,
                           seed=6)["divergence"]
    assert_world_size_invariant(DivergenceBound(DivergenceConfig(**cfg)), clf, data, res,
                                seed=6)
    # the random starts are drawn per block: another seed moves ψ of some point
    other = engine.run_suite(clf, data, policy_with("divergence", cfg), progress=False,
                             seed=7)["divergence"]
    assert not np.array_equal(other.per_point["kl@0.1"], res.per_point["kl@0.1"])
