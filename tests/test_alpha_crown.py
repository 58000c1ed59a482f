"""alpha-CROWN (robust_cert.bounds.local, ``alpha_steps``; issue 23): known answers where the
optimal relaxation is exact (one unstable ReLU, a max over two free elements), CROWN's
parameters reproducing CROWN's bound, soundness against sampling and attacks, never looser
than CROWN (bounds and radii), radii certified by a fresh bound, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_cert.bounds import lipschitz_bound, local_bounds, local_radius
from robust_cert.bounds.local import default_spec, local_analysis
from tests.test_local_bounds import _mixed, _pooled, _sampled_min


def _identity(n: int) -> nn.Linear:
    lin = nn.Linear(n, n)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n))
        lin.bias.zero_()
    return lin


def _forms(net, shape, x, r, norm, spec, steps=20):
    """(alpha-CROWN's own form, CROWN's) of the margins, lower bounds at r (IBP aside)."""
    local = local_analysis(lipschitz_bound(net, shape))
    rr = torch.full((x.shape[0],), r, dtype=torch.float64)
    _, form = local.forms(x, rr, norm, spec, None, "crown-ibp", alpha_steps=steps)
    assert form is not None
    assert form.alt is not None
    return form._lower(rr), form.alt.lower(rr), form.lower(rr)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_one_unstable_relu_gets_its_exact_minimum(norm) -> None:
    """relu(x) over [0.2 − 0.5, 0.2 + 0.5]: min 0. CROWN's adaptive lower slope is 1 there
    (u = 0.7 > −l = 0.3), bound −0.3; the best slope, 0, gives the exact 0."""
    net = nn.Sequential(_identity(1), nn.ReLU(), _identity(1)).eval()
    spec = torch.ones((1, 1, 1), dtype=torch.float64)
    own, crown, best = _forms(net, (1,), torch.tensor([[0.2]]), 0.5, norm, spec)
    assert float(crown[0, 0]) == pytest.approx(-0.3, abs=1e-7)
    assert float(own[0, 0]) <= 0.0
    assert float(own[0, 0]) == pytest.approx(0.0, abs=1e-7)
    assert torch.equal(best, own)


def test_a_max_of_two_free_elements_gets_its_exact_maximum() -> None:
    """max(z1, z2) over [−1, 1]²: at most 1. CROWN's upper weights λ = (½, ½) (both can be
    the max) give ½z1 + ½z2 + 1 ≤ 2; the best, λ = 0, gives c = max u_j = 1, exact. Its
    minimum, −1, is exact either way (the lower line is one of the elements)."""
    net = nn.Sequential(_identity(2), nn.Unflatten(1, (1, 1, 2)), nn.MaxPool2d((1, 2)),
                        nn.Flatten(), _identity(1)).eval()
    spec = torch.tensor([[[-1.0], [1.0]]], dtype=torch.float64)
    own, crown, best = _forms(net, (2,), torch.zeros((1, 2)), 1.0, "linf", spec)
    assert float(crown[0, 0]) == pytest.approx(-2.0, abs=1e-7)
    assert float(best[0, 0]) <= -1.0
    assert float(best[0, 0]) == pytest.approx(-1.0, abs=1e-7)
    assert float(best[0, 1]) == pytest.approx(-1.0, abs=1e-7)


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_crowns_own_parameters_reproduce_crowns_bound(method) -> None:
    """The alpha code paths (ReLU, max pooling, one relaxation per spec row) started at
    CROWN's parameters give CROWN's form: the first evaluation of the optimisation."""
    model = _pooled(2)
    x = torch.rand(5, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    local = local_analysis(bound)
    with torch.no_grad():
        spec = default_spec(model(x).double())
    r = torch.full((5,), 0.04, dtype=torch.float64)
    for norm in ("linf", "l2"):
        _, plain = local.forms(x, r, norm, spec, None, method)
        _, alpha = local.forms(x, r, norm, spec, None, method, alpha_steps=1)
        assert plain is not None
        assert alpha is not None
        assert alpha.alt is not None
        # equal up to the float64 allowance (REL_SLACK times magnitudes summed otherwise)
        assert float((alpha.alt.lower(r) - plain.lower(r)).abs().max()) < 1e-7
        for rr in (r, r / 2, torch.zeros_like(r)):
            assert (alpha.lower(rr) >= plain.lower(rr) - 1e-10).all()


def _pooled_case(points: int, norm: str):
    """The pooled network, ``points`` random inputs (from the current generator), its
    Lipschitz bound, the default margins and a radius per ``norm``."""
    model = _pooled(0)
    x = torch.rand(points, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    with torch.no_grad():
        spec = default_spec(model(x).double())
    r = torch.full((points,), {"linf": 0.05, "l2": 0.3, "l1": 0.8}[norm], dtype=torch.float64)
    return model, x, bound, spec, r


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("box", [None, (0.0, 1.0)])
def test_alpha_is_sound_and_never_looser_than_crown(norm, box) -> None:
    model, x, bound, spec, r = _pooled_case(6, norm)
    crown = local_bounds(bound, x, r, norm, spec, box=box, method="crown-ibp")
    alpha = local_bounds(bound, x, r, norm, spec, box=box, method="crown-ibp", alpha_steps=10)
    if box is None:  # _sampled_min samples the whole ball
        true = _sampled_min(model, x, spec, r, norm)
        assert (alpha.exact <= true + 1e-9).all(), float((alpha.exact - true).max())
    assert (alpha.exact >= crown.exact - 1e-10).all()
    assert (alpha.exact > crown.exact + 1e-6).any()  # and strictly tighter somewhere
    assert (alpha.lower <= alpha.exact).all()


class PaddedPool(nn.Module):
    """ReLUs, overlapping padded max pooling (the general path), a residual addition."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        z = F.max_pool2d(F.relu(self.c1(x)), 3, stride=2, padding=1)  # 6×4×4
        z = z + F.relu(self.c2(z))
        return self.fc(z.flatten(1))


@pytest.mark.parametrize(("points", "setting", "slack"), [
    (6, {"alpha_steps": 10}, 1e-10),  # the margin's own slopes
    (4, {"alpha_intermediate": 8}, 0.0),  # the intermediate bounds' slopes: never looser at all
], ids=["alpha", "intermediate"])
def test_alpha_is_sound_through_padded_pooling_and_a_residual(points, setting, slack) -> None:
    torch.manual_seed(4)
    model = PaddedPool().eval()
    x = torch.rand(points, 2, 8, 8)
    bound = lipschitz_bound(model, (2, 8, 8))
    with torch.no_grad():
        spec = default_spec(model(x).double())
    for norm, rad in (("linf", 0.03), ("l2", 0.15)):
        r = torch.full((points,), rad, dtype=torch.float64)
        crown = local_bounds(bound, x, r, norm, spec, method="crown")
        alpha = local_bounds(bound, x, r, norm, spec, method="crown", **setting)
        true = _sampled_min(model, x, spec, r, norm)
        assert (alpha.exact <= true + 1e-9).all(), float((alpha.exact - true).max())
        assert (alpha.exact >= crown.exact - slack).all()
        assert (alpha.exact > crown.exact + 1e-6).any()


def test_a_constant_relaxation_before_the_margins_leaves_crowns_bound() -> None:
    """tanh is relaxed by constants: no coefficient reaches the ReLUs and poolings before
    it, so there is nothing to optimise and the bound is CROWN's."""
    model = _mixed()
    x = torch.rand(4, 2, 8, 8)
    bound = lipschitz_bound(model, (2, 8, 8))
    crown = local_bounds(bound, x, 0.01, "linf")
    alpha = local_bounds(bound, x, 0.01, "linf", alpha_steps=5)
    assert torch.equal(alpha.exact, crown.exact)


def test_alpha_radius_is_at_least_crowns_and_certified_by_a_fresh_bound() -> None:
    model = _pooled(1)
    x = torch.rand(10, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    wider = 0
    for norm, big in (("linf", 0.045), ("l2", 0.2)):
        r0 = local_radius(bound, x, big, norm, method="crown-ibp")
        r1 = local_radius(bound, x, big, norm, method="crown-ibp", alpha_steps=10)
        assert (r1 >= r0).all()
        assert (r1 <= big).all()
        wider += int((r1 > r0 * 1.01).sum())
        pos = r1 > 0
        if not pos.any():
            continue
        fresh = local_bounds(bound, x[pos], r1[pos], norm, method="crown-ibp", alpha_steps=10)
        assert (fresh.lower > 0).all()
        with torch.no_grad():
            spec = default_spec(model(x[pos]).double())
        true = _sampled_min(model, x[pos], spec, r1[pos], norm, count=2000)
        assert (true > 0).all()
    assert wider


def test_negative_alpha_steps_are_refused() -> None:
    model = _pooled(0)
    bound = lipschitz_bound(model, (1, 8, 8))
    with pytest.raises(ValueError, match="alpha_steps must be >= 0"):
        local_bounds(bound, torch.rand(1, 1, 8, 8), 0.01, "linf", alpha_steps=-1)


def test_safe_radius_with_alpha_steps_certifies_at_least_as_much() -> None:
    """The metric's setting: on these points the certified radius with alpha-CROWN is at
    least CROWN-IBP's alone and larger on some (each fit is never looser; the searches'
    trial radii may differ), below every witness; a negative number of steps is refused by
    the policy's validation."""
    import numpy as np
    import pydantic

    import robust_cert
    from robust_cert.metrics.base import RunContext
    from robust_cert.metrics.safe_radius import SafeRadius, SafeRadiusConfig
    from tests.test_safe_radius import CPU

    model = _pooled(1)
    x = torch.rand(12, 1, 8, 8).numpy()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = robust_cert.load_data((x, y), input_range=(0.0, 1.0))
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    out = {}
    for steps in (0, 10):
        cfg = SafeRadiusConfig(norms=["linf"], local_bound="crown-ibp", alpha_steps=steps,
                               within_box=True, clever_batches=2, clever_samples=1,
                               estimate_steps=0)
        out[steps] = SafeRadius(cfg).run(clf, data, RunContext(CPU, batch_size=12, seed=0))
    lo0, lo1 = out[0].per_point["lower@linf"], out[10].per_point["lower@linf"]
    up = out[10].per_point["upper@linf"]
    assert (lo1 >= lo0 * (1 - 1e-12)).all()
    assert (lo1 > lo0 * 1.01).any()
    assert (lo1 <= up).all()
    assert out[10].diagnostics["linf"]["sandwich_violations"] == 0
    assert np.isfinite(lo1).all()
    with pytest.raises(pydantic.ValidationError, match="alpha_steps"):
        SafeRadiusConfig(alpha_steps=-1)


# ---- alpha-CROWN of the intermediate bounds (``alpha_intermediate``)


class _Kinked(nn.Module):
    """z = relu(x) − x/2 (an intermediate node feeding a ReLU), output relu(z)."""

    def forward(self, x):
        return torch.relu(torch.relu(x) - 0.5 * x)


def _z_interval(net, x, r, norm, steps):
    """The interval of _Kinked's node z over the ball: CROWN's (steps 0) or alpha-CROWN's."""
    bound = lipschitz_bound(net, (1,))
    local = local_analysis(bound)
    (z,) = [n for n in local.refined if local.slopes_below[n]]
    rr = torch.full((x.shape[0],), r, dtype=torch.float64)
    xd = x.double()
    inp = (xd, rr, xd - r, xd + r, norm, None)
    with torch.no_grad():
        values = local.graph._evaluate(x)
        ctx = local._intervals(values, inp, True, None, steps)
    return float(ctx.lower[z][0, 0]), float(ctx.upper[z][0, 0])


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_an_intermediate_bound_gets_its_exact_minimum(norm) -> None:
    """x ∈ [0.2 − 0.5, 0.2 + 0.5] = [−0.3, 0.7]: z = relu(x) − x/2 has the exact range
    [0, 0.35]; IBP gives [−0.35, 0.85]. CROWN's lower slope of relu(x) is 1 (0.7 > 0.3):
    z ≥ x/2 ≥ −0.15. The best slope, ½, gives z ≥ 0, exact; the upper chord's 0.35 is exact
    either way."""
    net = _Kinked().eval()
    x = torch.tensor([[0.2]])
    lo0, hi0 = _z_interval(net, x, 0.5, norm, 0)
    lo1, hi1 = _z_interval(net, x, 0.5, norm, 30)
    assert lo0 == pytest.approx(-0.15, abs=1e-7)
    assert hi0 == pytest.approx(0.35, abs=1e-7)
    assert lo1 <= 0.0
    assert lo1 == pytest.approx(0.0, abs=1e-6)
    assert hi1 == pytest.approx(0.35, abs=1e-7)
    assert hi1 >= 0.35


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_intermediate_alpha_is_sound_and_never_looser_than_crown(norm) -> None:
    """On a two-conv network with max pooling: every margin's bound with the intermediate
    bounds optimised (and the margins' too) is at most the sampled and attacked minimum,
    never below CROWN's, and above it somewhere."""
    torch.manual_seed(0)
    model, x, bound, spec, r = _pooled_case(5, norm)
    crown = local_bounds(bound, x, r, norm, spec, method="crown")
    inter = local_bounds(bound, x, r, norm, spec, method="crown", alpha_intermediate=10)
    both = local_bounds(bound, x, r, norm, spec, method="crown", alpha_steps=10,
                        alpha_intermediate=10)
    true = _sampled_min(model, x, spec, r, norm)
    for res in (inter, both):
        assert (res.exact <= true + 1e-9).all(), float((res.exact - true).max())
        assert (res.exact >= crown.exact).all()
        assert (res.lower <= res.exact).all()
    assert (inter.exact > crown.exact + 1e-6).any()


def test_intermediate_alpha_radius_is_at_least_crowns_and_certified_by_a_fresh_bound() -> None:
    """(Where the radius is strictly larger is a matter of the trial radius: the bounds'
    test above shows the margins' bounds strictly tighter.)"""
    torch.manual_seed(0)
    model = _pooled(1)
    x = torch.rand(6, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    for norm, big in (("linf", 0.05), ("l2", 0.15)):
        r0 = local_radius(bound, x, big, norm, method="crown")
        r1 = local_radius(bound, x, big, norm, method="crown", alpha_intermediate=10)
        assert (r1 >= r0).all()
        assert (r1 <= big).all()
        pos = r1 > 0
        assert pos.any()
        fresh = local_bounds(bound, x[pos], r1[pos], norm, method="crown",
                             alpha_intermediate=10)
        assert (fresh.lower > 0).all()
        with torch.no_grad():
            spec = default_spec(model(x[pos]).double())
        true = _sampled_min(model, x[pos], spec, r1[pos], norm, count=2000)
        assert (true > 0).all()


def test_intermediate_alpha_without_crowns_intermediate_bounds_changes_nothing() -> None:
    """crown-ibp and ibp tighten no intermediate node: the setting leaves their bounds."""
    model = _pooled(0)
    x = torch.rand(3, 1, 8, 8)
    bound = lipschitz_bound(model, (1, 8, 8))
    for method in ("crown-ibp", "ibp"):
        a = local_bounds(bound, x, 0.05, "linf", method=method)
        b = local_bounds(bound, x, 0.05, "linf", method=method, alpha_intermediate=5)
        assert torch.equal(a.exact, b.exact)


def test_intermediate_alpha_memory_estimate_and_bad_input() -> None:
    import pydantic

    from robust_cert.metrics.safe_radius import SafeRadiusConfig

    model = _pooled(0)
    bound = lipschitz_bound(model, (1, 8, 8))
    local = local_analysis(bound)
    assert local.bytes_per_point("crown", 2, alpha_intermediate=5) > \
        local.bytes_per_point("crown", 2)
    assert local.bytes_per_point("crown-ibp", 2, alpha_intermediate=5) == \
        local.bytes_per_point("crown-ibp", 2)
    with pytest.raises(ValueError, match="alpha_intermediate must be >= 0"):
        local_bounds(bound, torch.rand(1, 1, 8, 8), 0.01, "linf", alpha_intermediate=-1)
    with pytest.raises(pydantic.ValidationError, match="alpha_intermediate"):
        SafeRadiusConfig(alpha_intermediate=-1)
