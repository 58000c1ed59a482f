"""Known-answer tests of the surrogates (Family G): J = W and H = Wᵀ(diag p − ppᵀ)W."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.surrogates import Surrogates, SurrogatesConfig

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
