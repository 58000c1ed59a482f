"""Sound local bounds of a traced network over a ball: interval bound propagation (IBP) and
backward linear relaxations (CROWN, Zhang et al. 2018), op by op through the bound-op
registry (:meth:`BoundOp.interval <robust_cert.bounds.BoundOp.interval>`,
:meth:`BoundOp.linear <robust_cert.bounds.BoundOp.linear>`).

:func:`local_bounds` bounds the margins C·f (rows of a *specification matrix* C, e.g.
e_y − e_j) from below over B_p(x0, r) (∩ the input box when given), for every point of a
batch at once, in L∞, L2 and L1:

1. the input region is the box [x0 − r, x0 + r] (∩ the input box): it contains the ball in
   every p-norm, so IBP over it is sound for the ball;
2. forward, every node's interval comes from its inputs' (IBP); with ``method="crown"`` the
   inputs of every relaxed op (ReLU, max pooling, other activations) are first tightened by
   CROWN itself (a backward pass from that node with the rows ±e_i of its unstable elements),
   intersected with IBP's;
3. the margins: C·f ≥ A_in·x + c with the coefficients A_in back-substituted from the output
   (C itself, not the logits one by one: the specification trick) to the input through each
   op's relaxation, and min over the ball of A_in·x = A_in·x0 − r‖A_in‖_q with q the dual
   norm (‖·‖₁ for L∞, ‖·‖₂ for L2, ‖·‖∞ for L1); with the input box also the exact minimum
   over the box [max(x0 − r, lo), min(x0 + r, hi)] ⊇ ball ∩ box, and the larger is kept.
   CROWN's bound is also intersected with IBP's (both are sound: the larger is kept).

Soundness. Every relaxation holds on the input intervals of its op, and those intervals
contain every value the op takes over the region (by induction over the graph: IBP and CROWN
each give sound bounds, so does their intersection), so C·f(x) ≥ the returned bound for every
x in the region, for the exact (real-arithmetic) network with its float32 parameters. The
bounds are computed in float64 from the float32 parameters; the rounding of that evaluation
is covered by an outward allowance of :data:`REL_SLACK` times the magnitude of the terms
summed (every interval is widened by it, and every CROWN bound lowered by it times the sum of
the absolute values of its terms |A|·|b| and |A_in|·max(|x_lo|, |x_hi|)): float64 sums of n
terms are within γ_n(2^-53) ≈ n·1.1e-16 of their magnitude, under 1e-9 per level below 10^7
terms. Finally the margins of the *float32 evaluation* of the network anywhere in the ball
differ from the exact ones by at most |C|·E_ball, with E_ball the elementwise rounding bound
of the logits over the ball of :meth:`LipschitzBound.rounding
<robust_cert.bounds.LipschitzBound.rounding>` (the same forward error analysis as the
Lipschitz bound, not a second one; an L1 ball is inside the L2 ball of the same radius, so its
L2 bound serves): ``lower`` = CROWN/IBP bound − |C|·E_ball holds for both evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.fx.node import map_arg

from robust_cert.bounds.base import BoundOp, NotBoundable, first
from robust_cert.bounds.graph import GraphBound, LipschitzBound
from robust_cert.bounds.rounding import strict_float32

#: Relative outward allowance for the float64 evaluation of the bounds (see the module doc).
REL_SLACK = 1e-9
#: Default memory budget of one bound computation (bytes): points are processed in chunks.
DEFAULT_MAX_MEMORY = 1 << 30
#: Norms of the ball and their dual norm on the input coefficients.
NORMS = ("linf", "l2", "l1")
METHODS = ("crown", "ibp")


class Region:
    """What the ops' :meth:`~robust_cert.bounds.BoundOp.interval` and
    :meth:`~robust_cert.bounds.BoundOp.linear` see: ``lower``/``upper`` (the intervals of the
    nodes bounded so far, float64, batch first), ``values`` (every node's value at the centres
    x0: constants such as sizes are those of this batch), :meth:`rerun`, :meth:`transpose`
    and :meth:`add_bias`."""

    def __init__(self, graph: GraphBound, values: dict, batch: int):
        self.graph = graph
        self.values = values
        self.batch = batch
        self.lower: dict = {}
        self.upper: dict = {}
        self._modules = dict(graph.gm.named_modules())
        self.bias: torch.Tensor | None = None
        self.mag: torch.Tensor | None = None

    def value(self, n: torch.fx.Node):
        """The value of node ``n`` at the centres (element 0 of a tuple)."""
        return first(self.values[n])

    def rerun(self, node: torch.fx.Node, replace: dict) -> torch.Tensor:
        """Node ``node``'s own op with the inputs in ``replace`` (node → tensor) substituted
        and every other input at its value at the centres (element 0 of a tuple output)."""
        env = {a: (replace[a] if a in replace else first(self.values[a]))
               for a in node.all_input_nodes}
        args = map_arg(node.args, lambda a: env[a])
        kwargs = map_arg(node.kwargs, lambda a: env[a])
        if node.op == "call_function":
            out = cast(Callable, node.target)(*args, **kwargs)  # fx: the callable
        elif node.op == "call_method":
            out = getattr(args[0], cast(str, node.target))(*args[1:], **kwargs)
        else:
            out = self._modules[cast(str, node.target)](*args, **kwargs)  # fx: a module's path
        return first(out)

    def transpose(self, node: torch.fx.Node, src: torch.fx.Node,
                  a: torch.Tensor) -> torch.Tensor:
        """Aᵀ of a node that is *linear* in its input ``src`` (shape ops, pooling): the
        vector-Jacobian products of the rows a[:, s] (batch, specs, *output shape)."""
        z = self.value(src).double()
        # (vjp returns a third element, the aux, only with has_aux)
        _, vjp = cast("tuple[Any, Callable]",
                      torch.func.vjp(lambda t: self.rerun(node, {src: t}), z))
        return torch.func.vmap(lambda g: vjp(g)[0], in_dims=1, out_dims=1)(a)

    def add_bias(self, a: torch.Tensor, t) -> None:
        """Add Σ a·t (over the output elements, per point and spec) to the bound's constant;
        ``t`` is a number or a tensor broadcastable to (batch, *output shape). Its magnitude
        for the float64 allowance is ‖a‖₂·‖t‖₂ ≥ Σ|a||t| (Cauchy–Schwarz)."""
        # set by _backward, the only caller of the ops' linear (which call this)
        assert self.bias is not None
        assert self.mag is not None
        af = a.flatten(2)
        if isinstance(t, torch.Tensor):
            tf = torch.broadcast_to(t.to(a.device, torch.float64),
                                    (a.shape[0], *a.shape[2:])).reshape(a.shape[0], -1)
            self.bias = self.bias + torch.bmm(af, tf.unsqueeze(2)).squeeze(2)
            self.mag = self.mag + af.norm(dim=2) * tf.norm(dim=1)[:, None]
        else:
            t = float(t)
            if t:
                self.bias = self.bias + af.sum(-1) * t
                self.mag = self.mag + af.abs().sum(-1) * abs(t)

    def relax(self, a: torch.Tensor, lower: tuple, upper: tuple) -> torch.Tensor:
        """Back-substitution through an elementwise relaxation αL·z + βL ≤ φ(z) ≤ αU·z + βU
        (each (batch, *shape), valid on the region): positive coefficients take the lower
        line, negative ones the upper. Only the columns where the two lines differ (unstable
        elements, in any point) are treated apart; elsewhere φ is exactly affine."""
        (al, bl), (au, bu) = lower, upper
        b, s = a.shape[:2]
        af = a.reshape(b, s, -1)
        al_f, bl_f = al.reshape(b, -1), bl.reshape(b, -1)
        out = af * al_f.unsqueeze(1)
        self.add_bias(af, bl_f)
        du, db = au.reshape(b, -1) - al_f, bu.reshape(b, -1) - bl_f
        differ = ((du != 0) | (db != 0)).any(0)
        cols = differ.nonzero().squeeze(1)
        if 2 * cols.numel() > differ.numel():  # mostly unstable: all columns at once
            neg = af.clamp(max=0)
            out += neg * du.unsqueeze(1)
            self.add_bias(neg, db)
        elif cols.numel():
            neg = af.index_select(2, cols).clamp(max=0)  # (b, s, k)
            out.index_add_(2, cols, neg * du.index_select(1, cols).unsqueeze(1))
            self.add_bias(neg, db.index_select(1, cols))
        return out.view_as(a)


def _widen(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = REL_SLACK * (lo.abs() + hi.abs()) + 1e-300
    return lo - d, hi + d


class LocalBound:
    """The local bounds of one analysed graph (:class:`GraphBound`): which nodes are tightened
    by CROWN, and the computation (:meth:`margins`). Raises :class:`NotBoundable` naming the
    first op without an interval (or, for CROWN, a linear) bound."""

    def __init__(self, graph: GraphBound):
        self.graph = graph
        self.missing: dict[str, str] = {}
        for step in graph.steps:
            op, call, _ = graph.calls[step.node]
            for meth, what in (("interval", "interval bound (IBP)"),
                               ("linear", "linear relaxation (CROWN)")):
                if meth not in self.missing and getattr(type(op), meth) is getattr(BoundOp,
                                                                                    meth):
                    self.missing[meth] = (f"{call.label} at {call.where} has no {what}")
        users: dict = {n: [] for n in graph.order}
        for step in graph.steps:
            for a in set(step.inputs):
                users[a].append(step.node)
        self.users = users
        kinds = {s.node: s.kind for s in graph.steps}
        # nodes whose intervals feed a relaxation and are not themselves relaxed outputs
        self.refined = [n for n in graph.order if n is not graph.input and n in kinds
                        and any(graph.calls[u][0].relaxed for u in users[n])
                        and not graph.calls[n][0].relaxed and kinds[n] not in ("same", "first")]
        self.numel = {n: first(graph.values[n])[0].numel() for n in graph.order
                      if isinstance(first(graph.values[n]), torch.Tensor)}

    def check(self, method: str) -> None:
        """Raise :class:`NotBoundable` if an op lacks the bound ``method`` needs."""
        if "interval" in self.missing:
            raise NotBoundable(self.missing["interval"])
        if method == "crown" and "linear" in self.missing:
            raise NotBoundable(self.missing["linear"])

    def bytes_per_point(self, method: str, specs: int) -> int:
        """A generous estimate of the memory one point needs (float64 coefficients of the
        widest back-substitution, three live copies)."""
        widest = max(self.numel.values())
        total = sum(self.numel.values()) * 8 * 4
        if method == "ibp":
            return total
        rows = max([2 * self.numel[n] for n in self.refined] + [specs])
        return total + rows * widest * 8 * 3

    def margins(self, x0: torch.Tensor, radius: torch.Tensor, norm: str, spec: torch.Tensor,
                box: tuple[float, float] | None, method: str) -> torch.Tensor:
        """Lower bounds (float64, (batch, specs)) of spec·f over the region, exact network."""
        g = self.graph
        with torch.no_grad():
            values = g._evaluate(x0.to(g.dtype))
            ctx = Region(g, values, x0.shape[0])
            x = x0.double()
            r = radius.to(x.device, torch.float64).view(-1, *([1] * (x.ndim - 1)))
            xl, xu = x - r, x + r
            if box is not None:
                xl, xu = xl.clamp(min=box[0]), xu.clamp(max=box[1])
            ctx.lower[g.input], ctx.upper[g.input] = _widen(xl, xu)
            inp = (x, r.flatten(), xl, xu, norm, box is not None)
            for step in g.steps:
                n = step.node
                op, call, params = g.calls[n]
                lo, hi = op.interval(call, params, ctx)
                ctx.lower[n], ctx.upper[n] = _widen(lo.double(), hi.double())
                if method == "crown" and n in self.refined:
                    self._refine(n, ctx, inp)
            out = g.output
            shape = ctx.lower[out].shape[1:]
            c = spec.to(x.device, torch.float64)
            lo, hi = ctx.lower[out].flatten(1)[:, None, :], ctx.upper[out].flatten(1)[:, None, :]
            ibp = (c.clamp(min=0) * lo + c.clamp(max=0) * hi).sum(-1)
            if method == "ibp":
                return ibp
            crown = self._backward(out, c.view(c.shape[0], c.shape[1], *shape), ctx, inp)
            return torch.maximum(ibp, crown)

    def _refine(self, n, ctx: Region, inp) -> None:
        lo, hi = ctx.lower[n], ctx.upper[n]
        mask = None
        for u in self.users[n]:
            op, call, params = self.graph.calls[u]
            if op.relaxed:
                # a relaxed op whose output feeds another relaxation (ReLU → max pooling)
                # passes on every input bound, stable elements' too: refine them all
                chained = any(self.graph.calls[w][0].relaxed for w in self.users[u])
                m = None if chained else op.refine(call, params, lo, hi)
                if m is None:
                    mask = torch.ones_like(lo, dtype=torch.bool)
                    break
                mask = m if mask is None else mask | m
        if mask is None:
            return
        b = lo.shape[0]
        flat = mask.reshape(b, -1)
        counts = flat.sum(1)
        k = int(counts.max()) if b else 0
        if k == 0:
            return
        idx = torch.argsort(flat.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
        valid = torch.arange(k, device=lo.device)[None, :] < counts[:, None]
        nel = flat.shape[1]
        a = torch.zeros((b, k, nel), dtype=torch.float64, device=lo.device)
        a.scatter_(2, idx[:, :, None], 1.0)
        # rows e_i, and −e_i added at the first relaxation (the map before it is linear)
        lb = self._backward(n, a.view(b, k, *lo.shape[1:]), ctx, inp, mirror=True)
        new_lo, new_hi = lb[:, :k], -lb[:, k:]
        lo_f, hi_f = lo.reshape(b, -1).clone(), hi.reshape(b, -1).clone()
        old_lo, old_hi = lo_f.gather(1, idx), hi_f.gather(1, idx)
        lo_f.scatter_(1, idx, torch.where(valid, torch.maximum(old_lo, new_lo), old_lo))
        hi_f.scatter_(1, idx, torch.where(valid, torch.minimum(old_hi, new_hi), old_hi))
        ctx.lower[n], ctx.upper[n] = lo_f.view_as(lo), hi_f.view_as(hi)

    def _backward(self, start, a: torch.Tensor, ctx: Region, inp,
                  mirror: bool = False) -> torch.Tensor:
        """CROWN: a lower bound (batch, specs) of Σ a·start over the region; with
        ``mirror``, of the rows a and then −a (2·specs), the rows −a formed only at the first
        relaxed op (before it, the coefficients of −a are those of a negated)."""
        g = self.graph
        b, s = a.shape[:2]
        ctx.bias = torch.zeros((b, s), dtype=torch.float64, device=a.device)
        ctx.mag = torch.zeros_like(ctx.bias)
        acc = {start: a}
        pos = g.order.index(start)

        def unfold_mirror():
            for key in acc:
                acc[key] = torch.cat([acc[key], -acc[key]], dim=1)
            ctx.bias = torch.cat([ctx.bias, -ctx.bias], dim=1)
            ctx.mag = torch.cat([ctx.mag, ctx.mag], dim=1)

        for n in reversed(g.order[:pos + 1]):
            if n not in acc or n is g.input:
                continue
            op, call, params = g.calls[n]
            if mirror and op.relaxed:
                unfold_mirror()
                mirror = False
            coef = acc.pop(n)
            for src, a_src in op.linear(call, params, coef, ctx):
                if not g.depends.get(src, False):
                    continue
                acc[src] = acc[src] + a_src if src in acc else a_src
        if mirror:
            unfold_mirror()
        a_in = acc.get(g.input)
        bias, mag = ctx.bias, ctx.mag
        ctx.bias = ctx.mag = None
        if a_in is None:  # the start does not depend on the input (constant)
            return bias - REL_SLACK * mag
        x, r, xl, xu, norm, boxed = inp
        af = a_in.flatten(2)
        xc = x.flatten(1)[:, None, :]
        lo, hi = xl.flatten(1)[:, None, :], xu.flatten(1)[:, None, :]
        dual = {"linf": lambda t: t.abs().sum(-1), "l2": lambda t: t.norm(dim=-1),
                "l1": lambda t: t.abs().amax(-1)}[norm]
        ball = (af * xc).sum(-1) - r[:, None] * dual(af)
        if boxed or norm == "linf":
            inside = (af.clamp(min=0) * lo + af.clamp(max=0) * hi).sum(-1)
            ball = torch.maximum(ball, inside) if boxed else ball
        reach = torch.maximum((xc - r[:, None, None]).abs(), (xc + r[:, None, None]).abs())
        mag = mag + (af.abs() * reach).sum(-1)
        return ball + bias - REL_SLACK * mag


@dataclass
class LocalMargins:
    """Result of :func:`local_bounds`, per point and spec row (float64, on the device):
    ``lower`` holds for the exact network and its float32 evaluation anywhere in the region;
    ``exact`` is the bound of the exact network, ``rounding`` |C|·E_ball subtracted."""

    lower: torch.Tensor
    exact: torch.Tensor
    rounding: torch.Tensor
    method: str


def local_analysis(bound: LipschitzBound) -> LocalBound:
    """The (cached) :class:`LocalBound` of a Lipschitz bound's graph."""
    if bound.graph is None:
        raise NotBoundable("no graph to bound locally")
    local = getattr(bound.graph, "_local", None)
    if local is None:
        local = LocalBound(bound.graph)
        bound.graph._local = local
    return local


def default_spec(logits: torch.Tensor) -> torch.Tensor:
    """The rows e_t − e_j (j ≠ t) of the predicted class t of each point: (batch, C−1, C)."""
    p, c = logits.shape
    t = logits.argmax(1)
    eye = torch.eye(c, dtype=torch.float64, device=logits.device)
    a = eye[t][:, None, :] - eye[None, :, :]
    keep = ~torch.nn.functional.one_hot(t, c).bool()
    return a[keep].view(p, c - 1, c)


def local_bounds(bound: LipschitzBound, x0: torch.Tensor, radius, norm: str,
                 spec: torch.Tensor | None = None, *, box: tuple[float, float] | None = None,
                 method: str = "crown", max_memory: int = DEFAULT_MAX_MEMORY,
                 ball_error: torch.Tensor | None = None) -> LocalMargins:
    """Sound lower bounds of the margins spec·f over B_``norm``(x0, radius) (∩ ``box``) for
    each point of the batch ``x0`` (see the module doc for the algorithm and its soundness).

    ``radius``: a number or one per point; ``norm``: "linf", "l2" or "l1"; ``spec``: (batch,
    S, C) rows (default: e_t − e_j for the predicted class t of the float32 logits at x0);
    ``method``: "crown" (CROWN, intermediate bounds by CROWN, intersected with IBP) or "ibp";
    ``max_memory``: the points are processed in chunks whose estimated peak (float64
    coefficients) stays within it (a single point above it raises :class:`NotBoundable`);
    ``ball_error``: an elementwise bound (batch, C) of the float32 rounding of the logits
    over a ball containing this one (default: :meth:`LipschitzBound.rounding` at this
    radius). Raises :class:`NotBoundable` naming an op without the bound ``method`` needs.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    local = local_analysis(bound)
    local.check(method)
    b = x0.shape[0]
    radius = torch.as_tensor(radius, dtype=torch.float64, device=x0.device)
    radius = radius.expand(b).clone() if radius.ndim == 0 else radius.to(torch.float64)
    if (radius < 0).any() or not torch.isfinite(radius).all():
        raise ValueError("radii must be finite and non-negative")
    if spec is None:
        with strict_float32(), torch.no_grad():
            assert bound.graph is not None  # local_analysis refused a bound without one
            logits = bound.graph._evaluate(x0.to(bound.graph.dtype))[bound.graph.output]
        spec = default_spec(first(logits).flatten(1).double())
    spec = spec.to(x0.device, torch.float64)
    per_point = local.bytes_per_point(method, spec.shape[1])
    if per_point > max_memory:
        raise NotBoundable(f"the {method} bound needs about {per_point / 2**20:.0f} MiB per "
                           f"point, above max_bound_memory ({max_memory / 2**20:.0f} MiB)")
    chunk = max(1, int(max_memory // per_point))
    parts = [local.margins(x0[i:i + chunk], radius[i:i + chunk], norm, spec[i:i + chunk], box,
                           method) for i in range(0, b, chunk)]
    exact = torch.cat(parts) if parts else torch.zeros((0, spec.shape[1]), dtype=torch.float64)
    if ball_error is None:
        _, ball_error = bound.rounding(x0, radius, "linf" if norm == "linf" else "l2")
        assert ball_error is not None  # with a radius: the ball's bound
    rnd = torch.einsum("psc,pc->ps", spec.abs(), ball_error.to(spec.device, torch.float64))
    return LocalMargins(exact - rnd, exact, rnd, method)
