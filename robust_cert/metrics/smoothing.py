"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019; Family D): certified L2 radii."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator
from scipy import stats as _st

from robust_cert.data import EvalSet
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    draw_per_point,
    value_list,
)
from robust_cert.metrics.local_probabilistic import to_device
from robust_cert.models.base import Classifier

ABSTAIN = -1


def smoothing_draws_needed(radius: float, sigma: float, alpha: float) -> int:
    """Fewest noise draws n for which ``certify`` can return a radius ≥ ``radius`` at all.

    With n_A = n the lower bound is α^{1/n}, so the radius never exceeds σ·Φ⁻¹(α^{1/n}); it
    reaches ``radius`` iff α^{1/n} ≥ Φ(radius/σ), i.e. n ≥ ln α / ln Φ(radius/σ).
    """
    q = float(_st.norm.cdf(radius / sigma))
    if q >= 1.0:
        raise ValueError(f"radius {radius} is beyond any finite number of draws at σ={sigma}")
    n = max(1, math.ceil(math.log(alpha) / math.log(q)))
    while n > 1 and alpha ** (1.0 / (n - 1)) >= q:
        n -= 1
    while alpha ** (1.0 / n) < q:
        n += 1
    return n


def radius_cap(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``certify`` can return with n draws: σ·Φ⁻¹(α^{1/n})."""
    return float(sigma * _st.norm.ppf(alpha ** (1.0 / n)))


def smoothed_counts(model: Classifier, x: torch.Tensor, sigma: float, num: int,
                    generator: torch.Generator | Sequence[torch.Generator],
                    max_forward_images: int = 4096) -> torch.Tensor:
    """Class counts (len(x), C) of f(x + δ) over ``num`` draws δ ~ N(0, σ²I) per point.

    Many points and many draws share each forward pass (at most ``max_forward_images``
    images); noise is drawn on the CPU (reproducible on any device) from ``generator``: one
    generator for the batch, or one per point (``len(x)`` of them,
    :meth:`RunContext.point_generators`), each point then drawing its noise in chunks of
    min(num, max_forward_images) draws, whatever the other points. The counts are
    accumulated on the model's device and copied back once (returned on the CPU).
    """
    p = x.shape[0]
    counts = torch.zeros(p, model.num_classes, dtype=torch.long, device=model.device)
    block = min(num, max_forward_images)
    per_fwd = max(1, max_forward_images // block)
    for s in range(0, p, per_fwd):
        xs = x[s:s + per_fwd]
        done = 0
        while done < num:
            b = min(block, num - done)
            if isinstance(generator, torch.Generator):
                noise = torch.randn((xs.shape[0], b, *xs.shape[1:]), generator=generator)
            else:
                shape = (b, *xs.shape[1:])
                noise = draw_per_point(generator[s:s + per_fwd],
                                       lambda g, shape=shape: torch.randn(shape, generator=g))
            noise = noise * sigma
            xp = to_device((xs[:, None] + noise).flatten(0, 1), model.device)
            pred = model.logits(xp).argmax(1).view(xs.shape[0], b)
            counts[s:s + xs.shape[0]] += torch.nn.functional.one_hot(
                pred, model.num_classes).sum(1)
            done += b
    return counts.cpu()


def p_lower_bound(n_a: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound at level α: beta.ppf(α, n_A, n − n_A + 1)."""
    n_a = np.asarray(n_a, dtype=np.float64)
    out = _st.beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1)
    return np.where(n_a > 0, out, 0.0)


def certify(model: Classifier, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float,
            generator: torch.Generator | Sequence[torch.Generator],
            max_forward_images: int = 4096):
    """Cohen et al.'s CERTIFY for a batch of points at once.

    n0 draws select the class c_A (most frequent), n fresh draws count n_A;
    p_lower = beta.ppf(α, n_A, n − n_A + 1); abstain (prediction −1, radius NaN) if
    p_lower < 0.5, else radius σ·Φ⁻¹(p_lower). With probability ≥ 1 − α over the draws, a
    non-abstained point's smoothed prediction is c_A and is constant within that L2 radius.

    Returns numpy arrays (prediction, radius, p_lower, n_a).
    """
    c_a = smoothed_counts(model, x, sigma, n0, generator, max_forward_images).argmax(1)
    counts = smoothed_counts(model, x, sigma, n, generator, max_forward_images)
    n_a = counts.gather(1, c_a[:, None])[:, 0].numpy()
    p_low = p_lower_bound(n_a, n, alpha)
    certified = p_low >= 0.5
    prediction = np.where(certified, c_a.numpy(), ABSTAIN).astype(np.int64)
    with np.errstate(divide="ignore"):
        radius = np.where(certified, sigma * _st.norm.ppf(np.where(certified, p_low, 0.5)),
                          np.nan)
    return prediction, radius, p_low, n_a.astype(np.int64)


def predict(model: Classifier, x: torch.Tensor, sigma: float, n: int, alpha: float,
            generator: torch.Generator | Sequence[torch.Generator],
            max_forward_images: int = 4096) -> np.ndarray:
    """Cohen et al.'s PREDICT for a batch: the top class of n draws, or −1 (abstain) unless
    the two-sided binomial test of n_A vs n_B (top two counts) at p = 1/2 has p-value ≤ α.

    The returned class differs from the smoothed classifier's with probability ≤ α.
    """
    counts = smoothed_counts(model, x, sigma, n, generator, max_forward_images)
    top = counts.topk(2, dim=1)
    n_a, n_b = top.values[:, 0].numpy(), top.values[:, 1].numpy()
    pval = np.minimum(1.0, 2.0 * _st.binom.cdf(np.minimum(n_a, n_b), n_a + n_b, 0.5))
    return np.where(pval <= alpha, top.indices[:, 0].numpy(), ABSTAIN).astype(np.int64)


if TYPE_CHECKING:  # the type value_list() builds (a call is no type expression)
    Radii = list[float]
else:
    Radii = value_list("radii", low=0)


class SmoothingConfig(MetricConfig):
    """Parameters of :class:`RandomizedSmoothing` (validated in this order)."""

    sigma: float = Field(gt=0, description="noise σ of the smoothed classifier")
    n0: int = Field(default=100, ge=1, le=10_000_000, description="draws to select the class")
    n: int = Field(default=10_000, ge=1, le=100_000_000, description="draws to estimate p_A")
    alpha: float = Field(default=0.001, gt=0, lt=1, description="per-point failure probability")
    radii: Radii = Field(default=[0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
                               description="radii of the certified-accuracy curve")
    max_forward_images: int = Field(default=4096, ge=1, le=100_000_000,
                                    description="noisy images per step (memory); on CPU the "
                                    "model gets at most max(batch_size, 64) per call")

    @field_validator("radii")
    @classmethod
    def _reachable(cls, v: list[float], info: ValidationInfo):
        """Refuse radii no number of draws ``n`` could certify (v is sorted already)."""
        d = info.data
        if all(d.get(k) is not None for k in ("sigma", "n", "alpha")):
            need = smoothing_draws_needed(v[-1], d["sigma"], d["alpha"])
            if d["n"] < need:
                raise ValueError(
                    f"radius {v[-1]} can never be certified with n={d['n']} draws (cap "
                    f"σ·Φ⁻¹(α^(1/n)) = {radius_cap(d['sigma'], d['n'], d['alpha']):.4g}); "
                    f"it needs n ≥ {need}")
        return v


class RandomizedSmoothing(Metric[SmoothingConfig]):
    """Certified accuracy of the *smoothed* classifier g(x) = argmax_c P_δ[f(x+δ) = c],
    δ ~ N(0, σ²I), at L2 radii r (Cohen et al. 2019, CERTIFY).

    For each point, n0 draws choose c_A, n fresh draws give n_A and
    p_lower = beta.ppf(α, n_A, n − n_A + 1); the point abstains if p_lower < 0.5, else its
    certified radius is R = σ·Φ⁻¹(p_lower). Guarantee, per point: with probability ≥ 1 − α
    over the noise draws, if the point does not abstain then g(x + e) = c_A for every
    ‖e‖₂ < R. This is a statement about g, not about the base model f (f itself may be broken
    by far smaller perturbations); inputs are not clipped (g is defined on all of ℝ^d).
    No radius exceeds σ·Φ⁻¹(α^{1/n}).

    The proportion at radius r is the fraction of points with c_A = y and R ≥ r (certified
    accuracy); over m points at most m·α certificates are expected to be wrong
    (``diagnostics.expected_wrong_certificates_at_most``). The CI of each proportion covers
    the sampling of evaluation points.

    Kind: certified (for the smoothed classifier, with probability 1 − α per point). A model
    that is random at evaluation time is smoothed together with its own randomness.

    Sharding (``shardable``): the engine may run it on consecutive blocks of points, in
    several processes; each point draws its noise (n0 selection draws, then n counting
    draws) from its own generator, seeded by (seed, σ, the point's index in the whole set),
    so a point's draws depend neither on its block, nor on the process, nor on the batch
    size (:attr:`pointwise`). The
    per-point certificates concatenate and :meth:`finalize` recomputes the diagnostics from
    them.

    Args (policy ``metrics.randomized_smoothing``): sigma (required, > 0), n0 (100),
    n (10,000; must reach the largest radius: n ≥ ln α / ln Φ(r_max/σ)), alpha (0.001),
    radii ([0, 0.25, 0.5, 0.75, 1]), max_forward_images (4096).

    Example::

        res = RandomizedSmoothing(SmoothingConfig(sigma=0.25)).run(model, data, ctx)
        res.find({"radius": 0.25}).estimate      # certified accuracy at r = 0.25
        # policy: {metric: randomized_smoothing, radius: 0.25, at_least: 0.6}
    """

    name = "randomized_smoothing"
    description = "P[g(x) = y certified with L2 radius ≥ r], g = Gaussian-smoothed f"
    Config = SmoothingConfig

    #: the bound on wrong certificates is ⌈m·α⌉ of all m points (:meth:`finalize`)
    merge_rules = {"guarantee": "same", "abstained": "sum", "certified_correct": "sum",
                   "radius_cap": "same", "expected_wrong_certificates_at_most": "recompute",
                   "forward_images": "sum"}
    pointwise = True

    def selectors(self):
        return [{"radius": r} for r in self.config.radii]

    def cost(self, n_points: int) -> int:
        return n_points

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        m = len(data)
        gens = ctx.point_generators(f"{self.name}/{cfg.sigma!r}", m)
        prediction = np.empty(m, dtype=np.int64)
        radius = np.empty(m, dtype=np.float64)
        p_low = np.empty(m, dtype=np.float64)
        n_a = np.empty(m, dtype=np.int64)
        for s in range(0, m, ctx.batch_size):
            sl = slice(s, min(s + ctx.batch_size, m))
            prediction[sl], radius[sl], p_low[sl], n_a[sl] = certify(
                model, data.x[sl], cfg.sigma, cfg.n0, cfg.n, cfg.alpha, gens[sl],
                cfg.max_forward_images)
            ctx.advance(sl.stop - sl.start)
        correct = prediction == data.y.numpy()
        props = []
        for r in cfg.radii:
            ok = correct & (np.nan_to_num(radius, nan=-1.0) >= r)
            props.append(Proportion({"radius": r}, int(ok.sum()), m))
        res = self.result(
            props,
            per_point={"prediction": prediction, "radius": radius, "p_lower": p_low,
                       "n_a": n_a, "correct": correct})
        return self.finalize(res, model, data, ctx)

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """Summaries from the (merged) per-point arrays: the bound on wrong certificates is
        ⌈m·α⌉ of all m points, not a sum of the blocks' ceilings."""
        cfg = self.config
        pp = result.per_point
        m = len(pp["prediction"])
        result.diagnostics = {
            "guarantee": "for the smoothed classifier g, per point with probability ≥ "
                         "1 − α: g(x+e) = c_A for all ‖e‖₂ < R",
            "abstained": int((pp["prediction"] == ABSTAIN).sum()),
            "certified_correct": int(pp["correct"].sum()),
            "radius_cap": radius_cap(cfg.sigma, cfg.n, cfg.alpha),
            "expected_wrong_certificates_at_most": int(math.ceil(m * cfg.alpha - 1e-12)),
            "forward_images": int(m * (cfg.n0 + cfg.n)),
        }
        return result
