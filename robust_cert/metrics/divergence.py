"""Divergence bound (Yu et al.; Family H): the largest KL change of the softmax in an ε-ball.

One algorithm: per point, projected gradient ascent on δ ↦ KL(softmax f(x) ‖ softmax f(x+δ))
over the ε-ball (L∞ or L2, clipped to the input range), from a first step along the
cross-entropy gradient of the predicted class (the KL gradient vanishes at δ = 0) and from
seeded random starts; the best value found is a lower bound on the true maximum ψ(x). For
the most vulnerable points it also samples the decision surface: the margin on the plane
spanned by the ascent direction and a random direction.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from robust_cert.data import EvalSet
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    batches,
    value_list,
)
from robust_cert.models.base import Classifier

Radii = value_list("ε", low=0, low_open=True)
KLThresholds = value_list("KL thresholds", low=0)


class DivergenceConfig(MetricConfig):
    """Parameters of :class:`DivergenceBound` (ε in the data's own units)."""

    eps: Radii = Field(min_length=1, description="ball radii (> 0)")
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(default=20, ge=1, le=10_000)
    step_size: float | None = Field(default=None, gt=0, description="default 2.5·ε/steps")
    restarts: int = Field(default=1, ge=0, le=100, description="extra random starts")
    thresholds: KLThresholds = Field(
        default_factory=list, description="κ: proportion of points with ψ(x) ≤ κ (gateable)")
    surface_points: int = Field(default=4, ge=0, le=100,
                                description="most vulnerable points to sample the surface of")
    surface_grid: int = Field(default=21, ge=3, le=201, description="G: a G×G grid")


def kl_softmax(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax p ‖ softmax q) per row."""
    lp = torch.log_softmax(p_logits, 1)
    lq = torch.log_softmax(q_logits, 1)
    return (lp.exp() * (lp - lq)).sum(1)


class DivergenceBound(Metric):
    """ψ(x) = max over ‖δ‖ ≤ ε of KL(softmax f(x) ‖ softmax f(x+δ)), found by ascent.

    Kind: empirical — each ψ(x) found is a **lower bound** on the true maximum (the ascent may
    miss a larger value). Per point: ``kl@ε`` and ``direction_norm@ε``. ``diagnostics``: the
    distribution of ψ per ε (mean, quantiles, max), and ``surface`` — for the
    ``surface_points`` points with the largest ψ at the largest ε, the margin
    f_t − max_{j≠t} f_j (t = prediction at x) on a G×G grid x + a·u + b·v, a, b ∈ [−2ε, 2ε],
    u the unit ascent direction and v a seeded random unit direction orthogonal to u (in the
    L2 sense; the grid is clipped to the input range): data for a report to draw.

    Proportions (optional): for each ε and threshold κ in ``thresholds``, the fraction of
    points with ψ(x) ≤ κ — an upper bound on the true fraction (ψ found ≤ true ψ), with an
    exact Clopper–Pearson interval over the points.

    Known answer: a linear binary model with logits (0, g), g = w·x + b, under L∞ (no box):
    ψ = KL(Bern σ(g) ‖ Bern σ(g − sign(g)·ε‖w‖₁)) — KL is convex in the perturbed logit, so the
    maximum is at an end of [g − ε‖w‖₁, g + ε‖w‖₁], and it is the end towards the boundary.

    Args (policy ``metrics.divergence``): eps (required), norm (``linf``), steps (20),
    step_size (2.5·ε/steps), restarts (1 extra random start), thresholds (none),
    surface_points (4), surface_grid (21).

    Example::

        DivergenceBound(DivergenceConfig(eps=[0.1])).run(model, data, ctx)
    """

    name = "divergence"
    kind = "empirical"
    quantity = "fraction with bounded divergence"
    higher_is_better = True
    needs_gradients = True
    description = "P[max_{||δ||<=ε} KL(softmax f(x) || softmax f(x+δ)) <= κ] (upper bound)"
    Config = DivergenceConfig

    def selectors(self):
        return [{"eps": e, "kl_at_most": k} for e in self.config.eps
                for k in self.config.thresholds]

    def cost(self, n_points: int) -> int:
        return n_points * len(self.config.eps)

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        fn = model.attack_module()
        box = data.input_range
        n = len(data)
        kl = {e: np.empty(n) for e in cfg.eps}
        dirs = {}
        g = ctx.generator(f"{self.name}/starts")
        e_max = cfg.eps[-1]
        for sl, x, _ in batches(data, ctx.batch_size, ctx.device):
            for e in cfg.eps:
                val, delta = self._ascent(fn, x, e, box, g)
                kl[e][sl] = val.cpu().numpy()
                if e == e_max:
                    dirs[sl.start] = delta.cpu()
                ctx.advance(sl.stop - sl.start)
        props = [Proportion({"eps": e, "kl_at_most": k}, int((kl[e] <= k).sum()), n)
                 for e in cfg.eps for k in cfg.thresholds]
        diagnostics = {
            "norm": cfg.norm,
            "distribution": {f"{e:g}": _distribution(kl[e]) for e in cfg.eps},
            "surface": self._surfaces(fn, data, kl[e_max], dirs, e_max, ctx),
        }
        per_point = {f"kl@{e:g}": kl[e] for e in cfg.eps}
        return self.result(props, per_point=per_point, diagnostics=diagnostics)

    def _project(self, delta, x, e, box):
        if self.config.norm == "linf":
            delta = delta.clamp(-e, e)
        else:
            nrm = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
            delta = delta * (e / nrm).clamp(max=1.0).view(-1, *([1] * (x.ndim - 1)))
        return (x + delta).clamp(*box) - x

    def _step(self, grad, alpha, x):
        if self.config.norm == "linf":
            return alpha * grad.sign()
        gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (x.ndim - 1)))
        return alpha * grad / gn

    def _ascent(self, fn, x, e, box, g):
        """Best KL over the starts and steps, and the perturbation that reached it."""
        cfg = self.config
        alpha = cfg.step_size or 2.5 * e / cfg.steps
        with torch.no_grad():
            clean = fn(x).detach()
        t = clean.argmax(1)
        best = torch.full((x.shape[0],), -1.0, dtype=torch.float64, device=x.device)
        best_delta = torch.zeros_like(x)
        for r in range(cfg.restarts + 1):
            if r == 0:  # a first step that raises the predicted class's loss
                with torch.enable_grad():
                    xx = x.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(F.cross_entropy(fn(xx), t, reduction="sum"),
                                                  xx)
                delta = self._project(self._step(grad, alpha, x), x, e, box)
            else:
                u = torch.rand(x.shape, generator=g).to(x.device, x.dtype) * 2 - 1
                if cfg.norm == "l2":
                    u = u / u.flatten(1).norm(dim=1).clamp_min(1e-30).view(
                        -1, *([1] * (x.ndim - 1)))
                delta = self._project(u * e, x, e, box)
            for _ in range(cfg.steps + 1):
                with torch.enable_grad():
                    dv = delta.detach().requires_grad_(True)
                    val = kl_softmax(clean, fn(x + dv))
                    (grad,) = torch.autograd.grad(val.sum(), dv)
                better = val.detach().double() > best
                best = torch.where(better, val.detach().double(), best)
                best_delta[better] = delta[better]
                delta = self._project(delta + self._step(grad, alpha, x), x, e, box)
        return best.clamp_min(0.0), best_delta

    def _surfaces(self, fn, data, kl, dirs, e, ctx):
        cfg = self.config
        k = min(cfg.surface_points, len(kl))
        if k == 0:
            return []
        order = np.argsort(-kl, kind="stable")[:k]
        g = ctx.generator(f"{self.name}/surface")
        axis = torch.linspace(-2 * e, 2 * e, cfg.surface_grid, dtype=torch.float64)
        out = []
        bs = ctx.batch_size
        for i in order.tolist():
            start = (i // bs) * bs
            u = dirs[start][i - start].double().flatten()
            x = data.x[i].to(torch.float64).flatten()
            if u.norm() == 0:
                u = torch.randn(u.shape, generator=g, dtype=torch.float64)
            u = u / u.norm()
            v = torch.randn(u.shape, generator=g, dtype=torch.float64)
            v = v - (v @ u) * u
            v = v / v.norm().clamp_min(1e-30)
            a, b = torch.meshgrid(axis, axis, indexing="ij")
            pts = x + a.reshape(-1, 1) * u + b.reshape(-1, 1) * v
            pts = pts.clamp(*data.input_range).to(data.x.dtype).view(-1, *data.input_shape)
            with torch.no_grad():
                t = int(fn(data.x[i:i + 1].to(ctx.device)).argmax(1))
                logits = fn(pts.to(ctx.device)).double().cpu()
            other = logits.clone()
            other[:, t] = -torch.inf
            margin = (logits[:, t] - other.amax(1)).view(cfg.surface_grid, cfg.surface_grid)
            out.append({"index": i, "kl": float(kl[i]), "prediction": t,
                        "axis": [float(v_) for v_ in axis], "margin": margin.tolist()})
        return out


def _distribution(v: np.ndarray) -> dict[str, float]:
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return {"mean": float(v.mean()), "p10": float(q[0]), "median": float(q[1]),
            "p90": float(q[2]), "max": float(v.max())}
