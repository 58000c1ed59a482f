"""The bound-op registry: a user's op through register_bound_op and through the
``robust_cert.bound_ops`` entry-point group; unregistered ops still fail as NotBoundable."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch import nn

from robust_cert.bounds import (
    NORM_SAFETY,
    BoundOp,
    BoundOpPluginError,
    NotBoundable,
    lipschitz_bound,
    register_bound_op,
    registry,
)
from robust_cert.bounds.ops.activations import ReLU
from robust_cert.bounds.ops.linear import Linear


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Each test registers into a copy of the registry (the built-in ops stay as they are)."""
    monkeypatch.setattr(registry, "_MODULES", dict(registry._MODULES))
    monkeypatch.setattr(registry, "_FUNCTIONS", dict(registry._FUNCTIONS))
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_LOADED_PLUGINS", set())


class ScaledSoftsign(nn.Module):
    """alpha·x/(1 + |x|): slope ≤ |alpha|. Traced into, it is abs/add/div of the input, which
    no built-in op bounds (a division by a value that depends on the input)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * x / (1 + x.abs())


class Net(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.act = act
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ScaledSoftsignBound(BoundOp):
    """Elementwise, slope ≤ |alpha| (the softsign's slope is ≤ 1); a product, an abs, an
    addition and a division: 4 ulp of the result."""

    modules = (ScaledSoftsign,)

    def params(self, call):
        return abs(float(call.target.alpha))

    def lipschitz(self, call, params):
        return call.step("act", l2=params, linf=params, ulps=4.0, info="ScaledSoftsign")


def _max_dual_gradient(model, x, norm):
    x = x.clone().requires_grad_(True)
    out = model(x)
    m = out[:, 0] - out[:, 1]
    (g,) = torch.autograd.grad(m.sum(), x)
    g = g.double()
    return float((g.abs().sum(1) if norm == "linf" else g.norm(dim=1)).max())


def test_a_registered_custom_module_gets_a_bound() -> None:
    torch.manual_seed(0)
    model = Net(ScaledSoftsign(2.5)).eval()
    with pytest.raises(NotBoundable, match=r"\.abs\(\) at abs"):
        lipschitz_bound(model, (4,))  # traced into: its abs is not bounded
    register_bound_op(ScaledSoftsignBound())
    bound = lipschitz_bound(model, (4,))
    w1 = model.fc1.weight.detach().double()
    sigma = float(torch.linalg.matrix_norm(w1, 2)) * NORM_SAFETY
    row = float(w1.abs().sum(1).max()) * NORM_SAFETY
    assert bound.prefix["l2"] == pytest.approx(2.5 * sigma, rel=1e-12)
    assert bound.prefix["linf"] == pytest.approx(2.5 * row, rel=1e-12)
    torch.testing.assert_close(bound.head, model.fc2.weight.detach())
    assert {"layer": "act", "type": "ScaledSoftsign", "l2": 2.5, "linf": 2.5} in bound.layers
    x = torch.randn(256, 4) * 3
    a = torch.tensor([[1.0, -1.0]])
    for norm in ("l2", "linf"):
        assert _max_dual_gradient(model, x, norm) <= float(bound.margin_constants(a, norm)[0])
    # the rounding model covers the float32 evaluation of the logits
    err, _ = bound.rounding(x)
    with torch.no_grad():
        got = model(x).double()
        exact = model.double()(x.double())
    model.float()
    assert ((got - exact).abs() <= err).all()
    assert (err > 0).all()


def twice(x):
    return 2 * x


torch.fx.wrap("twice")  # a leaf function for torch.fx: one call_function node


class UsesTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(twice(x))


def test_the_decorator_registers_a_class_for_a_function() -> None:
    with pytest.raises(NotBoundable, match=r"cannot bound the operation .*twice at twice"):
        lipschitz_bound(UsesTwice(), (3,))

    @register_bound_op(functions=[twice])
    class TwiceBound(BoundOp):
        """x ↦ 2x: L = 2, one rounding of the result (exact for a power of two)."""

        def lipschitz(self, call, params):
            return call.step("scale", l2=2.0, linf=2.0, ulps=2.0, info="twice")

    bound = lipschitz_bound(UsesTwice(), (3,))
    assert bound.prefix == {"l2": 2.0, "linf": 2.0, "l1": 2.0}
    assert isinstance(registry.function_op(twice), TwiceBound)
    # the default params: one dependent input, passed first
    assert bound.graph.steps[0].kind == "scale"


class OwnLayer(nn.Module):
    def forward(self, x):
        return torch.sin(x)


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, OwnLayer) or super().is_leaf_module(m, qualname)


def test_an_unregistered_custom_module_is_named() -> None:
    model = Net(OwnLayer()).eval()
    # as one node of the graph (a user's tracer kept it): the layer and its class are named
    gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
    with pytest.raises(NotBoundable, match=r"^cannot bound layer act \(OwnLayer\)$"):
        lipschitz_bound(gm, (4,))
    # traced into: the op inside it is named
    with pytest.raises(NotBoundable, match=r"^cannot bound the operation torch\.sin at sin$"):
        lipschitz_bound(model, (4,))
    # an op registered for another class does not cover it
    register_bound_op(ScaledSoftsignBound())
    with pytest.raises(NotBoundable, match=r"cannot bound layer act \(OwnLayer\)"):
        lipschitz_bound(gm, (4,))


def test_conflicting_registrations() -> None:
    with pytest.raises(ValueError, match="Linear is already bound by Linear"):
        register_bound_op(ReLU(), modules=[nn.Linear])
    register_bound_op(Linear(), modules=[nn.Linear])  # the same class again: nothing changes
    assert isinstance(registry.module_op(nn.Linear), Linear)
    register_bound_op(ReLU(), modules=[nn.Linear], replace=True)
    assert isinstance(registry.module_op(nn.Linear), ReLU)
    with pytest.raises(TypeError, match="needs a BoundOp"):
        register_bound_op(object())
    with pytest.raises(TypeError, match="not an nn.Module class"):
        register_bound_op(ReLU(), modules=[int])
    with pytest.raises(ValueError, match="names no module class"):
        register_bound_op(ScaledSoftsignBound(), modules=[], functions=[], methods=[])
    # a subclass of a registered torch.nn class resolves to its nearest registered base
    assert isinstance(registry.module_op(nn.ReLU6), ReLU)


PLUGIN = '''
from torch import nn
from robust_cert.bounds import BoundOp


class PlugAct(nn.Module):
    def forward(self, x):
        return 3 * x.sin()


class PlugActBound(BoundOp):
    """3·sin: slope ≤ 3."""

    modules = (PlugAct,)

    def lipschitz(self, call, params):
        return call.step("act", l2=3.0, linf=3.0, ulps=4.0, info="PlugAct")
'''


def _entry_points(monkeypatch, *eps):
    def entry_points(**kw):
        assert kw == {"group": "robust_cert.bound_ops"}
        return list(eps)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_plugins_from_the_entry_point_group(tmp_path, monkeypatch) -> None:
    (tmp_path / "rc_plug_ok.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("plug", "rc_plug_ok:PlugActBound", "robust_cert.bound_ops")
    _entry_points(monkeypatch, ep)
    import rc_plug_ok

    model = Net(rc_plug_ok.PlugAct()).eval()
    bound = lipschitz_bound(model, (4,))  # loads the plugin, then traces PlugAct as one node
    w1 = model.fc1.weight.detach().double()
    assert bound.prefix["l2"] == pytest.approx(
        3.0 * float(torch.linalg.matrix_norm(w1, 2)) * NORM_SAFETY, rel=1e-12)
    assert registry.load_bound_op_plugins() == []  # loaded once


def test_a_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch) -> None:
    (tmp_path / "rc_plug_broken.py").write_text("import robust_cert_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = importlib.metadata.EntryPoint("fine", "robust_cert.bounds.ops.linear:Linear",
                                         "robust_cert.bound_ops")
    bad = importlib.metadata.EntryPoint("broken", "rc_plug_broken:Op", "robust_cert.bound_ops")
    _entry_points(monkeypatch, good, bad)
    model = nn.Sequential(nn.Linear(4, 2))
    for _ in range(2):  # tried again, and failing again, on the next bound
        with pytest.raises(BoundOpPluginError) as info:
            lipschitz_bound(model, (4,))
        msg = str(info.value)
        assert "\n" not in msg
        assert msg.startswith("bound-op plugin 'broken' (rc_plug_broken:Op) failed to load: "
                              "ModuleNotFoundError")
        assert "robust_cert_no_such_module" in msg
        assert not isinstance(info.value, NotBoundable)  # the safe radius must not hide it
    assert {"fine"} == registry._LOADED_PLUGINS


class _MethodNeg(nn.Module):
    def __init__(self, neg):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)
        self.neg = neg

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h.neg() if self.neg == "method" else -h)


def test_negation_keeps_error_bounds_non_negative_in_every_form() -> None:
    """``h.neg()`` is bounded like ``-h``: the error carried through it is negated back (a
    method-form negation used to give negative error bounds)."""
    torch.manual_seed(0)
    a = _MethodNeg("method").eval()
    b = _MethodNeg("operator").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, 6) * 10
    ea, ba = lipschitz_bound(a, (6,)).rounding(x, torch.full((64,), 0.1), "l2")
    eb, bb = lipschitz_bound(b, (6,)).rounding(x, torch.full((64,), 0.1), "l2")
    torch.testing.assert_close(ea, eb, rtol=0, atol=0)
    torch.testing.assert_close(ba, bb, rtol=0, atol=0)
    assert (ea > 0).all()
    with torch.no_grad():
        got, exact = a(x).double(), a.double()(x.double())
    assert ((got - exact).abs() <= ea).all()


def test_every_built_in_op_states_its_bound() -> None:
    """Each built-in op class documents its soundness argument and covers a module or
    functional form."""
    ops = {type(op) for op in registry._MODULES.values()} | {
        type(op) for op in registry._FUNCTIONS.values()}
    assert len(ops) >= 15
    for cls in ops:
        assert len(cls.__doc__ or "") > 40, cls
        assert cls.__module__.startswith("robust_cert.bounds.ops."), cls
