"""The graph walk: trace the network with torch.fx (or take a torch.export GraphModule as it
is), bound every node with its registered op (:mod:`robust_cert.bounds.registry`), compose
the Lipschitz constants from the input to the logits, and bound the float rounding of the
logits (:meth:`LipschitzBound.rounding`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.fx.node import map_arg

import robust_cert.bounds.ops  # noqa: F401  (registers the built-in ops)
from robust_cert.bounds import registry
from robust_cert.bounds import rounding as rnd
from robust_cert.bounds.base import NotBoundable, OpCall, Step, first, label
from robust_cert.bounds.rounding import NORM_SAFETY, gamma, strict_float32, unit_roundoff


class GraphBound:
    """The analysed graph: steps in execution order, constants per node."""

    #: the graph's LocalBound, cached by :func:`robust_cert.bounds.local.local_analysis` (typed
    #: object here: that module imports this one)
    _local: object

    def __init__(self, gm: torch.fx.GraphModule, input_shape: tuple[int, ...],
                 power_iterations: int):
        self.gm = gm
        self.power_iterations = power_iterations
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotBoundable(f"cannot bound the model: it takes {len(placeholders)} inputs "
                               "(one tensor expected)")
        self.input = placeholders[0]
        out_node = next(n for n in graph.nodes if n.op == "output")
        outs = [a for a in _flatten_args(out_node.args) if isinstance(a, torch.fx.Node)]
        if len(outs) != 1:
            raise NotBoundable("cannot bound the model: it returns "
                               f"{len(outs)} tensors (one logits tensor expected)")
        self.output = outs[0]
        # the nodes the output needs, in graph order
        needed: set[torch.fx.Node] = set()
        stack = [self.output]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        self.order = [n for n in graph.nodes if n in needed]
        p = next(gm.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x0 = torch.zeros((1, *input_shape), device=self.device, dtype=self.dtype)
        try:
            with torch.no_grad():
                self.values = self._evaluate(x0)
        except NotBoundable:
            raise
        except Exception as exc:  # e.g. a graph exported for one fixed batch size
            raise NotBoundable(f"cannot bound the model: its graph fails on one input of shape "
                               f"{tuple(x0.shape)} ({type(exc).__name__}: {exc})") from None
        # a value depends on the input when it is a tensor computed from it (sizes and other
        # metadata read from the input are constants of the batch, not perturbed values)
        self.depends = {}
        for n in self.order:
            tensor = isinstance(first(self.values[n]), torch.Tensor)
            self.depends[n] = n is self.input or (tensor and any(
                self.depends.get(a, False) for a in n.all_input_nodes))
        if not self.depends[self.output]:
            raise NotBoundable("cannot bound the model: its output does not depend on the input")
        self.steps: list[Step] = []
        #: the registered op, its call and its params of every bounded node (local bounds)
        self.calls: dict[torch.fx.Node, tuple] = {}
        #: Lipschitz constants of every value w.r.t. the input in (L2, L∞, L1)
        self.lip: dict[torch.fx.Node, tuple[float, float, float]] = {self.input: (1.0, 1.0, 1.0)}
        self.layers: list[dict] = []
        for n in self.order:
            if n is self.input or not self.depends[n]:
                continue
            step = self._analyze(n)
            self._no_duplication(step)
            self.steps.append(step)
            self.lip[n] = self._propagate_lip(step)
            if step.kind in ("affine", "max", "act", "scale") and (step.l2 != 1.0 or
                                                                  step.linf != 1.0):
                entry = {"layer": n.name, "type": step.info or str(n.target), "l2": step.l2,
                         "linf": step.linf}
                if step.info.startswith("Conv") and step.matrix is None:
                    entry["l2_lower"] = step.l2_lower
                self.layers.append(entry)

    def _no_duplication(self, step: Step) -> None:
        """Elementwise and reshaping ops are bounded as maps that never copy an input element
        to several outputs; a broadcast that does (x * c with c larger than x, expand) would
        multiply the L2 norm, so it is refused."""
        if step.kind in ("affine", "max", "cat", "first"):
            return
        out = first(self.values[step.node])
        per = out[0].numel() if out.ndim else 1
        for a in step.inputs:
            v = first(self.values[a])
            if v[0].numel() < per if step.kind == "same" else v[0].numel() != per:
                raise NotBoundable(f"cannot bound {step.info or step.node.target} at "
                                   f"{step.node.name}: it broadcasts its input to more elements")

    # ---- evaluation of the needed nodes (guards and other side branches are skipped)

    def _evaluate(self, x: torch.Tensor) -> dict:
        env: dict = {}
        mods = dict(self.gm.named_modules())
        for n in self.order:
            if n.op == "placeholder":
                env[n] = x
            elif n.op == "get_attr":
                obj = self.gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n] = obj
            else:
                args = map_arg(n.args, lambda a: env[a])
                kwargs = map_arg(n.kwargs, lambda a: env[a])
                if n.op == "call_function":
                    env[n] = n.target(*args, **kwargs)
                elif n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                elif n.op == "call_module":
                    env[n] = mods[n.target](*args, **kwargs)
                else:
                    raise NotBoundable(f"cannot bound node {n.name} ({n.op})")
        return env

    # ---- per-op analysis: the registered op of each node

    def _dep_args(self, n) -> list[torch.fx.Node]:
        return [a for a in n.all_input_nodes if self.depends[a]]

    def _analyze(self, n: torch.fx.Node) -> Step:
        deps = self._dep_args(n)
        where = f"{n.name}"
        ctx = {"values": self.values, "depends": self.depends,
               "power_iterations": self.power_iterations}
        if n.op == "call_module":
            mod = dict(self.gm.named_modules())[cast(str, n.target)]  # fx: a module's path
            call = OpCall(n, "module", mod, deps, type(mod).__name__, **ctx)
            if len(deps) != 1:
                raise NotBoundable(f"cannot bound layer {call.layer}: it takes several inputs")
            op = registry.module_op(type(mod))
        elif n.op == "call_method":
            method = cast(str, n.target)  # fx: a method's target is its name
            found = registry.method_op(method)
            if found is None:
                raise NotBoundable(f"cannot bound the method .{n.target}() at {where}")
            op, alias = found
            if alias is None:
                call = OpCall(n, "method", method, deps, method, **ctx)
            else:  # the method is this function, self first
                call = OpCall(n, "function", alias, deps, label(alias), **ctx)
        elif n.op == "call_function":
            call = OpCall(n, "function", n.target, deps, label(n.target), **ctx)
            op = registry.function_op(cast(Callable, n.target))  # fx: the callable
        else:
            raise NotBoundable(f"cannot bound node {where} ({n.op})")
        if op is None:
            raise call.unsupported()
        params = op.params(call)
        self.calls[n] = (op, call, params)
        return op.lipschitz(call, params)

    def _propagate_lip(self, step: Step) -> tuple[float, float, float]:
        ins = [self.lip[a] for a in step.inputs]
        if step.kind in ("affine", "max", "act", "scale"):
            return ins[0][0] * step.l2, ins[0][1] * step.linf, ins[0][2] * self._l1(step)
        if step.kind in ("same", "first"):
            return ins[0]
        if step.kind == "add":
            return (sum(c * li[0] for c, li in zip(step.coef, ins, strict=True)),
                    sum(c * li[1] for c, li in zip(step.coef, ins, strict=True)),
                    sum(c * li[2] for c, li in zip(step.coef, ins, strict=True)))
        if step.kind == "cat":  # ‖(a, b)‖₁ = ‖a‖₁ + ‖b‖₁
            return (math.sqrt(sum(li[0] ** 2 for li in ins)), max(li[1] for li in ins),
                    sum(li[2] for li in ins))
        raise AssertionError(step.kind)

    def _l1(self, step: Step) -> float:
        """The 1→1 constant of a step: its own ``l1``; for an elementwise map its slope
        bound; for an explicit matrix its largest column sum of |A|; else √m·‖A‖₂ (m outputs:
        ‖Aδ‖₁ ≤ √m‖Aδ‖₂ ≤ √m‖A‖₂‖δ‖₂ ≤ √m‖A‖₂‖δ‖₁), sound for any linear or 1-Lipschitz-per-
        window map."""
        if step.l1 is not None:
            return step.l1
        if step.kind in ("act", "scale"):
            return max(step.l2, step.linf)
        if step.matrix is not None:
            return float(step.matrix.detach().double().abs().sum(0).max()) * NORM_SAFETY
        out = first(self.values[step.node])
        return math.sqrt(out[0].numel()) * step.l2

    # ---- rounding errors

    def rounding(self, x: torch.Tensor, radius: torch.Tensor | None, norm: str):
        """Elementwise bounds on |computed − exact| of the logits: at x, and (when ``radius``
        is given, one per point) anywhere in the ``norm`` ball of that radius around x.

        Returns (err_center, err_ball) of the output's shape (err_ball None without radius).
        The bounds are of the evaluation under :func:`strict_float32` (which this runs in), and
        the unit roundoff of every product is read from the settings at this call.
        """
        with strict_float32():
            return self._rounding(x, radius, norm)

    def _rounding(self, x: torch.Tensor, radius: torch.Tensor | None, norm: str):
        for step in self.steps:
            if step.u_kind is not None:
                step.u = unit_roundoff(self.dtype, self.device, step.u_kind)
        with torch.no_grad():
            vals = self._evaluate(x.to(self.dtype))
        col = 0 if norm == "l2" else 1
        shape = (-1,)
        err_c: dict[torch.fx.Node, torch.Tensor] = {
            self.input: torch.zeros_like(x, dtype=self.dtype)}
        err_b: dict[torch.fx.Node, torch.Tensor] = {
            self.input: torch.zeros_like(x, dtype=self.dtype)}
        # magnitudes of computed values: at x (|ẑ| of this evaluation, +2e for another run of
        # the same ops), and in the ball (|ẑ(x)| + 2e(x) + L·r + e_ball)
        mag_c: dict[torch.fx.Node, torch.Tensor] = {}
        mag_b: dict[torch.fx.Node, torch.Tensor] = {}

        def r_view(t):
            assert radius is not None  # called for the ball only
            return radius.to(t.device, t.dtype).view(shape + (1,) * (t.ndim - 1))

        def mags(a):
            if a not in mag_c:
                v = vals[a]
                v = first(v)
                mag_c[a] = v.abs() + 2 * err_c[a]
                if radius is not None:
                    mag_b[a] = mag_c[a] + self.lip[a][col] * r_view(v) + err_b[a]
            return mag_c[a], mag_b.get(a)

        # the accumulated error of every value also has an L2-norm bound per point, carried
        # forward through the ops' L2 constants: ‖ẑ_k − z_k‖₂ ≤ L_k·‖ẑ_in − z_in‖₂ + ‖r_k‖₂
        # (r_k the op's own rounding). Elementwise errors are capped by it at every node, so
        # deep networks do not compound |W|-products (the elementwise bound alone grows like
        # the L∞ operator norms).
        zero = torch.zeros(x.shape[0], dtype=self.dtype, device=x.device)
        norm_c: dict[torch.fx.Node, torch.Tensor] = {self.input: zero}
        norm_b: dict[torch.fx.Node, torch.Tensor] = {self.input: zero}

        def pnorm(t):
            # in float64 (a sum of numel squares would lose γ_numel in float32), cast back
            # (one rounding, within the per-step allowance of :func:`evaluation_safety`)
            t = t.double()
            return (t.flatten(1).norm(dim=1) if t.ndim > 1 else t.abs()).to(self.dtype)

        with torch.no_grad():
            for step in self.steps:
                n = step.node
                out = first(vals[n])
                for ball, err, nrm in ((False, err_c, norm_c), (True, err_b, norm_b)):
                    if ball and radius is None:
                        continue
                    e_in = [err[a] for a in step.inputs]
                    n_in = [nrm[a] for a in step.inputs]
                    # the ball's magnitudes exist when there is a radius (else no ball pass)
                    m_in = cast("list[torch.Tensor]",
                                [mags(a)[1 if ball else 0] for a in step.inputs])
                    local = None  # the op's own rounding, elementwise
                    if step.kind == "affine":
                        assert step.apply_abs is not None  # an affine step has both maps
                        g = gamma(step.fan_in, step.u)
                        local = g * step.apply_abs(m_in[0])
                        if step.bias is not None:
                            local = local + g * step.bias
                        e = step.apply_abs(e_in[0])
                        en = step.l2 * n_in[0]
                    elif step.kind == "max":
                        assert step.apply is not None  # a max step has the pooling
                        e, en = step.apply(e_in[0]), step.l2 * n_in[0]
                    elif step.kind == "act":
                        slope = max(step.l2, step.linf)
                        e, en = slope * e_in[0], slope * n_in[0]
                        if step.ulps:
                            # |φ(ẑ)| ≤ |φ(0)| + L|ẑ| (φ(0) = 0, or 1/2 for the sigmoid)
                            local = step.ulps * step.u * (step.linf * m_in[0] + 0.5)
                    elif step.kind == "scale":
                        e, en = step.linf * e_in[0], step.l2 * n_in[0]
                        local = gamma(2, step.u) * step.linf * m_in[0]
                    elif step.kind == "same":
                        e, en = _reapply(n, vals, step.inputs[0], e_in[0], self,
                                     step.negates), n_in[0]
                    elif step.kind == "first":
                        e, en = e_in[0], n_in[0]
                    elif step.kind == "add":
                        e = _tsum(c * ei for c, ei in zip(step.coef, e_in, strict=True))
                        en = _tsum(c * ni for c, ni in zip(step.coef, n_in, strict=True))
                        local = gamma(2, step.u) * _tsum(
                            c * mi for c, mi in zip(step.coef, m_in, strict=True))
                    elif step.kind == "cat":
                        e = _reapply_cat(n, vals, step.inputs, e_in, self)
                        en = torch.sqrt(_tsum(ni ** 2 for ni in n_in))
                    else:
                        raise AssertionError(step.kind)
                    if local is not None:
                        local = local.expand_as(out) if local.shape != out.shape else local
                        e = e + local
                        en = en + pnorm(local)
                    e = e.expand_as(out) if e.shape != out.shape else e
                    nrm[n] = en
                    err[n] = torch.minimum(e, en.view(-1, *([1] * (e.ndim - 1))))
        safety = max(rnd.ERROR_BOUND_SAFETY, rnd.evaluation_safety(self.steps))
        self.safety = safety
        # the scaling in float64 (a float32 product could round down)
        return (err_c[self.output].double() * safety,
                err_b[self.output].double() * safety if radius is not None else None)



def _tsum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum`` of tensors (never of none: a step has at least one input), typed as such."""
    return cast(torch.Tensor, sum(terms))


def _flatten_args(args):
    for a in args:
        if isinstance(a, (tuple, list)):
            yield from _flatten_args(a)
        elif isinstance(a, dict):
            yield from _flatten_args(list(a.values()))
        else:
            yield a


def _reapply(n: torch.fx.Node, vals: dict, src: torch.fx.Node, t: torch.Tensor,
             gb: GraphBound, negates: bool = False) -> torch.Tensor:
    """Run node ``n``'s (shape or sign) op on ``t`` in place of its input ``src`` (negated
    back when the op ``negates``)."""
    env = {a: (t if a is src else first(vals[a])) for a in n.all_input_nodes}
    args = map_arg(n.args, lambda a: env[a])
    kwargs = map_arg(n.kwargs, lambda a: env[a])
    if n.op == "call_function":
        out = cast(Callable, n.target)(*args, **kwargs)
    elif n.op == "call_method":
        out = getattr(args[0], cast(str, n.target))(*args[1:], **kwargs)
    else:
        out = dict(gb.gm.named_modules())[cast(str, n.target)](*args, **kwargs)
    return -out if negates else out  # an error bound stays non-negative


def _reapply_cat(n, vals, inputs, errs, gb) -> torch.Tensor:
    env = {a: torch.zeros_like(first(vals[a])) for a in n.all_input_nodes}
    for a, e in zip(inputs, errs, strict=True):
        env[a] = e
    args = map_arg(n.args, lambda a: env[a])
    kwargs = map_arg(n.kwargs, lambda a: env[a])
    return n.target(*args, **kwargs)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer (as ``torch.fx.symbolic_trace``), which also keeps a module whose
    very class is registered (a user's op) as one node instead of tracing into it."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return registry.is_registered_module(type(m)) or super().is_leaf_module(
            m, module_qualified_name)


# --------------------------------------------------------------------------- public API


@dataclass
class LipschitzBound:
    """Per-norm constants of the network up to (``prefix``) its last linear layer (``head``).

    A margin a·f(x) has |a·f(x+δ) − a·f(x)| ≤ ‖aᵀ head‖_dual · prefix[norm] · ‖δ‖ (or
    ‖a‖_dual · prefix when the network does not end in a linear layer). ``graph`` bounds the
    float rounding of the logits (:meth:`rounding`)."""

    prefix: dict[str, float]
    head: torch.Tensor | None
    layers: list[dict]
    input_dim: int
    graph: GraphBound | None = None

    def margin_constants(self, a: torch.Tensor, norm: str) -> torch.Tensor:
        """Lipschitz bounds of the margins a_j·f (rows of ``a``) w.r.t. the ``norm`` of δ."""
        a = a.double()
        rows = a @ self.head.double() if self.head is not None else a
        l2 = rows.norm(dim=-1) * self.prefix["l2"] * NORM_SAFETY
        if norm == "l2":
            return l2
        linf = rows.abs().sum(-1) * self.prefix["linf"] * NORM_SAFETY
        if norm == "linf":
            return torch.minimum(linf, l2 * math.sqrt(self.input_dim))
        if norm != "l1":
            raise ValueError(f"norm must be l2, linf or l1, got {norm!r}")
        # ‖δ‖₂ ≤ ‖δ‖₁ and ‖δ‖∞ ≤ ‖δ‖₁: the L2 and L∞ constants also bound the L1 one
        l1 = rows.abs().amax(-1) * self.prefix["l1"] * NORM_SAFETY
        return torch.minimum(torch.minimum(l1, l2), linf)

    def rounding(self, x: torch.Tensor, radius: torch.Tensor | None = None, norm: str = "l2"):
        """Elementwise bounds (float64, shape of the logits) on the rounding error of the
        float evaluation of the logits at x and, with ``radius`` (one per point), at any
        input within that ``norm`` distance of x.

        Error model (standard forward error analysis, Higham ch. 3): every output of a linear
        op (Linear, convolution, average pooling, batch norm) is a sum of n rounded products
        in some order, so |ŷ − y| ≤ |W|·e_in + γ_{n+1}(|W||ẑ| + |b|) with n the fan-in and
        γ_n = n·u/(1 − n·u), u = 2^-24 for float32 (2^-11 for TF32 on CUDA when enabled);
        max pooling, ReLU, clamps and reshapes are exact (e_out = max/same of e_in); additions
        and constant scalings add γ₂ of their result; tanh/sigmoid/ELU add 4 ulp of their
        output. Algorithms that do not compute each output as such a sum (Winograd or FFT
        convolutions) are outside this model: the logits are bounded as evaluated under
        :func:`strict_float32` (cuDNN off, IEEE float32 products), and so must the logits the
        bounds are applied to be. The bounds are multiplied by max(ERROR_BOUND_SAFETY,
        ``evaluation_safety`` of the steps walked) for their own float evaluation."""
        if self.graph is None:
            raise ValueError("no graph to bound the rounding of")
        ec, eb = self.graph.rounding(x, radius, norm)
        return ec.double().flatten(1), (eb.double().flatten(1) if eb is not None else None)


def lipschitz_bound(module: nn.Module, input_shape: tuple[int, ...],
                    power_iterations: int = 100) -> LipschitzBound:
    """Sound Lipschitz constants of ``module``, from a torch.fx trace (a torch.fx/torch.export
    GraphModule is used as it is), each node bounded by its registered op (the built-in ops
    of :mod:`robust_cert.bounds.ops`, :func:`~robust_cert.bounds.register_bound_op`, and the
    plugins of the ``robust_cert.bound_ops`` entry-point group, loaded first).

    ``power_iterations``: iterations of the reported lower estimate of each convolution's
    spectral norm (``layers[i]["l2_lower"]``; never used in the bound). Raises
    :class:`NotBoundable` naming the first op it cannot bound, and
    :class:`~robust_cert.bounds.registry.BoundOpPluginError` naming a plugin that fails to
    load.
    """
    registry.load_bound_op_plugins()
    if isinstance(module, torch.fx.GraphModule):
        gm = module
    else:
        try:
            tracer = _Tracer()
            traced = tracer.trace(module)
            name = type(module).__name__ if isinstance(module, nn.Module) else module.__name__
            gm = torch.fx.GraphModule(tracer.root, traced, name)
        except Exception as exc:  # any tracing failure means "cannot bound"
            raise NotBoundable(f"cannot bound the model: it cannot be traced ({exc})") from None
    graph = GraphBound(gm, tuple(input_shape), power_iterations)
    out = graph.output
    head = None
    prefix_node = out
    last = next((s for s in graph.steps if s.node is out), None)
    if last is not None and last.kind == "affine" and last.matrix is not None:
        head = last.matrix.detach()
        prefix_node = last.inputs[0]
        graph.layers = [entry for entry in graph.layers if entry["layer"] != out.name]
        graph.layers.append({"layer": out.name, "type": f"{last.info} (head)"})
    l2, linf, l1 = graph.lip[prefix_node]
    return LipschitzBound({"l2": l2, "linf": linf, "l1": l1}, head, graph.layers,
                          int(np.prod(input_shape)), graph)
