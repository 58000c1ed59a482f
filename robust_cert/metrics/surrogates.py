"""Robustness surrogates (Jung et al.; Family G): input-Jacobian norm and loss curvature.

One algorithm: per point, the Frobenius norm of the input Jacobian of the logits (one
forward and C batched vector-Jacobian products) and the top eigenvalue of the input Hessian of
the cross-entropy loss by power iteration on Hessian-vector products (batched over points: the
loss is a sum of per-point losses, so its Hessian is block-diagonal and one HVP serves all
points). Trend indicators: reported, never gated.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.nn.attention import SDPBackend, sdpa_kernel

from robust_cert.data import EvalSet
from robust_cert.metrics.base import Metric, MetricConfig, MetricResult, RunContext, batches
from robust_cert.metrics.jacobians import logits_and_jacobian
from robust_cert.models.base import Classifier

#: Power iterations between two reads of the stop flags (a host sync): stopping early only
#: saves work, the values are those of running every iteration with stopped points frozen.
CHECK_EVERY = 8


class SurrogatesConfig(MetricConfig):
    """Parameters of :class:`Surrogates`."""

    power_iterations: int = Field(default=20, ge=1, le=10_000,
                                  description="HVP power iterations per point")


def _summary(v: np.ndarray) -> dict[str, float]:
    return {"mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.quantile(v, 0.9)), "max": float(v.max())}


class Surrogates(Metric[SurrogatesConfig]):
    """Mean input-Jacobian Frobenius norm and top input-Hessian eigenvalue of the loss.

    Per point (``per_point``): ``jacobian_fro`` = ‖∂f(x)/∂x‖_F (logits f, data units) and
    ``hessian_top`` = the Rayleigh quotient vᵀHv of H = ∂²CE(f(x), y)/∂x² at the vector v that
    power iteration converged to — the eigenvalue of largest magnitude (for ReLU networks H is
    positive semi-definite almost everywhere, so it is the top eigenvalue). Power iteration
    starts from a seeded random vector. ``diagnostics`` hold mean, median, 90th percentile and
    max of both over all points and ``hessian_converged``: the number of points whose last
    iteration changed the quotient by < 1e-3 relative.

    Every per-point value depends on that point alone (the Hessian of a sum of per-point losses
    is block-diagonal; normalisation, quotient and stopping are per point), so the metric is
    :attr:`shardable`: the power iteration's start vectors are drawn per block (from the seed
    and the block's first point), ``hessian_converged`` counts add, and :meth:`finalize`
    recomputes the summaries from the merged per-point values.

    Kind: estimate. No proportions: the metric is a trend indicator and cannot be a
    requirement (``selectors()`` is empty). Known answers for a linear softmax model
    f = Wx + b with cross-entropy: J = W at every x, H = Wᵀ(diag p − ppᵀ)W with p = softmax f.

    Args (policy ``metrics.surrogates``):
        power_iterations: HVP iterations per point (default 20).

    Example::

        Surrogates(SurrogatesConfig()).run(model, data, ctx).diagnostics["jacobian_fro"]
    """

    name = "surrogates"
    description = "mean ||∂f/∂x||_F and top eigenvalue of ∂²CE/∂x² (trend indicators)"
    Config = SurrogatesConfig

    #: the summaries (mean, median, p90, max) are over all points (:meth:`finalize`)
    merge_rules = {"jacobian_fro": "recompute", "hessian_top": "recompute",
                   "hessian_converged": "sum"}

    def selectors(self):
        return []

    def cost(self, n_points: int) -> int:
        return n_points

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        fn = model.attack_module()
        jac, top, ok = [], [], []  # on the device, copied once per call
        g = ctx.generator(f"{self.name}/power")  # per block: (seed, label, first point)
        for sl, x, y in batches(data, ctx.batch_size, ctx.device):
            jac.append(self._jacobian_norms(fn, x))
            v = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
            lam, conv = self._top_eigenvalues(fn, x, y, v)
            top.append(lam)
            ok.append(conv)
            ctx.advance(sl.stop - sl.start)
        jac = torch.cat(jac).cpu().numpy()
        top = torch.cat(top).cpu().numpy()
        converged = int(torch.cat(ok).sum())
        return self.result(
            [], per_point={"jacobian_fro": jac, "hessian_top": top},
            diagnostics={"jacobian_fro": _summary(jac), "hessian_top": _summary(top),
                         "hessian_converged": converged})

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """Summaries over all points, from the merged per-point values (declared
        ``recompute``); ``hessian_converged`` is a count and the merge added it."""
        pp = result.per_point
        return dataclasses.replace(result, diagnostics={
            **result.diagnostics, "jacobian_fro": _summary(pp["jacobian_fro"]),
            "hessian_top": _summary(pp["hessian_top"])})

    @staticmethod
    def _jacobian_norms(fn, x: torch.Tensor) -> torch.Tensor:
        _, jac = logits_and_jacobian(fn, x)  # (P, C, d)
        return jac.flatten(1).double().norm(dim=1)

    def _top_eigenvalues(self, fn, x, y, v):
        def hvp(vec):
            # second derivatives: the fused attention kernels (flash / memory-efficient) have no
            # double backward, the math kernel computes the same attention and has one
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                xx = x.detach().requires_grad_(True)
                loss = F.cross_entropy(fn(xx), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xx, create_graph=True)
                (hv,) = torch.autograd.grad(grad, xx, grad_outputs=vec)
            return hv.detach()

        dims = tuple(range(1, x.ndim))
        rows = (-1, *([1] * (x.ndim - 1)))
        lam = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        prev = lam.clone()
        # a point stops when its Hessian-vector product is exactly zero (its quotient is then
        # final); the flags stay on the device and are read every CHECK_EVERY iterations only
        live = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for it in range(self.config.power_iterations):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(rows)
            hv = hvp(v)
            prev = torch.where(live, lam, prev)
            lam = torch.where(live, (hv * v).sum(dims).double(), lam)
            v = hv
            live = live & v.flatten(1).abs().amax(1).gt(0)
            if (it + 1) % CHECK_EVERY == 0 and not bool(live.any()):
                break
        ok = (lam - prev).abs() <= 1e-3 * lam.abs().clamp_min(1e-12)
        return lam, ok
