"""Divergence bound (Yu et al.; Family H): the largest KL change of the softmax in an ε-ball.

One algorithm: per point, projected gradient ascent on δ ↦ KL(softmax f(x) ‖ softmax f(x+δ))
over the ε-ball (L∞ or L2, clipped to the input range), from a first step along the
cross-entropy gradient of the predicted class (the KL gradient vanishes at δ = 0) and from
seeded random starts; the best value found is a lower bound on the true maximum ψ(x). For
the most vulnerable points it also samples the decision surface: the margin on the plane
spanned by the ascent direction and a random direction.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Literal

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

if TYPE_CHECKING:  # the type value_list() builds (a call is no type expression)
    Radii = list[float]
    KLThresholds = list[float]
else:
    Radii = value_list("ε", low=0, low_open=True)
    KLThresholds = value_list("KL thresholds", low=0)
#: diagnostics key of a block's surface candidates (whole-set index → ascent direction);
#: :meth:`DivergenceBound.finalize` replaces it with ``surface``
_CANDIDATES = "surface_candidates"


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


class DivergenceBound(Metric[DivergenceConfig]):
    """ψ(x) = max over ‖δ‖ ≤ ε of KL(softmax f(x) ‖ softmax f(x+δ)), found by ascent.

    Kind: empirical — each ψ(x) found is a **lower bound** on the true maximum (the ascent may
    miss a larger value). Per point: ``kl@ε`` and ``direction_norm@ε`` (the size, in the
    ball's norm, of the perturbation that reached ψ). ``diagnostics``: the distribution of ψ
    per ε over all points (mean, quantiles, max), and ``surface`` — for the
    ``surface_points`` points of the whole set with the largest ψ at the largest ε (ties: the
    lower index), the margin f_t − max_{j≠t} f_j (t = prediction at x) on a G×G grid
    x + a·u + b·v, a, b ∈ [−2ε, 2ε], u the unit ascent direction that reached ψ and v a seeded
    random unit direction orthogonal to u (in the L2 sense; the grid is clipped to the input
    range): data for a report to draw. ``index`` is the point's index in the whole set.

    Sharding (:attr:`shardable`): the random starts are drawn per block (from the seed and the
    block's first point), so ψ of a point depends only on its block; each block keeps the
    ascent directions of its own ``surface_points`` largest ψ, and :meth:`finalize` picks the
    whole set's largest among them (a point in the whole top is in its block's top), draws v
    once for the whole set (seeded generator, the same for any blocking) and recomputes the
    distribution from the merged per-point values.

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
    description = "P[max_{||δ||<=ε} KL(softmax f(x) || softmax f(x+δ)) <= κ] (upper bound)"
    Config = DivergenceConfig

    #: each block's surface candidates are keyed by index in the whole set: a disjoint union
    merge_rules = {"norm": "same", _CANDIDATES: "concat", "distribution": "recompute",
                   "surface": "recompute"}

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
        g = ctx.generator(f"{self.name}/starts")  # per block: (seed, label, first point)
        e_max = cfg.eps[-1]
        # kept on the device, copied once per call: no host sync per batch
        vals = {e: [] for e in cfg.eps}
        sizes = {e: [] for e in cfg.eps}
        dirs = []
        for sl, x, _ in batches(data, ctx.batch_size, ctx.device):
            for e in cfg.eps:
                val, delta = self._ascent(fn, x, e, box, g)
                vals[e].append(val)
                sizes[e].append(self._size(delta))
                if e == e_max:
                    dirs.append(delta)
                ctx.advance(sl.stop - sl.start)
        kl = {e: torch.cat(vals[e]).cpu().numpy() for e in cfg.eps}
        props = [Proportion({"eps": e, "kl_at_most": k}, int((kl[e] <= k).sum()), n)
                 for e in cfg.eps for k in cfg.thresholds]
        per_point = {f"kl@{e:g}": kl[e] for e in cfg.eps}
        per_point.update({f"direction_norm@{e:g}": torch.cat(sizes[e]).cpu().numpy()
                          for e in cfg.eps})
        # this block's candidates for the surface: its surface_points largest ψ at the largest
        # ε (ties: lower index, as in the whole set), keyed by index in the whole set
        top = np.argsort(-kl[e_max], kind="stable")[:min(cfg.surface_points, n)]
        chosen = torch.cat(dirs)[torch.as_tensor(top, device=ctx.device)].cpu().numpy()
        candidates = {ctx.offset + i: u for i, u in zip(top.tolist(), chosen, strict=True)}
        res = self.result(props, per_point=per_point,
                          diagnostics={"norm": cfg.norm, _CANDIDATES: candidates})
        if ctx.total is None:  # the whole set in one call: nothing will merge
            res = self.finalize(res, model, data, ctx)
        return res

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """The distribution of ψ over all points, and the surfaces of the whole set's most
        vulnerable points (from the directions the blocks kept)."""
        cfg = self.config
        e_max = cfg.eps[-1]
        diag = {k: v for k, v in result.diagnostics.items() if k != _CANDIDATES}
        candidates = result.diagnostics.get(_CANDIDATES, {})
        kl = {e: result.per_point[f"kl@{e:g}"] for e in cfg.eps}
        diag["distribution"] = {f"{e:g}": _distribution(kl[e]) for e in cfg.eps}
        # the grid (G² images per point) in forward calls of the sizes logits() uses: on CPU
        # one 441-image call costs about 1.3× per image what the sizer's pick costs
        view = model.attack_module()
        diag["surface"] = self._surfaces(functools.partial(model.in_calls, view), data,
                                         kl[e_max], candidates, e_max, ctx)
        return dataclasses.replace(result, diagnostics=diag)

    def _project(self, delta, x, e, box):
        if self.config.norm == "linf":
            delta = delta.clamp(-e, e)
        else:
            nrm = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
            delta = delta * (e / nrm).clamp(max=1.0).view(-1, *([1] * (x.ndim - 1)))
        return (x + delta).clamp(*box) - x

    def _size(self, delta):
        """Each row's size in the ball's norm (float64)."""
        flat = delta.flatten(1).double()
        return flat.abs().amax(1) if self.config.norm == "linf" else flat.norm(dim=1)

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
                # where(), not masked assignment: no host sync (nonzero) per step
                best_delta = torch.where(better.view(-1, *([1] * (x.ndim - 1))), delta.detach(),
                                         best_delta)
                delta = self._project(delta + self._step(grad, alpha, x), x, e, box)
        return best.clamp_min(0.0), best_delta

    def _surfaces(self, fn, data, kl, candidates, e, ctx):
        """Margins on the grid around the whole set's ``surface_points`` largest ψ; ``kl`` is
        over the whole set, ``candidates`` maps whole-set indices to ascent directions."""
        cfg = self.config
        k = min(cfg.surface_points, len(kl))
        if k == 0:
            return []
        order = np.argsort(-kl, kind="stable")[:k]
        g = ctx.global_generator(f"{self.name}/surface")  # one draw for the whole set
        axis = torch.linspace(-2 * e, 2 * e, cfg.surface_grid, dtype=torch.float64)
        out = []
        for i in order.tolist():
            u = torch.as_tensor(candidates[i]).double().flatten()
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
            with torch.no_grad():  # a few chosen points: one host sync each is fine
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
