"""Rare-event failure probabilities by adaptive multilevel splitting (Webb, Rainforth, Teh &
Kumar 2019; Family C): log p_fail far below what plain Monte Carlo reaches."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from robust_cert.data import EvalSet
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    value_list,
)
from robust_cert.metrics.local_probabilistic import (
    ProportionalProgress,
    draw_noise,
    noise_scale,
    reference_labels,
    to_device,
)
from robust_cert.models.base import Classifier


def failure_score(model: Classifier, x: torch.Tensor, target: torch.Tensor,
                  max_forward_images: int = 4096) -> torch.Tensor:
    """s(x') = max_{i≠t} f_i(x') − f_t(x') for a flat batch; the input fails iff s ≥ 0.

    ``target`` on the model's device; the scores stay there (float64, no synchronisation)."""
    out = []
    for s in range(0, len(x), max_forward_images):
        logits = model.logits(to_device(x[s:s + max_forward_images], model.device))
        t = target[s:s + max_forward_images]
        own = logits.gather(1, t[:, None])[:, 0]
        others = logits.scatter(1, t[:, None], float("-inf")).max(1).values
        out.append((others - own).double())
    return torch.cat(out)


def ams_log_p(model: Classifier, x: torch.Tensor, target: torch.Tensor, *, distribution: str,
              scale: float, input_range: tuple[float, float], generator: torch.Generator,
              particles: int = 1000, kill: float = 0.5, mcmc_steps: int = 20,
              max_levels: int = 70, max_forward_images: int = 4096):
    """One run of adaptive multilevel splitting for every point of ``x`` at once.

    For each point, ``particles`` perturbations δ are drawn from the prior (``gaussian``
    N(0, scale²I) or ``uniform_linf`` in the L∞ ball of radius ``scale``); the score is
    s(clip(x + δ)). Each level sets L to the ``kill``-quantile of the scores; if L ≥ 0 the run
    ends with the fraction of particles with s ≥ 0, else the fraction with s > L multiplies
    the estimate, killed particles are replaced by copies of survivors, and every particle
    makes ``mcmc_steps`` Metropolis moves that leave the prior restricted to {s > L} invariant
    (Gaussian: preconditioned Crank–Nicolson; uniform ball: a random walk whose moves
    out of the ball are rejected), with the step size adapted to the acceptance rate.

    Returns (natural-log estimate of p_fail (P,) float64, levels used (P,), reached (P,)
    bool), on the CPU. Where ``reached`` is false the run stopped at ``max_levels`` and the
    estimate is an estimated upper bound (the product so far).

    The particles live on the model's device; random numbers are drawn on the CPU from
    ``generator`` (the same on any device) and copied over. The host waits for the device a
    few times per level (which points finish, resampling), never inside the MCMC moves.
    """
    lo, hi = input_range
    p, n = x.shape[0], particles
    shape = x.shape[1:]
    dev = model.device
    x, target = to_device(x, dev), to_device(target, dev)

    def scores(xs, ts, delta):
        xp = (xs[:, None] + delta).clamp(lo, hi).flatten(0, 1)
        return failure_score(model, xp, ts.repeat_interleave(n), max_forward_images).view(
            len(xs), n)

    delta = to_device(draw_noise(x, n, distribution, scale, generator), dev)
    s = scores(x, target, delta)
    log_p = torch.zeros(p, dtype=torch.float64, device=dev)
    levels = torch.zeros(p, dtype=torch.long, device=dev)
    active = torch.ones(p, dtype=torch.bool, device=dev)
    step = torch.full((p,), 0.5 if distribution == "gaussian" else 0.5 * scale,
                      dtype=torch.float64, device=dev)
    k_kill = max(1, min(n - 1, int(math.ceil(kill * n))))
    for _ in range(max_levels + 1):
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        sa = s[idx]
        thresh = sa.kthvalue(k_kill, dim=1).values
        finish = thresh >= 0
        if finish.any():
            f_idx = idx[finish]
            log_p[f_idx] += torch.log((sa[finish] >= 0).double().mean(1))
            active[f_idx] = False
        go = ~finish & (levels[idx] < max_levels)
        if not go.any():
            break
        idx, sa, thresh = idx[go], sa[go], thresh[go]
        alive = sa > thresh[:, None]
        frac = alive.double().mean(1)
        log_p[idx] += torch.log(frac)
        levels[idx] += 1
        dead = frac == 0
        if dead.any():  # all particles tie at the threshold: the estimate is 0
            active[idx[dead]] = False
            idx, sa, thresh, alive = idx[~dead], sa[~dead], thresh[~dead], alive[~dead]
        if idx.numel() == 0:
            continue  # every point left died: the next level finds none active
        # resample the killed particles from the survivors (drawn on the CPU generator)
        pick = torch.multinomial(alive.double().cpu(), n, replacement=True, generator=generator)
        keep = torch.where(alive, torch.arange(n, device=dev)[None].expand_as(alive),
                           to_device(pick, dev))
        d = delta[idx].gather(1, keep.view(*keep.shape, *([1] * len(shape))).expand(
            -1, -1, *shape))
        sc = sa.gather(1, keep)
        xs, ts = x[idx], target[idx]
        for _ in range(mcmc_steps):
            b = step[idx]
            view = (len(idx),) + (1,) * (1 + len(shape))
            if distribution == "gaussian":
                noise = to_device(torch.randn(d.shape, generator=generator, dtype=d.dtype)
                                  * scale, dev)
                rho = (1 - b.clamp(max=1.0) ** 2).sqrt().to(d.dtype)
                prop = rho.view(view) * d + b.to(d.dtype).view(view) * noise
                inside = torch.ones(sc.shape, dtype=torch.bool, device=dev)
            else:
                u = to_device(torch.rand(d.shape, generator=generator, dtype=d.dtype) * 2 - 1,
                              dev)
                prop = d + b.to(d.dtype).view(view) * u
                inside = prop.flatten(2).abs().amax(2) <= scale
            sp = scores(xs, ts, prop)
            acc = inside & (sp > thresh[:, None])
            d = torch.where(acc.view(*acc.shape, *([1] * len(shape))), prop, d)
            sc = torch.where(acc, sp, sc)
            rate = acc.double().mean(1)
            cap = 1.0 if distribution == "gaussian" else 2.0 * scale
            step[idx] = torch.where(rate > 0.2, (b * 1.2).clamp(max=cap), b * 0.8)
        delta[idx] = d
        s[idx] = sc
    reached = ~active
    return log_p.cpu(), levels.cpu(), reached.cpu()


if TYPE_CHECKING:  # the type value_list() builds (a call is no type expression)
    Probabilities = list[float]
else:
    Probabilities = value_list("p_max", low=0, high=1, low_open=True, high_open=True)


class RareEventConfig(MetricConfig):
    """Parameters of :class:`RareEventProbability`."""

    distribution: Literal["gaussian", "uniform_linf"] = "gaussian"
    eps: float | None = Field(default=None, gt=0, description="ball radius (uniform_linf)")
    sigma: float | None = Field(default=None, gt=0, description="noise σ (gaussian)")
    particles: int = Field(default=1000, ge=10, le=10_000_000)
    kill: float = Field(default=0.5, gt=0, lt=1, description="fraction killed per level")
    mcmc_steps: int = Field(default=20, ge=1, le=100_000)
    max_levels: int = Field(default=70, ge=1, le=100_000,
                            description="levels per run: p below (1 − kill)^max_levels "
                                        "(8e-22 by default) is reported as not reached")
    runs: int = Field(default=4, ge=2, le=1000, description="independent runs (spread)")
    points: int | None = Field(default=None, ge=1, description="random subset of points")
    p_max: Probabilities = Field(default=[1e-6], min_length=1,
                               description="proportions of points with estimated p_fail ≤ p")
    failure: Literal["misclassified", "prediction_changed"] = "misclassified"
    max_forward_images: int = Field(default=4096, ge=1, le=100_000_000,
                                    description="noisy images per step (memory); on CPU the "
                                    "model gets at most max(batch_size, 64) per call")

    @model_validator(mode="after")
    def _scale_for_distribution(self):
        noise_scale(self.distribution, self.eps, self.sigma)
        return self

    @property
    def scale(self) -> float:
        return noise_scale(self.distribution, self.eps, self.sigma)


class RareEventProbability(Metric[RareEventConfig]):
    """Per-point failure probability p_fail(x) = P_δ[f(clip(x + δ)) fails] estimated by adaptive
    multilevel splitting (AMS, Webb et al. 2019), down to 1e-6 and far below.

    Forward passes only (ONNX works). Each of ``runs`` independent runs gives an estimate of
    log p per point (:func:`ams_log_p`); the per-point result is the mean of log10 p over the
    runs, with their standard deviation as the run-to-run spread. The number of levels is
    about ln p / ln(1 − kill), and the relative variance of one run about
    (−ln p)·kill / ((1 − kill)·(−ln(1 − kill))·particles).

    Guarantee: none — kind "estimate". AMS is consistent (exact as particles → ∞, for
    a well-mixing MCMC), but a single run carries no exact confidence bound; the spread over
    runs is the honest error bar. Known answer (tests): a linear score with Gaussian noise at
    margin z·σ‖w‖ has p = Φ(−z) (z = 5: log10 p = −6.543). A point whose run stops at
    ``max_levels`` is reported as below (1 − kill)^max_levels (``reached`` false).

    The proportions (selector ``{"p_max": p}``) are the fraction of the evaluated points whose
    mean log10 p_fail ≤ log10 p; their CIs cover the sampling of points only — they gate on an
    estimate, so use them for trends, not certificates.

    Sharding (``shardable``): the engine may run it on consecutive blocks of points, in
    several processes. The ``points`` subset is drawn for the whole set (the same in every
    block; per_point ``index`` holds indices in the whole set) and each block evaluates the
    chosen points it holds; the AMS runs of a block draw from its own generator, seeded by
    (seed, distribution and scale, the block's first point). :meth:`finalize` recomputes the
    diagnostics from the merged per-point arrays, so the result is the same for any number
    of processes.

    Args (policy ``metrics.rare_event_probability``): distribution ("gaussian"; or
    "uniform_linf"), sigma or eps (required, > 0), particles (1000), kill (0.5),
    mcmc_steps (20), max_levels (70), runs (4, ≥ 2), points (all; or a random subset),
    p_max ([1e-6]), failure ("misclassified"), max_forward_images (4096).

    Example::

        res = RareEventProbability(RareEventConfig(sigma=0.1, points=20)).run(model, data, ctx)
        res.per_point["log10_p"], res.per_point["log10_p_spread"]
    """

    name = "rare_event_probability"
    description = "AMS estimate of log P_δ[f(clip(x+δ)) fails] per point"
    Config = RareEventConfig

    #: blocks carry no diagnostics; the median spread is over all points (:meth:`finalize`)
    merge_rules = {"guarantee": "same", "runs": "same", "points": "sum", "not_reached": "sum",
                   "zero_estimates": "sum", "floor_log10_p": "same",
                   "median_spread_log10": "recompute"}

    def selectors(self):
        return [{"p_max": p} for p in self.config.p_max]

    def cost(self, n_points: int) -> int:
        return min(n_points, self.config.points or n_points) * self.config.runs

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        g = ctx.generator(f"{self.name}/{cfg.distribution}/{cfg.scale!r}")
        n_total = ctx.n_total(data)
        if cfg.points is None or cfg.points >= n_total:
            local = torch.arange(len(data))
        else:  # the subset of the whole set (the same in every block), then this block's part
            chosen = torch.randperm(n_total, generator=ctx.global_generator(
                f"{self.name}/points/{cfg.distribution}/{cfg.scale!r}"))[:cfg.points]
            chosen = chosen.sort().values
            local = chosen[(chosen >= ctx.offset) & (chosen < ctx.offset + len(data))]
            local = local - ctx.offset
        m = len(local)
        sub = dataclasses.replace(data, x=data.x[local], y=data.y[local])
        target = reference_labels(model, sub, ctx, cfg.failure)
        x = sub.x
        chunk = max(1, min(ctx.batch_size, cfg.max_forward_images // cfg.particles))
        logs = np.empty((cfg.runs, m))
        levels = np.zeros((cfg.runs, m), dtype=np.int64)
        reached = np.ones(m, dtype=bool)
        progress = ProportionalProgress(ctx.advance, self.cost(len(data)), cfg.runs * m)
        for r in range(cfg.runs):
            for s in range(0, m, chunk):
                sl = slice(s, min(s + chunk, m))
                lp, lv, ok = ams_log_p(
                    model, x[sl], target[sl], distribution=cfg.distribution, scale=cfg.scale,
                    input_range=data.input_range, generator=g, particles=cfg.particles,
                    kill=cfg.kill, mcmc_steps=cfg.mcmc_steps, max_levels=cfg.max_levels,
                    max_forward_images=cfg.max_forward_images)
                logs[r, sl] = lp.numpy() / math.log(10)
                levels[r, sl] = lv.numpy()
                reached[sl] &= ok.numpy()
                progress.step(sl.stop - sl.start)
        clipped = np.where(np.isfinite(logs), logs, self._floor())  # p estimated 0: the floor
        mean = clipped.mean(0)
        spread = clipped.std(0, ddof=1)
        props = [Proportion({"p_max": p}, int((mean <= math.log10(p)).sum()), m)
                 for p in cfg.p_max]
        res = self.result(
            props,
            per_point={"index": (local + ctx.offset).numpy(), "log10_p": mean,
                       "log10_p_spread": spread, "log10_p_runs": logs.T.copy(),
                       "levels": levels.T.copy(), "reached": reached})
        return self.finalize(res, model, data, ctx) if ctx.total is None else res

    def _floor(self) -> float:
        """log10 of the smallest estimate a run can give: what a zero estimate counts as."""
        cfg = self.config
        return cfg.max_levels * math.log10(1 - cfg.kill) + math.log10(1 / cfg.particles)

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """The summaries of the evaluated points, from the merged per-point arrays (the
        median spread is not a function of the blocks' medians)."""
        pp = result.per_point
        m = len(pp["index"])
        result.diagnostics = {
            "guarantee": "none: AMS estimates; spread over independent runs reported",
            "runs": int(self.config.runs),
            "points": int(m),
            "not_reached": int((~pp["reached"]).sum()),
            "zero_estimates": int((~np.isfinite(pp["log10_p_runs"])).sum()),
            "floor_log10_p": float(self._floor()),
            "median_spread_log10": float(np.median(pp["log10_p_spread"])) if m else 0.0,
        }
        return result
