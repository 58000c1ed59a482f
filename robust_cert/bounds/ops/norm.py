"""Batch normalisation in eval mode (running statistics)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from robust_cert.bounds.base import BoundOp, NotBoundable, OpCall, Step, aten_targets
from robust_cert.bounds.registry import register_bound_op
from robust_cert.bounds.rounding import NORM_SAFETY, unit_roundoff

BATCH_NORM = {F.batch_norm} | aten_targets("batch_norm", "_native_batch_norm_legit_no_training")


class BatchNormParams(NamedTuple):
    weight: torch.Tensor | None  # γ
    bias: torch.Tensor | None  # β
    mean: torch.Tensor  # running mean μ
    var: torch.Tensor  # running variance σ²
    eps: float


@register_bound_op
class BatchNorm(BoundOp):
    """Batch norm in eval mode: y = s·(x − μ) + β per channel, s = γ/√(σ² + eps).

    Lipschitz: a diagonal map, so max |s| in both norms (computed in float64, × NORM_SAFETY).
    Rounding ("affine", diagonal): folded or not, each output takes a handful of rounded
    operations, so |BN(ẑ) − BN(z)| ≤ |s|·e + γ₆(|s||ẑ| + |s||μ| + |β|). Training mode (batch
    statistics) and missing running statistics are refused.

    Local bounds: the affine map x ↦ s·x + (β − s·μ) per channel (folded, float64): IBP by
    centre and radius, CROWN A ↦ A·s with the constant A·(β − s·μ); exact.
    """

    modules = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    functions = BATCH_NORM

    def params(self, call: OpCall) -> BatchNormParams:
        if call.form == "module":
            m = call.target
            if m.training or m.running_var is None:
                raise call.unsupported("batch norm in training mode (batch statistics)")
            return BatchNormParams(m.weight, m.bias, m.running_mean, m.running_var, m.eps)
        fn, n, where = call.target, call.node, call.where
        if not call.single:
            raise call.unsupported()
        if fn is F.batch_norm:
            mean = call.const(call.arg(1, "running_mean"))
            var = call.const(call.arg(2, "running_var"))
            w, b = call.const(call.arg(3, "weight")), call.const(call.arg(4, "bias"))
            if call.arg(5, "training", False):
                raise NotBoundable(f"cannot bound batch norm in training mode at {where}")
            eps = float(call.arg(7, "eps", 1e-5))
        else:
            w, b = call.const(n.args[1]), call.const(n.args[2])
            mean, var = call.const(n.args[3]), call.const(n.args[4])
            if "legit" in str(fn):  # (input, weight, bias, mean, var, momentum, eps)
                eps = float(n.args[6])  # pyright: ignore[reportArgumentType]  (fx arg: a number)
            else:  # aten.batch_norm(input, weight, bias, mean, var, training, mom, eps, …)
                if n.args[5]:
                    raise NotBoundable(f"cannot bound batch norm in training mode at {where}")
                eps = float(n.args[7])  # pyright: ignore[reportArgumentType]  (fx arg: a number)
        if mean is None or var is None:
            raise NotBoundable(f"cannot bound batch norm without running statistics at "
                               f"{where}")
        return BatchNormParams(w, b, mean, var, eps)

    def lipschitz(self, call: OpCall, params: BatchNormParams) -> Step:
        w, b, mean, var, eps = params
        if call.form == "function" and "legit" in str(call.target):
            call.mark_tuple_output()  # (output, save_mean, save_rstd)
        z = call.z
        assert z is not None  # the op's one dependent input (params checked it)
        scale = 1.0 / torch.sqrt(var.detach().double() + eps)
        if w is not None:
            scale = scale * w.detach().double()
        s = float(scale.abs().max())
        view = (-1, *([1] * (z.ndim - 2)))
        sabs = scale.abs().to(z.dtype).view(view)
        # |BN(ẑ) − BN(z)| ≤ |s|·e + γ_6(|s||ẑ| + |s||μ| + |β|): a handful of rounded
        # operations per element (folded or not)
        const = (scale.abs() * mean.detach().double().abs()
                 + (b.detach().double().abs() if b is not None else 0.0)).to(z.dtype).view(view)
        return call.step("affine", l2=s * NORM_SAFETY, linf=s * NORM_SAFETY, l1=s * NORM_SAFETY,
                         apply=lambda v: v * sabs, apply_abs=lambda v: v * sabs,
                         bias=const, fan_in=6,
                         u=unit_roundoff(z.dtype, z.device), u_kind="", info="BatchNorm (eval)")

    @staticmethod
    def _affine(params: BatchNormParams, z: torch.Tensor):
        w, b, mean, var, eps = params
        dev = z.device
        scale = 1.0 / torch.sqrt(var.detach().to(dev, torch.float64) + eps)
        if w is not None:
            scale = scale * w.detach().to(dev, torch.float64)
        shift = -scale * mean.detach().to(dev, torch.float64)
        if b is not None:
            shift = shift + b.detach().to(dev, torch.float64)
        view = (-1, *([1] * (z.ndim - 2)))
        return scale.view(view), shift.view(view)

    def interval(self, call: OpCall, params: BatchNormParams, ctx):
        lo, hi = ctx.lower[call.deps[0]], ctx.upper[call.deps[0]]
        s, t = self._affine(params, lo)
        c, r = (hi + lo) / 2, (hi - lo) / 2
        mid, rad = c * s + t, r * s.abs()
        return mid - rad, mid + rad

    def linear(self, call: OpCall, params: BatchNormParams, a: torch.Tensor, ctx):
        s, t = self._affine(params, ctx.lower[call.deps[0]])
        ctx.add_bias(a, t)
        return [(call.deps[0], a * s)]
