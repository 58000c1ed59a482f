"""Linear maps with a weight matrix: nn.Linear, F.linear, aten.linear/addmm, x @ C."""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from robust_cert.bounds.base import BoundOp, OpCall, Step, aten_targets
from robust_cert.bounds.registry import register_bound_op
from robust_cert.bounds.rounding import NORM_SAFETY, unit_roundoff

LINEAR = {F.linear} | aten_targets("linear")
ADDMM = aten_targets("addmm")
MM = {torch.mm, torch.matmul, operator.matmul} | aten_targets("mm", "matmul")


class LinearParams(NamedTuple):
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None
    info: str


@register_bound_op
class Linear(BoundOp):
    """y = W x + b: nn.Linear, ``F.linear``/``aten.linear``, ``aten.addmm`` (b·β + x·(α Wᵀ))
    and ``x @ C`` / ``mm`` / ``matmul`` of a 2-D input by a constant 2-D matrix (W = Cᵀ).

    Lipschitz: the operator norms of W, which are its Lipschitz constants: ‖W‖₂ by SVD
    (exact spectral norm) for L2 and the max absolute row sum for L∞, both computed in
    float64 from the float32 weights and multiplied by NORM_SAFETY (1 + 1e-9) to cover the
    float64 rounding of the SVD and the sums. Rounding ("affine"): each output is a sum of n
    rounded products plus the bias (n the input features), so |ŷ − y| ≤ |W|·e_in +
    γ_{n+1}(|W||ẑ| + |b|) with u of the matmul arithmetic (read when rounding). W is kept as
    ``matrix``: a final Linear becomes the head of the bound.

    Local bounds: exact. IBP by centre and radius (W c + b ± |W| r); CROWN back-substitutes
    A ↦ A W with the constant A·b, in float64 from the float32 parameters.
    """

    modules = (nn.Linear,)
    functions = LINEAR | ADDMM | MM

    def params(self, call: OpCall) -> LinearParams:
        if call.form == "module":
            m = call.target
            return LinearParams(m.weight.detach(), m.bias, call.label)
        fn, n, deps = call.target, call.node, call.deps
        if fn in LINEAR and call.single:
            return LinearParams(call.const(call.arg(1, "weight")),
                                call.const(call.arg(2, "bias")), call.label)
        if fn in ADDMM and len(deps) == 1 and n.args[1] is deps[0]:
            wt = call.const(n.args[2])
            beta = float(n.kwargs.get("beta", 1.0))  # pyright: ignore[reportArgumentType]  (fx arg: a number)
            alpha = float(n.kwargs.get("alpha", 1.0))  # pyright: ignore[reportArgumentType]  (fx arg: a number)
            b = call.const(n.args[0])
            b = None if b is None else b * beta
            return LinearParams((wt * alpha).t(), b, "addmm")
        if fn in MM and len(deps) == 1 and n.args[0] is deps[0] and call.z is not None \
                and call.z.ndim == 2:
            wt = call.const(n.args[1])
            if isinstance(wt, torch.Tensor) and wt.ndim == 2:
                return LinearParams(wt.t(), None, call.label)
        raise call.unsupported()

    def lipschitz(self, call: OpCall, params: LinearParams) -> Step:
        w, b, info = params
        w = w.detach()
        w64 = w.double()
        l2 = float(torch.linalg.matrix_norm(w64, 2)) * NORM_SAFETY
        linf = float(w64.abs().sum(1).max()) * NORM_SAFETY
        l1 = float(w64.abs().sum(0).max()) * NORM_SAFETY  # the largest column sum
        wabs = w.abs()
        return call.step("affine", l2=l2, linf=linf, l1=l1,
                         apply=lambda v: F.linear(v, w), apply_abs=lambda v: F.linear(v, wabs),
                         bias=None if b is None else b.detach().abs(), fan_in=w.shape[1] + 1,
                         u=unit_roundoff(w.dtype, w.device, "matmul"), u_kind="matmul",
                         matrix=w, info=info)

    def interval(self, call: OpCall, params: LinearParams, ctx):
        w, b, _ = params
        lo, hi = ctx.lower[call.deps[0]], ctx.upper[call.deps[0]]
        w64 = w.detach().to(lo.device, torch.float64)
        c, r = (hi + lo) / 2, (hi - lo) / 2
        mid = F.linear(c, w64, None if b is None else b.detach().to(lo.device, torch.float64))
        rad = F.linear(r, w64.abs())
        return mid - rad, mid + rad

    def linear(self, call: OpCall, params: LinearParams, a: torch.Tensor, ctx):
        w, b, _ = params
        if b is not None:
            ctx.add_bias(a, b.detach())
        return [(call.deps[0], a @ w.detach().to(a.device, torch.float64))]
