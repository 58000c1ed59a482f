"""Known-answer tests of the analytical p_σ estimators (Han et al.) and the batched MVN CDF."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import stats as st
from torch import nn

import robust_cert
from robust_cert import stats
from robust_cert.metrics import REGISTRY
from robust_cert.metrics.analytical import (
    AnalyticalConfig,
    AnalyticalRobustness,
    jacobian_budget,
    logits_and_jacobian,
    margins,
    monte_carlo_p,
    mvn_cdf,
    mvn_cdf_scipy,
    noisy_logits_and_mean_jacobian,
)
from robust_cert.metrics.base import RunContext

CPU = torch.device("cpu")
WIDE = (-10.0, 10.0)


def _ctx(seed: int = 0, batch_size: int = 64) -> RunContext:
    return RunContext(device=CPU, batch_size=batch_size, seed=seed)


def _affine(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        lin.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return lin


def _random_corr(rng, n: int, k: int) -> np.ndarray:
    a = rng.normal(size=(n, k, k + 2))
    cov = a @ a.transpose(0, 2, 1)
    d = np.sqrt(np.einsum("nii->ni", cov))
    return cov / d[:, :, None] / d[:, None, :] + 1e-5 * np.eye(k)


def test_batched_mvn_cdf_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for k in (2, 4, 9):
        corr = _random_corr(rng, 12, k)
        upper = rng.uniform(-0.5, 2.5, size=(12, k))
        ref = mvn_cdf_scipy(upper, corr)
        est, err = mvn_cdf(torch.from_numpy(upper), torch.from_numpy(corr), points=4096)
        assert np.abs(est.numpy() - ref).max() < 2e-3
        assert (err.numpy() < 2e-3).all()
    # k = 1 is the normal CDF exactly
    est, _ = mvn_cdf(torch.tensor([[1.3], [-0.2]], dtype=torch.float64),
                     torch.ones(2, 1, 1, dtype=torch.float64))
    np.testing.assert_allclose(est.numpy(), st.norm.cdf([1.3, -0.2]), rtol=1e-12)


def test_taylor_is_exact_for_a_binary_affine_model() -> None:
    w = np.array([1.0, -2.0, 0.5, 1.5])
    weight = np.stack([np.zeros(4), w])
    model = _affine(weight, np.array([0.0, 0.3]))
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(30, 4)).astype(np.float32)
    g = x.astype(np.float64) @ w + 0.3
    sigma = 0.7
    exact = st.norm.cdf(np.abs(g) / (sigma * np.linalg.norm(w)))
    data = robust_cert.load_data((x, (g > 0).astype(np.int64)), input_range=WIDE)
    clf = robust_cert.load_model(model, input_shape=(4,))
    cfg = AnalyticalConfig(sigma=sigma, estimators=["taylor", "mvs"], primary="taylor",
                           validate_points=0)
    res = AnalyticalRobustness(cfg).run(clf, data, _ctx())
    # exact up to the 1e-5 ridge on Σ (here Φ(z / √(1 + 1e-5))) and float32 logits
    np.testing.assert_allclose(res.per_point["p_taylor"], exact, atol=1e-5)
    z = np.abs(g) / (sigma * np.linalg.norm(w))
    np.testing.assert_allclose(res.per_point["p_taylor"], st.norm.cdf(z / np.sqrt(1 + 1e-5)),
                               atol=1e-6)
    np.testing.assert_allclose(res.per_point["p_mvs"], 1 / (1 + np.exp(-z)), atol=1e-6)
    np.testing.assert_array_equal(res.per_point["prediction"], (g > 0).astype(np.int64))


def test_taylor_matches_scipy_and_monte_carlo_for_a_multiclass_affine_model() -> None:
    rng = np.random.default_rng(2)
    weight, bias = rng.normal(size=(5, 6)), rng.normal(size=5) * 0.3
    model = _affine(weight, bias)
    clf = robust_cert.load_model(model, input_shape=(6,))
    x = torch.from_numpy(rng.normal(size=(8, 6)).astype(np.float32))
    sigma = 0.4
    logits, jac = logits_and_jacobian(clf.attack_module(), x)
    np.testing.assert_allclose(jac.numpy(), np.broadcast_to(weight, (8, 5, 6)), rtol=1e-6)
    z, corr = margins(logits, jac, logits.argmax(1), sigma)
    ref = mvn_cdf_scipy(z.numpy(), corr.numpy())
    metric = AnalyticalRobustness(AnalyticalConfig(sigma=sigma, estimators=["taylor"],
                                                   primary="taylor", qmc_points=4096))
    target, est, _ = metric.estimate(clf, x, torch.Generator().manual_seed(0))
    assert np.abs(est["taylor"] - ref).max() < 2e-3
    draws = 20_000
    k = monte_carlo_p(clf, x, target, sigma, draws, torch.Generator().manual_seed(3))
    for kk, p in zip(k, est["taylor"], strict=True):
        lo, hi = stats.clopper_pearson(int(kk), draws, 0.999)
        assert lo - 2e-3 <= p <= hi + 2e-3


def _per_sample_jacobians(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: each sample's Jacobian on its own (autograd.functional), (P, C, d)."""
    return torch.stack([torch.autograd.functional.jacobian(module, row) for row in x])


class _Calls:
    """Records forward batch sizes and, per autograd call, class rows × images."""

    def __init__(self, module: nn.Module, monkeypatch):
        self.module, self.sizes, self.backward = module, [], []
        real = torch.autograd.grad

        def grad(outputs, inputs, grad_outputs=None, **kw):
            if kw.get("is_grads_batched"):
                self.backward.append(grad_outputs.shape[0] * grad_outputs.shape[1])
            elif grad_outputs is not None:  # a plain backward pass: one row per image
                self.backward.append(grad_outputs.shape[0])
            return real(outputs, inputs, grad_outputs=grad_outputs, **kw)

        monkeypatch.setattr(torch.autograd, "grad", grad)

    def __call__(self, z):
        self.sizes.append(z.shape[0])
        return self.module(z)


@pytest.mark.parametrize("batched", [True, False])
def test_jacobians_within_a_budget_are_the_per_sample_jacobians(monkeypatch, batched) -> None:
    """Jacobians from batched vector-Jacobian products (or, not ``batched``, plain backward
    passes, one per class) equal each sample's own (float32 rounding: |Δ| ≤ 1e-5 relative on
    values of order 1), logits in order, and every autograd call back-propagates at most
    ``budget`` images × class rows (points and class rows split to fit)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    x = torch.randn(23, 6)
    ref = _per_sample_jacobians(mlp, x)
    with torch.no_grad():
        ref_logits = mlp(x)
    for budget, sizes in ((None, [23]), (20, [4] * 5 + [3]), (3, [1] * 23)):
        calls = _Calls(mlp, monkeypatch)
        lg, j = logits_and_jacobian(calls, x, budget, classes=5, batched=batched)
        assert calls.sizes == sizes
        if budget is not None:
            assert max(calls.backward) <= budget
        np.testing.assert_allclose(lg.numpy(), ref_logits.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(j.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    clf = robust_cert.load_model(mlp, input_shape=(6,))
    assert jacobian_budget(clf, 4096) == 4096
    assert jacobian_budget(dataclasses.replace(clf, max_batch=64), 4096) == 64


@pytest.mark.parametrize("batched", [True, False])
def test_mean_jacobian_of_noisy_copies_is_the_mean_of_their_jacobians(monkeypatch,
                                                                       batched) -> None:
    """The MMSE step's per-point mean Jacobian over n noisy copies, back-propagated through
    x ↦ (1/n) Σ_k f(x + ε_k), equals the mean of the copies' own Jacobians (float32
    rounding), with the copies' logits in order, whether points, copies or class rows are
    split to keep every autograd call within the budget."""
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    x, noise = torch.randn(7, 6), 0.3 * torch.randn(7, 4, 6)
    copies = (x[:, None] + noise).flatten(0, 1)
    ref_mean = _per_sample_jacobians(mlp, copies).view(7, 4, 5, 6).mean(1)
    with torch.no_grad():
        ref_logits = mlp(copies)
    # budget → forward sizes: all at once; 2 points of 4 copies; 2 copies; 1 copy, 3 rows
    for budget, sizes in ((None, [28]), (40, [8, 8, 8, 4]), (12, [2] * 14), (3, [1] * 28)):
        calls = _Calls(mlp, monkeypatch)
        lg, j = noisy_logits_and_mean_jacobian(calls, x, noise, budget, classes=5,
                                               batched=batched)
        assert calls.sizes == sizes
        if budget is not None:
            assert max(calls.backward) <= budget
        np.testing.assert_allclose(lg.numpy(), ref_logits.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(j.flatten(2).numpy(), ref_mean.numpy(), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("batched", [True, False])
def test_outputs_that_ignore_the_input_have_zero_jacobians(batched) -> None:
    """A constant model, and one whose output depends on parameters only: zero Jacobian
    rows (as torch.func.jacrev gives), not an autograd error."""
    bias = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(4, 6)
    for fn in (lambda z: torch.zeros(z.shape[0], 3), lambda z: bias.expand(z.shape[0], 3)):
        lg, j = logits_and_jacobian(fn, x, 8, classes=3, batched=batched)
        assert tuple(j.shape) == (4, 3, 6)
        assert not j.any()
        lg, j = noisy_logits_and_mean_jacobian(fn, x, torch.randn(4, 2, 6), 8, classes=3,
                                               batched=batched)
        assert tuple(lg.shape) == (8, 3)
        assert tuple(j.shape) == (4, 3, 6)
        assert not j.any()


def test_plain_backward_rows_are_the_vmapped_rows_bit_for_bit() -> None:
    """On the CPU the class rows are plain backward passes (the default there), through the
    same forward passes: the same logits and Jacobians, bit for bit, as the vmapped product on
    a CNN with BatchNorm, ReLU and pooling (so a certificate does not change with the
    switch), whatever the budget's split, for one image alone too."""
    torch.manual_seed(4)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.rand(13, 3, 8, 8)
    noise = 0.05 * torch.randn(13, 4, 3, 8, 8)
    for budget in (None, 40, 7, 256):
        a = logits_and_jacobian(cnn, x, budget, classes=10, batched=True)
        b = logits_and_jacobian(cnn, x, budget, classes=10)
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], b[1])
        a = noisy_logits_and_mean_jacobian(cnn, x, noise, budget, classes=10, batched=True)
        b = noisy_logits_and_mean_jacobian(cnn, x, noise, budget, classes=10)
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], b[1])
    one = logits_and_jacobian(cnn, x[:1], classes=10)[1]
    assert torch.equal(one, logits_and_jacobian(cnn, x[:1], classes=10, batched=True)[1])


def test_metric_on_a_small_mlp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, size=(60, 5)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = robust_cert.load_data((x, y))
    clf = robust_cert.load_model(model, input_shape=(5,))
    cfg = AnalyticalConfig(sigma=0.2, validate_points=20, validate_draws=3000,
                           estimators=["taylor", "mmse", "mvs", "mmse_mvs", "softmax"],
                           thresholds=[0.9, 0.5])
    res = AnalyticalRobustness(cfg).run(clf, data, _ctx(batch_size=16))
    assert res.kind == "estimate"
    assert [p.params for p in res.proportions] == [{"tau": 0.5}, {"tau": 0.9}]
    p = res.per_point["p_mmse"]
    for prop in res.proportions:
        assert prop.k == int((p >= prop.params["tau"]).sum())
    for name in ("taylor", "mmse", "mvs", "mmse_mvs", "softmax"):
        v = res.per_point[f"p_{name}"]
        assert v.shape == (60,)
        assert ((v >= 0) & (v <= 1)).all()
    val = res.diagnostics["validation"]
    assert val["points"] == 20
    # on a smooth small MLP at small σ the linearisation is good
    assert val["taylor"]["mae"] < 0.05
    assert val["mmse"]["mae"] < 0.05
    rank = res.per_point["rank"]
    assert sorted(rank.tolist()) == list(range(60))
    assert res.diagnostics["most_vulnerable"] == np.argsort(p, kind="stable")[:10].tolist()
    bias = res.diagnostics["robustness_bias"]
    means = {c: d["mean"] for c, d in bias["per_class"].items()}
    assert bias["largest_gap"] == pytest.approx(max(means.values()) - min(means.values()))
    for c, d in bias["per_class"].items():
        assert d["ci"][0] <= d["mean"] <= d["ci"][1]
        assert d["mean"] == pytest.approx(p[y == int(c)].mean())
    again = AnalyticalRobustness(cfg).run(clf, data, _ctx(batch_size=7))
    # another batch size may use other float32 kernels: logits and gradients then differ by a
    # few ulp (relative ~1e-6), and p = Φ(z) moves by at most φ(z)·|z|·1e-6 <= 0.25e-6 per unit
    # of relative error in z: far below 1e-5, while a real batching bug moves p by far more.
    np.testing.assert_allclose(again.per_point["p_taylor"], res.per_point["p_taylor"], atol=1e-5)


def test_softmax_only_needs_no_gradients() -> None:
    assert REGISTRY["analytical_robustness"] is AnalyticalRobustness
    only = AnalyticalRobustness(AnalyticalConfig(sigma=0.1, estimators=["softmax"],
                                                 primary="softmax"))
    assert only.needs_gradients is False
    assert AnalyticalRobustness(AnalyticalConfig(sigma=0.1)).needs_gradients is True


@pytest.mark.parametrize(("cfg", "key", "words"), [
    ({"sigma": 0.0}, "sigma", "greater than 0"),
    ({"sigma": 0.1, "estimators": ["taylor"]}, "primary", "not among estimators"),
    ({"sigma": 0.1, "thresholds": [0.0]}, "thresholds", "(0, 1]"),
    ({"sigma": 0.1, "confidence": 1.0}, "confidence", "less than 1"),
])
def test_bad_configs(cfg, key, words) -> None:
    with pytest.raises(ValidationError) as info:
        AnalyticalConfig(**cfg)
    err = info.value.errors()[0]
    assert err["loc"] == (key,)
    assert words in err["msg"]


def test_policy_can_name_a_threshold_and_the_certificate_is_valid_json() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, size=(40, 3)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    pol = {"name": "han", "metrics": {"analytical_robustness": {
               "sigma": 0.05, "thresholds": [0.9], "validate_points": 8, "validate_draws": 500}},
           "requirements": [{"metric": "analytical_robustness", "tau": 0.9, "at_least": 0.01}]}
    cert = robust_cert.certify(model, (x, y), pol, progress=False)
    (res,) = cert.body["results"]
    assert res["kind"] == "estimate"
    assert res["values"][0]["params"] == {"tau": 0.9}
    assert set(res["diagnostics"]["validation"]) >= {"taylor", "mmse", "mvs", "softmax"}
    assert cert.body["requirements"][0]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")


@pytest.mark.parametrize("samples", [16, 5])
def test_mmse_equals_taylor_and_the_exact_answer_on_affine_models(samples) -> None:
    """On an affine model the smoothed model E[f(x + ε)] is f itself, so mmse must equal
    taylor and, for two classes, Φ(|g| / (σ‖w‖)). Plain Monte Carlo averages carry a random
    error of about σ‖w‖/√n in g (up to 0.19 in p before the fix); antithetic pairs cancel it.
    Tolerance: both sides from float32 logits of size ~10 (relative error ~1e-6 in z, p moves
    by ≤ φ(z)·Δz < 1e-5), while the Monte Carlo error this guards against is ≥ 1e-2."""
    w = np.array([1.0, -2.0, 0.5, 1.5])
    model = _affine(np.stack([np.zeros(4), w]), np.array([0.0, 0.3]))
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, size=(60, 4)).astype(np.float32)
    g = x.astype(np.float64) @ w + 0.3
    sigma = 0.5
    data = robust_cert.load_data((x, (g > 0).astype(np.int64)), input_range=WIDE)
    clf = robust_cert.load_model(model, input_shape=(4,))
    cfg = AnalyticalConfig(sigma=sigma, estimators=["taylor", "mmse", "mmse_mvs"],
                           primary="mmse", mmse_samples=samples, validate_points=0)
    res = AnalyticalRobustness(cfg).run(clf, data, _ctx())
    z = np.abs(g) / (sigma * np.linalg.norm(w))
    exact = st.norm.cdf(z / np.sqrt(1 + 1e-5))  # the 1e-5 ridge, as taylor
    np.testing.assert_allclose(res.per_point["p_mmse"], exact, atol=1e-5)
    np.testing.assert_allclose(res.per_point["p_mmse"], res.per_point["p_taylor"], atol=1e-5)
    np.testing.assert_allclose(res.per_point["p_mmse_mvs"], 1 / (1 + np.exp(-z)), atol=1e-5)

    # multiclass affine: mmse = taylor (same z and Σ), integrated with the same QMC points
    weight, bias = rng.normal(size=(5, 6)), rng.normal(size=5) * 0.3
    clf5 = robust_cert.load_model(_affine(weight, bias), input_shape=(6,))
    x5 = torch.from_numpy(rng.normal(size=(40, 6)).astype(np.float32))
    metric = AnalyticalRobustness(AnalyticalConfig(sigma=0.4, estimators=["taylor", "mmse"],
                                                   primary="mmse", mmse_samples=samples))
    _, est, _ = metric.estimate(clf5, x5, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(est["mmse"], est["taylor"], atol=1e-5)
