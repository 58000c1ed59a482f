"""Sound Lipschitz bounds of traced networks with functional ops (issue 12, section 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_cert
from robust_cert.bounds import NotBoundable, lipschitz_bound
from robust_cert.digits_cnn import DigitsCNN
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.safe_radius import SafeRadius, SafeRadiusConfig

CPU = torch.device("cpu")


class Functional(nn.Module):
    """Functional relu, max/avg pooling, a residual addition, batch norm, view, scaling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = h + F.relu(self.bn(self.conv2(h)))  # residual
        h = F.max_pool2d(h, 2)  # 8 -> 4
        h = F.avg_pool2d(h, 2) * 0.5  # 4 -> 2
        return self.fc(h.view(h.shape[0], -1))


def _trained_bn(model: Functional) -> Functional:
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def _max_dual_gradient(model, x, norm):
    """max over points and margin rows f_t − f_j of the dual norm of the input gradient."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    t = out.argmax(1)
    best = 0.0
    for j in range(out.shape[1]):
        m = out.gather(1, t[:, None])[:, 0] - out[:, j]
        (g,) = torch.autograd.grad(m.sum(), x, retain_graph=True)
        g = g.flatten(1).double()
        d = {"linf": g.abs().sum(1), "l2": g.norm(dim=1), "l1": g.abs().amax(1)}[norm]
        best = max(best, float(d.max()))
    return best


def test_functional_ops_and_residuals_are_bounded_soundly() -> None:
    torch.manual_seed(0)
    model = _trained_bn(Functional())
    bound = lipschitz_bound(model, (1, 8, 8))
    assert bound.head is not None  # the final Linear
    x = torch.rand(200, 1, 8, 8)
    eye = torch.eye(3, dtype=torch.float64)
    rows = (eye[:, None, :] - eye[None, :, :]).reshape(9, 3)  # every e_i − e_j
    for norm in ("l2", "linf", "l1"):
        lip = float(bound.margin_constants(rows, norm).max())
        # the Lipschitz constant bounds every gradient's dual norm
        assert _max_dual_gradient(model, x, norm) <= lip
    # a residual addition adds the constants of its branches: x + 0.5·relu(x) has 1.5
    res = lipschitz_bound(_Residual(), (4,))
    for nm in ("l2", "linf", "l1"):
        assert res.prefix[nm] == pytest.approx(1.5, rel=1e-8)
        assert res.prefix[nm] >= 1.5


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x + 0.5 * F.relu(x))


def test_torch_export_graph_gives_the_same_bound_as_the_module() -> None:
    torch.manual_seed(1)
    model = DigitsCNN().eval()
    ep = torch.export.export(model, (torch.zeros(4, 1, 8, 8),))
    a = lipschitz_bound(model, (1, 8, 8))
    b = lipschitz_bound(ep.module(), (1, 8, 8))
    for nm in ("l2", "linf", "l1"):
        assert b.prefix[nm] == pytest.approx(a.prefix[nm], rel=1e-9)
    torch.testing.assert_close(a.head, b.head)
    # and the functional twin of the same network: same constants
    fx = _trained_bn(Functional())
    batch = {"x": {0: torch.export.Dim("batch")}}  # its view() reads the batch size
    ex = torch.export.export(fx, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=batch)
    c, d = lipschitz_bound(fx, (1, 8, 8)), lipschitz_bound(ex.module(), (1, 8, 8))
    for nm in ("l2", "linf", "l1"):
        assert d.prefix[nm] == pytest.approx(c.prefix[nm], rel=1e-9)


class _Sin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.sin(x))


class _LpPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(F.lp_pool2d(x, 2, 2).flatten(1))


class _Broadcast(nn.Module):
    """x * c with c larger than x: three copies of every input element (L2 norm × √3)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)
        self.register_buffer("c", torch.ones(3, 4))

    def forward(self, x):
        return self.fc((x[:, None, :] * self.c).flatten(1))


def test_the_unsupported_op_is_named() -> None:
    with pytest.raises(NotBoundable, match="broadcasts its input"):
        lipschitz_bound(_Broadcast(), (4,))
    with pytest.raises(NotBoundable, match=r"torch\.sin at sin"):
        lipschitz_bound(_Sin(), (4,))
    with pytest.raises(NotBoundable, match=r"torch\.nn\.functional\.lp_pool2d") as info:
        lipschitz_bound(_LpPool(), (1, 8, 8))
    assert "boolean_dispatch" not in str(info.value)
    assert "<function" not in str(info.value)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_no_flip_inside_the_certified_ball_of_a_cnn(norm) -> None:
    """A projected-gradient search inside 0.999 × the certified radius (the margin's own
    gradient, 50 steps) never changes the float32 prediction of the functional CNN, on the
    torch.export graph as on the module; the witness is never inside the certified ball."""
    torch.manual_seed(2)
    model = _trained_bn(Functional())
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        t = model(x).argmax(1)
    ep = torch.export.export(model, (torch.zeros(2, 1, 8, 8),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}}).module()
    for net in (model, ep):
        data = robust_cert.load_data((x.numpy(), t.numpy()), input_range=(0.0, 1.0))
        clf = robust_cert.load_model(net, input_shape=(1, 8, 8))
        res = SafeRadius(SafeRadiusConfig(norms=[norm], bisection_steps=6, attack_steps=10,
                                          clever_batches=2, clever_samples=2)).run(
            clf, data, RunContext(CPU, batch_size=64, seed=0))
        assert res.diagnostics["lower_bound"] == "ok"
        lower = torch.from_numpy(res.per_point[f"lower@{norm}"])
        assert (lower > 0).all()
        upper = res.per_point[f"upper@{norm}"]
        finite = np.isfinite(upper)
        assert (lower.numpy()[finite] <= upper[finite]).all()
        r = (0.999 * lower).float().view(-1, 1, 1, 1)
        delta = torch.zeros_like(x)
        for _ in range(50):
            d = delta.clone().requires_grad_(True)
            out = model(x + d)
            other = out.masked_fill(F.one_hot(t, 3).bool(), -torch.inf).amax(1)
            margin = out.gather(1, t[:, None])[:, 0] - other
            (g,) = torch.autograd.grad(margin.sum(), d)
            with torch.no_grad():
                if norm == "linf":
                    delta = (delta - 0.1 * r * g.sign()).clamp(-r, r)
                else:
                    gn = g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
                    delta = delta - 0.1 * r * g / gn
                    dn = delta.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
                    delta = delta * (r / dn).clamp(max=1.0)
                assert (model(x + delta).argmax(1) == t).all()


# --- the arithmetic of the products: float32 matmul precision, TF32, cuDNN -------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(("precision", "u"), [("highest", 2.0 ** -24), ("high", 2.0 ** -11),
                                              ("medium", 2.0 ** -8)])
def test_matmul_precision_maps_to_its_unit_roundoff(monkeypatch, device, precision, u) -> None:
    """"medium" is bfloat16 products (u = 2^-8), not TF32 (2^-11). No CUDA is needed: only the
    device's type is read."""
    from robust_cert.bounds import rounding as lipschitz

    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dev = torch.device(device)
    assert lipschitz.unit_roundoff(torch.float32, dev, "matmul") == u
    assert lipschitz.unit_roundoff(torch.float32, dev, "conv") == u  # im2col without cuDNN
    assert lipschitz.unit_roundoff(torch.float32, dev) == 2.0 ** -24  # elementwise
    assert lipschitz.unit_roundoff(torch.float64, dev, "matmul") == 2.0 ** -53
    # cuDNN's TF32 convolutions on CUDA: at least 2^-11
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    conv = lipschitz.unit_roundoff(torch.float32, dev, "conv")
    assert conv == (max(u, 2.0 ** -11) if device == "cuda" else u)


def test_strict_float32_sets_and_restores_the_settings() -> None:
    from robust_cert.bounds import strict_float32

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
              torch.backends.cudnn.enabled)
    torch.set_float32_matmul_precision("medium")
    try:
        with strict_float32():
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cudnn.enabled
            assert not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.backends.cudnn.enabled == before[2]
    finally:
        torch.set_float32_matmul_precision(before[0])
    assert torch.backends.cudnn.allow_tf32 == before[1]


def test_rounding_reads_the_precision_at_evaluation() -> None:
    """A bound built under "medium" precision rounds like one built under "highest": the
    rounding runs in IEEE float32 (strict_float32) and reads u then, not at construction."""
    torch.manual_seed(0)
    model = _trained_bn(Functional())
    x = torch.rand(3, 1, 8, 8)
    ref = lipschitz_bound(model, (1, 8, 8), 5).rounding(x, torch.full((3,), 0.1), "l2")
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        bound = lipschitz_bound(model, (1, 8, 8), 5)
        got = bound.rounding(x, torch.full((3,), 0.1), "l2")
    finally:
        torch.set_float32_matmul_precision(prec)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_reused_bound_gives_what_a_fresh_one_gives() -> None:
    """The safe radius reuses one bound for every block of a sharded run (issue 14): its
    rounding bounds and constants must not depend on the calls before (other points, radii,
    norms, precision settings) — equal, bit for bit, to a fresh bound's."""
    torch.manual_seed(0)
    model = _trained_bn(Functional())
    x = torch.rand(3, 1, 8, 8)
    r = torch.full((3,), 0.1)
    fresh = lipschitz_bound(model, (1, 8, 8), 5)
    ref = fresh.rounding(x, r, "l2")
    reused = lipschitz_bound(model, (1, 8, 8), 5)
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        reused.rounding(torch.rand(5, 1, 8, 8) * 4, torch.full((5,), 2.0), "linf")
    finally:
        torch.set_float32_matmul_precision(prec)
    reused.rounding(x[:1], None, "l2")
    for a, b in zip(reused.rounding(x, r, "l2"), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert reused.prefix == fresh.prefix
    assert reused.layers == fresh.layers  # power iteration (l2_lower) seeded on its own
    a = torch.eye(3)[None].expand(3, 3, 3) - torch.eye(3)[:, None]
    for nm in ("l2", "linf"):
        torch.testing.assert_close(reused.margin_constants(a, nm), fresh.margin_constants(a, nm),
                                   rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN, TF32, bf16)")
def test_cuda_rounding_model_covers_the_strict_evaluation() -> None:
    """On CUDA with cuDNN benchmarking and bf16 products allowed, the certified margins and the
    rounding are of the strict float32 evaluation: the computed logits lie within the bound of
    a float64 evaluation."""
    from robust_cert.bounds import strict_float32

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = _trained_bn(Functional()).to(dev)
    x = torch.rand(16, 1, 8, 8, device=dev)
    prec, bench = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.benchmark = True
    try:
        bound = lipschitz_bound(model, (1, 8, 8), 5)
        err, _ = bound.rounding(x)
        with strict_float32(), torch.no_grad():
            out = model(x).double()
        exact = model.double()(x.double()).detach()
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cudnn.benchmark = bench
        model.float()
    assert ((out - exact).abs() <= err).all()


# --- the float evaluation of the error bounds themselves ------------------------------------


def _deep_wide_stack(depth: int, k: int = 4607, length: int = 8) -> nn.Module:
    """``depth`` 1-channel convolutions with kernel k ("same" padding: fan-in k + 1, γ ≈ 2.7e-4
    at float32), weights 1/8 on the 8 central taps (values stay of order one)."""
    layers = []
    for _ in range(depth):
        conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0, k // 2 - 4:k // 2 + 4] = 1 / 8
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(length, 2)).eval()


def test_error_bound_safety_covers_a_deep_wide_stack(monkeypatch) -> None:
    """The old fixed ×1.01 is below ∏(1 + γ_fan-in) after ~37 such layers: the factor now is
    computed over the steps walked, ∏ 1/(1 − γ_k) ≥ ∏ (1 + γ_fan-in)."""
    from robust_cert.bounds import rounding as lipschitz

    depth = 40
    bound = lipschitz_bound(_deep_wide_stack(depth), (1, 8), 1)
    u = 2.0 ** -24
    needed = math.prod(1 + lipschitz.gamma(4608, u) for _ in range(depth))
    assert needed > lipschitz.ERROR_BOUND_SAFETY  # the old constant is not enough here
    x = torch.rand(2, 1, 8)
    err, ball = bound.rounding(x, torch.full((2,), 0.01), "l2")
    safety = bound.graph.safety
    assert safety >= needed
    assert safety == lipschitz.evaluation_safety(bound.graph.steps)
    # and it is what the bounds are multiplied by
    monkeypatch.setattr(lipschitz, "evaluation_safety", lambda steps: 1.0)
    monkeypatch.setattr(lipschitz, "ERROR_BOUND_SAFETY", 1.0)
    raw, raw_ball = bound.rounding(x, torch.full((2,), 0.01), "l2")
    assert (raw > 0).all()
    torch.testing.assert_close(err, raw * safety, rtol=1e-12, atol=0)
    torch.testing.assert_close(ball, raw_ball * safety, rtol=1e-12, atol=0)
    # a shallow narrow network keeps the 1.01 floor
    small = lipschitz_bound(_trained_bn(Functional()), (1, 8, 8), 5)
    small.rounding(torch.rand(2, 1, 8, 8))
    assert small.graph.safety == lipschitz.ERROR_BOUND_SAFETY


def test_l1_constants_are_the_largest_column_sums() -> None:
    """Known answers of the 1→1 operator norms: a Linear layer's is its largest column sum of
    |W|; a stride-1 convolution's the largest sum of |K| over an input channel's kernels (every
    input pixel away from the border meets each kernel weight once); max pooling with window
    2 and stride 1 puts one input in up to 2 windows per dimension."""
    torch.manual_seed(3)
    fc = nn.Linear(5, 4)
    net = nn.Sequential(fc, nn.ReLU(), nn.Linear(4, 2))
    b = lipschitz_bound(net, (5,))
    want = float(fc.weight.detach().double().abs().sum(0).max())
    assert b.prefix["l1"] == pytest.approx(want, rel=1e-8)
    assert b.prefix["l1"] >= want
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    cnet = nn.Sequential(conv, nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    c = lipschitz_bound(cnet, (2, 6, 6))
    kernel = float(conv.weight.detach().double().abs().sum((0, 2, 3)).max())
    assert c.prefix["l1"] == pytest.approx(kernel * 4, rel=1e-8)
    # sound: no margin gradient has a larger ∞-norm (the dual of L1)
    x = torch.rand(300, 2, 6, 6)
    rows = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert _max_dual_gradient(cnet, x, "l1") <= float(c.margin_constants(rows, "l1").max())
