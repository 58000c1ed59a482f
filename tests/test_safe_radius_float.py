"""The safe-radius lower bound is certified in floating point (issue 12, section 3).

Known answers: for a linear two-class model with float32 weights the exact maximum safe radii
are MSR₂ = |g|/‖w‖₂ and MSR∞ = |g|/‖w‖₁ with g = w·x + b and w = w₁ − w₀, computed in float64
from the float32 parameters (products of float32 numbers are exact in float64; a 30-term sum
has relative error below 1e-14). A certified lower bound must never exceed them, and no
float32 input strictly inside the certified ball may change the model's float32 prediction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.safe_radius import SafeRadius, SafeRadiusConfig

CPU = torch.device("cpu")
#: the cheapest witness and CLEVER budgets: only the lower bound is under test here
CHEAP = dict(bisection_steps=1, attack_steps=1, clever_batches=2, clever_samples=1)


def _linear_and_points(n=500, d=30, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(d, 2).eval()
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(n, d)).astype(np.float32)
    with torch.no_grad():
        t = model(torch.from_numpy(x)).argmax(1).numpy()
    w32, b32 = model.weight.detach().numpy(), model.bias.detach().numpy()
    w = w32[1].astype(np.float64) - w32[0].astype(np.float64)  # exact
    b = float(b32[1]) - float(b32[0])
    g = x.astype(np.float64) @ w + b
    return model, x, t, w, g


def _lower(model, x, t, norm):
    data = robust_cert.load_data((x, t), input_range=(0.0, 1.0))
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    res = SafeRadius(SafeRadiusConfig(norms=[norm], **CHEAP)).run(
        clf, data, RunContext(CPU, batch_size=128, seed=0))
    assert res.diagnostics["lower_bound"] == "ok"
    return res.per_point[f"lower@{norm}"]


def _worst_direction(w: np.ndarray, g: np.ndarray, norm: str) -> np.ndarray:
    """Unit direction (in the norm) that decreases |g| fastest, per point."""
    s = -np.sign(g)[:, None]
    if norm == "linf":
        return s * np.sign(w)[None, :]
    return s * (w / np.linalg.norm(w))[None, :]


def _inside(x64: np.ndarray, cand: np.ndarray, r: np.ndarray, norm: str) -> np.ndarray:
    d = cand.astype(np.float64) - x64
    dist = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    return dist < r


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_lower_bound_never_exceeds_the_exact_radius_of_a_linear_model(norm) -> None:
    model, x, t, w, g = _linear_and_points()
    lower = _lower(model, x, t, norm)
    exact = np.abs(g) / (np.linalg.norm(w) if norm == "l2" else np.abs(w).sum())
    assert (lower <= exact * (1 - 1e-13)).all(), (
        f"{int((lower > exact).sum())} of {len(x)} lower bounds exceed the exact radius")
    # tight: below by at most the float32 rounding slack of the logits: γ₃₁(|W_k|·|x'| + |b_k|)
    # for both logits k, at x and anywhere in the ball (|x'_i| ≤ |x_i| + r), twice for margin
    gamma = 31 * 2.0 ** -24 / (1 - 31 * 2.0 ** -24)
    wk = model.weight.detach().double().abs().numpy()
    bk = model.bias.detach().double().abs().numpy()
    dual = np.linalg.norm(w) if norm == "l2" else np.abs(w).sum()
    slack = 2 * gamma * ((np.abs(x) @ wk.T).sum(1) * 2 + wk.sum() * exact + 2 * bk.sum()) / dual
    assert (exact - lower <= slack).all()
    assert (lower > 0).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_no_float32_input_inside_the_certified_ball_flips_the_prediction(norm) -> None:
    model, x, t, w, g = _linear_and_points()
    lower = _lower(model, x, t, norm)
    x64 = x.astype(np.float64)
    rng = np.random.default_rng(1)
    unit = _worst_direction(w, g, norm)
    cands = []
    # directed: along the worst direction just inside the ball, then every float32 neighbour
    # of that point one ulp towards the boundary (rounding can only help an adversary here)
    for frac in (0.999, 0.99999, 1 - 1e-7):
        c = (x64 + frac * lower[:, None] * unit).astype(np.float32)
        cands.append(c)
        cands.append(np.nextafter(c, (c.astype(np.float64) + unit).astype(np.float32)))
    # random points in the ball, and random float32 perturbations of the directed point
    for _ in range(20):
        if norm == "linf":
            delta = rng.uniform(-1, 1, size=x.shape)
        else:
            delta = rng.normal(size=x.shape)
            delta /= np.linalg.norm(delta, axis=1, keepdims=True)
            delta *= rng.uniform(0, 1, size=(len(x), 1)) ** (1 / x.shape[1])
        cands.append((x64 + 0.999 * lower[:, None] * delta).astype(np.float32))
        nudge = rng.integers(-2, 3, size=x.shape)
        base = cands[0]
        cands.append(np.nextafter(base, base + np.sign(nudge).astype(np.float32)))
    checked = flips = 0
    for c in cands:
        ok = _inside(x64, c, lower, norm)
        with torch.no_grad():
            pred = model(torch.from_numpy(np.ascontiguousarray(c))).argmax(1).numpy()
        checked += int(ok.sum())
        flips += int((ok & (pred != t)).sum())
    assert checked > 20 * len(x)
    assert flips == 0, f"{flips} float32 inputs inside certified balls changed the prediction"


def test_certified_margins_come_from_the_modelled_arithmetic(monkeypatch) -> None:
    """The logits of the certified margins are evaluated with cuDNN off and IEEE float32
    products, whatever the caller set (bf16 "medium" products, cuDNN on): the rounding model
    (sums of rounded float32 products) describes that evaluation, not Winograd/FFT or bf16."""
    from robust_cert.models.base import Classifier

    model, x, t, _, _ = _linear_and_points(n=20)
    seen = []
    real = Classifier.logits

    def spy(self, xb):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.enabled,
                     torch.backends.cudnn.allow_tf32))
        return real(self, xb)

    monkeypatch.setattr(Classifier, "logits", spy)
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        _lower(model, x, t, "l2")
        after = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(prec)
    assert seen
    assert all(s == ("highest", False, False) for s in seen), seen
    assert after == "medium"  # the caller's setting is restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN, TF32, bf16)")
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_no_flip_inside_the_certified_ball_on_cuda_with_bf16_allowed(norm) -> None:
    """On CUDA, with bf16 products allowed and cuDNN benchmarking on, the lower bound stays
    below the exact radius (float64 from the float32 parameters)."""
    dev = torch.device("cuda")
    model, x, t, _, g = _linear_and_points()
    w = model.weight.detach().double()
    exact = np.abs(g) / float((w[1] - w[0]).norm(p=2 if norm == "l2" else 1))
    data = robust_cert.load_data((x, t), input_range=(0.0, 1.0))
    clf = robust_cert.load_model(model.to(dev), input_shape=data.input_shape, device=dev)
    prec, bench = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.benchmark = True
    try:
        res = SafeRadius(SafeRadiusConfig(norms=[norm], **CHEAP)).run(
            clf, data, RunContext(dev, batch_size=128, seed=0))
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cudnn.benchmark = bench
        model.cpu()
    assert (res.per_point[f"lower@{norm}"] <= exact * (1 + 1e-12)).all()


def _relu_net_and_points(n=60, d=20, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3)).eval()
    x = torch.rand(n, d).numpy()
    with torch.no_grad():
        t = model(torch.from_numpy(x)).argmax(1).numpy()
    return model, x, t


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_no_float32_input_inside_the_crown_certified_ball_flips_the_prediction(norm) -> None:
    """The local (CROWN) radius, larger than the Lipschitz one: PGD from inside the ball, the
    one-ulp neighbours of its end points and random points in the ball never change the
    float32 prediction (issue 23)."""
    model, x, t = _relu_net_and_points()
    data = robust_cert.load_data((x, t), input_range=(0.0, 1.0))
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    res = SafeRadius(SafeRadiusConfig(norms=[norm], clever_batches=2, clever_samples=1,
                                        local_bound="crown")).run(
        clf, data, RunContext(CPU, batch_size=64, seed=0))
    pp = res.per_point
    lower, lip = pp[f"lower@{norm}"], pp[f"lower_lipschitz@{norm}"]
    assert res.diagnostics["local_bound"] == "crown"
    assert (lower >= lip).all()
    crown = pp[f"bound@{norm}"] == "crown"
    assert crown.sum() > len(x) // 2  # CROWN certifies more on most points
    assert np.median(lower[crown] / lip[crown]) > 1.5
    assert res.diagnostics[norm]["sandwich_violations"] == 0
    upper = pp[f"upper@{norm}"]
    assert (lower[np.isfinite(upper)] <= upper[np.isfinite(upper)]).all()
    x64 = x.astype(np.float64)
    r = torch.from_numpy(lower * 0.999).view(-1, 1)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    delta = torch.zeros_like(xt, requires_grad=True)
    ends = []
    for _ in range(60):  # PGD on the margin of the predicted class, inside the ball
        logits = model(xt + delta)
        other = logits.scatter(1, tt[:, None], -torch.inf).amax(1)
        margin = logits.gather(1, tt[:, None])[:, 0] - other
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            rf = r.float()
            if norm == "linf":
                delta -= 0.05 * rf * grad.sign()
                delta.copy_(torch.maximum(torch.minimum(delta, rf), -rf))
            else:
                delta -= 0.1 * rf * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
                delta *= (rf / delta.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp(max=1)
        ends.append((xt + delta).detach().numpy())
    rng = np.random.default_rng(2)
    cands = list(ends[-5:])
    for c in ends[-3:]:
        for _ in range(3):
            cands.append(np.nextafter(c, c + rng.integers(-1, 2, size=c.shape).astype(
                np.float32)))
    for _ in range(20):
        if norm == "linf":
            delta_r = rng.uniform(-1, 1, size=x.shape)
        else:
            delta_r = rng.normal(size=x.shape)
            delta_r /= np.linalg.norm(delta_r, axis=1, keepdims=True)
        cands.append((x64 + 0.999 * lower[:, None] * delta_r).astype(np.float32))
    checked = flips = 0
    for c in cands:
        ok = _inside(x64, c, lower, norm)
        with torch.no_grad():
            pred = model(torch.from_numpy(np.ascontiguousarray(c))).argmax(1).numpy()
        checked += int(ok.sum())
        flips += int((ok & (pred != t)).sum())
    assert checked > 20 * len(x)
    assert flips == 0, f"{flips} float32 inputs inside CROWN-certified balls flipped"
