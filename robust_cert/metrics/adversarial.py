"""Robust accuracy under white-box attacks (Family B), per-point worst case over the attacks."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from robust_cert.data import EvalSet
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    batches,
)
from robust_cert.models.base import Classifier

ATTACKS = ("fgsm", "pgd")


class RobustAccuracyConfig(MetricConfig):
    """Parameters of :class:`RobustAccuracy` (ε in the data's own units)."""

    eps: list[float] = Field(min_length=1, description="L∞ radii; 0 is allowed (sanity check)")
    attacks: list[Literal["fgsm", "pgd"]] = Field(default=["fgsm", "pgd"], min_length=1)
    norm: Literal["linf"] = "linf"
    steps: int = Field(default=10, ge=1, le=10_000, description="PGD iterations")
    step_size: float | None = Field(default=None, gt=0, description="PGD step; 2.5·ε/steps")
    random_start: bool = True

    @field_validator("eps", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, (int, float)) else v

    @field_validator("eps")
    @classmethod
    def _non_negative(cls, v):
        bad = [e for e in v if not e >= 0]
        if bad:
            raise ValueError(f"ε must be >= 0, got {bad[0]}")
        return sorted(set(float(e) for e in v))


class _UnitRangeView(nn.Module):
    """Presents a model on inputs in [lo, hi] as one on [0, 1], the range torchattacks expects."""

    def __init__(self, inner: nn.Module, lo: float, hi: float):
        super().__init__()
        self.inner, self.lo, self.scale = inner, lo, hi - lo

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.inner(self.lo + self.scale * u)


class RobustAccuracy(Metric):
    """Robust accuracy at each ε: the fraction of points classified correctly at x and under
    every configured attack within the L∞ ball of radius ε (clipped to the input range).

    Kind: empirical. An attack that fails to find an adversarial example proves nothing, so
    this is an **upper bound** on the true robust accuracy; its Clopper–Pearson interval covers
    the sampling of test points only, not the attack's misses.

    Args (policy ``metrics.robust_accuracy``):
        eps: list of radii in data units, e.g. ``[0.05, 0.1]``.
        attacks: any of ``fgsm``, ``pgd`` (default both); a point counts as robust only if it
            survives all of them (per-point worst case).
        steps: PGD iterations (default 10). step_size: PGD step (default 2.5·ε/steps).
        random_start: PGD starts uniformly in the ball (default true).

    Example::

        RobustAccuracy(RobustAccuracyConfig(eps=[0.1])).run(model, data, ctx)

    Sanity checks in ``diagnostics``: adversarial inputs stay in range and within ε
    (``max_linf_excess``, ``range_violations``), and robust accuracy at ε = 0 equals clean
    accuracy when 0 is configured.
    """

    name = "robust_accuracy"
    kind = "empirical"
    quantity = "robust accuracy"
    higher_is_better = True
    needs_gradients = True
    description = "P[f(x') = y for every attack's x' with ||x' - x||∞ <= ε] (upper bound)"
    Config = RobustAccuracyConfig

    def selectors(self):
        return [{"eps": e} for e in self.config.eps]

    def cost(self, n_points: int) -> int:
        return n_points * len(self.config.eps) * len(self.config.attacks)

    def _attack(self, name: str, view: nn.Module, eps01: float):
        import torchattacks

        cfg = self.config
        if name == "fgsm":
            return torchattacks.FGSM(view, eps=eps01)
        step = (cfg.step_size / self._scale) if cfg.step_size else 2.5 * eps01 / cfg.steps
        return torchattacks.PGD(view, eps=eps01, alpha=step, steps=cfg.steps,
                                random_start=cfg.random_start)

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        lo, hi = data.input_range
        self._scale = hi - lo
        view = _UnitRangeView(model.attack_module(), lo, hi)
        n, n_eps = len(data), len(cfg.eps)
        robust = np.zeros((n, n_eps), dtype=bool)
        broken_by = {a: [0] * n_eps for a in cfg.attacks}
        max_excess, range_violations = 0.0, 0
        for sl, x, y in batches(data, ctx.batch_size, ctx.device):
            u = (x - lo) / self._scale
            clean_ok = model.logits(x).argmax(1) == y
            for j, eps in enumerate(cfg.eps):
                alive = clean_ok.clone()
                eps01 = eps / self._scale
                for a in cfg.attacks:
                    idx = alive.nonzero().squeeze(1)
                    if idx.numel() and eps > 0:
                        ctx.seed_global(f"{self.name}/{a}/{eps!r}/{sl.start}")
                        adv = self._attack(a, view, eps01)(u[idx], y[idx])
                        max_excess = max(max_excess, float((adv - u[idx]).abs().max() - eps01))
                        range_violations += int(((adv < 0) | (adv > 1)).any(dim=tuple(
                            range(1, adv.ndim))).sum())
                        still = model.logits(lo + self._scale * adv).argmax(1) == y[idx]
                        broken_by[a][j] += int((~still).sum())
                        alive[idx] = still
                    ctx.advance(sl.stop - sl.start)
                robust[sl, j] = alive.cpu().numpy()
        clean_correct = robust[:, 0] if cfg.eps[0] == 0 else None
        props = [Proportion({"eps": e}, int(robust[:, j].sum()), n) for j, e in enumerate(cfg.eps)]
        diagnostics = {
            "broken_by_attack": broken_by,
            "max_linf_excess": max(0.0, max_excess * self._scale),
            "range_violations": range_violations,
            "attack_order": list(cfg.attacks),
        }
        if clean_correct is not None:
            diagnostics["eps0_equals_clean"] = True  # by construction: ε=0 runs no attack
        return self.result(props, per_point={"robust": robust}, diagnostics=diagnostics)
