"""Convolutions with zero padding: nn.Conv1d/2d/3d, F.conv*d, aten.conv*d/convolution."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robust_cert.bounds.base import BoundOp, NotBoundable, OpCall, Step, aten_targets, expand
from robust_cert.bounds.registry import register_bound_op
from robust_cert.bounds.rounding import NORM_SAFETY, unit_roundoff

CONV = {F.conv1d, F.conv2d, F.conv3d} | aten_targets("conv1d", "conv2d", "conv3d")
CONVOLUTION = aten_targets("convolution", "_convolution")


class ConvParams(NamedTuple):
    weight: torch.Tensor  # (C_out, C_in / groups, *kernel)
    bias: torch.Tensor | None
    stride: object
    padding: object  # int, tuple, "valid" or "same"
    dilation: object
    groups: int
    info: str


@register_bound_op
class Conv(BoundOp):
    """Convolution with zero padding (any stride, dilation, groups; "valid"/"same" padding).

    Lipschitz: operator norms of the convolution matrix K. L∞ = max absolute row sum, i.e.
    max(|K|·1), computed by the convolution itself (padding included). L2 = the smaller of
    two rigorous upper bounds on ‖K‖₂: the zero-padded convolution is a submatrix of the
    circular convolution on the padded grid, whose singular values are those of the
    C_out × C_in kernel DFT matrices (Sedghi et al. 2019), so ‖K‖₂ ≤ max over frequencies of
    their spectral norm; and ‖K‖₂ ≤ √(‖K‖₁‖K‖∞) with both norms exact (|K|ᵀ·1 by autograd).
    All in float64 from the float32 weights, × NORM_SAFETY. Power iteration (a lower bound)
    is reported as ``l2_lower``, never used. Rounding ("affine"): every output is a sum of
    C_in/groups·∏k products plus the bias, u of the convolution arithmetic (TF32 when cuDNN
    may use it; the bounds hold for the :func:`strict_float32` evaluation).

    Local bounds: exact (float64 from the float32 weights). IBP by centre and radius
    (K c + b ± |K| r); CROWN A ↦ Kᵀ A (the transposed convolution, by
    ``torch.nn.grad.conv*d_input``, which matches the input size whatever the stride; a
    "same" padding of odd total, padded asymmetrically, by the op's own adjoint) with the
    constant A·b.
    """

    modules = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    functions = CONV | CONVOLUTION

    def params(self, call: OpCall) -> ConvParams:
        if call.form == "module":
            m = call.target
            if m.padding_mode != "zeros":
                raise call.unsupported(f"padding mode {m.padding_mode}")
            return ConvParams(m.weight.detach(), m.bias, m.stride, m.padding, m.dilation,
                              m.groups, call.label)
        fn, n = call.target, call.node
        if fn in CONV and call.single:
            w = call.const(call.arg(1, "weight"))
            return ConvParams(w, call.const(call.arg(2, "bias")), call.arg(3, "stride", 1),
                              call.arg(4, "padding", 0), call.arg(5, "dilation", 1),
                              int(call.arg(6, "groups", 1)), f"Conv{w.ndim - 2}d ({call.label})")
        if fn in CONVOLUTION and call.single:
            if n.args[6]:
                raise NotBoundable(f"cannot bound a transposed convolution at {call.where}")
            w, b = call.const(n.args[1]), call.const(n.args[2])
            return ConvParams(w, b, n.args[3], n.args[4], n.args[5], int(n.args[8]),  # pyright: ignore[reportArgumentType]  (fx arg: a number)
                              f"Conv{w.ndim - 2}d ({call.label})")
        raise call.unsupported()

    def lipschitz(self, call: OpCall, params: ConvParams) -> Step:
        w, b, stride, padding, dilation, groups, info = params
        w = w.detach()
        nd = w.ndim - 2
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        stride, dilation = expand(stride, nd), expand(dilation, nd)
        if isinstance(padding, str):
            if padding == "valid":
                pad = (0,) * nd
            else:  # "same": at most d·(k − 1) in total per dimension
                pad = tuple(d * (k - 1) for d, k in zip(dilation, w.shape[2:], strict=True))
            padding_arg = padding
        else:
            pad = expand(padding, nd)
            padding_arg = pad
        wabs = w.abs()

        def apply(v):
            return conv(v, w, None, stride, padding_arg, dilation, groups)

        def apply_abs(v):
            return conv(v, wabs, None, stride, padding_arg, dilation, groups)

        z = call.z
        assert z is not None  # the op's one dependent input (params checked it)
        in_shape = tuple(z.shape[1:])
        w64 = w.double()
        ones = torch.ones((1, *in_shape), dtype=torch.float64, device=w.device)
        row = conv(ones, w64.abs(), None, stride, padding_arg, dilation, groups)
        linf = float(row.max())
        ones_v = ones.clone().requires_grad_(True)
        with torch.enable_grad():
            out = conv(ones_v, w64.abs(), None, stride, padding_arg, dilation, groups)
            (col,) = torch.autograd.grad(out.sum(), ones_v)
        l1 = float(col.max())
        fourier = conv_fourier_bound(w64, in_shape, pad, dilation, groups)
        l2 = min(fourier, math.sqrt(l1 * linf))
        return call.step("affine", l2=l2 * NORM_SAFETY, linf=linf * NORM_SAFETY,
                         l1=l1 * NORM_SAFETY, apply=apply, apply_abs=apply_abs,
                         bias=None if b is None else b.detach().abs().view(-1, *([1] * nd)),
                         fan_in=int(np.prod(w.shape[1:])) + 1,
                         u=unit_roundoff(w.dtype, w.device, "conv"), u_kind="conv", info=info,
                         l2_lower=power_iteration(apply, in_shape, w, call.power_iterations))


    def _setup(self, params: ConvParams, ref: torch.Tensor):
        w, b, stride, padding, dilation, groups, _ = params
        w64 = w.detach().to(ref.device, torch.float64)
        nd = w.ndim - 2
        stride, dilation = expand(stride, nd), expand(dilation, nd)
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * nd
            else:
                tot = [d * (k - 1) for d, k in zip(dilation, w.shape[2:], strict=True)]
                padding = tuple(t // 2 for t in tot) if all(t % 2 == 0 for t in tot) \
                    else padding
        else:
            padding = expand(padding, nd)
        return w64, b, stride, padding, dilation, groups, nd

    def interval(self, call: OpCall, params: ConvParams, ctx):
        lo, hi = ctx.lower[call.deps[0]], ctx.upper[call.deps[0]]
        w64, b, stride, padding, dilation, groups, nd = self._setup(params, lo)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        b64 = None if b is None else b.detach().to(lo.device, torch.float64)
        c, r = (hi + lo) / 2, (hi - lo) / 2
        mid = conv(c, w64, b64, stride, padding, dilation, groups)
        rad = conv(r, w64.abs(), None, stride, padding, dilation, groups)
        return mid - rad, mid + rad

    def linear(self, call: OpCall, params: ConvParams, a: torch.Tensor, ctx):
        src = call.deps[0]
        z = ctx.lower[src]
        w64, b, stride, padding, dilation, groups, nd = self._setup(params, z)
        if b is not None:
            ctx.add_bias(a, b.detach().view(-1, *([1] * nd)))
        if isinstance(padding, str):  # asymmetric "same": the op's own adjoint
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
            zz = torch.zeros_like(z[:1])
            # (vjp returns a third element, the aux, only with has_aux)
            _, vjp = cast("tuple[Any, Callable]", torch.func.vjp(
                lambda t: conv(t, w64, None, stride, padding, dilation, groups), zz))
            flat = a.reshape(-1, 1, *a.shape[2:])
            out = torch.func.vmap(lambda g: vjp(g)[0])(flat)
            return [(src, out.reshape(*a.shape[:2], *z.shape[1:]))]
        grad_input = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,  # pyright: ignore[reportAttributeAccessIssue]  (torch.nn.grad: missing in the stubs)
                      3: torch.nn.grad.conv3d_input}[nd]  # pyright: ignore[reportAttributeAccessIssue]
        bs = a.shape[0] * a.shape[1]
        out = grad_input((bs, *z.shape[1:]), w64, a.reshape(bs, *a.shape[2:]), stride,
                         padding, dilation, groups)
        return [(src, out.view(*a.shape[:2], *z.shape[1:]))]


def conv_fourier_bound(w: torch.Tensor, in_shape: tuple[int, ...], pad: tuple[int, ...],
                       dilation: tuple[int, ...], groups: int) -> float:
    """max over DFT frequencies of ‖Ŵ(f)‖₂ on a grid holding the padded input: an upper bound
    on the spectral norm of the zero-padded (strided, dilated) convolution (float64); inf
    when the transform would be too large."""
    nd = w.ndim - 2
    k = w.shape[2:]
    kd = [d * (ki - 1) + 1 for d, ki in zip(dilation, k, strict=True)]
    grid = [s + 2 * p + kk for s, p, kk in zip(in_shape[1:], pad, kd, strict=True)]
    if int(np.prod(grid)) * w.shape[0] * w.shape[1] > 50_000_000:
        return math.inf  # too large to transform: the √(‖K‖₁‖K‖∞) bound is used
    full = torch.zeros((*w.shape[:2], *kd), dtype=torch.float64, device=w.device)
    index = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)
    full[index] = w
    spec = torch.fft.fftn(full, s=grid, dim=tuple(range(2, 2 + nd)))
    o, i = w.shape[:2]
    spec = spec.reshape(groups, o // groups, i, -1).permute(3, 0, 1, 2)
    return float(torch.linalg.matrix_norm(spec, 2).max())


def power_iteration(apply, in_shape, w: torch.Tensor, iters: int) -> float:
    """Power iteration on KᵀK (seeded): a lower estimate of ‖K‖₂, reported only. The norm
    goes to the host once, after the last iteration (no device sync per iteration)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn((1, *in_shape), generator=g, dtype=w.dtype).to(w.device)
    u = None
    for _ in range(iters):
        v = v / v.norm().clamp_min(1e-30)
        vv = v.detach().requires_grad_(True)
        with torch.enable_grad():
            u = apply(vv)
            # Kᵀu as the gradient of <u, stop_grad(u)>: the same values as grad_outputs=u
            # (the product's backward multiplies ones by u exactly), without the symbolic-
            # shape check (and sympy import) that autograd runs on given grad_outputs
            (v,) = torch.autograd.grad((u * u.detach()).sum(), vv)
    return float(u.detach().norm()) if u is not None else 0.0

