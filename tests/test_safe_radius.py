"""Known-answer tests of the maximum-safe-radius sandwich (Family F) on linear models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.safe_radius import (
    NotBoundable,
    SafeRadius,
    SafeRadiusConfig,
    clever_score,
    lipschitz_bound,
    reverse_weibull_location,
)
from tests.linear_models import binary_linear

CPU = torch.device("cpu")
W = np.array([1.0, -2.0, 0.5, 1.5])
B = 0.3
WIDE = (-50.0, 50.0)


def _binary() -> nn.Linear:
    return binary_linear(W, B)


def _run(model, x, y, seed=0, input_range=WIDE, **cfg):
    data = robust_cert.load_data((x, y), input_range=input_range)
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    return SafeRadius(SafeRadiusConfig(**cfg)).run(clf, data,
                                                   RunContext(CPU, batch_size=32, seed=seed))


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 4)).astype(np.float32)
    g = x.astype(np.float64) @ W + float(np.float32(B))  # exact: the model's float32 weights
    return x, (g > 0).astype(np.int64), g


DUAL = {"l2": float(np.linalg.norm(W)), "linf": float(np.abs(W).sum()),
        "l1": float(np.abs(W).max())}


def _rounding_slack(x, expected, dual):
    """How far below the exact radius a sound float32 bound may sit: the forward error bound
    γ₅(|w|·|x'| + |b|) of the logit, at x and in the ball (|x'| ≤ |x| + r), for both logits
    and both evaluations (8×), divided by the dual norm."""
    n = len(W) + 1
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    return 8 * gamma * (np.abs(x) @ np.abs(W) + np.abs(W).sum() * expected + abs(B)) / dual


def _check_sandwich(res, expected, mask, norm, tol=2e-3, x=None):
    lower = res.per_point[f"lower@{norm}"][mask]
    upper = res.per_point[f"upper@{norm}"][mask]
    clever = res.per_point[f"clever@{norm}"][mask]
    # sound: never above the exact (float64) radius; tight: within the float32 rounding slack
    assert (lower <= expected[mask] * (1 + 1e-12)).all()
    slack = _rounding_slack(x[mask], expected[mask], DUAL[norm])
    assert (lower >= expected[mask] - slack).all()
    np.testing.assert_allclose(clever, expected[mask], rtol=1e-5, atol=1e-6)
    assert (upper >= expected[mask] * (1 - 1e-5) - 1e-6).all()  # a witness is never inside
    np.testing.assert_allclose(upper, expected[mask], rtol=tol, atol=tol)


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_adversarial_msr_of_a_linear_binary_model(norm) -> None:
    x, y, g = _data()
    res = _run(_binary(), x, y, norms=[norm], radii=[0.1, 0.3], clever_radius=100.0,
               clever_samples=20, bisection_steps=20, max_radius=5.0)
    expected = np.abs(g) / DUAL[norm]
    _check_sandwich(res, expected, np.ones(len(x), bool), norm, x=x)
    for r in (0.1, 0.3):
        assert res.find({"norm": norm, "radius": r}).k == int((expected > r).sum())
    assert res.diagnostics[norm]["sandwich_violations"] == 0
    assert res.kind == "certified"


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_boundary_search_reaches_the_msr_of_a_linear_binary_model(norm) -> None:
    """The default witness search with a single bisection step: the minimal-norm boundary
    search alone must reach |g|/‖w‖_dual (‖w‖₂, ‖w‖₁, ‖w‖∞) within 0.1%, never below it."""
    x, y, g = _data()
    res = _run(_binary(), x, y, norms=[norm], bisection_steps=1, clever_samples=2,
               clever_batches=2, estimate_steps=0, local_bound="off")
    expected = np.abs(g) / DUAL[norm]
    upper = res.per_point[f"upper@{norm}"]
    assert (upper >= expected * (1 - 1e-5) - 1e-6).all()  # a witness is never inside
    np.testing.assert_allclose(upper, expected, rtol=1e-3, atol=1e-5)


def test_boundary_search_off_is_bisection_only_and_no_closer() -> None:
    """witness_steps 0 leaves the bisection alone; the boundary search only adds witnesses, so
    the default is never farther than it (per point, same points)."""
    x, y, _ = _data()
    kw = dict(norms=["l2"], bisection_steps=4, attack_steps=5, clever_samples=2,
              clever_batches=2, estimate_steps=0, local_bound="off")
    off = _run(_binary(), x, y, witness_steps=0, **kw).per_point["upper@l2"]
    on = _run(_binary(), x, y, **kw).per_point["upper@l2"]
    assert np.isfinite(off).all()
    assert (on <= off).all()
    assert np.median(on / off) < 0.999  # 4 bisection steps alone stay a few % above


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_uncertainty_radius_of_a_linear_binary_model(norm) -> None:
    tau = 0.8
    x, y, g = _data(seed=1)
    res = _run(_binary(), x, y, property="uncertainty", tau=tau, norms=[norm],
               clever_radius=100.0, clever_samples=20, bisection_steps=20, max_radius=5.0)
    logit = math.log(tau / (1 - tau))
    mask = np.abs(g) > logit + 1e-3
    assert 0 < mask.sum() < len(x)
    expected = (np.abs(g) - logit) / DUAL[norm]
    _check_sandwich(res, expected, mask, norm, x=x)
    np.testing.assert_array_equal(res.per_point["holds"], np.abs(g) >= logit)
    assert (res.per_point[f"upper@{norm}"][~mask] < 1e-3).all()


def test_reachability_radius_of_a_linear_binary_model() -> None:
    x, y, g = _data(seed=2)
    low, high = -1.0, 2.0
    res = _run(_binary(), x, y, property="reachability", output=1, low=low, high=high,
               norms=["l2"], clever_radius=100.0, clever_samples=20, bisection_steps=20,
               max_radius=5.0)
    inside = (g > low) & (g < high)
    expected = np.minimum(g - low, high - g) / DUAL["l2"]
    _check_sandwich(res, expected, inside, "l2", x=x)
    np.testing.assert_array_equal(res.per_point["holds"], inside)


def _conv_matrix(conv: nn.Conv2d, in_shape) -> torch.Tensor:
    """The explicit (outputs × inputs) float64 matrix of a bias-free convolution."""
    d = int(np.prod(in_shape))
    basis = torch.eye(d, dtype=torch.float64).view(d, *in_shape)
    with torch.no_grad():
        out = nn.functional.conv2d(basis, conv.weight.double(), None, conv.stride, conv.padding,
                                   conv.dilation, conv.groups)
    return out.flatten(1).T


@pytest.mark.parametrize(("kw", "in_shape"), [
    (dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (2, 5, 5)),
    (dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1), (2, 7, 6)),
    (dict(in_channels=4, out_channels=4, kernel_size=2, dilation=2, groups=2), (4, 6, 6)),
    (dict(in_channels=1, out_channels=5, kernel_size=(1, 3), padding=(0, 2)), (1, 4, 4)),
])
def test_conv_bounds_are_sound_upper_bounds_of_the_explicit_operator(kw, in_shape) -> None:
    """L2: a certified upper bound on the spectral norm (never below the exact value of the
    explicit matrix, and no looser than √(‖K‖₁‖K‖∞)); power iteration, reported as
    ``l2_lower``, converges to the exact value from below. L∞: the exact max row sum."""
    torch.manual_seed(0)
    conv = nn.Conv2d(**kw)
    with torch.no_grad():
        out_shape = conv(torch.zeros(1, *in_shape)).shape[1:]
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(int(np.prod(out_shape)), 4))
    bound = lipschitz_bound(model, in_shape, power_iterations=500)
    mat = _conv_matrix(conv, in_shape)
    sigma = float(torch.linalg.matrix_norm(mat, 2))
    l1, linf = float(mat.abs().sum(0).max()), float(mat.abs().sum(1).max())
    (layer,) = [entry for entry in bound.layers if entry["type"].startswith("Conv2d")]
    assert sigma <= layer["l2"] <= math.sqrt(l1 * linf) * (1 + 1e-8)
    assert layer["l2_lower"] <= sigma * (1 + 1e-6)
    assert layer["l2_lower"] == pytest.approx(sigma, rel=1e-3)
    assert layer["linf"] == pytest.approx(linf, rel=1e-8)
    assert layer["linf"] >= linf
    assert bound.head is not None


def test_sandwich_holds_on_a_small_cnn_and_is_seeded() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).eval()
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, size=(12, 1, 6, 6)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    kw = dict(norms=["l2", "linf"], radii=[0.0], clever_samples=10, clever_radius=0.5,
              bisection_steps=8, input_range=(0.0, 1.0))
    a = _run(model, x, y, seed=5, **kw)
    b = _run(model, x, y, seed=5, **kw)
    for nm in ("l2", "linf"):
        lower, upper = a.per_point[f"lower@{nm}"], a.per_point[f"upper@{nm}"]
        finite = np.isfinite(upper)
        assert (lower[finite] <= upper[finite]).all()
        assert (lower > 0).all()
        assert a.diagnostics[nm]["sandwich_violations"] == 0
        np.testing.assert_array_equal(a.per_point[f"clever@{nm}"], b.per_point[f"clever@{nm}"])
    assert a.find({"norm": "l2", "radius": 0.0}).k == 12


class _Square(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = _binary()

    def forward(self, x):
        return self.lin(x * x)


def test_unboundable_layers_are_not_applicable() -> None:
    with pytest.raises(NotBoundable, match="cannot bound"):
        lipschitz_bound(_Square(), (4,))
    x, y, _ = _data(n=8)
    res = _run(_Square(), x, y, norms=["l2"], clever_samples=5, bisection_steps=3)
    assert res.status == "ok"
    assert res.diagnostics["lower_bound"].startswith("not applicable")
    assert np.isnan(res.per_point["lower@l2"]).all()
    assert np.isfinite(res.per_point["clever@l2"]).all()
    gated = _run(_Square(), x, y, norms=["l2"], radii=[0.1], clever_samples=5,
                 bisection_steps=3)
    assert gated.status == "not_applicable"
    assert "cannot bound" in gated.reason


class _Clip(nn.Module):
    """A module with a Lipschitz bound but no local bound (registered below, in a copy of the
    registry)."""

    def forward(self, x):
        return x.clamp(-1, 1)


def test_an_op_without_a_local_bound_falls_back_to_the_lipschitz_bound(monkeypatch) -> None:
    from robust_cert.bounds import BoundOp, register_bound_op, registry

    monkeypatch.setattr(registry, "_MODULES", dict(registry._MODULES))

    class ClipBound(BoundOp):
        def lipschitz(self, call, params):
            return call.step("act", info="Clip")

    register_bound_op(ClipBound(), modules=[_Clip])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _Clip(), nn.Linear(8, 2)).eval()
    x, _, _ = _data(n=10)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    res = _run(model, x, y, norms=["l2"], clever_samples=5, bisection_steps=3,
               local_bound="crown")
    assert res.diagnostics["local_bound"].startswith("lipschitz only: ")
    assert "_Clip" in res.diagnostics["local_bound"] or "Clip" in res.diagnostics["local_bound"]
    assert (res.per_point["bound@l2"] == "lipschitz").all()
    np.testing.assert_array_equal(res.per_point["lower@l2"],
                                  res.per_point["lower_lipschitz@l2"])
    assert res.diagnostics["l2"]["certified_by"]["crown"] == 0
    # the same network with a plain clamp (Hardtanh) is bounded by CROWN beyond Lipschitz
    model2 = nn.Sequential(model[0], nn.Hardtanh(), model[2]).eval()
    res2 = _run(model2, x, y, norms=["l2"], clever_samples=5, bisection_steps=3,
                local_bound="crown")
    assert res2.diagnostics["local_bound"] == "crown"
    assert (res2.per_point["lower@l2"] >= res2.per_point["lower_lipschitz@l2"]).all()
    assert res2.diagnostics["l2"]["certified_by"]["crown"] > 0


def test_weibull_location_and_config_errors() -> None:
    assert reverse_weibull_location(np.full(10, 3.0)) == 3.0
    rng = np.random.default_rng(4)
    maxima = 5.0 - rng.weibull(2.0, size=50) * 0.5  # reverse Weibull with upper end 5
    loc = reverse_weibull_location(maxima)
    assert maxima.max() <= loc < 5.5
    # maxima without a bounded tail: the fit runs away, the largest norm is used instead
    flat = np.array([17.2, 18.6, 17.9, 18.1, 17.5, 18.3, 17.8, 18.0, 17.4, 18.2])
    assert reverse_weibull_location(flat) <= flat.max() + 2 * np.ptp(flat)
    with pytest.raises(ValueError, match="reachability needs low"):
        SafeRadiusConfig(property="reachability")
    with pytest.raises(ValueError, match="radii must be >= 0"):
        SafeRadiusConfig(radii=[-1])


def test_clever_score_fits_only_the_margins_that_can_attain_the_minimum(monkeypatch) -> None:
    """The score skips fits, never changes: on random points (fitted, constant, runaway and
    zero maxima; negative and positive margins; caps that bind or not) it equals the
    minimum over every margin's fit, and it fits fewer margins than there are."""
    import robust_cert.metrics.safe_radius as sr

    calls = []
    real = sr.reverse_weibull_location

    def counting(m):
        calls.append(1)
        return real(m)

    monkeypatch.setattr(sr, "reverse_weibull_location", counting)
    rng = np.random.default_rng(7)
    fitted = total = 0
    for trial in range(30):
        m = 9
        maxima = 5.0 - rng.weibull(2.0, size=(m, 10)) * rng.uniform(0.1, 2.0, size=(m, 1))
        if trial % 2:  # nearly equal margins: the hard case, fits decide the minimum
            h = 1.0 + rng.normal(0, 0.05, size=m)
        else:
            maxima[0] = 3.0  # constant: no spread to fit
            maxima[1] = [17.2, 18.6, 17.9, 18.1, 17.5, 18.3, 17.8, 18.0, 17.4, 18.2]  # runaway
            h = rng.normal(1.0, 1.5, size=m) * rng.uniform(0.5, 5.0, size=m)
        if trial % 3 == 0:
            maxima[2] = 0.0  # a margin whose gradients vanish: +inf
        if trial % 6 == 4:
            h[5] = -0.3  # a violated margin: the score is 0
        cap = 0.05 if trial % 5 == 2 else 10.0
        every = [max(h[j], 0.0) / loc if (loc := real(maxima[j])) > 0 else np.inf
                 for j in range(m)]
        calls.clear()
        got = clever_score(maxima, h, cap)
        assert got == min(cap, *every)
        fitted, total = fitted + len(calls), total + m
    assert fitted < total
    # non-finite inputs: an infinite maximum (location inf: value 0) and a NaN margin (its
    # value is NaN, which min() passes over in both computations)
    maxima = 5.0 - rng.weibull(2.0, size=(4, 10))
    maxima[1, 3] = np.inf
    h = np.array([0.8, 0.5, np.nan, 1.2])
    for hh in (h, np.where(np.isnan(h), 0.3, h)):
        every = [max(hh[j], 0.0) / loc if (loc := real(maxima[j])) > 0 else np.inf
                 for j in range(4)]
        assert clever_score(maxima, hh, 10.0) == min(10.0, *every)


def test_local_bound_skips_only_points_it_can_never_certify(monkeypatch) -> None:
    """A point whose rounding allowance exceeds one of its margins at x is not searched by the
    local bound, and the per-point results are those of a run that searches every point, bit
    for bit (rounding bounds inflated so that about half the points are such points)."""
    import robust_cert.metrics.safe_radius as sr
    from robust_cert.bounds import LipschitzBound

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 3)).eval()
    x = np.random.default_rng(3).uniform(-1, 1, size=(16, 4)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).double()
    y = logits.argmax(1).numpy()
    top2 = logits.topk(2, 1).values
    gap = float(np.median((top2[:, 0] - top2[:, 1]).numpy()))
    real = LipschitzBound.rounding

    def inflated(self, xx, radius=None, norm="l2"):
        # E_ball − E(x) = gap/2 per logit: a point is skipped where a margin is ≤ gap
        ec, eb = real(self, xx, radius, norm)
        return ec, (eb + gap / 2 if eb is not None else None)

    monkeypatch.setattr(LipschitzBound, "rounding", inflated)
    searched: list[int] = []
    real_local = sr.local_radius

    def counting(bound, x0, *a, **k):
        searched.append(x0.shape[0])
        return real_local(bound, x0, *a, **k)

    monkeypatch.setattr(sr, "local_radius", counting)
    skipped: list[int] = []
    real_skip = sr._uncertifiable

    def recording(*a):
        out = real_skip(*a)
        skipped.append(int(out.sum()))
        return out

    kw = dict(norms=["l2", "linf"], local_bound="crown-ibp", clever_samples=2,
              clever_batches=2, estimate_steps=0, bisection_steps=4, attack_steps=5)
    monkeypatch.setattr(sr, "_uncertifiable", recording)
    fast = _run(net, x, y, input_range=(-2.0, 2.0), **kw)
    calls_fast, n_skipped = list(searched), sum(skipped)
    searched.clear()
    monkeypatch.setattr(sr, "_uncertifiable",
                        lambda a, *_: torch.zeros(a.shape[0], dtype=torch.bool))
    full = _run(net, x, y, input_range=(-2.0, 2.0), **kw)
    assert 0 < n_skipped < 2 * len(x)  # some points of each norm skipped, not all
    assert sum(calls_fast) < sum(searched)
    for nm in ("l2", "linf"):
        assert np.isfinite(full.per_point[f"lower_local@{nm}"]).any()  # the bound certifies
    for key, v in full.per_point.items():
        np.testing.assert_array_equal(fast.per_point[key], v, err_msg=key)


def test_clever_jacobian_equals_the_batched_jacobian_bit_for_bit(monkeypatch, request) -> None:
    """CLEVER's input Jacobians by forward passes of a few images and C plain backward passes
    each are exactly, bit for bit, those of one backward batched over the C one-hot rows
    (what it computes when everything fits its memory budget), on a convolutional network
    with batch norm and residual blocks, over several sub-batches of images and a remainder;
    and they are the true Jacobian (float64 finite differences of a smooth network agree).
    On one thread: with several, a convolution's sums may be split differently for batches
    of different sizes (seen here at ROBUST_CERT_THREADS=2 after other tests), so the bits
    then depend on the pass sizes, which the memory budget fixes (never the timing)."""
    import robust_cert.metrics.safe_radius as sr
    from tests.architectures import ResNet18

    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = ResNet18(num_classes=10, width=4).eval()
    xs = torch.rand(23, 3, 32, 32)
    per_image, classes = sr._activation_bytes(net, xs)
    assert per_image > 0
    view = robust_cert.load_model(net, input_shape=(3, 32, 32)).attack_module()
    assert sr._activation_bytes(view, xs) == (per_image, classes)  # the view's network
    assert classes == 10
    monkeypatch.setattr(sr, "_JACOBIAN_BYTES", 8 * per_image)  # 3 passes: 8, 8, 7 images
    passes = []
    hook = net.register_forward_pre_hook(lambda _m, args: passes.append(args[0].shape[0]))
    got = sr._input_jacobian(net, xs)
    assert passes == [1, 8, 8, 7]  # the measuring pass, then the three
    monkeypatch.setattr(sr, "_JACOBIAN_BYTES", 23 * 10 * per_image)  # all rows at once
    passes.clear()
    batched = sr._input_jacobian(net, xs)
    hook.remove()
    assert passes == [1, 23]
    assert torch.equal(batched, got)
    xb = xs.clone().requires_grad_(True)
    logits = net(xb)
    eye = torch.eye(10)
    want = torch.autograd.grad(logits, xb, grad_outputs=eye[:, None, :].expand(10, 23, 10),
                               is_grads_batched=True)[0].flatten(2)
    assert got.shape == (10, 23, 3 * 32 * 32)
    assert torch.equal(got, want)
    smooth = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    jac = sr._input_jacobian(smooth, x)  # (3, 4, 5)
    for i in range(4):
        full = torch.autograd.functional.jacobian(smooth, x[i])  # (3, 5)
        torch.testing.assert_close(jac[:, i], full, rtol=0, atol=1e-12)
        fd = torch.stack([(smooth(x[i] + h) - smooth(x[i] - h)) / 2e-6
                          for h in torch.eye(5, dtype=torch.float64) * 1e-6], 1)
        torch.testing.assert_close(jac[:, i], fd, rtol=1e-6, atol=1e-7)


# --- a gradient twin: the bound would be of the twin, not of the deployed graph --------------


class _Wrapped(nn.Module):
    """The same linear model behind a different object: a stand-in for a deployed graph."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_a_gradient_twin_makes_the_lower_bound_not_applicable() -> None:
    import dataclasses

    x, y, _ = _data(n=12)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    twin = _binary()
    clf = robust_cert.load_model(_Wrapped(twin), input_shape=data.input_shape)
    clf = dataclasses.replace(clf, gradient_forward=twin)
    kw = dict(norms=["l2", "linf"], clever_samples=5, bisection_steps=3)
    res = SafeRadius(SafeRadiusConfig(radii=[0.1], **kw)).run(
        clf, data, RunContext(CPU, batch_size=32, seed=0))
    assert res.status == "not_applicable"
    assert "gradient twin" in res.reason
    assert "deployed graph" in res.reason
    assert res.proportions == []
    assert res.diagnostics["lower_bound"] == "not applicable: " + res.reason
    for nm in ("l2", "linf"):  # the diagnostics are still reported
        assert np.isnan(res.per_point[f"lower@{nm}"]).all()
        assert np.isfinite(res.per_point[f"clever@{nm}"]).all()
        assert np.isfinite(res.per_point[f"upper@{nm}"]).any()
    # without radii: no certified proportion, status ok, the reason in the diagnostics
    free = SafeRadius(SafeRadiusConfig(**kw)).run(clf, data,
                                                  RunContext(CPU, batch_size=32, seed=0))
    assert free.status == "ok"
    assert free.proportions == []
    assert "gradient twin" in free.diagnostics["lower_bound"]


def test_onnx_with_a_twin_gives_no_certified_safe_radius(tmp_path) -> None:
    """End to end: an ONNX export certified with its PyTorch twin — the safe-radius
    requirement is INCONCLUSIVE, naming the twin; the witness and CLEVER are still reported."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(40, 4)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    policy = {"name": "twin-safe-radius", "confidence": 0.95, "metrics": {
        "accuracy": {},
        "safe_radius": {"norms": ["l2"], "radii": [0.01], "clever_batches": 2,
                        "clever_samples": 4, "bisection_steps": 4, "attack_steps": 3}},
        "requirements": [{"metric": "accuracy", "at_least": 0.5},
                         {"metric": "safe_radius", "norm": "l2", "radius": 0.01,
                          "at_least": 0.1}]}
    cert = robust_cert.certify(str(path), (x, y), policy, seed=0, progress=False,
                               gradient_twin=model)
    sr = next(r for r in cert.results if r["metric"] == "safe_radius")
    assert sr["status"] == "not_applicable"
    assert "gradient twin" in sr["reason"]
    assert sr["values"] == []
    assert np.isfinite(cert.per_point["safe_radius/clever@l2"]).all()
    outcome = next(o for o in cert.requirements if o["metric"] == "safe_radius")
    assert outcome["verdict"] == "INCONCLUSIVE"
    assert "gradient twin" in outcome["reason"]
    # the same network as a PyTorch model: the bound applies and the proportion is produced
    ref = robust_cert.certify(model, (x, y), policy, seed=0, progress=False)
    ref_sr = next(r for r in ref.results if r["metric"] == "safe_radius")
    assert ref_sr["status"] == "ok"
    assert ref_sr["values"]


# --- the bound is cached per network (issue 14: blocks of a sharded run) ---------------------


def test_bound_cache_reuses_only_an_unchanged_network(monkeypatch) -> None:
    """One metric instance runs many blocks: the network is bounded once while it is
    unchanged, and bounded again after any change (in place, through ``.data``, train mode, a
    different module with the same weights) — each result equal to a fresh instance's."""
    import robust_cert.metrics.safe_radius as sr

    calls = []
    real = sr.lipschitz_bound
    monkeypatch.setattr(sr, "lipschitz_bound", lambda *a: calls.append(1) or real(*a))
    x, y, _ = _data(n=10)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    cfg = SafeRadiusConfig(norms=["l2", "linf"], radii=[0.1], clever_samples=5,
                           bisection_steps=3, attack_steps=3)
    shared = SafeRadius(cfg)

    def check(model, expect_calls):
        clf = robust_cert.load_model(model, input_shape=(4,))
        before = len(calls)
        got = shared.run(clf, data, RunContext(CPU, batch_size=4, seed=0))
        assert len(calls) - before == expect_calls
        ref = SafeRadius(cfg).run(clf, data, RunContext(CPU, batch_size=4, seed=0))
        for k, v in ref.per_point.items():
            np.testing.assert_array_equal(got.per_point[k], v)
        assert got.diagnostics == ref.diagnostics
        return got.per_point["lower@l2"]

    lin = _binary()
    first = check(lin, 1)
    np.testing.assert_array_equal(check(lin, 0), first)  # unchanged: reused
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place: a new version
    doubled = check(lin, 1)
    g2 = x.astype(np.float64) @ (2 * W) + float(np.float32(B))
    exact = np.abs(g2) / (2 * DUAL["l2"])
    assert (doubled <= exact).all()
    np.testing.assert_allclose(doubled, exact, atol=1e-5)  # within the rounding slack
    lin.weight.data.mul_(0.5)  # through .data: same version, caught by the fingerprint
    np.testing.assert_array_equal(check(lin, 1), first)
    np.testing.assert_array_equal(check(_binary(), 1), first)  # another module, same weights
    wrapped = nn.Sequential(_binary(), nn.Dropout(0.5)).eval()
    check(wrapped, 1)
    wrapped[1].train()  # a mode change: dropout on cannot be bounded
    clf = robust_cert.load_model(wrapped, input_shape=(4,))
    wrapped[1].train()  # load_model puts the module in eval mode
    res = shared.run(clf, data, RunContext(CPU, batch_size=4, seed=0))
    assert res.status == "not_applicable"
    assert "dropout in training mode" in res.reason
