"""Global probabilistic robustness (Lim & Mu; Family C): the failure rate under random noise."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from robust_cert import stats
from robust_cert.data import EvalSet
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    value_list,
)
from robust_cert.models.base import Classifier

#: Failure-rate bands in the style of IEC 61508 (per demand), most lenient first.
IEC_BANDS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def draws_to_demonstrate(k: int, n: int, band: float, confidence: float) -> int:
    """Smallest N ≥ n such that k failures in N draws (no failure after the first n) give a
    one-sided Clopper–Pearson upper bound ≤ ``band`` at ``confidence``. With k = 0 this is
    :func:`robust_cert.stats.zero_failure_sample_size`."""
    if k == 0:
        return max(n, stats.zero_failure_sample_size(band, confidence))

    def ok(total: int) -> bool:
        return stats.clopper_pearson(k, total, confidence, "upper")[1] <= band

    lo, hi = max(n, k), max(n, k, 1)
    while not ok(hi):
        lo, hi = hi, hi * 2
    while lo < hi:  # smallest ok in [lo, hi]
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def failure_rate_bands(k: int, n: int, confidence: float, bands=IEC_BANDS) -> dict:
    """Which failure-rate bands k failures in n i.i.d. draws demonstrate at ``confidence``.

    A band b is demonstrated when the one-sided Clopper–Pearson upper bound on the failure rate
    is ≤ b (then P(demonstrating b | true rate > b) ≤ 1 − confidence). ``next_band`` is the
    most lenient band not yet demonstrated; ``more_failure_free_draws`` how many further
    draws, all failure-free, would demonstrate it.
    """
    upper = stats.clopper_pearson(k, n, confidence, "upper")[1]
    shown = [b for b in bands if upper <= b]
    rest = [b for b in bands if upper > b]
    nxt = rest[0] if rest else None
    more = None if nxt is None else draws_to_demonstrate(k, n, nxt, confidence) - n
    return {"upper_bound": float(upper), "demonstrated": [float(b) for b in shown],
            "best_band": float(min(shown)) if shown else None,
            "next_band": None if nxt is None else float(nxt),
            "more_failure_free_draws": None if more is None else int(more)}


Radii = value_list("ε", low=0, low_open=True)


class ProbabilisticRobustnessConfig(MetricConfig):
    """Parameters of :class:`ProbabilisticRobustness`."""

    eps: Radii = Field(min_length=1, description="L∞ radius of the uniform noise ball")
    samples: int = Field(
        default=2995, ge=1, le=100_000_000,
        description="i.i.d. (x, δ) pairs; 2,995 failure-free pairs demonstrate ≤ 1e-3 at 95%",
    )
    distribution: Literal["uniform_linf"] = "uniform_linf"
    failure: Literal["misclassified", "prediction_changed"] = Field(
        default="misclassified",
        description="misclassified: f(x+δ) ≠ y; prediction_changed: f(x+δ) ≠ f(x)",
    )


class ProbabilisticRobustness(Metric):
    """Failure rate of the model under random perturbation, certified by an exact test.

    Draws ``samples`` i.i.d. pairs (x_i, δ_i): x_i uniformly from the evaluation set (with
    replacement), δ_i uniform in the L∞ ball of radius ε; x_i + δ_i is clipped to the input
    range. Each pair is a Bernoulli trial (failure or not), so with probability at least
    1 − α over the draws the true failure rate lies below the one-sided Clopper–Pearson upper
    bound at level α. With zero failures, n ≥ ln(α)/ln(1 − p) pairs demonstrate p_fail ≤ p.

    ``diagnostics.bands`` reports, per radius, which IEC 61508-style failure-rate bands
    (1e-1 … 1e-5) the draws demonstrate at the policy's confidence (one-sided CP upper bound
    ≤ band; each radius on its own, not Holm-adjusted) and how many more failure-free draws
    would demonstrate the next band (:func:`failure_rate_bands`).

    Kind: statistical. The population is the evaluation set's empirical distribution × the
    noise; it speaks for deployment data only as far as the evaluation set is a sample of it.

    Args (policy ``metrics.probabilistic_robustness``):
        eps: noise radius (or list of radii) in data units.
        samples: pairs per radius (default 2,995).
        failure: ``misclassified`` (default) or ``prediction_changed``.

    Example::

        ProbabilisticRobustness(ProbabilisticRobustnessConfig(eps=0.1)).run(model, data, ctx)
    """

    name = "probabilistic_robustness"
    kind = "statistical"
    quantity = "failure rate"
    higher_is_better = False
    description = "P_{x~data, δ~U(B∞(ε))}[f(clip(x+δ)) fails]"
    Config = ProbabilisticRobustnessConfig

    def selectors(self):
        return [{"eps": e} for e in self.config.eps]

    def cost(self, n_points: int) -> int:
        return self.config.samples * len(self.config.eps)

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        lo, hi = data.input_range
        n_data, m = len(data), cfg.samples
        props, per_point, reference = [], {}, None
        bands = {}
        if cfg.failure == "prediction_changed":
            reference = torch.cat([
                model.logits(data.x[s:s + ctx.batch_size].to(ctx.device)).argmax(1).cpu()
                for s in range(0, n_data, ctx.batch_size)
            ])
        for eps in cfg.eps:
            g = ctx.generator(f"{self.name}/{eps!r}")
            idx = torch.randint(n_data, (m,), generator=g)
            fail = np.zeros(m, dtype=bool)
            for s in range(0, m, ctx.batch_size):
                bi = idx[s:s + ctx.batch_size]
                x = data.x[bi]
                delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
                xp = (x + delta).clamp_(lo, hi).to(ctx.device)
                pred = model.logits(xp).argmax(1).cpu()
                target = data.y[bi] if reference is None else reference[bi]
                fail[s:s + len(bi)] = (pred != target).numpy()
                ctx.advance(len(bi))
            props.append(Proportion({"eps": eps}, int(fail.sum()), m))
            bands[f"{eps:g}"] = failure_rate_bands(int(fail.sum()), m, ctx.confidence)
            per_point[f"failed@{eps:g}"] = fail
            per_point[f"index@{eps:g}"] = idx.numpy()
        diagnostics = {"bands": {"confidence": float(ctx.confidence), "by_eps": bands}}
        return self.result(props, per_point=per_point, diagnostics=diagnostics)
