"""Pooling: max pooling (a max over windows) and average pooling (a non-negative linear map)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_arg

from robust_cert.bounds.base import (
    BoundOp,
    NotBoundable,
    OpCall,
    Step,
    aten_targets,
    expand,
    first,
    spec,
)
from robust_cert.bounds.registry import register_bound_op
from robust_cert.bounds.rounding import NORM_SAFETY, unit_roundoff

MAXPOOL = {F.max_pool1d, F.max_pool2d, F.max_pool3d} | aten_targets(
    "max_pool1d", "max_pool2d", "max_pool3d")
MAXPOOL_WITH_INDICES = {F.max_pool1d_with_indices, F.max_pool2d_with_indices,
                        F.max_pool3d_with_indices} | aten_targets(
    "max_pool2d_with_indices", "max_pool3d_with_indices")
MEAN = aten_targets("mean")
AVGPOOL = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
           F.adaptive_avg_pool2d, F.adaptive_avg_pool3d} | aten_targets(
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d") | MEAN


#: CROWN through max pooling whose windows tile the input (stride = kernel, no padding or
#: dilation) by reshapes instead of a scatter and a fold (same sums; off only to test that).
TILED_FAST_PATH = True


class MaxPoolParams(NamedTuple):
    kernel_size: object
    stride: object  # falsy: the kernel size
    dilation: object
    apply: Callable[[torch.Tensor], torch.Tensor]  # the pooling of a tensor (values only)
    info: str
    padding: object = 0
    ceil_mode: bool = False


class _Windows(NamedTuple):
    """The windows of a 2-D max pooling over input bounds (see :meth:`MaxPool.linear`)."""

    k: tuple
    st: tuple
    pad: tuple
    dil: tuple
    shape: tuple  # (b, c, h, w) of the input
    wi: torch.Tensor  # (1, kk, L): each window element's flat input index (−1: padding)
    wl: torch.Tensor  # (b, c, kk, L): lower bounds (−∞: padding)
    wu: torch.Tensor  # upper bounds (−∞: padding)
    lf: torch.Tensor  # lower bounds, padding 0
    best: torch.Tensor  # (b, c, 1, L): the element of the largest lower bound
    cand: torch.Tensor  # (b, c, kk, L): the elements that can be the max
    lam: torch.Tensor  # (b, c, kk, L): the upper weights ∝ (u_i − max_j l_j)⁺


@register_bound_op
class MaxPool(BoundOp):
    """Max pooling, any kernel, stride, padding and dilation (also ``*_with_indices``).

    Lipschitz: in L∞ 1 (each output is the max of some inputs, |max a − max b| ≤ ‖a − b‖∞).
    In L2 √c with c the most windows one input can fall in — ∏ ceil(k/s), or ∏ k with
    dilation — since ‖y − y'‖₂² ≤ Σ over windows of the max squared difference in it ≤ c‖δ‖₂².
    Rounding ("max"): a max is exact; the error of each output is at most the max of the
    errors in its window, obtained by pooling the error tensor itself.

    Local bounds: IBP is exact (max is monotone: the pooling of the lower and of the upper
    bounds). CROWN (2-D, without ``ceil_mode``; otherwise NotBoundable) relaxes each window:
    y ≥ z_k with k the element of the largest lower bound (y is at least any element), and
    y ≤ Σ λ_i z_i + c for weights λ_i ≥ 0, Σ λ_i ≤ 1 (here ∝ (u_i − max_j l_j)⁺) with
    c = max_j [(1 − λ_j) u_j − Σ_{i≠j} λ_i l_i]: for each j, z_j − λ·z is linear with
    coefficient 1 − λ_j ≥ 0 on z_j and −λ_i ≤ 0 on the others, so its maximum over the box
    is that term, and max_j z_j − λ·z ≤ c (exact, y = z_k, when z_k dominates: λ = e_k,
    c = 0; the triangle relaxation of a + relu(b − a) for two elements). The bound holds for
    any λ ∈ [0, 1] (only λ_i ≥ 0 and 1 − λ_j ≥ 0 are used), so alpha-CROWN optimises λ and
    the lower line's weights (:meth:`_alpha_linear`), one set per spec row.
    """

    modules = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    functions = MAXPOOL | MAXPOOL_WITH_INDICES
    relaxed = True

    def interval(self, call: OpCall, params: MaxPoolParams, ctx):
        src = call.deps[0]
        return first(params.apply(ctx.lower[src])), first(params.apply(ctx.upper[src]))

    def alpha_init(self, call: OpCall, params: MaxPoolParams, lo, hi):
        # alpha-CROWN: the upper weights λ and the lower weights μ (one-hot: the pick) of
        # every window, (batch, channels, window size, windows) each, as linear uses them
        w = self._windows(call, params, lo, hi)
        if not bool((w.lam > 0).sum(2).gt(1).any()):  # every window has a dominant element
            return None
        return w.lam, torch.zeros_like(w.lam).scatter_(2, w.best, 1.0)

    def _windows(self, call: OpCall, params: MaxPoolParams, zl, zu) -> _Windows:
        if zl.ndim != 4 or params.ceil_mode:
            raise NotBoundable(f"no linear relaxation (CROWN) for {call.label} at {call.where}"
                               " (2-D max pooling without ceil_mode only)")
        k = expand(params.kernel_size, 2)
        st = expand(params.stride if params.stride else params.kernel_size, 2)
        pad, dil = expand(params.padding, 2), expand(params.dilation, 2)
        b, c, h, w = zl.shape
        spec = (pad[1], pad[1], pad[0], pad[0])

        def windows(t, fill):
            t = F.pad(t.reshape(b * c, 1, h, w), spec, value=fill)
            out = F.unfold(t, k, dilation=dil, stride=st)  # (b·c, kk, L)
            return out.view(b, c, out.shape[1], out.shape[2])

        wl, wu = windows(zl, -math.inf), windows(zu, -math.inf)  # (b, c, kk, L)
        index = torch.arange(h * w, dtype=torch.float64, device=zl.device).view(1, 1, h, w)
        wi = F.unfold(F.pad(index, spec, value=-1.0), k, dilation=dil, stride=st)
        best = wl.argmax(2, keepdim=True)  # (b, c, 1, L)
        # upper: y ≤ Σ λ_i z_i + c with λ_i ∝ (u_i − max_j l_j)⁺ (the elements that can be
        # the max; λ = e_k when z_k dominates: exact), c = max_j (1 − λ_j)u_j − Σ_{i≠j} λ_i l_i
        top = wl.amax(2, keepdim=True)
        wt = (wu - top).clamp(min=0)
        lam = wt / wt.sum(2, keepdim=True).clamp(min=1e-300)
        lf = torch.where(torch.isfinite(wl), wl, 0.0)
        return _Windows(k, st, pad, dil, (b, c, h, w), wi, wl, wu, lf, best, wt > 0, lam)

    def linear(self, call: OpCall, params: MaxPoolParams, a: torch.Tensor, ctx):
        src = call.deps[0]
        win_ = self._windows(call, params, ctx.lower[src], ctx.upper[src])
        k, st, pad, dil, wi, wu, lf, best, lam = (win_.k, win_.st, win_.pad, win_.dil, win_.wi,
                                                  win_.wu, win_.lf, win_.best, win_.lam)
        b, c, h, w = win_.shape
        alpha = ctx.alpha.get(call.node) if ctx.alpha else None
        if alpha is not None:
            return [(src, self._alpha_linear(win_, alpha, a, ctx))]
        flat = wi[0].expand(b, c, -1, -1).gather(2, best).squeeze(2).long()  # (b, c, L)
        tot = (lam * lf).sum(2, keepdim=True)
        const = ((1 - lam) * wu - (tot - lam * lf)).amax(2)  # (b, c, L)
        s = a.shape[1]
        coef = a.reshape(b, s, c, -1)
        neg = coef.clamp(max=0)
        ctx.add_bias(neg, const)
        kk, nwin = lam.shape[2], lam.shape[3]
        if (TILED_FAST_PATH and pad == (0, 0) and dil == (1, 1) and st == k
                and h % k[0] == 0 and w % k[1] == 0):
            # windows tile the input: each element's coefficient is its window's negative
            # part times its λ plus the positive part where it is the window's pick (the same
            # products as the general scatter and fold below). λ and the picks are laid out
            # as images (no spec dimension) and the window coefficients broadcast over each
            # window, so the result is written once, already in the input's layout.
            ho, wo = h // k[0], w // k[1]
            pick = torch.zeros_like(lam).scatter_(2, best, 1.0)  # (b, c, kk, L)

            def image(t):  # (b, c, kk, L) -> (b, 1, c, ho, k0, wo, k1)
                return (t.view(b, c, k[0], k[1], ho, wo).permute(0, 1, 4, 2, 5, 3).contiguous()
                        .unsqueeze(1))

            win = (b, s, c, ho, 1, wo, 1)
            v = torch.addcmul(neg.view(win) * image(lam), (coef - neg).view(win), image(pick))
            return [(src, v.view(b, s, c, h, w))]
        out = torch.zeros((b, s, c, h * w), dtype=a.dtype, device=a.device)
        out.scatter_add_(3, flat.unsqueeze(1).expand(b, s, c, -1), coef - neg)
        cols = (neg.unsqueeze(3) * lam.unsqueeze(1)).reshape(b * s * c, kk, nwin)
        hp, wp = h + 2 * pad[0], w + 2 * pad[1]
        up = F.fold(cols, (hp, wp), k, dilation=dil, stride=st)[
            :, 0, pad[0]:pad[0] + h, pad[1]:pad[1] + w]
        out = out + up.reshape(b, s, c, h * w)
        return [(src, out.view(b, s, c, h, w))]

    @staticmethod
    def _alpha_linear(win_: _Windows, alpha, a: torch.Tensor, ctx) -> torch.Tensor:
        """alpha-CROWN's back-substitution, one relaxation per spec row: the upper weights
        λ (b, s, c, kk, L) clamped to [0, 1] on the elements that can be the max (any such λ
        is valid: the bound of the class docstring needs only λ_i ≥ 0 and 1 − λ_j ≥ 0), the
        lower y ≥ Σ μ_i z_i + (1 − Σμ)·max_j l_j with μ ≥ 0 of sum at most 1 (the weights
        clamped at 0 and normalised to a sum just below 1; all zero: the pick)."""
        lam_p, mu_p = alpha
        b, c, h, w = win_.shape
        s = a.shape[1]
        kk, nwin = win_.lam.shape[2], win_.lam.shape[3]
        lam = lam_p.clamp(0.0, 1.0) * win_.cand.unsqueeze(1)
        real = torch.isfinite(win_.wl).unsqueeze(1)
        mu = mu_p.clamp(min=0.0) * real
        tot_mu = mu.sum(3, keepdim=True)
        pick = torch.zeros_like(win_.lam).scatter_(2, win_.best, 1.0).unsqueeze(1)
        # Σμ ≤ 1 for sure (the division's rounding aside), and the rest on the window's
        # largest lower bound: y ≥ Σ μ_i z_i + (1 − Σμ)·max_j l_j holds for any μ ≥ 0 with
        # Σμ ≤ 1 (y ≥ every z_i and y ≥ max_j l_j); 1 − Σμ is computed within 1e-14
        mu = torch.where(tot_mu > 0, mu / (tot_mu.clamp(min=1e-300) * (1 + 1e-12)), pick)
        top = win_.wl.amax(2).unsqueeze(1)  # (b, 1, c, L), finite: every window has an element
        rest = (1 - mu.sum(3)) * top - 1e-14 * top.abs()
        lf = win_.lf.unsqueeze(1)
        wu = torch.where(real, win_.wu.unsqueeze(1), 0.0)  # padding: finite, then excluded
        tot = (lam * lf).sum(3, keepdim=True)
        const = torch.where(real, (1 - lam) * wu - (tot - lam * lf), -math.inf).amax(3)
        coef = a.reshape(b, s, c, -1)
        neg = coef.clamp(max=0)
        ctx.add_bias_rows(neg, const)
        ctx.add_bias_rows(coef - neg, rest)
        cols = (neg.unsqueeze(3) * lam + (coef - neg).unsqueeze(3) * mu)
        hp, wp = h + 2 * win_.pad[0], w + 2 * win_.pad[1]
        out = F.fold(cols.reshape(b * s * c, kk, nwin), (hp, wp), win_.k, dilation=win_.dil,
                     stride=win_.st)[:, 0, win_.pad[0]:win_.pad[0] + h,
                                     win_.pad[1]:win_.pad[1] + w]
        return out.reshape(b, s, c, h, w)

    def params(self, call: OpCall) -> MaxPoolParams:
        if call.form == "module":
            m = call.target
            return MaxPoolParams(m.kernel_size, m.stride, m.dilation, m, call.label, m.padding,
                                 bool(m.ceil_mode))
        fn = call.target
        if not call.single:
            raise call.unsupported()
        k = call.arg(1, "kernel_size")
        s = call.arg(2, "stride", None) or k
        dil = call.arg(4, "dilation", 1)
        call_args = map_arg(call.node.args[1:], call.const)
        call_kwargs = map_arg(call.node.kwargs, call.const)
        if fn is F.max_pool2d or fn is F.max_pool1d or fn is F.max_pool3d:
            call_kwargs = {k2: v for k2, v in call_kwargs.items() if k2 != "return_indices"}
        return MaxPoolParams(k, s, dil, lambda v: first(fn(v, *call_args, **call_kwargs)),
                             call.label, call.const(call.arg(3, "padding", 0)),
                             bool(call.const(call.arg(5, "ceil_mode", False))))

    def lipschitz(self, call: OpCall, params: MaxPoolParams) -> Step:
        k, s, dil, apply, info = params[:5]
        if call.form == "function" and call.target in MAXPOOL_WITH_INDICES:
            call.mark_tuple_output()
        z = call.z
        assert z is not None  # the op's one dependent input (params checked it)
        nd = z.ndim - 2 if z.ndim > 2 else 1
        k, s = expand(k, nd), expand(s if s else k, nd)
        dil = expand(dil, nd)
        if any(d != 1 for d in dil):
            count = float(np.prod(k))
        else:
            count = float(np.prod([math.ceil(ki / si) for ki, si in zip(k, s, strict=False)]))
        # L1: Σ_out |max_w a − max_w b| ≤ Σ_out Σ_w |a − b| ≤ count·‖a − b‖₁
        return call.step("max", l2=math.sqrt(count), linf=1.0, l1=count, apply=apply, info=info)


class AvgPoolParams(NamedTuple):
    apply: Callable[[torch.Tensor], torch.Tensor]  # the pooling of a tensor
    spatial: bool  # windows within a channel (False: a mean over several dimensions)
    info: str


@register_bound_op
class AvgPool(BoundOp):
    """Average pooling, adaptive average pooling, and ``aten.mean`` over non-batch dimensions.

    Lipschitz: the op is a linear map A with non-negative weights, so ‖A‖∞ = max(A·1) and
    ‖A‖₁ = max(Aᵀ·1), both computed exactly (float64) by the op itself and by autograd;
    ‖A‖₂ ≤ √(‖A‖₁‖A‖∞). Both × NORM_SAFETY. Rounding ("affine", |A| = A): each output is a
    sum of at most the spatial size (a whole sample for a mean) terms and one division,
    elementwise u. ``divisor_override`` and a mean over the batch are refused.

    Local bounds: exact. IBP pools the lower and the upper bounds (non-negative weights);
    CROWN back-substitutes through the op's adjoint (its vector-Jacobian product).
    """

    modules = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    functions = AVGPOOL

    def params(self, call: OpCall) -> AvgPoolParams:
        if call.form == "module":
            m = call.target
            if getattr(m, "divisor_override", None):
                raise call.unsupported("divisor_override")
            return AvgPoolParams(m, True, call.label)
        fn = call.target
        if not call.single:
            raise call.unsupported()
        if fn in MEAN:
            dims = spec(call.arg(1, "dim", None))
            if None in dims or 0 in dims:
                raise NotBoundable(f"cannot bound a mean over the batch at {call.where}")
        if call.arg(6, "divisor_override", None):
            raise NotBoundable(f"cannot bound average pooling with divisor_override at "
                               f"{call.where}")
        call_args = map_arg(call.node.args[1:], call.const)
        call_kwargs = map_arg(call.node.kwargs, call.const)
        return AvgPoolParams(lambda v: fn(v, *call_args, **call_kwargs), fn not in MEAN,
                             call.label)

    def lipschitz(self, call: OpCall, params: AvgPoolParams) -> Step:
        apply, spatial, info = params
        z = call.z
        assert z is not None  # the op's one dependent input (params checked it)
        ones = torch.ones_like(z[:1], dtype=torch.float64).requires_grad_(True)
        with torch.enable_grad():
            out = apply(ones)
            (col,) = torch.autograd.grad(out.sum(), ones)
        linf, l1 = float(out.detach().max()), float(col.max())
        # terms per output (the γ index): a window never spans channels, so at most the
        # spatial size (the whole sample for a mean over several dimensions), + 1 division
        fan = int(np.prod(z.shape[2:])) if spatial and z.ndim > 2 else z[0].numel()
        return call.step("affine", l2=math.sqrt(l1 * linf) * NORM_SAFETY,
                         linf=linf * NORM_SAFETY, l1=l1 * NORM_SAFETY, apply=apply,
                         apply_abs=apply, bias=None,
                         fan_in=fan + 1, u=unit_roundoff(z.dtype, z.device), u_kind="",
                         info=info)

    def interval(self, call: OpCall, params: AvgPoolParams, ctx):
        src = call.deps[0]
        return params.apply(ctx.lower[src]), params.apply(ctx.upper[src])

    def linear(self, call: OpCall, params: AvgPoolParams, a: torch.Tensor, ctx):
        return [(call.deps[0], ctx.transpose(call.node, call.deps[0], a))]
