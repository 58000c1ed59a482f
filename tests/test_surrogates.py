"""Known-answer tests of the surrogates (Family G): J = W and H = Wᵀ(diag p − ppᵀ)W."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import engine
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.surrogates import Surrogates, SurrogatesConfig
from tests.test_shard_misc import (
    BATCH,
    POINTS,
    assert_world_size_invariant,
    digits_points,
    policy_with,
    small_cnn,
)

CPU = torch.device("cpu")


def _run(model, x, y, iters=200, seed=0, batch_size=16):
    data = robust_cert.load_data((x, y), input_range=(-10.0, 10.0))
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    return Surrogates(SurrogatesConfig(power_iterations=iters)).run(
        clf, data, RunContext(CPU, batch_size=batch_size, seed=seed))


def test_linear_softmax_closed_forms() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 5))
    bias = rng.normal(size=3)
    lin = nn.Linear(5, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight))
        lin.bias.copy_(torch.from_numpy(bias))
    model = nn.Sequential(lin).float()
    x = rng.uniform(-1, 1, size=(30, 5)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    res = _run(model, x, y)
    w32 = model[0].weight.detach().double().numpy()
    np.testing.assert_allclose(res.per_point["jacobian_fro"], np.linalg.norm(w32), rtol=1e-5)
    logits = x.astype(np.float64) @ w32.T + model[0].bias.detach().double().numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = [np.linalg.eigvalsh(w32.T @ (np.diag(pi) - np.outer(pi, pi)) @ w32).max()
                for pi in p]
    np.testing.assert_allclose(res.per_point["hessian_top"], expected, rtol=1e-3)
    assert res.proportions == []
    assert res.kind == "estimate"
    assert Surrogates(SurrogatesConfig()).selectors() == []
    assert res.diagnostics["jacobian_fro"]["mean"] == pytest.approx(np.linalg.norm(w32),
                                                                    rel=1e-5)
    assert res.diagnostics["hessian_converged"] == 30


def test_mlp_matches_autograd_jacobian_and_hessian() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    res = _run(model, x, y, iters=300, batch_size=4)
    for i in range(6):
        xi = torch.from_numpy(x[i])
        jac = torch.autograd.functional.jacobian(model, xi)
        assert res.per_point["jacobian_fro"][i] == pytest.approx(float(jac.norm()), rel=1e-5)

        def loss(z, i=i):
            return nn.functional.cross_entropy(model(z[None]), torch.tensor([int(y[i])]))

        hess = torch.autograd.functional.hessian(loss, xi).double().numpy()
        eig = np.linalg.eigvalsh(hess)
        top = eig[np.argmax(np.abs(eig))]
        assert res.per_point["hessian_top"][i] == pytest.approx(top, rel=1e-3, abs=1e-6)


def test_seeded_and_policy_cannot_gate_it() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = np.random.default_rng(2).uniform(-1, 1, size=(10, 3)).astype(np.float32)
    y = np.zeros(10, dtype=np.int64)
    a = _run(model, x, y, iters=5, seed=3)
    b = _run(model, x, y, iters=5, seed=3)
    np.testing.assert_array_equal(a.per_point["hessian_top"], b.per_point["hessian_top"])
    with pytest.raises(robust_cert.errors.PolicyError, match="produces no result"):
        robust_cert.load_policy({
            "name": "t", "metrics": {"surrogates": {}},
            "requirements": [{"metric": "surrogates", "at_most": 1.0}]})


# --------------------------------------------------------------------------- sharding


def _linear_softmax(seed=0, n=POINTS):
    rng = np.random.default_rng(seed)
    lin = nn.Linear(5, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.normal(size=(3, 5))))
        lin.bias.copy_(torch.from_numpy(rng.normal(size=3)))
    x = rng.uniform(-1, 1, size=(n, 5)).astype(np.float32)
    y = rng.integers(0, 3, n)
    data = robust_cert.load_data((x, y), input_range=(-10.0, 10.0))
    return nn.Sequential(lin), data


def _closed_form_top(weight, bias, x):
    logits = x.astype(np.float64) @ weight.T + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.array([np.linalg.eigvalsh(weight.T @ (np.diag(pi) - np.outer(pi, pi)) @ weight)
                     .max() for pi in p])


def test_blocked_run_keeps_the_closed_forms() -> None:
    torch.set_num_threads(1)
    model, data = _linear_softmax()
    clf = robust_cert.load_model(model, input_shape=(5,))
    res = engine.run_suite(clf, data, policy_with("surrogates", {"power_iterations": 200}),
                           progress=False)["surrogates"]
    assert len(engine.batch_blocks(POINTS, BATCH)) == 4
    w = model[0].weight.detach().double().numpy()
    b = model[0].bias.detach().double().numpy()
    np.testing.assert_allclose(res.per_point["jacobian_fro"], np.linalg.norm(w), rtol=1e-5)
    np.testing.assert_allclose(res.per_point["hessian_top"],
                               _closed_form_top(w, b, data.x.numpy()), rtol=1e-3)
    assert res.diagnostics["hessian_converged"] == POINTS  # the blocks' counts added
    assert res.proportions == []
    # the Jacobian is deterministic, and block 0 starts where the one-call run starts
    whole = Surrogates(SurrogatesConfig(power_iterations=200)).run(
        clf, data, RunContext(CPU, batch_size=BATCH, seed=0))
    np.testing.assert_array_equal(res.per_point["jacobian_fro"], whole.per_point["jacobian_fro"])
    np.testing.assert_array_equal(res.per_point["hessian_top"][:BATCH],
                                  whole.per_point["hessian_top"][:BATCH])


def test_blocked_summaries_come_from_the_merged_points() -> None:
    torch.set_num_threads(1)
    data = digits_points()
    clf = robust_cert.load_model(small_cnn(2), input_shape=(1, 8, 8))
    metric = Surrogates(SurrogatesConfig(power_iterations=4))
    res = engine.run_suite(clf, data, policy_with("surrogates", {"power_iterations": 4}),
                           progress=False, seed=3)["surrogates"]
    for key in ("jacobian_fro", "hessian_top"):
        v = res.per_point[key]
        assert len(v) == POINTS
        assert res.diagnostics[key] == {"mean": float(v.mean()), "median": float(np.median(v)),
                                        "p90": float(np.quantile(v, 0.9)),
                                        "max": float(v.max())}
    # few iterations: some points have not converged; the count is the blocks' sum
    counts = []
    for block in engine.batch_blocks(POINTS, BATCH):
        part = dataclasses.replace(data, x=data.x[block.start:block.stop],
                                   y=data.y[block.start:block.stop])
        counts.append(metric.run(clf, part, RunContext(CPU, BATCH, seed=3, offset=block.start,
                                                       total=POINTS))
                      .diagnostics["hessian_converged"])
    assert res.diagnostics["hessian_converged"] == sum(counts)
    assert 0 <= sum(counts) <= POINTS


def test_blocked_run_is_the_same_for_any_blocking_order() -> None:
    torch.set_num_threads(1)
    data = digits_points()
    clf = robust_cert.load_model(small_cnn(2), input_shape=(1, 8, 8))
    cfg = {"power_iterations": 10}
    res = engine.run_suite(clf, data, policy_with("surrogates", cfg), progress=False,
                           seed=8)["surrogates"]
    assert_world_size_invariant(Surrogates(SurrogatesConfig(**cfg)), clf, data, res, seed=8)


def test_points_with_a_zero_hessian_stop_alone() -> None:
    """f = c·relu(w·x) + b: where w·x < 0 the Jacobian and the Hessian are exactly zero (the
    point stops at once, λ = 0, converged); elsewhere J = c wᵀ and H has the one eigenvalue
    ‖w‖² cᵀ(diag p − ppᵀ)c. The first block has only zero-Hessian points (it stops early)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(4)
    w, c, bias = rng.normal(size=5), rng.normal(size=3), rng.normal(size=3)
    x = rng.uniform(-1, 1, size=(POINTS, 5)).astype(np.float32)
    s = x.astype(np.float64) @ w
    x = x[np.argsort(s, kind="stable")]
    s = x.astype(np.float64) @ w
    assert (s[:BATCH] < 0).all()
    assert (s > 0).sum() > BATCH
    model = nn.Sequential(nn.Linear(5, 1, bias=False), nn.ReLU(), nn.Linear(1, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w[None]))
        model[2].weight.copy_(torch.from_numpy(c[:, None]))
        model[2].bias.copy_(torch.from_numpy(bias))
    data = robust_cert.load_data((x, rng.integers(0, 3, POINTS)), input_range=(-10.0, 10.0))
    clf = robust_cert.load_model(model, input_shape=(5,))
    w, c, bias = (p.detach().double().numpy().ravel() for p in
                  (model[0].weight, model[2].weight, model[2].bias))
    s = x.astype(np.float64) @ w
    res = engine.run_suite(clf, data, policy_with("surrogates", {"power_iterations": 30}),
                           progress=False)["surrogates"]
    active = s > 0
    logits = np.maximum(s, 0)[:, None] * c + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = (w @ w) * ((p * c**2).sum(1) - (p @ c) ** 2)
    jac = res.per_point["jacobian_fro"]
    np.testing.assert_array_equal(jac[~active], 0.0)
    np.testing.assert_allclose(jac[active], np.linalg.norm(c) * np.linalg.norm(w), rtol=1e-5)
    np.testing.assert_array_equal(res.per_point["hessian_top"][~active], 0.0)
    np.testing.assert_allclose(res.per_point["hessian_top"][active], top[active], rtol=1e-4)
    assert res.diagnostics["hessian_converged"] == POINTS


def test_jacobian_metrics_do_not_import_torch_dynamo() -> None:
    """Surrogates and the Han estimators take their Jacobians from batched vector-Jacobian
    products, not torch.func, whose first use imports torch._dynamo (~35 MB of memory and
    ~1.5 s in every certification process); checked in a fresh interpreter."""
    import subprocess
    import sys

    code = """
import sys, torch
from torch import nn
import robust_cert
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.surrogates import Surrogates, SurrogatesConfig
from robust_cert.metrics.analytical import AnalyticalRobustness, AnalyticalConfig
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
data = robust_cert.load_data((torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])))
clf = robust_cert.load_model(model, input_shape=(4,))
ctx = RunContext(torch.device("cpu"), batch_size=4, seed=0)
Surrogates(SurrogatesConfig(power_iterations=3)).run(clf, data, ctx)
AnalyticalRobustness(AnalyticalConfig(sigma=0.1, estimators=["taylor", "mmse"],
                     primary="taylor", validate_points=0)).run(clf, data, ctx)
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
