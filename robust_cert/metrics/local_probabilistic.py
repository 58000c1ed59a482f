"""Local probabilistic robustness (Lim & Mu; Family C): one sequential test per input."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from scipy import special as _sp

from robust_cert.data import EvalSet
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    draw_per_point,
)
from robust_cert.models.base import Classifier
from robust_cert.stats import SPRT, clopper_pearson

Distribution = Literal["uniform_linf", "gaussian", "uniform_l2"]

#: What the proportion (fraction of points decided robust) covers.
POPULATION = ("inputs drawn like the evaluation points: probability of being decided robust "
              "by the per-point test (one decision per point, draws not pooled)")

#: per-point ``decision`` codes
ROBUST, NOT_ROBUST, UNDECIDED = 1, -1, 0


def draw_noise(x: torch.Tensor, draws: int, distribution: str, scale: float,
               generator: torch.Generator) -> torch.Tensor:
    """Noise of shape ``(len(x), draws, *x.shape[1:])`` drawn on the CPU from ``generator``.

    ``uniform_linf``: uniform in the L∞ ball of radius ``scale``; ``gaussian``: N(0, scale²I);
    ``uniform_l2``: uniform in the L2 ball of radius ``scale`` (direction uniform on the
    sphere, radius ``scale``·U^{1/d}).
    """
    shape = (x.shape[0], draws, *x.shape[1:])
    if distribution == "uniform_linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * scale
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator) * scale
    if distribution == "uniform_l2":
        d = int(np.prod(x.shape[1:]))
        direction = torch.randn(shape, generator=generator)
        norm = direction.flatten(2).norm(dim=2).clamp_min(1e-12)
        radius = scale * torch.rand(shape[:2], generator=generator) ** (1.0 / d)
        view = (*shape[:2],) + (1,) * (len(shape) - 2)
        return direction * (radius / norm).view(view)
    raise ValueError(f"unknown distribution {distribution!r}")


def noise_scale(distribution: str, eps: float | None, sigma: float | None) -> float:
    """The scale a noise distribution takes: σ for ``gaussian``, ε for the balls. A config
    that gives the other one, or neither, is an error naming what it needs."""
    if distribution == "gaussian":
        if sigma is None or eps is not None:
            raise ValueError("distribution gaussian takes sigma (> 0) and no eps")
        return sigma
    if eps is None or sigma is not None:
        raise ValueError(f"distribution {distribution} takes eps (> 0) and no sigma")
    return eps


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device``. To a CUDA device the copy is asynchronous, from
    page-locked memory (the caching host allocator keeps the staging block until the copy has
    run), so the host goes on preparing the next batch instead of waiting for the device."""
    if device.type != "cuda":
        return t.to(device)
    if t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class ProportionalProgress:
    """Reports exactly ``total`` units through ``advance`` (the progress bar's share of one
    :meth:`Metric.run`, as :meth:`Metric.cost` counts it), in proportion to the ``work`` done
    so far (:meth:`step`); all at once when there is no work."""

    def __init__(self, advance, total: int, work: int):
        self.advance, self.total, self.work = advance, int(total), int(work)
        self.done = self.sent = 0
        if self.work <= 0:
            self.step(0)

    def step(self, amount: int) -> None:
        self.done += amount
        due = (self.total if self.done >= self.work
               else self.total * self.done // self.work)
        if due > self.sent:
            self.advance(due - self.sent)
            self.sent = due


def reference_labels(model: Classifier, data: EvalSet, ctx: RunContext, failure: str):
    """What a perturbed prediction is compared with: the label, or the clean prediction
    (on the CPU; the predictions are gathered on the device and copied once)."""
    if failure == "misclassified":
        return data.y.clone()
    if not len(data):
        return data.y.clone()
    return torch.cat([
        model.logits(to_device(data.x[s:s + ctx.batch_size], ctx.device)).argmax(1)
        for s in range(0, len(data), ctx.batch_size)
    ]).cpu()


class LocalProbabilisticConfig(MetricConfig):
    """Parameters of :class:`LocalProbabilisticRobustness` (validated in this order)."""

    distribution: Distribution = "uniform_linf"
    eps: float | None = Field(default=None, gt=0, description="ball radius (uniform_linf/l2)")
    sigma: float | None = Field(default=None, gt=0, description="noise σ (gaussian)")
    p0: float = Field(default=0.01, gt=0, lt=1, description="H0: p_fail ≥ p0 (not robust)")
    p1: float = Field(default=0.001, gt=0, lt=1, description="H1: p_fail ≤ p1 (robust)")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="P(robust | p_fail ≥ p0)")
    beta: float = Field(default=0.05, gt=0, lt=1, description="P(not robust | p_fail ≤ p1)")
    max_draws: int = Field(default=2000, ge=1, le=10_000_000, description="per-point budget")
    block_size: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="draws per point per forward pass; default: up to 16, 64, then the "
                    "fewest draws that can accept H1, then blocks of that size")
    max_forward_images: int = Field(default=4096, ge=1, le=100_000_000,
                                    description="noisy images per step (memory); on CPU the "
                                    "model gets at most max(batch_size, 64) per call")
    failure: Literal["misclassified", "prediction_changed"] = "misclassified"

    @field_validator("p1")
    @classmethod
    def _p1_below_p0(cls, v: float, info: ValidationInfo):
        p0 = info.data.get("p0")
        if p0 is not None and not v < p0:
            raise ValueError(f"p1 must be < p0 (H1 p_fail ≤ p1 vs H0 p_fail ≥ p0), got "
                             f"p1={v} ≥ p0={p0}")
        return v

    @field_validator("beta")
    @classmethod
    def _alpha_plus_beta(cls, v: float, info: ValidationInfo):
        a = info.data.get("alpha")
        if a is not None and not a + v < 1:
            raise ValueError(f"alpha + beta must be < 1, got alpha={a}, beta={v}")
        return v

    @field_validator("max_draws")
    @classmethod
    def _budget_reaches_a_decision(cls, v: int, info: ValidationInfo):
        d = info.data
        if all(d.get(k) is not None for k in ("p0", "p1", "alpha", "beta")):
            sprt = SPRT(d["p0"], d["p1"], d["alpha"], d["beta"])
            need = sprt.draws_to_accept_h1_without_failures()
            if v < need:
                raise ValueError(
                    f"budget {v} is too small: the SPRT (p0={d['p0']}, p1={d['p1']}, "
                    f"alpha={d['alpha']}, beta={d['beta']}) needs at least {need} failure-free "
                    f"draws to ever decide 'robust'; set max_draws ≥ {need}")
        return v

    @model_validator(mode="after")
    def _scale_for_distribution(self):
        noise_scale(self.distribution, self.eps, self.sigma)
        return self

    @property
    def scale(self) -> float:
        return noise_scale(self.distribution, self.eps, self.sigma)

    def sprt(self) -> SPRT:
        return SPRT(self.p0, self.p1, self.alpha, self.beta)


class LocalProbabilisticRobustness(Metric[LocalProbabilisticConfig]):
    """Per input, Wald's SPRT of H0: p_fail(x) ≥ p0 (not robust) vs H1: p_fail(x) ≤ p1 (robust).

    p_fail(x) = P_δ[f(clip(x + δ)) fails], δ drawn from ``distribution`` (uniform in the L∞
    ball of radius eps, N(0, σ²I), or uniform in the L2 ball of radius eps), clipped to the
    input range; "fails" is ``f ≠ y`` (misclassified) or ``f ≠ f(x)`` (prediction_changed).

    Draws are made in vectorised blocks (``block_size`` draws for each of many points in one
    forward pass) and the SPRT is applied draw by draw inside a block, so the decision and the
    draws used are those of the exact sequential test. A point still undecided after
    ``max_draws`` draws is decided by the one-sided Clopper–Pearson bounds: robust if the upper
    bound at confidence 1 − α is < p0, else not robust if the lower bound at confidence 1 − β
    is > p1, otherwise undecided.

    Guarantee, per point (Wald's bound plus the fallback's level, a union bound): if
    p_fail(x) ≥ p0, P(decided robust) ≤ α/(1 − β) + α; if p_fail(x) ≤ p1, P(decided not
    robust) ≤ β/(1 − α) + β. Over m points the expected number of wrong decisions is at most
    m times these (``diagnostics.expected_wrong_*_at_most``); nothing is promised for points
    with p1 < p_fail < p0 (indifference zone).

    The proportion is the fraction of points *decided robust*: one decision per point, however
    many draws the test made, so the decisions are i.i.d. Bernoulli(ρ) across points, with
    ρ = P_{x, draws}(x is decided robust) for inputs drawn like the evaluation points, and the
    exact binomial test and Clopper–Pearson interval of the verdict hold for ρ (not for the
    draws, which are never pooled). Since a point with p_fail(x) ≥ p0 is decided robust with
    probability at most e = α/(1 − β) + α, the fraction of the population that is robust,
    P_x(p_fail(x) < p0), is at least ρ − e; ``diagnostics.robust_population_fraction_at_least``
    is the one-sided Clopper–Pearson lower bound on ρ at the policy's confidence minus e.

    Sharding (``shardable``): the engine may run the test on consecutive blocks of points, in
    several processes. Each point draws its noise from its own generator, seeded by (seed,
    distribution and scale, the point's index in the whole set), ``b`` draws per round of
    the schedule: a point's draws depend neither on its block, nor on the process that runs
    it, nor on the batch size (:attr:`pointwise`). :meth:`finalize` recomputes every
    summary in ``diagnostics`` from the merged per-point arrays (only ``forward_images`` is
    summed over the blocks), so the result is the same for any number of processes.

    Kind: statistical. A model that is random at evaluation time makes p_fail a property of the
    random classifier (``certify`` warns, see engine.check_deterministic).

    Args (policy ``metrics.local_probabilistic_robustness``): distribution ("uniform_linf"),
    eps or sigma (required, > 0), p0 (0.01), p1 (0.001), alpha (0.05), beta (0.05),
    max_draws (2000; must be ≥ ``SPRT(p0, p1, alpha, beta).draws_to_accept_h1_without_failures()``,
    326 with the defaults), block_size (default: blocks ending at 16, 64 and that minimum
    draws, then blocks of the minimum), max_forward_images (4096),
    failure ("misclassified").

    Example::

        cfg = LocalProbabilisticConfig(eps=0.1, p0=0.01, p1=0.001)
        res = LocalProbabilisticRobustness(cfg).run(model, data, ctx)
        res.find({"p0": 0.01}).estimate            # fraction of points decided robust
        # policy: {metric: local_probabilistic_robustness, p0: 0.01, at_least: 0.9}
    """

    name = "local_probabilistic_robustness"
    description = "per point SPRT of P_δ[f(clip(x+δ)) fails] ≤ p1 vs ≥ p0"
    Config = LocalProbabilisticConfig

    #: blocks carry ``forward_images`` only; the bounds are over all points (:meth:`finalize`)
    merge_rules = {"guarantee": "same", "robust": "sum", "not_robust": "sum",
                   "undecided": "sum", "decided_at_budget": "sum", "draws_used": "sum",
                   "forward_images": "sum", "min_draws_to_decide_robust": "same",
                   "wrong_robust_probability_per_point_at_most": "same",
                   "wrong_not_robust_probability_per_point_at_most": "same",
                   "expected_wrong_robust_decisions_at_most": "recompute",
                   "expected_wrong_not_robust_decisions_at_most": "recompute",
                   "robust_population_fraction_at_least": "recompute"}
    pointwise = True

    def selectors(self):
        return [{"p0": self.config.p0}]

    def cost(self, n_points: int) -> int:
        return n_points

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        sprt = cfg.sprt()
        n_min = sprt.draws_to_accept_h1_without_failures()
        schedule = _block_schedule(cfg.block_size, n_min)
        lo, hi = data.input_range
        m = len(data)
        target = reference_labels(model, data, ctx, cfg.failure)
        failures = np.zeros(m, dtype=np.int64)
        draws = np.zeros(m, dtype=np.int64)
        decision = np.zeros(m, dtype=np.int8)
        at_budget = np.zeros(m, dtype=bool)
        gens = ctx.point_generators(f"{self.name}/{cfg.distribution}/{cfg.scale!r}", m)
        active = np.arange(m)
        forward_images = 0
        while active.size:
            # every active point has made the same number of draws
            b = int(min(next(schedule), cfg.max_draws - draws[active[0]]))
            per_fwd = max(1, cfg.max_forward_images // b)
            for s in range(0, active.size, per_fwd):
                idx = active[s:s + per_fwd]
                x = data.x[idx]
                # each point's b draws from its own generator: the same whatever the batch
                noise = draw_per_point(
                    [gens[i] for i in idx.tolist()],
                    lambda g, b=b, x1=x[:1]: draw_noise(x1, b, cfg.distribution, cfg.scale, g)[0])
                xp = x[:, None] + noise
                xp = to_device(xp.clamp_(lo, hi).flatten(0, 1), ctx.device)
                # one copy back per forward pass (up to max_forward_images images): the
                # sequential test decides on the host which points go on
                pred = model.logits(xp).argmax(1).cpu().view(len(idx), b)
                fail = (pred != target[idx][:, None]).numpy()
                forward_images += fail.size
                cf = failures[idx, None] + np.cumsum(fail, axis=1)
                cd = draws[idx, None] + np.arange(1, b + 1)[None]
                dec = sprt.decide_many(cf, cd)
                stop = dec != 0
                hit = stop.any(1)
                first = stop.argmax(1)
                rows = np.arange(len(idx))
                decision[idx[hit]] = dec[rows[hit], first[hit]]
                draws[idx] = np.where(hit, cd[rows, first], cd[:, -1])
                failures[idx] = np.where(hit, cf[rows, first], cf[:, -1])
                ctx.advance(int(hit.sum()))
            left = active[decision[active] == 0]
            done = left[draws[left] >= cfg.max_draws]
            if done.size:
                at_budget[done] = True
                decision[done] = _fallback(failures[done], draws[done], cfg)
                ctx.advance(int(done.size))
            active = left[draws[left] < cfg.max_draws]

        res = self.result(
            [Proportion({"p0": cfg.p0}, int((decision == ROBUST).sum()), m,
                        population=POPULATION)],
            per_point={"decision": decision, "draws": draws, "failures": failures,
                       "decided_at_budget": at_budget},
            # the only summary that is not a function of the per-point arrays: it adds up
            diagnostics={"forward_images": int(forward_images)},
        )
        return self.finalize(res, model, data, ctx) if ctx.total is None else res

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """The summaries of the merged blocks, from the merged per-point arrays (the bounds on
        wrong decisions and the population fraction are not sums of the blocks')."""
        cfg = self.config
        pp = result.per_point
        decision, m = pp["decision"], len(pp["decision"])
        robust = int((decision == ROBUST).sum())
        err_robust = cfg.alpha / (1 - cfg.beta) + cfg.alpha
        err_not = cfg.beta / (1 - cfg.alpha) + cfg.beta
        result.diagnostics = {
            "guarantee": (
                "per point: if p_fail ≥ p0, P(decided robust) ≤ α/(1−β)+α; if p_fail ≤ p1, "
                "P(decided not robust) ≤ β/(1−α)+β (Wald SPRT + Clopper–Pearson at the "
                "budget, union bound); no promise for p1 < p_fail < p0"),
            "robust": robust,
            "not_robust": int((decision == NOT_ROBUST).sum()),
            "undecided": int((decision == UNDECIDED).sum()),
            "decided_at_budget": int(pp["decided_at_budget"].sum()),
            "draws_used": int(pp["draws"].sum()),
            "forward_images": int(result.diagnostics["forward_images"]),
            "min_draws_to_decide_robust": int(cfg.sprt().draws_to_accept_h1_without_failures()),
            "wrong_robust_probability_per_point_at_most": float(err_robust),
            "wrong_not_robust_probability_per_point_at_most": float(err_not),
            "expected_wrong_robust_decisions_at_most": int(math.ceil(m * err_robust - 1e-12)),
            "expected_wrong_not_robust_decisions_at_most": int(math.ceil(m * err_not - 1e-12)),
            "robust_population_fraction_at_least": {
                "confidence": float(ctx.confidence),
                "value": float(max(0.0, clopper_pearson(robust, m, ctx.confidence, "lower")[0]
                                   - err_robust)),
                "statement": "P_x(p_fail(x) < p0) for inputs drawn like the evaluation points "
                             "(one-sided CP lower bound on the fraction decided robust minus "
                             "the per-point wrong-robust probability)"},
        }
        return result


#: draws in the first block when block_size is not set: clear failures stop here
FIRST_BLOCK = 16


def _block_schedule(block_size: int | None, n_min: int):
    """Draws per point in successive forward passes. Default: up to FIRST_BLOCK draws, then up
    to 4·FIRST_BLOCK (points that fail often are decided early, with little waste), then up to
    the n_min draws a failure-free point needs to be decided robust (it is decided with no
    wasted draw), then blocks of n_min."""
    if block_size:
        while True:
            yield block_size
    done = 0
    for target in (FIRST_BLOCK, 4 * FIRST_BLOCK, n_min):
        if target > done and target <= n_min:
            yield target - done
            done = target
    while True:
        yield n_min


def _fallback(failures: np.ndarray, draws: np.ndarray, cfg: LocalProbabilisticConfig):
    """Decision at the budget from one-sided Clopper–Pearson bounds (vectorised). The beta
    quantiles come from ``scipy.special.betaincinv(a, b, q)``, bit for bit what
    ``scipy.stats.beta.ppf(q, a, b)`` returns (tests/test_probabilistic_local.py), without
    importing scipy.stats (about a second, in every process of a certification)."""
    k, n = failures.astype(np.float64), draws.astype(np.float64)
    upper = np.where(k < n, _sp.betaincinv(k + 1, np.maximum(n - k, 1), 1 - cfg.alpha), 1.0)
    lower = np.where(k > 0, _sp.betaincinv(np.maximum(k, 1), n - k + 1, cfg.beta), 0.0)
    out = np.full(len(k), UNDECIDED, dtype=np.int8)
    out[lower > cfg.p1] = NOT_ROBUST
    out[upper < cfg.p0] = ROBUST
    return out
