"""Local bounds (IBP and CROWN, robust_cert.bounds.local; issue 23): known answers on linear
models, soundness against dense sampling and attacks on small random networks with every
supported op, CROWN at least as tight as IBP, chunking within the memory budget, and ops
without a bound named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_cert.bounds import NotBoundable, lipschitz_bound, local_bounds, register_bound_op
from robust_cert.bounds import registry as reg
from robust_cert.bounds.base import BoundOp
from robust_cert.bounds.local import default_spec, local_analysis
from tests.architectures import ResNet18

DUAL = {"linf": 1, "l2": 2, "l1": math.inf}


def _linear(d=12, c=2, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c).eval()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_crown_on_a_linear_model_is_the_exact_minimum(norm) -> None:
    """|g| − r‖w‖_q (q dual to the norm of the ball), up to the float slack; for L1 the
    certified radius |g|/‖w‖_∞."""
    model = _linear()
    x = torch.rand(20, 12)
    bound = lipschitz_bound(model, (12,))
    w = (model.weight[1].double() - model.weight[0].double()).detach()
    b = float(model.bias[1].detach()) - float(model.bias[0].detach())
    g = (x.double() @ w + b).detach()
    r = 0.3 * g.abs() / w.norm(p=DUAL[norm])
    res = local_bounds(bound, x, r, norm)
    exact = g.abs() - r * w.norm(p=DUAL[norm])
    assert (res.exact[:, 0] <= exact).all()
    assert (exact - res.exact[:, 0]).max() < 1e-7
    assert (res.lower <= res.exact).all()
    assert (res.exact - res.lower).max() < 1e-5
    # at the exact radius |g|/‖w‖_q the bound is ≤ 0, just below it > 0
    msr = g.abs() / w.norm(p=DUAL[norm])
    assert (local_bounds(bound, x, msr, norm).lower[:, 0] <= 0).all()
    assert (local_bounds(bound, x, msr * (1 - 1e-2), norm).lower[:, 0] > 0).all()


class Mixed(nn.Module):
    """Every op with a local bound: conv (stride, dilation, groups), BatchNorm, ReLU,
    LeakyReLU, Hardtanh, tanh, max and average pooling, residual add/sub, scaling, negation,
    concatenation, flatten/view, a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 2 * 2 + 8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        z = F.relu(self.bn(self.c1(x)))
        z = z + 0.5 * F.leaky_relu(self.c2(z), 0.1)  # residual
        y = F.hardtanh(self.c3(z), -0.5, 2.0)  # 6×4×4
        y = F.max_pool2d(y, 3, stride=2, padding=1)  # 6×2×2, overlapping, padded
        a = F.avg_pool2d(-z, 4)  # 8×2×2
        h = torch.cat([y.flatten(1), a.view(a.shape[0], -1)], dim=1)
        h = torch.tanh(self.fc1(h) - 0.1)
        return self.fc2(h)


def _mixed():
    torch.manual_seed(1)
    m = Mixed()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def _ball(x, r, norm, count, g):
    p, d = x.shape[0], x[0].numel()
    if norm == "linf":
        delta = (torch.rand((p, count, d), generator=g) * 2 - 1)
        delta = torch.where(torch.rand((p, count, d), generator=g) < 0.5, delta.sign(), delta)
    elif norm == "l2":
        delta = torch.randn((p, count, d), generator=g)
        delta = delta / delta.norm(dim=-1, keepdim=True)
    else:  # vertices and random points of the L1 ball
        delta = torch.randn((p, count, d), generator=g) ** 3
        delta = delta / delta.abs().sum(-1, keepdim=True)
    scale = r.view(-1, 1, *[1] * (x.ndim - 1)).to(x.dtype)
    return x[:, None] + delta.view(p, count, *x.shape[1:]) * scale


def _sampled_min(model, x, spec, r, norm, count=3000):
    """min over samples in the ball, and over a PGD attack on each margin (an upper bound on
    the true minimum)."""
    g = torch.Generator().manual_seed(0)
    xs = _ball(x, r, norm, count, g)
    with torch.no_grad():
        f = model(xs.flatten(0, 1)).double().view(x.shape[0], count, -1)
    best = torch.einsum("psc,pkc->psk", spec, f).amin(-1)
    for s in range(spec.shape[1]):  # PGD on margin s, per point
        delta = torch.zeros_like(x, requires_grad=True)
        rr = r.view(-1, *[1] * (x.ndim - 1)).float()
        for _ in range(30):
            m = (model(x + delta).double() * spec[:, s]).sum()
            (grad,) = torch.autograd.grad(m, delta)
            with torch.no_grad():
                if norm == "linf":
                    delta -= 0.1 * rr * grad.sign()
                    delta.copy_(torch.maximum(torch.minimum(delta, rr), -rr))
                else:
                    gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(rr)
                    delta -= 0.2 * rr * grad / gn
                    dn = delta.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(rr)
                    delta *= (rr / dn).clamp(max=1.0)
        if norm != "l1":
            with torch.no_grad():
                val = (model(x + delta).double() * spec[:, s]).sum(-1)
            best[:, s] = torch.minimum(best[:, s], val)
    return best


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_crown_is_sound_and_at_least_as_tight_as_ibp_on_a_mixed_network(norm) -> None:
    model = _mixed()
    x = torch.rand(6, 2, 8, 8)
    bound = lipschitz_bound(model, (2, 8, 8))
    with torch.no_grad():
        spec = default_spec(model(x).double())
    r = torch.full((6,), {"linf": 0.01, "l2": 0.05, "l1": 0.2}[norm], dtype=torch.float64)
    crown = local_bounds(bound, x, r, norm, spec)
    ibp = local_bounds(bound, x, r, norm, spec, method="ibp")
    true = _sampled_min(model, x, spec, r, norm)
    assert (crown.exact <= true + 1e-9).all(), float((crown.exact - true).max())
    assert (crown.exact >= ibp.exact - 1e-12).all()
    assert (crown.exact > ibp.exact + 1e-6).any()  # and strictly tighter somewhere
    assert (crown.lower <= crown.exact).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crown_on_random_relu_nets_is_below_the_true_minimum(seed) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                        nn.Linear(24, 3)).eval()
    x = torch.rand(8, 5)
    bound = lipschitz_bound(net, (5,))
    with torch.no_grad():
        spec = default_spec(net(x).double())
    for norm in ("linf", "l2"):
        r = torch.full((8,), 0.15, dtype=torch.float64)
        crown = local_bounds(bound, x, r, norm, spec)
        ibp = local_bounds(bound, x, r, norm, spec, method="ibp")
        true = _sampled_min(net, x, spec, r, norm, count=20000)
        assert (crown.exact <= true + 1e-9).all()
        assert (crown.exact >= ibp.exact - 1e-12).all()
        # CROWN is close to the true minimum on these small nets (IBP is not)
        assert float((true - crown.exact).mean()) < 0.5 * float((true - ibp.exact).mean())


def test_the_input_box_tightens_and_stays_sound() -> None:
    model = _linear(d=6)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0, 0.2]])
    bound = lipschitz_bound(model, (6,))
    free = local_bounds(bound, x, 0.3, "linf")
    boxed = local_bounds(bound, x, 0.3, "linf", box=(0.0, 1.0))
    w = (model.weight[1].double() - model.weight[0].double()).detach()
    sign = float(default_spec(model(x).double())[0, 0, 1])
    lo, hi = (x.double() - 0.3).clamp(0, 1), (x.double() + 0.3).clamp(0, 1)
    a = sign * w
    exact = (a.clamp(min=0) * lo + a.clamp(max=0) * hi).sum() + sign * (
        float(model.bias[1]) - float(model.bias[0]))
    assert float(boxed.exact[0, 0]) == pytest.approx(float(exact), abs=1e-7)
    assert float(boxed.exact[0, 0]) <= float(exact) + 1e-12
    assert boxed.exact[0, 0] > free.exact[0, 0]


def test_chunks_within_the_memory_budget_give_the_same_bounds() -> None:
    model = _mixed()
    x = torch.rand(5, 2, 8, 8)
    bound = lipschitz_bound(model, (2, 8, 8))
    whole = local_bounds(bound, x, 0.01, "linf")
    per = local_analysis(bound).bytes_per_point("crown", 3)
    chunked = local_bounds(bound, x, 0.01, "linf", max_memory=2 * per)
    assert torch.allclose(whole.lower, chunked.lower, rtol=0, atol=1e-9)
    # below one point's estimate, crown tightens each node by fewer rows at a time: the same
    # bounds (the rows never mix)
    rows = local_bounds(bound, x, 0.01, "linf", max_memory=per // 2)
    assert torch.allclose(whole.lower, rows.lower, rtol=0, atol=1e-9)
    with pytest.raises(NotBoundable, match="max_bound_memory"):
        local_bounds(bound, x, 0.01, "linf", method="crown-ibp",
                     max_memory=local_analysis(bound).bytes_per_point("crown-ibp", 3) // 2)
    with pytest.raises(NotBoundable, match="max_bound_memory"):
        local_bounds(bound, x, 0.01, "linf", max_memory=local_analysis(
            bound).bytes_per_point("crown", 3, max_rows=2) // 2)


def test_tightening_rows_in_parts_gives_the_same_bounds() -> None:
    """crown with at most 8 or 50 tightening rows at a time: the bounds of all at once,
    in every norm (a ResNet: residual additions, BatchNorm, strided convolutions)."""
    torch.manual_seed(0)
    model = ResNet18(width=4).eval()
    x = torch.rand(2, 3, 8, 8)
    bound = lipschitz_bound(model, (3, 8, 8))
    local = local_analysis(bound)
    with torch.no_grad():
        spec = default_spec(model(x).double())
    for norm, r in (("linf", 2e-3), ("l2", 1e-2)):
        rr = torch.full((2,), r, dtype=torch.float64)
        whole = local.margins(x, rr, norm, spec, None, "crown")
        for rows in (8, 50):
            part = local.margins(x, rr, norm, spec, None, "crown", max_rows=rows)
            assert torch.allclose(whole, part, rtol=1e-12, atol=1e-12)


def test_a_resnet_is_bounded_by_crown() -> None:
    torch.manual_seed(0)
    model = ResNet18(width=4).eval()
    x = torch.rand(2, 3, 8, 8)
    bound = lipschitz_bound(model, (3, 8, 8))
    crown = local_bounds(bound, x, 1e-3, "linf")
    ibp = local_bounds(bound, x, 1e-3, "linf", method="ibp")
    with torch.no_grad():
        spec = default_spec(model(x).double())
        f = model(x).double()
    at_x = torch.einsum("psc,pc->ps", spec, f)
    assert (crown.exact <= at_x).all()
    assert (crown.exact >= ibp.exact - 1e-12).all()


class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_an_op_without_a_local_bound_is_named(monkeypatch) -> None:
    monkeypatch.setattr(reg, "_MODULES", dict(reg._MODULES))

    class SquareBound(BoundOp):
        def lipschitz(self, call, params):
            return call.step("act", l2=2.0, linf=2.0, info="Square")

    register_bound_op(SquareBound(), modules=[Square])
    net = nn.Sequential(nn.Linear(3, 3), Square(), nn.Linear(3, 2)).eval()
    bound = lipschitz_bound(net, (3,))
    with pytest.raises(NotBoundable, match=r"Square at \w+ has no interval bound \(IBP\)"):
        local_bounds(bound, torch.rand(2, 3), 0.1, "l2")


def _pooled(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(24, 3)).eval()


@pytest.mark.parametrize("switch", ["pooling.TILED_FAST_PATH", "activations.RELU_FAST_PATH"])
def test_fast_paths_give_the_general_paths_bounds(monkeypatch, switch) -> None:
    """Tiled max pooling and ReLU have their own code: the bounds of the general one."""
    from robust_cert.bounds import ops
    model = _pooled()
    x = torch.rand(4, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    fast = local_bounds(bound, x, 0.05, "linf")
    module, name = switch.split(".")
    monkeypatch.setattr(getattr(ops, module), name, False)
    general = local_bounds(bound, x, 0.05, "linf")
    assert torch.allclose(fast.exact, general.exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_local_radius_on_a_linear_model_is_the_exact_radius(norm) -> None:
    """|g|/‖w‖_q from below, to the float slack; a trial radius below it is returned as is."""
    from robust_cert.bounds import local_radius
    model = _linear()
    x = torch.rand(20, 12)
    bound = lipschitz_bound(model, (12,))
    w = (model.weight[1].double() - model.weight[0].double()).detach()
    b = float(model.bias[1].detach()) - float(model.bias[0].detach())
    msr = (x.double() @ w + b).detach().abs() / w.norm(p=DUAL[norm])
    r = local_radius(bound, x, 2 * msr, norm)
    assert (r <= msr).all()
    # short of it by the float32 rounding allowance of the margin (< 1e-5, as above)
    assert float(((msr - r) * w.norm(p=DUAL[norm])).max()) < 1e-5
    assert torch.equal(local_radius(bound, x, 0.5 * msr, norm), 0.5 * msr)


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_local_radius_is_certified_by_a_fresh_bound_and_never_flips(method) -> None:
    """The radius found with the relaxations of a larger ball: a bound fitted to its own ball
    is positive there too, and no sampled input in it changes the prediction."""
    from robust_cert.bounds import local_radius
    model = _pooled(1)
    x = torch.rand(10, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    found = 0
    for norm, big in (("linf", 0.045), ("l2", 0.2)):  # some points in (0, big), some 0
        r = local_radius(bound, x, big, norm, method=method)
        assert (r <= big).all()
        pos = r > 0
        found += int(pos.sum())
        if not pos.any():
            continue
        fresh = local_bounds(bound, x[pos], r[pos], norm, method=method)
        assert (fresh.lower > 0).all()
        with torch.no_grad():
            spec = default_spec(model(x[pos]).double())
        true = _sampled_min(model, x[pos], spec, r[pos], norm, count=2000)
        assert (true > 0).all()
    assert found


def test_crown_ibp_is_sound_and_between_ibp_and_the_true_minimum() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                        nn.Linear(24, 3)).eval()
    x = torch.rand(8, 5)
    bound = lipschitz_bound(net, (5,))
    with torch.no_grad():
        spec = default_spec(net(x).double())
    r = torch.full((8,), 0.15, dtype=torch.float64)
    mid = local_bounds(bound, x, r, "linf", spec, method="crown-ibp")
    ibp = local_bounds(bound, x, r, "linf", spec, method="ibp")
    true = _sampled_min(net, x, spec, r, "linf", count=20000)
    assert (mid.exact <= true + 1e-9).all()
    assert (mid.exact >= ibp.exact - 1e-12).all()
    assert (mid.exact > ibp.exact + 1e-6).any()


def test_the_l2_ball_within_the_box_is_bounded_by_its_exact_minimum() -> None:
    """min a·x over ‖x − x0‖₂ ≤ r ∩ [0, 1]^d: the dual bound against SLSQP (an independent
    solver), below it and within 1e-6; tighter than the ball alone where x0 sits on a face."""
    from scipy.optimize import minimize

    from robust_cert.bounds.local import _l2_box_min
    rng = np.random.default_rng(0)
    d, s = 6, 3
    x0 = rng.uniform(0, 1, (4, d))
    x0[:, :3] = 0.0  # on the lower face (a digit's background)
    a = rng.normal(size=(4, s, d))
    r = np.array([0.05, 0.3, 0.8, 3.0])
    got = _l2_box_min(torch.from_numpy(a), torch.from_numpy(x0), torch.from_numpy(r),
                      (0.0, 1.0)).numpy()
    for p in range(4):
        for j in range(s):
            cons = {"type": "ineq", "fun": lambda x, p=p: r[p] ** 2 - ((x - x0[p]) ** 2).sum()}
            best = minimize(lambda x, p=p, j=j: a[p, j] @ x, x0[p], bounds=[(0, 1)] * d,
                            constraints=[cons], method="SLSQP", options={"ftol": 1e-12})
            assert got[p, j] <= best.fun + 1e-9
            assert got[p, j] >= best.fun - 1e-6
            ball = a[p, j] @ x0[p] - r[p] * np.linalg.norm(a[p, j])
            assert got[p, j] >= ball - 1e-12
    assert (got > (np.einsum("psd,pd->ps", a, x0) - r[:, None] * np.linalg.norm(a, axis=2))
            + 1e-3).any()


def _reference_radius(local, x, big, norm, spec, box, method, thr):
    """local_radius without its shortcuts: every row of every point back-substituted, the
    bisection over all of them (:data:`RADIUS_STEPS` steps)."""
    from robust_cert.bounds.local import RADIUS_STEPS
    ibp, form = local.forms(x, big, norm, spec, box, method)

    def ok(r):
        return ((torch.maximum(ibp, form.lower(r)) - thr) > 0).all(1)

    lo, hi = torch.zeros_like(big), big.clone()
    full, zero = ok(hi), ok(lo)
    for _ in range(RADIUS_STEPS):
        mid = (lo + hi) / 2
        good = ok(mid)
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    return torch.where(full, big, torch.where(zero, lo, torch.zeros_like(lo)))


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_local_radius_shortcuts_give_the_full_computations_radius(method) -> None:
    """Rows positive by IBP not back-substituted, points certified by IBP not bounded by
    CROWN, the bisection on the rows not positive at the trial radius only: the radius of
    the computation without them, bit for bit; and the rows kept by ``forms`` with a
    threshold are the full computation's rows."""
    from robust_cert.bounds.local import _radius_on_forms
    model = _pooled(2)
    x = torch.rand(16, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    local = local_analysis(bound)
    with torch.no_grad():
        spec = default_spec(model(x).double())
    g = torch.Generator().manual_seed(0)
    seen = {"full": 0, "zero": 0, "between": 0}
    for norm, big in (("linf", 0.03), ("l2", 0.15), ("l1", 0.5)):
        r = big * (0.2 + 1.8 * torch.rand(16, generator=g, dtype=torch.float64))
        thr = 1e-3 * torch.rand(16, spec.shape[1], generator=g, dtype=torch.float64)
        for box in (None, (0.0, 1.0)):
            want = _reference_radius(local, x, r, norm, spec, box, method, thr)
            got = _radius_on_forms(local, x, r, norm, spec, box, method, thr)
            assert torch.equal(got, want)
            seen["full"] += int((got == r).sum())
            seen["zero"] += int((got == 0).sum())
            seen["between"] += int(((got > 0) & (got < r)).sum())
        ibp, full = local.forms(x, r, norm, spec, (0.0, 1.0), method)
        ibp_t, part = local.forms(x, r, norm, spec, (0.0, 1.0), method,
                                  threshold=ibp.median())
        assert torch.equal(ibp, ibp_t)
        assert full is not None
        assert part is not None
        assert part.rows is not None
        assert part.valid is not None
        assert 0 < int(part.valid.sum()) < ibp.numel()
        kept = part.lower(r * 0.7)
        ref = full.lower(r * 0.7).gather(1, part.rows)
        assert torch.equal(kept[part.valid], ref[part.valid])
        assert (ibp.gather(1, part.rows)[part.valid] <= ibp.median()).all()
    assert all(seen.values()), seen  # every branch of the shortcuts taken


def test_crown_skips_refining_the_first_affine_op_in_linf_without_loss() -> None:
    """In L∞ the first affine op's IBP interval over the region (a box) is its exact range:
    CROWN refinement of it changes the bounds by no more than the float allowances, and in
    L2 it is still refined (there it tightens)."""
    model = _pooled(3)
    x = torch.rand(6, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    local = local_analysis(bound)
    assert len(local.box_exact) == 1
    assert local.box_exact < set(local.refined)
    skipped = {nm: local_bounds(bound, x, r, nm, box=(0.0, 1.0)).exact
               for nm, r in (("linf", 0.04), ("l2", 0.2))}
    kept = local.box_exact
    local.box_exact = set()
    try:
        full = {nm: local_bounds(bound, x, r, nm, box=(0.0, 1.0)).exact
                for nm, r in (("linf", 0.04), ("l2", 0.2))}
    finally:
        local.box_exact = kept
    assert torch.allclose(skipped["linf"], full["linf"], rtol=0, atol=1e-8)
    assert torch.equal(skipped["l2"], full["l2"])
