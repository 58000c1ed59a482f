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
   intersected with IBP's — but for one affine op of the input in L∞: over a box (the L∞
   region, ∩ the input box or not) IBP's interval of an affine map (centre ± |W|·radius) is
   its exact range, which CROWN's bound of the same rows cannot exceed;
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
#: On the CPU, the working set of one chunk of points (bytes, at most ``max_memory``): larger
#: chunks bought no speed there (359 digits points, crown-ibp: 1.68 s of CPU in one chunk of
#: ~210 MB, 1.71 s in 32 MiB chunks, 1.73 s in 8 MiB ones), only a higher peak of the process
#: (safe_radius of digits-adversarial.yaml alone: 496 MB at 1 GiB, 479 at 32 MiB, 458 at 8).
#: On an accelerator, chunks fill ``max_memory`` (more points per kernel).
CPU_CHUNK_BYTES = 8 << 20
#: Adam's learning rate on alpha-CROWN's slopes (in [0, 1]).
ALPHA_LR = 0.1
#: Norms of the ball and their dual norm on the input coefficients.
NORMS = ("linf", "l2", "l1")
METHODS = ("crown", "crown-ibp", "ibp")


class Region:
    """What the ops' :meth:`~robust_cert.bounds.BoundOp.interval` and
    :meth:`~robust_cert.bounds.BoundOp.linear` see: ``lower``/``upper`` (the intervals of the
    nodes bounded so far, float64, batch first), ``values`` (every node's value at the centres
    x0: constants such as sizes are those of this batch), :meth:`rerun`, :meth:`transpose`,
    :meth:`moved_back` and :meth:`add_bias`; ``alpha`` (None, or while the margins are
    back-substituted by alpha-CROWN: relaxed node → the lower-line slopes (batch, specs,
    *shape) of its unstable elements, each clamped to [0, 1] by the op that reads them)."""

    def __init__(self, graph: GraphBound, values: dict, batch: int):
        self.graph = graph
        self.values = values
        self.batch = batch
        self.lower: dict = {}
        self.upper: dict = {}
        self._modules = dict(graph.gm.named_modules())
        self.bias: torch.Tensor | None = None
        self.mag: torch.Tensor | None = None
        self.alpha: dict | None = None

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

    def moved_back(self, node: torch.fx.Node, src: torch.fx.Node,
                   a: torch.Tensor) -> torch.Tensor:
        """Aᵀ of a node that only moves its input's elements (a reshape, view, flatten,
        squeeze, clone, ...): when the node keeps every element in its row-major place —
        checked exactly, by running it on the element indices (float64 integers, exact) —
        the adjoint is a reshape of the rows; any other move goes through
        :meth:`transpose`. The same values either way (the vector-Jacobian product of a
        reshape is the reshape of its vector), without torch.func's vmap, whose first use
        imports torch._dynamo (about 35 MB of the process's peak)."""
        z = self.value(src)
        index = torch.arange(z.numel(), dtype=torch.float64, device=z.device).view(z.shape)
        out = self.rerun(node, {src: index})
        if out.numel() == index.numel() and out.shape[:1] == z.shape[:1] and \
                torch.equal(out.reshape(-1), index.reshape(-1)):
            return a.reshape(*a.shape[:2], *z.shape[1:])
        return self.transpose(node, src, a)

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
            if not bool(tf.any()):  # a zero constant (a ReLU's lower line): adds nothing
                return
            self.bias = self.bias + torch.bmm(af, tf.unsqueeze(2)).squeeze(2)
            self.mag = self.mag + af.norm(dim=2) * tf.norm(dim=1)[:, None]
        else:
            t = float(t)
            if t:
                self.bias = self.bias + af.sum(-1) * t
                self.mag = self.mag + af.abs().sum(-1) * abs(t)

    def add_bias_rows(self, a: torch.Tensor, t: torch.Tensor) -> None:
        """Add Σ a·t (over the output elements) to the bound's constant, ``t`` one value per
        spec row and element (a's shape); magnitude Σ|a||t|."""
        assert self.bias is not None  # set by _backward
        assert self.mag is not None
        self.bias = self.bias + (a * t).flatten(2).sum(-1)
        self.mag = self.mag + (a.abs() * t.abs()).flatten(2).sum(-1)

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
        # nodes that are one affine op of the input (through moves of elements only): their
        # IBP interval over a box is the exact range, so in L∞ (whose region, ∩ the input
        # box or not, is a box) CROWN cannot tighten it and they are not refined
        moved = {graph.input}
        for step in graph.steps:
            if step.kind == "same" and len(step.inputs) == 1 and step.inputs[0] in moved:
                moved.add(step.node)
        self.box_exact = {s.node for s in graph.steps if s.kind == "affine"
                          and len(set(s.inputs)) == 1 and s.inputs[0] in moved}
        # relaxed nodes with one dependent input: the candidates for alpha-CROWN's slopes
        self.slopes = [s.node for s in graph.steps if graph.calls[s.node][0].relaxed
                       and len(graph.calls[s.node][1].deps) == 1]
        self.numel = {n: first(graph.values[n])[0].numel() for n in graph.order
                      if isinstance(first(graph.values[n]), torch.Tensor)}
        # per refined node, the slope nodes it depends on (alpha-CROWN of its own bounds)
        below: dict = {graph.input: set()}
        slopes = set(self.slopes)
        for step in graph.steps:
            up = set().union(*(below.get(a, set()) for a in step.inputs))
            below[step.node] = up | ({step.node} if step.node in slopes else set())
        self.slopes_below = {n: [m for m in self.slopes if m in below.get(n, set())]
                             for n in self.refined}

    def check(self, method: str) -> None:
        """Raise :class:`NotBoundable` if an op lacks the bound ``method`` needs."""
        if "interval" in self.missing:
            raise NotBoundable(self.missing["interval"])
        if method == "crown" and "linear" in self.missing:
            raise NotBoundable(self.missing["linear"])

    def bytes_per_point(self, method: str, specs: int, alpha_steps: int = 0,
                        max_rows: int | None = None, alpha_intermediate: int = 0) -> int:
        """A generous estimate of the memory one point needs (float64 coefficients of the
        widest back-substitution, three live copies, at most ``max_rows`` rows of a node's
        tightening at a time; with ``alpha_steps``, alpha-CROWN's autograd graph of the
        margins' back-substitution: four copies of every node's coefficients, and its
        slopes with their Adam moments and best values; with ``alpha_intermediate`` and
        ``method="crown"``, the same for the rows of each tightened node, counting two
        parameters per input element of every relaxed op below it)."""
        widest = max(self.numel.values())
        total = sum(self.numel.values()) * 8 * 4
        if method == "ibp":
            return total
        refined = self.refined if method == "crown" else []  # crown-ibp: the specs only
        rows = max([2 * self.numel[n] for n in refined] + [specs])
        if max_rows:
            rows = min(rows, max(max_rows, specs))
        out = total + rows * widest * 8 * 3
        if alpha_steps > 0:
            out = max(out, total + specs * 8 * (4 * sum(self.numel.values())
                                                + 5 * sum(self.numel[n] for n in self.slopes)))
        if alpha_intermediate > 0 and method == "crown":
            for n in refined:
                below = self.slopes_below[n]
                if not below:
                    continue
                k = 2 * self.numel[n] if not max_rows else min(2 * self.numel[n],
                                                                 max(2, max_rows))
                params = sum(2 * self.numel[self.graph.calls[m][1].deps[0]] for m in below)
                out = max(out, total + k * 8 * (4 * sum(self.numel.values()) + 5 * params))
        return out

    def margins(self, x0: torch.Tensor, radius: torch.Tensor, norm: str, spec: torch.Tensor,
                box: tuple[float, float] | None, method: str, alpha_steps: int = 0,
                max_rows: int | None = None, alpha_intermediate: int = 0) -> torch.Tensor:
        """Lower bounds (float64, (batch, specs)) of spec·f over the region, exact network."""
        ibp, form = self.forms(x0, radius, norm, spec, box, method, alpha_steps=alpha_steps,
                               max_rows=max_rows, alpha_intermediate=alpha_intermediate)
        return ibp if form is None else torch.maximum(ibp, form.lower(radius))

    def forms(self, x0: torch.Tensor, radius: torch.Tensor, norm: str, spec: torch.Tensor,
              box: tuple[float, float] | None, method: str,
              threshold: torch.Tensor | None = None, alpha_steps: int = 0,
              max_rows: int | None = None,
              alpha_intermediate: int = 0) -> tuple[torch.Tensor, LinearForm | None]:
        """IBP's lower bounds (float64, (batch, specs)) of spec·f over the region and, but for
        ``method="ibp"``, CROWN's as a :class:`LinearForm` of the input (None for IBP).

        With ``threshold`` (batch, specs), only the rows whose IBP bound is ≤ it are
        back-substituted (a row above it stays above it on every smaller ball: IBP's bound
        at this radius holds there): the form then holds k rows per point, row j of point p
        being spec row ``form.rows[p, j]``, meaningful where ``form.valid[p, j]`` (the others
        repeat a dropped row); None when no row of any point is needed. The bounds of the
        rows kept are those of the full computation (every row is back-substituted on its
        own: the rows never mix).

        With ``alpha_steps`` > 0 (and a CROWN method), the margins' form is alpha-CROWN's
        (:meth:`_alpha_form`): the free parameters of the relaxations (ReLU lower slopes,
        max-pooling weights) optimised per point and row at this radius; never below CROWN's
        at any r ≤ ``radius``. With ``max_rows``, ``method="crown"`` tightens an
        intermediate node by at most that many rows at a time (the same bounds, less memory:
        :meth:`bytes_per_point`).

        With ``alpha_intermediate`` > 0 and ``method="crown"``, every tightened node whose
        rows reach a relaxation with free parameters is bounded by alpha-CROWN too
        (:meth:`_refine`: its own parameters per element and sign, this many steps), so the
        relaxations after it are fitted to tighter intervals. CROWN's intervals are then
        computed as well (one more forward pass, without the steps), and CROWN's form of the
        margins on them is :attr:`LinearForm.alt` of the form returned (at the end of its
        chain): the bound is never looser than CROWN's."""
        g = self.graph
        with torch.no_grad():
            values = g._evaluate(x0.to(g.dtype))
            refine = method == "crown"  # "crown-ibp": IBP's intermediate bounds
            x = x0.double()
            r = radius.to(x.device, torch.float64).view(-1, *([1] * (x.ndim - 1)))
            xl, xu = x - r, x + r
            if box is not None:
                xl, xu = xl.clamp(min=box[0]), xu.clamp(max=box[1])
            inp = (x, r.flatten(), xl, xu, norm, box)
            inter = alpha_intermediate if refine and any(
                self.slopes_below[n] for n in self.refined) else 0
            ctx = self._intervals(values, inp, refine, max_rows, inter)
            plain = self._intervals(values, inp, refine, max_rows) if inter else None
            out = g.output
            shape = ctx.lower[out].shape[1:]
            c = spec.to(x.device, torch.float64)
            ibp = _ibp_rows(c, ctx.lower[out], ctx.upper[out])
            if plain is not None:  # both are sound: the larger
                ibp = torch.maximum(ibp, _ibp_rows(c, plain.lower[out], plain.upper[out]))
            if method == "ibp":
                return ibp, None
            rows = valid = goal = None
            if threshold is not None:
                thr = torch.broadcast_to(threshold.to(ibp.device, torch.float64), ibp.shape)
                need = ibp <= thr
                rows, valid = _compress(need)
                if rows is None or valid is None:
                    return ibp, None
                c = c.gather(1, rows[:, :, None].expand(-1, -1, c.shape[2]))
                # alpha-CROWN may stop once every row kept is above its threshold
                goal = torch.where(valid, thr.gather(1, rows), -torch.inf)
            c = c.view(c.shape[0], c.shape[1], *shape)
            form = None
            if alpha_steps > 0:
                form = self._alpha_form(out, c, ctx, inp, alpha_steps, goal)
            if form is None:
                form = self._backward(out, c, ctx, inp, form=True)
            assert isinstance(form, LinearForm)  # with form
            if plain is not None:
                crown = self._backward(out, c, plain, inp, form=True)
                assert isinstance(crown, LinearForm)  # with form
                last = form
                while last.alt is not None:
                    last = last.alt
                last.alt = crown
            form.rows, form.valid = rows, valid
            return ibp, form

    def _intervals(self, values: dict, inp, refine: bool, max_rows: int | None,
                   alpha_intermediate: int = 0) -> Region:
        """The forward pass of :meth:`forms`: every node's interval over the region of
        ``inp`` (IBP, and with ``refine`` CROWN's tightening of the nodes in
        :attr:`refined`, by alpha-CROWN with ``alpha_intermediate`` steps)."""
        g = self.graph
        x, _, xl, xu, norm, _ = inp
        ctx = Region(g, values, x.shape[0])
        ctx.lower[g.input], ctx.upper[g.input] = _widen(xl, xu)
        for step in g.steps:
            n = step.node
            op, call, params = g.calls[n]
            lo, hi = op.interval(call, params, ctx)
            ctx.lower[n], ctx.upper[n] = _widen(lo.double(), hi.double())
            if refine and n in self.refined and not (norm == "linf" and n in self.box_exact):
                self._refine(n, ctx, inp, max_rows, alpha_intermediate)
        return ctx

    def _alpha_form(self, out, c: torch.Tensor, ctx: Region, inp, steps: int,
                    goal: torch.Tensor | None = None,
                    nodes: list | None = None) -> LinearForm | None:
        """alpha-CROWN (Xu et al. 2021) on the margins ``c``: the lower slopes α ∈ [0, 1] of
        the unstable elements of every relaxed op with a free slope
        (:meth:`BoundOp.alpha_init <robust_cert.bounds.BoundOp.alpha_init>`: ReLU), one per
        point, spec row and element, start at CROWN's and take ``steps`` projected Adam
        steps (learning rate :data:`ALPHA_LR`) up the bound of each row over the ball of
        this radius (its sum: the rows are independent). The slopes kept for each row are the
        best evaluated (CROWN's among them), and the bound is the usual back-substitution with
        them, so its soundness does not depend on the optimisation (any α ∈ [0, 1] gives a
        valid lower line: the op clamps them); the returned form is the larger of it and
        CROWN's (:attr:`LinearForm.alt`) at every r. None when no op has a free slope, and
        CROWN's own form when none of them is reached by the margins' coefficients (a
        relaxation by constants before them). With ``goal`` (batch, specs), the steps stop
        once every row's best bound exceeds it (CROWN's form alone when it already does).
        ``nodes``: the relaxed ops optimised (default: every one in :attr:`slopes`; those
        ``out`` depends on when it is an intermediate node). Intermediate bounds are left as
        they are."""
        g = self.graph
        b, s = c.shape[:2]
        alpha: dict[torch.fx.Node, list[torch.Tensor]] = {}
        single: set = set()  # the ops whose alpha_init returned one tensor (not a tuple)
        for n in self.slopes if nodes is None else nodes:
            op, call, params = g.calls[n]
            src = call.deps[0]
            init = op.alpha_init(call, params, ctx.lower[src], ctx.upper[src])
            if init is None:
                continue
            if not isinstance(init, tuple):
                single.add(n)
                init = (init,)
            alpha[n] = [v.unsqueeze(1).expand(b, s, *v.shape[1:]).clone() for v in init]
        if not alpha:
            return None

        def as_read(d: dict) -> dict:  # what the ops read: their alpha_init's form
            return {n: (vs[0] if n in single else tuple(vs)) for n, vs in d.items()}

        r = inp[1]
        best = {n: [v.clone() for v in vs] for n, vs in alpha.items()}
        leaves = [v.requires_grad_(True) for vs in alpha.values() for v in vs]
        opt = torch.optim.Adam(leaves, lr=ALPHA_LR)
        best_val: torch.Tensor | None = None
        crown: LinearForm | None = None
        try:
            for it in range(steps + 1):
                ctx.alpha = as_read(alpha)
                with torch.enable_grad():
                    form = self._backward(out, c, ctx, inp, form=True)
                    assert isinstance(form, LinearForm)  # with form
                    val = form.lower(r)
                    if not val.requires_grad:  # no optimised op is reached: CROWN's form
                        return form
                    if it < steps:
                        opt.zero_grad()
                        (-val.sum()).backward()
                with torch.no_grad():
                    v = val.detach()
                    if best_val is None:  # CROWN's slopes: its form, the floor
                        crown, best_val = form.detached(), v
                        if goal is not None and bool((v > goal).all()):
                            return crown
                    else:
                        better = v > best_val
                        best_val = torch.where(better, v, best_val)
                        for n, vs in alpha.items():
                            best[n] = [torch.where(better.view(b, s, *([1] * (a.ndim - 2))),
                                                   a.detach(), old)
                                       for a, old in zip(vs, best[n], strict=True)]
                    if goal is not None and bool((best_val > goal).all()):
                        break
                    if it < steps:
                        opt.step()
                        for a in leaves:
                            a.nan_to_num_(nan=0.0).clamp_(0.0, 1.0)
            ctx.alpha = as_read(best)
            with torch.no_grad():
                final = self._backward(out, c, ctx, inp, form=True)
        finally:
            ctx.alpha = None
        assert isinstance(final, LinearForm)  # with form
        final.alt = crown
        return final

    def _refine(self, n, ctx: Region, inp, max_rows: int | None = None,
                alpha_steps: int = 0) -> None:
        """Tighten node ``n``'s interval by CROWN: a backward pass with the rows ±e_i of its
        elements that a relaxation after it uses, intersected with the interval it has. With
        ``alpha_steps`` > 0 and a relaxation with free parameters below ``n``, each row is
        alpha-CROWN's (:meth:`_alpha_form`: the parameters of the relaxed ops ``n`` depends
        on, one set per point, element and sign, never looser than CROWN's row)."""
        lo, hi = ctx.lower[n], ctx.upper[n]
        mask = None
        for u in self.users[n]:
            op, call, params = self.graph.calls[u]
            if op.relaxed:
                # a relaxed op whose output feeds another relaxation (ReLU → max pooling)
                # passes on every input bound, stable elements' too: refine them all
                # but for those on which it is a known constant (a ReLU's hi ≤ 0)
                chained = any(self.graph.calls[w][0].relaxed for w in self.users[u])
                if chained:
                    const = op.constant(call, params, lo, hi)
                    m = None if const is None else ~const
                else:
                    m = op.refine(call, params, lo, hi)
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
        # rows e_i, and −e_i added at the first relaxation (the map before it is linear), at
        # most max_rows (both signs) at a time: the rows never mix, so the bounds are those
        # of all of them at once
        step = k if not max_rows else max(1, max_rows // 2)
        parts_lo, parts_hi = [], []
        for j in range(0, k, step):
            part = idx[:, j:j + step]
            kj = part.shape[1]
            a = torch.zeros((b, kj, nel), dtype=torch.float64, device=lo.device)
            a.scatter_(2, part[:, :, None], 1.0)
            a = a.view(b, kj, *lo.shape[1:])
            form = None
            if alpha_steps > 0 and self.slopes_below[n]:
                form = self._alpha_form(n, torch.cat([a, -a], 1), ctx, inp, alpha_steps,
                                        nodes=self.slopes_below[n])
            if form is not None:
                lb = form.lower(inp[1])
            else:
                lb = self._backward(n, a, ctx, inp, mirror=True)
            assert isinstance(lb, torch.Tensor)  # without form
            parts_lo.append(lb[:, :kj])
            parts_hi.append(-lb[:, kj:])
        new_lo, new_hi = torch.cat(parts_lo, 1), torch.cat(parts_hi, 1)
        lo_f, hi_f = lo.reshape(b, -1).clone(), hi.reshape(b, -1).clone()
        old_lo, old_hi = lo_f.gather(1, idx), hi_f.gather(1, idx)
        lo_f.scatter_(1, idx, torch.where(valid, torch.maximum(old_lo, new_lo), old_lo))
        hi_f.scatter_(1, idx, torch.where(valid, torch.minimum(old_hi, new_hi), old_hi))
        ctx.lower[n], ctx.upper[n] = lo_f.view_as(lo), hi_f.view_as(hi)

    def _backward(self, start, a: torch.Tensor, ctx: Region, inp, mirror: bool = False,
                  form: bool = False) -> torch.Tensor | LinearForm:
        """CROWN: a lower bound (batch, specs) of Σ a·start over the region (with ``form``,
        as a :class:`LinearForm`); with ``mirror``, of the rows a and then −a (2·specs), the
        rows −a formed only at the first relaxed op (before it, the coefficients of −a are
        those of a negated)."""
        g = self.graph
        b, s = a.shape[:2]
        ctx.bias = torch.zeros((b, s), dtype=torch.float64, device=a.device)
        ctx.mag = torch.zeros_like(ctx.bias)
        acc = {start: a}
        pos = g.order.index(start)

        def unfold_mirror():
            for key in acc:
                acc[key] = torch.cat([acc[key], -acc[key]], dim=1)
            assert ctx.bias is not None  # set above
            assert ctx.mag is not None
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
        assert bias is not None  # set above
        assert mag is not None
        x, r, _, _, norm, box = inp
        lin = LinearForm(None if a_in is None else a_in.flatten(2), bias, mag, x.flatten(1),
                         r, norm, box)
        return lin if form else lin.lower(r)


def _ibp_rows(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """IBP's lower bounds (batch, specs) of the rows ``c`` (batch, specs, n) of a node with
    the interval [lo, hi]."""
    lo, hi = lo.flatten(1)[:, None, :], hi.flatten(1)[:, None, :]
    return (c.clamp(min=0) * lo + c.clamp(max=0) * hi).sum(-1)


def _compress(need: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The True columns of each row of ``need`` (batch, n), first: (indices (batch, k),
    valid (batch, k)) with k the most in a row, the rest of each row padded with other
    columns (valid False); (None, None) when k = 0."""
    counts = need.sum(1)
    k = int(counts.max()) if need.shape[0] else 0
    if k == 0:
        return None, None
    order = torch.argsort(need.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
    return order, torch.arange(k, device=need.device)[None, :] < counts[:, None]


_DUAL = {"linf": lambda t: t.abs().sum(-1), "l2": lambda t: t.norm(dim=-1),
         "l1": lambda t: t.abs().amax(-1)}


class LinearForm:
    """CROWN's lower bound of the rows Σ a·f of a batch as a function of the input: for every
    x in the region of radius ``radius_max`` (per point) it computed its relaxations on,
    Σ a·f(x) ≥ a_in·x + bias (exact network). :meth:`lower` bounds it over B_norm(x0, r)
    (∩ ``box``) for any r ≤ ``radius_max``: the intermediate bounds of the larger region hold
    on the smaller one, so the relaxations, hence a_in and bias, stay valid, and only the
    minimum of a_in·x over the region changes — a_in·x0 − r‖a_in‖_q (q the dual norm), and
    with the box also the exact minimum over [max(x0 − r, lo), min(x0 + r, hi)] ⊇ ball ∩
    box and, in L2, the Lagrangian dual bound of the ball ∩ box (:func:`_l2_box_min`), the
    largest kept. All are non-increasing in r. The float64 allowance is REL_SLACK times
    the magnitude of the terms at ``radius_max`` (an upper bound of theirs at any r ≤
    radius_max)."""

    rows: torch.Tensor | None = None  # the spec rows held (see LocalBound.forms)
    valid: torch.Tensor | None = None
    #: another form of the same rows (alpha-CROWN: CROWN's); :meth:`lower` takes the larger
    alt: LinearForm | None = None

    def __init__(self, a_in: torch.Tensor | None, bias: torch.Tensor, mag: torch.Tensor,
                 x0: torch.Tensor, radius_max: torch.Tensor, norm: str,
                 box: tuple[float, float] | None):
        self.a_in, self.x0, self.radius_max, self.box = a_in, x0, radius_max, box
        self.norm = norm
        if a_in is None:  # the rows do not depend on the input (constant)
            self.const = bias - REL_SLACK * mag
            return
        xc = x0[:, None, :]
        rm = radius_max[:, None, None]
        reach = torch.maximum((xc - rm).abs(), (xc + rm).abs())
        self.const = bias - REL_SLACK * (mag + (a_in.abs() * reach).sum(-1))
        self.center = (a_in * xc).sum(-1)
        self.dual = _DUAL[norm](a_in)

    def take(self, points: torch.Tensor, rows: torch.Tensor) -> LinearForm:
        """The form of the rows ``rows`` (p, k: indices into this form's rows) of the points
        ``points`` (p): the same bounds, only fewer of them."""
        out = object.__new__(LinearForm)
        out.x0, out.radius_max, out.box, out.norm = (self.x0[points], self.radius_max[points],
                                                     self.box, self.norm)
        out.alt = None if self.alt is None else self.alt.take(points, rows)
        out.const = self.const[points].gather(1, rows)
        if self.a_in is None:
            out.a_in = None
            return out
        out.a_in = self.a_in[points].gather(
            1, rows[:, :, None].expand(-1, -1, self.a_in.shape[2]))
        out.center = self.center[points].gather(1, rows)
        out.dual = self.dual[points].gather(1, rows)
        return out

    def detached(self) -> LinearForm:
        """The same form with its tensors out of autograd's graph."""
        out = object.__new__(LinearForm)
        out.__dict__.update({k: (v.detach() if isinstance(v, torch.Tensor) else v)
                             for k, v in self.__dict__.items()})
        return out

    def lower(self, r: torch.Tensor) -> torch.Tensor:
        """The lower bound (batch, specs) over the region of radius ``r`` (per point, each
        ≤ ``radius_max``; not checked here); with :attr:`alt`, the larger of the two."""
        own = self._lower(r)
        return own if self.alt is None else torch.maximum(own, self.alt.lower(r))

    def _lower(self, r: torch.Tensor) -> torch.Tensor:
        if self.a_in is None:
            return self.const
        out = self.center - r[:, None] * self.dual
        if self.box is not None:
            xc, rr = self.x0, r[:, None]
            lo, hi = (xc - rr).clamp(min=self.box[0]), (xc + rr).clamp(max=self.box[1])
            a = self.a_in
            inside = (torch.bmm(a.clamp(min=0), lo[:, :, None])
                      + torch.bmm(a.clamp(max=0), hi[:, :, None])).squeeze(2)
            out = torch.maximum(out, inside)
            if self.norm == "l2":
                out = torch.maximum(out, _l2_box_min(a, xc, r, self.box))
        return out + self.const


#: Bisection steps of the multiplier of :func:`_l2_box_min` (any multiplier is sound).
L2_BOX_STEPS = 24


def _l2_box_min(a: torch.Tensor, x0: torch.Tensor, r: torch.Tensor,
                box: tuple[float, float]) -> torch.Tensor:
    """A lower bound (batch, specs) of min a·x over ‖x − x0‖₂ ≤ r, lo ≤ x ≤ hi (``box``):
    by weak duality, for every λ > 0, g(λ) = min over the box of a·x + λ(‖x − x0‖² − r²) is
    one, and the minimum is separable: x_i = clip(x0_i − t·a_i, lo, hi) with t = 1/(2λ).
    t is chosen by bisection (on log t, from the unclipped t₀ = r/‖a‖) so that
    ‖x(t) − x0‖ ≈ r, where g is the exact minimum (strong duality: Slater holds when x0 is in
    the box and r > 0); whatever t the bisection ends at, g is a valid bound. The ball alone
    ignores the box: in L2 it lets an input move out of the box along every coordinate (e.g.
    below 0 on a digit's black background), which the box forbids."""
    lo, hi = box
    an = a.norm(dim=-1).clamp_min(1e-300)  # (b, s)
    rr = r[:, None]
    t0 = (rr / an).clamp(max=1e200)  # a = 0: x = x0 whatever t
    xc = x0[:, None, :]

    def dist(t):
        x = (xc - t[..., None] * a).clamp(lo, hi)
        return x, (x - xc).norm(dim=-1)

    # n(t) = ‖x(t) − x0‖ is non-decreasing in t, and n(t₀) ≤ r: bisect log2(t/t₀) in [0, 32]
    k_lo, k_hi = torch.zeros_like(t0), torch.full_like(t0, 32.0)
    for _ in range(L2_BOX_STEPS):
        k = (k_lo + k_hi) / 2
        _, n = dist(t0 * torch.exp2(k))
        below = n <= rr
        k_lo, k_hi = torch.where(below, k, k_lo), torch.where(below, k_hi, k)
    t = (t0 * torch.exp2(k_lo)).clamp_min(1e-300)  # r = 0: x = x0, gap 0
    x, n = dist(t)
    gap = (n * n - rr * rr) / (2 * t)  # λ(‖x − x0‖² − r²), ≤ 0 here
    # the float64 evaluation of the gap term: its own REL_SLACK allowance (a·x's is in mag)
    return (a * x).sum(-1) + gap - REL_SLACK * (n * n + rr * rr) / (2 * t)


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


def _prepare(bound: LipschitzBound, x0: torch.Tensor, radius, norm: str,
             spec: torch.Tensor | None, method: str, max_memory: int, alpha_steps: int = 0,
             alpha_intermediate: int = 0):
    """Checked arguments of :func:`local_bounds` and :func:`local_radius`: (analysis, radii
    per point, spec, points per chunk, rows per tightening pass: None for all, or, with
    ``method="crown"``, fewer when all at once would not fit one point in ``max_memory``)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if alpha_steps < 0:
        raise ValueError(f"alpha_steps must be >= 0, got {alpha_steps}")
    if alpha_intermediate < 0:
        raise ValueError(f"alpha_intermediate must be >= 0, got {alpha_intermediate}")
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
    specs = spec.shape[1]
    per_point = local.bytes_per_point(method, specs, alpha_steps,
                                      alpha_intermediate=alpha_intermediate)
    max_rows = None
    if per_point > max_memory and method == "crown":
        # tighten intermediate nodes by fewer rows at a time (the same bounds): the most
        # (an even number, both signs of each element) that keep one point within budget
        floor = local.bytes_per_point(method, specs, alpha_steps, specs + 1,
                                      alpha_intermediate)
        per_row = local.bytes_per_point(method, specs, alpha_steps, specs + 2,
                                        alpha_intermediate) - floor
        fit = specs + 1 + max(0, int((max_memory - floor) // max(1, per_row)))
        max_rows = max(2, fit - fit % 2)
        per_point = local.bytes_per_point(method, specs, alpha_steps, max_rows,
                                          alpha_intermediate)
    if per_point > max_memory:
        raise NotBoundable(f"the {method} bound needs about {per_point / 2**20:.0f} MiB per "
                           f"point, above max_bound_memory ({max_memory / 2**20:.0f} MiB)")
    budget = max_memory if x0.device.type != "cpu" else min(max_memory, CPU_CHUNK_BYTES)
    return local, radius, spec, max(1, int(budget // per_point)), max_rows


def _rounding(bound: LipschitzBound, x0: torch.Tensor, radius: torch.Tensor, norm: str,
              spec: torch.Tensor, ball_error: torch.Tensor | None) -> torch.Tensor:
    """|C|·E_ball (batch, specs): the float32 rounding allowance of the margins."""
    if ball_error is None:
        _, ball_error = bound.rounding(x0, radius, "linf" if norm == "linf" else "l2")
        assert ball_error is not None  # with a radius: the ball's bound
    return torch.einsum("psc,pc->ps", spec.abs(), ball_error.to(spec.device, torch.float64))


def local_bounds(bound: LipschitzBound, x0: torch.Tensor, radius, norm: str,
                 spec: torch.Tensor | None = None, *, box: tuple[float, float] | None = None,
                 method: str = "crown", max_memory: int = DEFAULT_MAX_MEMORY,
                 ball_error: torch.Tensor | None = None, alpha_steps: int = 0,
                 alpha_intermediate: int = 0) -> LocalMargins:
    """Sound lower bounds of the margins spec·f over B_``norm``(x0, radius) (∩ ``box``) for
    each point of the batch ``x0`` (see the module doc for the algorithm and its soundness).

    ``radius``: a number or one per point; ``norm``: "linf", "l2" or "l1"; ``spec``: (batch,
    S, C) rows (default: e_t − e_j for the predicted class t of the float32 logits at x0);
    ``method``: "crown" (CROWN, intermediate bounds by CROWN, intersected with IBP),
    "crown-ibp" (CROWN with IBP's intermediate bounds: one backward pass, looser) or "ibp";
    ``max_memory``: the points are processed in chunks whose estimated peak (float64
    coefficients) stays within it (a single point above it raises :class:`NotBoundable`);
    ``ball_error``: an elementwise bound (batch, C) of the float32 rounding of the logits
    over a ball containing this one (default: :meth:`LipschitzBound.rounding` at this
    radius); ``alpha_steps``: with a CROWN method, the margins' relaxation is alpha-CROWN's
    (:meth:`LocalBound._alpha_form`: this many optimisation steps of the ReLUs' lower
    slopes; never looser than CROWN's, sound whatever the steps reach; 0: off);
    ``alpha_intermediate``: with ``method="crown"``, the intermediate nodes' tightening by
    alpha-CROWN too, this many steps per node (:meth:`LocalBound.forms`; never looser than
    CROWN's margins; 0: off). Raises :class:`NotBoundable` naming an op without the bound
    ``method`` needs.
    """
    local, radius, spec, chunk, max_rows = _prepare(bound, x0, radius, norm, spec, method,
                                                     max_memory, alpha_steps,
                                                     alpha_intermediate)
    b = x0.shape[0]
    parts = [local.margins(x0[i:i + chunk], radius[i:i + chunk], norm, spec[i:i + chunk], box,
                           method, alpha_steps, max_rows, alpha_intermediate)
             for i in range(0, b, chunk)]
    exact = torch.cat(parts) if parts else torch.zeros((0, spec.shape[1]), dtype=torch.float64)
    rnd = _rounding(bound, x0, radius, norm, spec, ball_error)
    return LocalMargins(exact - rnd, exact, rnd, method)


#: Bisection steps of :func:`local_radius` on a fixed relaxation (no network pass each).
RADIUS_STEPS = 40


def local_radius(bound: LipschitzBound, x0: torch.Tensor, radius, norm: str,
                 spec: torch.Tensor | None = None, offset: torch.Tensor | None = None, *,
                 box: tuple[float, float] | None = None, method: str = "crown",
                 max_memory: int = DEFAULT_MAX_MEMORY,
                 ball_error: torch.Tensor | None = None, alpha_steps: int = 0,
                 alpha_intermediate: int = 0) -> torch.Tensor:
    """Per point of ``x0``: a radius r ≤ ``radius`` (float64) such that every margin
    spec_j·f − offset_j (offset default 0) is positive over the closed ball B_``norm``(x0, r)
    (∩ ``box``), for the exact network and its float32 evaluation; ``radius`` itself where
    the bounds at ``radius`` are positive, 0 where not even the bound at r = 0 is.

    One bound computation at ``radius`` (:func:`local_bounds`' algorithm and arguments): the
    relaxations of every op are fitted to the intervals over the ball of radius ``radius``
    and hold on every smaller ball, so CROWN's bound of each margin is a :class:`LinearForm`
    valid for every r ≤ ``radius`` (IBP's, a constant, too; so is the rounding allowance
    |C|·E_ball, since E grows with the radius), non-increasing in r. The largest r keeping
    them all positive is found by bisection on these forms (:data:`RADIUS_STEPS` steps, no
    network pass), and the returned r is one where positivity was checked: sound, whatever
    the rounding of the bisection. Work that cannot change r is skipped
    (:func:`_radius_on_forms`: rows and points already certified by IBP, rows already
    positive at ``radius``). ``alpha_steps``, ``alpha_intermediate``: alpha-CROWN's
    margins and intermediate bounds, optimised at ``radius`` (:func:`local_bounds`). It is
    at most the radius a fresh bound at r would certify (tighter intervals at r): call again
    with a radius between (bisection of
    :meth:`SafeRadius._local_radius <robust_cert.metrics.safe_radius.SafeRadius>`)."""
    local, radius, spec, chunk, max_rows = _prepare(bound, x0, radius, norm, spec, method,
                                                     max_memory, alpha_steps,
                                                     alpha_intermediate)
    b = x0.shape[0]
    thr = _rounding(bound, x0, radius, norm, spec, ball_error)
    if offset is not None:
        thr = thr + offset.to(thr.device, torch.float64)
    out = []
    for i in range(0, b, chunk):
        sl = slice(i, i + chunk)
        out.append(_radius_on_forms(local, x0[sl], radius[sl], norm, spec[sl], box, method,
                                    thr[sl], alpha_steps, max_rows, alpha_intermediate))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _radius_on_forms(local: LocalBound, x0: torch.Tensor, big: torch.Tensor, norm: str,
                     spec: torch.Tensor, box: tuple[float, float] | None, method: str,
                     t: torch.Tensor, alpha_steps: int = 0,
                     max_rows: int | None = None, alpha_intermediate: int = 0) -> torch.Tensor:
    """:func:`local_radius` on one chunk of points (thresholds ``t``), with three shortcuts
    that leave its result unchanged, since every bound involved is non-increasing in r
    (fitted at ``big``, valid on every smaller ball):

    * with ``method="crown"``, a point whose IBP bounds at ``big`` exceed ``t`` on every row
      is certified at ``big`` without CROWN (one IBP pass first: its intervals are the ones
      CROWN's forward pass starts from, and the result takes the larger of the two bounds);
    * a row whose IBP bound exceeds its threshold is not back-substituted
      (:meth:`LocalBound.forms` with ``threshold``): it holds at every r ≤ ``big``;
    * the bisection runs only on the points certified at r = 0 and not at ``big``, and only
      on their rows not already positive at ``big`` (those stay positive below it)."""
    r_out = torch.zeros_like(big)
    todo = torch.arange(big.shape[0], device=big.device)
    if method == "crown":
        ibp0, _ = local.forms(x0, big, norm, spec, box, "ibp")
        done = ((ibp0 - t) > 0).all(1)
        r_out[done] = big[done]
        todo = (~done).nonzero().squeeze(1)
        if not todo.numel():
            return r_out
        x0, big, spec, t = x0[todo], big[todo], spec[todo], t[todo]
    ibp, form = local.forms(x0, big, norm, spec, box, method, threshold=t,
                            alpha_steps=alpha_steps, max_rows=max_rows,
                            alpha_intermediate=alpha_intermediate)
    if form is None:  # IBP: a constant in r (or no row left to back-substitute)
        good = ((ibp - t) > 0).all(1)
        r_out[todo] = torch.where(good, big, torch.zeros_like(big))
        return r_out
    assert form.rows is not None  # forms with a threshold
    assert form.valid is not None
    ibp_k, t_k, valid = ibp.gather(1, form.rows), t.gather(1, form.rows), form.valid

    def rows_ok(f: LinearForm, r, ibp_k, t_k, valid):
        return ((torch.maximum(ibp_k, f.lower(r)) - t_k) > 0) | ~valid

    at_big = rows_ok(form, big, ibp_k, t_k, valid)
    full = at_big.all(1)
    zero = rows_ok(form, torch.zeros_like(big), ibp_k, t_k, valid).all(1)
    r = torch.where(full, big, torch.zeros_like(big))
    bis = (zero & ~full).nonzero().squeeze(1)
    if bis.numel():
        rows, keep = _compress(~at_big[bis])
        assert rows is not None  # each point has a row not positive at big
        assert keep is not None
        sub = form.take(bis, rows)
        s_ibp, s_t = ibp_k[bis].gather(1, rows), t_k[bis].gather(1, rows)
        s_valid = keep & valid[bis].gather(1, rows)
        lo, hi = torch.zeros_like(big[bis]), big[bis].clone()
        for _ in range(RADIUS_STEPS):
            mid = (lo + hi) / 2
            good = rows_ok(sub, mid, s_ibp, s_t, s_valid).all(1)
            lo = torch.where(good, mid, lo)
            hi = torch.where(good, hi, mid)
        r[bis] = lo
    r_out[todo] = r
    return r_out
