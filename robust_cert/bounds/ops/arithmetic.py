"""Arithmetic: additions and subtractions (residual connections), scaling by a constant,
negation."""

from __future__ import annotations

import operator

import torch

from robust_cert.bounds.base import BoundOp, NotBoundable, OpCall, Step, aten_targets
from robust_cert.bounds.registry import register_bound_op

ADD = {operator.add, operator.iadd, torch.add} | aten_targets("add", "add_")
RSUB = aten_targets("rsub")
SUB = {operator.sub, operator.isub, torch.sub} | aten_targets("sub", "sub_") | RSUB
MUL = {operator.mul, operator.imul, torch.mul} | aten_targets("mul", "mul_")
DIV = {operator.truediv, operator.itruediv, torch.div} | aten_targets("div", "div_")
NEG = {operator.neg, torch.neg} | aten_targets("neg")


@register_bound_op
class Add(BoundOp):
    """a ± α·b (``+``, ``-``, ``torch.add/sub`` with ``alpha``, aten ``add``/``sub``/``rsub``;
    either operand may be a constant).

    Lipschitz: the sum of the dependent operands' constants times |coefficient| (triangle
    inequality), so a residual x + f(x) has L ≤ 1 + L_f. Rounding ("add"): the errors add
    with the same coefficients, plus one rounding of the result, γ₂ of Σ|c_i||z_i|.

    Local bounds: exact (affine). IBP: the op at the centres ± Σ|c_i|·radius_i; CROWN: each
    operand takes c_i·A (signed), the constant operand the bias A·(op at zero).
    """

    functions = ADD | SUB
    methods = {"add": torch.add, "__add__": torch.add, "sub": torch.sub,
               "__sub__": torch.sub}

    def params(self, call: OpCall) -> tuple[list[torch.fx.Node], list[float]]:
        fn, n = call.target, call.node
        plain = fn in (operator.add, operator.sub, operator.iadd, operator.isub)
        alpha = 1.0 if plain else abs(float(n.kwargs.get("alpha", 1.0)))  # pyright: ignore[reportArgumentType]  (fx arg: a number)
        rsub = fn in RSUB
        coefs = [(a, (alpha if rsub else 1.0) if i == 0 else (1.0 if rsub else alpha))
                 for i, a in enumerate(n.args[:2])]
        dep_coef = [c for a, c in coefs if call.is_dep(a)]
        dep_nodes = [a for a, _ in coefs if call.is_dep(a)]
        if set(dep_nodes) != set(call.deps) or not dep_nodes:
            raise NotBoundable(f"cannot bound the addition at {call.where}")
        return dep_nodes, dep_coef

    def lipschitz(self, call: OpCall, params) -> Step:
        nodes, coef = params
        return call.step("add", nodes, coef=coef, ulps=2.0, info=call.label)

    @staticmethod
    def signed(call: OpCall) -> list[tuple[torch.fx.Node, float]]:
        """The dependent operands with their signed coefficients."""
        fn, n = call.target, call.node
        plain = fn in (operator.add, operator.sub, operator.iadd, operator.isub)
        alpha = 1.0 if plain else float(n.kwargs.get("alpha", 1.0))  # pyright: ignore[reportArgumentType]  (fx arg: a number)
        if fn in RSUB:
            coefs = [-alpha, 1.0]
        elif fn in SUB:
            coefs = [1.0, -alpha]
        else:
            coefs = [1.0, alpha]
        return [(a, c) for a, c in zip(n.args[:2], coefs, strict=False) if call.is_dep(a)]

    def interval(self, call: OpCall, params, ctx):
        terms = self.signed(call)
        lo = {a: ctx.lower[a] for a, _ in terms}
        hi = {a: ctx.upper[a] for a, _ in terms}
        mid = ctx.rerun(call.node, {a: (hi[a] + lo[a]) / 2 for a in lo}).double()
        rad = sum(abs(c) * (hi[a] - lo[a]) / 2 for a, c in terms)
        return mid - rad, mid + rad

    def linear(self, call: OpCall, params, a: torch.Tensor, ctx):
        terms = self.signed(call)
        const = ctx.rerun(call.node, {n: torch.zeros_like(ctx.lower[n]) for n, _ in terms})
        ctx.add_bias(a, const)
        return [(n, c * a) for n, c in terms]


@register_bound_op
class Scale(BoundOp):
    """Multiplication or true division by a constant c (a scalar or a tensor broadcast to
    the input's shape, never beyond it).

    Lipschitz: max|c| for a product, 1/min|c| for a division (elementwise scaling by at most
    that much, in every p-norm). Rounding ("scale"): errors scale by the same factor, plus one
    rounding of the result, γ₂ of its magnitude. A rounding division and a division by a
    constant containing zero are refused.

    Local bounds: exact. The elementwise factor f (the op applied to ones): IBP centre·f ±
    radius·|f|, CROWN A·f.
    """

    functions = MUL | DIV
    methods = {"mul": torch.mul, "div": torch.div}

    def params(self, call: OpCall) -> float:
        fn, n, deps = call.target, call.node, call.deps
        if len(deps) == 1 and n.args[0] is deps[0] and not call.is_dep(n.args[1]):
            c = call.const(n.args[1])
            c = c.detach().double().abs() if isinstance(c, torch.Tensor) else abs(float(c))
            if fn in DIV:
                if n.kwargs.get("rounding_mode") is not None:
                    raise NotBoundable(f"cannot bound a rounding division at {call.where}")
                cmin = float(c.min()) if isinstance(c, torch.Tensor) else c
                if cmin == 0:
                    raise NotBoundable(f"cannot bound a division by zero at {call.where}")
                return 1.0 / cmin
            return float(c.max()) if isinstance(c, torch.Tensor) else c
        if fn in MUL and len(deps) == 1 and n.args[1] is deps[0] \
                and not call.is_dep(n.args[0]):
            c = call.const(n.args[0])
            return float(c.detach().abs().max()) if isinstance(c, torch.Tensor) \
                else abs(float(c))
        raise call.unsupported()

    def lipschitz(self, call: OpCall, params: float) -> Step:
        return call.step("scale", l2=params, linf=params, ulps=2.0, info=call.label)

    @staticmethod
    def factor(call: OpCall, ctx) -> torch.Tensor:
        src = call.deps[0]
        return ctx.rerun(call.node, {src: torch.ones_like(ctx.lower[src])}).double()

    def interval(self, call: OpCall, params: float, ctx):
        src = call.deps[0]
        f = self.factor(call, ctx)
        lo, hi = ctx.lower[src], ctx.upper[src]
        mid, rad = (hi + lo) / 2 * f, (hi - lo) / 2 * f.abs()
        return mid - rad, mid + rad

    def linear(self, call: OpCall, params: float, a: torch.Tensor, ctx):
        return [(call.deps[0], a * self.factor(call, ctx).unsqueeze(1))]


@register_bound_op
class Neg(BoundOp):
    """−x: an isometry in every norm (L = 1), exact in float ("same", negating)."""

    functions = NEG
    methods = {"neg": torch.neg}

    def params(self, call: OpCall) -> None:
        if len(call.deps) != 1:
            raise call.unsupported()
        return None

    def lipschitz(self, call: OpCall, params: None) -> Step:
        return call.step("same", negates=True, info=call.label)

    def interval(self, call: OpCall, params: None, ctx):
        src = call.deps[0]
        return -ctx.upper[src], -ctx.lower[src]

    def linear(self, call: OpCall, params: None, a: torch.Tensor, ctx):
        return [(call.deps[0], -a)]
