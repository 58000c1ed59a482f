"""Elementwise activations with a bounded slope: ReLU family, tanh, softsign, sigmoid,
leaky ReLU, ELU."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robust_cert.bounds.base import BoundOp, OpCall, Step, aten_targets
from robust_cert.bounds.registry import register_bound_op


class Activation(BoundOp):
    """An elementwise φ with |φ(a) − φ(b)| ≤ L|a − b| (L = :meth:`slope`): L bounds its
    Lipschitz constant in every p-norm (elementwise maps scale each coordinate's change by at
    most L). Rounding ("act"): errors scale by L, and the op itself adds ``ulps`` units of
    roundoff of its result, |φ(ẑ)| ≤ |φ(0)| + L|ẑ| with |φ(0)| ≤ 1/2.

    ``module_info``/``method_info`` name a module or method form in the report (default: the
    module's class name, the method name).

    Local bounds: every φ here is monotone, or piecewise linear with its only kink at 0, so
    over [l, u] its extremes are among φ(l), φ(u) and φ(0) (when l < 0 < u): IBP takes their
    min and max (φ evaluated by the node's own op in float64). CROWN, by default, relaxes φ by
    those constant bounds (slope 0: sound for any φ); piecewise-linear ops relax tighter."""

    ulps: ClassVar[float] = 0.0
    relaxed: ClassVar[bool] = True
    module_info: ClassVar[str | None] = None
    method_info: ClassVar[str | None] = None

    def slope(self, call: OpCall) -> float | None:
        """The bound L on |φ'| (None: 1, the default of the step)."""
        return None

    def params(self, call: OpCall) -> float | None:
        if not call.single:
            raise call.unsupported()
        return self.slope(call)

    def lipschitz(self, call: OpCall, params: float | None) -> Step:
        if call.form == "module":
            info = self.module_info or call.label
        elif call.form == "method":
            info = self.method_info or call.label
        else:
            info = call.label
        fields: dict[str, Any] = {} if params is None else {"l2": params, "linf": params}
        if self.ulps:
            fields["ulps"] = self.ulps
        return call.step("act", info=info, **fields)

    def interval(self, call: OpCall, params, ctx):
        src = call.deps[0]
        lo, hi = ctx.lower[src], ctx.upper[src]
        f_lo = ctx.rerun(call.node, {src: lo.clone()}).double()
        f_hi = ctx.rerun(call.node, {src: hi.clone()}).double()
        f_0 = ctx.rerun(call.node, {src: torch.zeros_like(lo)}).double()
        kink = (lo < 0) & (hi > 0)
        out_lo = torch.minimum(f_lo, f_hi)
        out_hi = torch.maximum(f_lo, f_hi)
        return (torch.where(kink, torch.minimum(out_lo, f_0), out_lo),
                torch.where(kink, torch.maximum(out_hi, f_0), out_hi))

    def linear(self, call: OpCall, params, a: torch.Tensor, ctx):
        # constant relaxation: φ ∈ [lo_out, hi_out] on the region
        zero = torch.zeros_like(ctx.lower[call.node])
        ctx.relax(a, (zero, ctx.lower[call.node]), (zero, ctx.upper[call.node]))
        return []

    @staticmethod
    def relax(a: torch.Tensor, lower: tuple, upper: tuple, ctx) -> torch.Tensor:
        """Back-substitution through φ(z) ≥ αL·z + βL and φ(z) ≤ αU·z + βU (elementwise, on
        the region): positive coefficients take the lower line, negative ones the upper
        (:meth:`Region.relax <robust_cert.bounds.local.Region.relax>`)."""
        return ctx.relax(a, lower, upper)


#: ReLU's own relaxation code (the general clamp's lines for the range [0, ∞), in fewer
#: passes); off: the general code (tests compare the two).
RELU_FAST_PATH = True

RELU6 = {F.relu6} | aten_targets("relu6")
HARDTANH = {F.hardtanh} | aten_targets("hardtanh", "hardtanh_")


@register_bound_op
class ReLU(Activation):
    """ReLU, ReLU6, Hardtanh (any clamp range): slope ≤ 1; exact in float (a max or clamp,
    no rounding). For ReLU, alpha-CROWN may replace the lower slope of an unstable element by
    any α ∈ [0, 1] (α·z ≤ max(z, 0) for every z), one per spec row (``ctx.alpha``)."""

    modules = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
    functions = {F.relu, torch.relu, F.relu6, F.hardtanh} | aten_targets(
        "relu", "relu_", "hardtanh", "hardtanh_", "relu6")
    methods = ("relu", "relu_")
    method_info = "relu"

    # Local bounds: clamp(z, a, b) (ReLU: a = 0, b = ∞; ReLU6: 0, 6; Hardtanh: its range)
    # with lines valid on [l, u] (each checked at the kinks and the ends):
    #   stable pieces exactly; l < a < u ≤ b: upper chord of (l, a), (u, u), lower
    #   a + α(z − a) with α = 1 if u − a > a − l else 0 (CROWN's adaptive slope);
    #   a ≤ l < b < u: lower chord of (l, l), (u, b), upper b + α(z − b) (α likewise);
    #   l < a, b < u: lower through (a, a) and (u, b), upper through (l, a) and (b, b).

    def clamp_range(self, call: OpCall) -> tuple[float, float]:
        if call.form == "module":
            m = call.target
            if isinstance(m, nn.Hardtanh):
                return float(m.min_val), float(m.max_val)
            return 0.0, math.inf
        if call.form == "method":
            return 0.0, math.inf
        fn = call.target
        if fn in RELU6:
            return 0.0, 6.0
        if fn in HARDTANH:
            return float(call.arg(1, "min_val", -1.0)), float(call.arg(2, "max_val", 1.0))
        return 0.0, math.inf

    def refine(self, call: OpCall, params, lo, hi):
        a, b = self.clamp_range(call)
        return ((lo < a) & (hi > a)) | ((lo < b) & (hi > b))

    def constant(self, call: OpCall, params, lo, hi):
        a, b = self.clamp_range(call)
        return (hi <= a) | (lo >= b)

    def alpha_init(self, call: OpCall, params, lo, hi):
        # ReLU (not ReLU6/Hardtanh): the lower line α·z of an unstable element, CROWN's α
        if self.clamp_range(call) != (0.0, math.inf) or not bool(((lo < 0) & (hi > 0)).any()):
            return None
        return (hi > -lo).double()

    def linear(self, call: OpCall, params, coef: torch.Tensor, ctx):
        src = call.deps[0]
        lo, up = ctx.lower[src], ctx.upper[src]
        a, b = self.clamp_range(call)
        alpha = ctx.alpha.get(call.node) if ctx.alpha else None
        if alpha is not None and a == 0.0 and b == math.inf:
            # alpha-CROWN: the lower line α·z of an unstable element, α ∈ [0, 1] (any such
            # line is below ReLU everywhere), one α per spec row (batch, specs, *shape); the
            # upper chord and the stable elements as below
            cross = (lo < 0) & (up > 0)
            slope = up / (up - lo).clamp(min=1e-300)
            au = torch.where(cross, slope, (lo >= 0).double())
            bu = torch.where(cross, -slope * lo, torch.zeros_like(lo))
            al = torch.where(cross.unsqueeze(1), alpha.clamp(0.0, 1.0), au.unsqueeze(1))
            neg = coef.clamp(max=0)
            ctx.add_bias(neg, bu)
            return [(src, coef.clamp(min=0) * al + neg * au.unsqueeze(1))]
        if RELU_FAST_PATH and a == 0.0 and b == math.inf:  # ReLU: the lines below, fewer passes
            cross = (lo < 0) & (up > 0)
            slope = up / (up - lo).clamp(min=1e-300)
            au = torch.where(cross, slope, (lo >= 0).double())
            al = torch.where(cross, (up > -lo).double(), au)
            bu = torch.where(cross, -slope * lo, torch.zeros_like(lo))
            return [(src, self.relax(coef, (al, torch.zeros_like(lo)), (au, bu), ctx))]
        one, zero = torch.ones_like(lo), torch.zeros_like(lo)
        bf = b  # ∞ for ReLU: the cases at b never hold (their unselected values are unused)
        width = (up - lo).clamp(min=1e-300)
        below, above = up <= a, lo >= bf
        inside = (lo >= a) & (up <= bf)
        left = (lo < a) & (up > a) & (up <= bf)  # crosses a only
        right = (lo >= a) & (lo < bf) & (up > bf)  # crosses b only
        # lower line
        al = torch.where(inside, one, zero)
        bl = torch.where(below, a * one, torch.where(above, bf * one, zero))
        alpha = (up - a > a - lo).double()
        al = torch.where(left, alpha, al)
        bl = torch.where(left, a * (1 - alpha), bl)
        s_r = (bf - lo) / width
        al = torch.where(right, s_r, al)
        bl = torch.where(right, lo * (1 - s_r), bl)
        both = (lo < a) & (up > bf)
        s_b = (bf - a) / (up - a).clamp(min=1e-300)
        al = torch.where(both, s_b, al)
        bl = torch.where(both, a * (1 - s_b), bl)
        # upper line
        au = torch.where(inside, one, zero)
        bu = torch.where(below, a * one, torch.where(above, bf * one, zero))
        s_l = (up - a) / width
        au = torch.where(left, s_l, au)
        bu = torch.where(left, a - s_l * lo, bu)
        beta = (bf - lo > up - bf).double()
        au = torch.where(right, beta, au)
        bu = torch.where(right, bf * (1 - beta), bu)
        s_t = (bf - a) / (bf - lo).clamp(min=1e-300)
        au = torch.where(both, s_t, au)
        bu = torch.where(both, bf * (1 - s_t), bu)
        return [(src, self.relax(coef, (al, bl), (au, bu), ctx))]


@register_bound_op
class Tanh(Activation):
    """tanh (slope 1 − tanh² ≤ 1) and softsign x/(1 + |x|) (slope 1/(1 + |x|)² ≤ 1); the
    library functions are within 4 ulp of their result."""

    modules = (nn.Tanh, nn.Softsign)
    functions = {torch.tanh, F.tanh, F.softsign} | aten_targets("tanh")
    methods = ("tanh",)
    ulps = 4.0
    method_info = "tanh"


@register_bound_op
class Sigmoid(Activation):
    """Logistic sigmoid: slope σ(1 − σ) ≤ 1/4; within 4 ulp of its result."""

    modules = (nn.Sigmoid,)
    functions = {torch.sigmoid, F.sigmoid} | aten_targets("sigmoid")
    methods = ("sigmoid",)
    ulps = 4.0
    module_info = "Sigmoid"
    method_info = "sigmoid"

    def slope(self, call: OpCall) -> float:
        return 0.25


@register_bound_op
class LeakyReLU(Activation):
    """Leaky ReLU with negative slope a: slope ≤ max(1, |a|); 1 ulp (one product)."""

    modules = (nn.LeakyReLU,)
    functions = {F.leaky_relu} | aten_targets("leaky_relu", "leaky_relu_")
    ulps = 1.0
    module_info = "LeakyReLU"

    def negative_slope(self, call: OpCall) -> float:
        return float(call.target.negative_slope if call.form == "module" else call.arg(
            1, "negative_slope", 0.01))

    def slope(self, call: OpCall) -> float:
        return max(1.0, abs(self.negative_slope(call)))

    def refine(self, call: OpCall, params, lo, hi):
        return (lo < 0) & (hi > 0)

    def linear(self, call: OpCall, params, coef: torch.Tensor, ctx):
        """Slopes s (z < 0) and 1: convex when s ≤ 1 (upper chord, lower α·z with α = 1 if
        up > −lo else s), concave when s > 1 (lower chord, upper α·z likewise); exact on
        stable elements."""
        src = call.deps[0]
        lo, up = ctx.lower[src], ctx.upper[src]
        s = self.negative_slope(call)
        zero = torch.zeros_like(lo)
        stable = torch.where(lo >= 0, torch.ones_like(lo), torch.full_like(lo, s))
        cross = (lo < 0) & (up > 0)
        k = (up - s * lo) / (up - lo).clamp(min=1e-300)
        chord_b = s * lo - k * lo
        alpha = torch.where(up > -lo, torch.ones_like(lo), torch.full_like(lo, s))
        line = (torch.where(cross, alpha, stable), zero)
        chord = (torch.where(cross, k, stable), torch.where(cross, chord_b, zero))
        lower, upper = (line, chord) if s <= 1 else (chord, line)
        return [(src, self.relax(coef, lower, upper, ctx))]


@register_bound_op
class ELU(Activation):
    """ELU with scale α: α(eˣ − 1) for x < 0 has slope α·eˣ ≤ |α|, so slope ≤ max(1, |α|);
    within 4 ulp of its result."""

    modules = (nn.ELU,)
    functions = {F.elu} | aten_targets("elu", "elu_")
    ulps = 4.0
    module_info = "ELU"

    def slope(self, call: OpCall) -> float:
        a = call.target.alpha if call.form == "module" else call.arg(1, "alpha", 1.0)
        return max(1.0, abs(float(a)))
