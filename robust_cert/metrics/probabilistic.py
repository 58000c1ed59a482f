"""Global probabilistic robustness (Lim & Mu; Family C): the failure rate under random noise."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

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
from robust_cert.metrics.local_probabilistic import (
    ProportionalProgress,
    reference_labels,
    to_device,
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


def population_bands(prop: Proportion, confidence: float, bands=IEC_BANDS) -> dict:
    """Which failure-rate bands a clustered proportion demonstrates for the population.

    A band b is demonstrated when the one-sided betting upper bound on the mean per-point
    failure rate (:meth:`Proportion.bound`, level 1 − ``confidence``) is ≤ b; then
    P(demonstrating b | population failure rate > b) ≤ 1 − confidence. Beyond what the
    evaluation points allow (about ln(1/α)/(0.9·points) with no failure at all), more draws per
    point do not help: only more points do.
    """
    upper = prop.bound(1.0 - confidence, "upper")
    shown = [b for b in bands if upper <= b]
    rest = [b for b in bands if upper > b]
    return {"upper_bound": float(upper), "demonstrated": [float(b) for b in shown],
            "best_band": float(min(shown)) if shown else None,
            "next_band": float(rest[0]) if rest else None,
            "points": prop.points, "interval_method": prop.interval_method,
            "population": prop.population}


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


if TYPE_CHECKING:  # the type value_list() builds (a call is no type expression)
    Radii = list[float]
else:
    Radii = value_list("ε", low=0, low_open=True)

#: What the verdict's interval of :class:`ProbabilisticRobustness` covers.
POPULATION = ("inputs drawn like the evaluation points × uniform L∞ noise (mean of the per-point "
              "failure rates; draws clustered by point)")


class ProbabilisticRobustnessConfig(MetricConfig):
    """Parameters of :class:`ProbabilisticRobustness`."""

    eps: Radii = Field(min_length=1, description="L∞ radius of the uniform noise ball")
    samples: int = Field(
        default=2995, ge=1, le=100_000_000,
        description="(x, δ) pairs per radius; 2,995 failure-free pairs demonstrate ≤ 1e-3 at 95% "
                    "on this evaluation set (the population bound needs more points)",
    )
    distribution: Literal["uniform_linf"] = "uniform_linf"
    failure: Literal["misclassified", "prediction_changed"] = Field(
        default="misclassified",
        description="misclassified: f(x+δ) ≠ y; prediction_changed: f(x+δ) ≠ f(x)",
    )


class ProbabilisticRobustness(Metric[ProbabilisticRobustnessConfig]):
    """Failure rate of the model under random perturbation, certified by an exact test.

    Draws ``samples`` pairs (x_i, δ_i): x_i uniformly from the evaluation set (with
    replacement), δ_i uniform in the L∞ ball of radius ε; x_i + δ_i is clipped to the input
    range. The quantity is the population failure rate p = E_x[p_fail(x)], p_fail(x) =
    P_δ[f(clip(x + δ)) fails], x from the population the evaluation points were drawn from.

    What each interval covers:

    * Population (used by the verdict and shown as ``ci``): the draws are clustered — about
      samples/points draws share each point — so they are not ``samples`` independent draws
      from the population. The proportion carries each point's failures and draws; given how
      many draws each point got (allotted independently of the points), the per-point failure
      rates are independent in [0, 1] with mean p, and the betting bound
      (:class:`robust_cert.stats.BettingBound`) gives an exact test and one-sided bounds for
      p. Its resolution is set by the number of *points*: with no failure at all the 95% upper
      bound is about 3.3/points.
    * On this evaluation set (``conditional_ci`` in the certificate): the pairs are i.i.d.
      from the evaluation set's empirical distribution × the noise, so the Clopper–Pearson
      interval on the pooled k of n is exact for that finite population only.

    ``diagnostics.bands`` reports, per radius, which IEC 61508-style failure-rate bands
    (1e-1 … 1e-5) are demonstrated at the policy's confidence (one-sided upper bound ≤ band;
    each radius on its own, not Holm-adjusted): ``population`` from the betting bound
    (:func:`population_bands`), ``on_this_evaluation_set`` from the pooled Clopper–Pearson bound
    with how many more failure-free draws would demonstrate the next band there
    (:func:`failure_rate_bands`).

    Kind: statistical. The population statement speaks for deployment data only as far as the
    evaluation points are an i.i.d. sample of it.

    Sharding (``shardable``): the engine may run it on consecutive blocks of points, in
    several processes. The points of the ``samples`` pairs are drawn for the whole set (a
    generator seeded by (seed, ε), the same in every block); each block evaluates the pairs
    whose point it holds, each point drawing its pairs' noise in pair order from its own
    generator, seeded by (seed, ε, the point's index) (:attr:`pointwise`: the result depends
    on neither the blocks nor the batch size). :meth:`finalize` puts the merged per-pair arrays
    (``failed@ε``, ``index@ε``: the point of each pair in the whole set) back in pair order
    and computes the bands from the merged counts, so the result is the same for any number
    of processes.

    Args (policy ``metrics.probabilistic_robustness``):
        eps: noise radius (or list of radii) in data units.
        samples: pairs per radius (default 2,995).
        failure: ``misclassified`` (default) or ``prediction_changed``.

    Example::

        ProbabilisticRobustness(ProbabilisticRobustnessConfig(eps=0.1)).run(model, data, ctx)
    """

    name = "probabilistic_robustness"
    description = "P_{x~data, δ~U(B∞(ε))}[f(clip(x+δ)) fails]"
    Config = ProbabilisticRobustnessConfig

    #: blocks carry no diagnostics; the bands are of the merged counts (:meth:`finalize`)
    merge_rules = {"bands": "recompute"}
    pointwise = True

    def selectors(self):
        return [{"eps": e} for e in self.config.eps]

    def cost(self, n_points: int) -> int:
        return self.config.samples * len(self.config.eps)

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        lo, hi = data.input_range
        n_data, m, dev = len(data), cfg.samples, ctx.device
        n_total = ctx.n_total(data)
        props, per_point = [], {}
        # what a perturbed prediction is compared with, for this block's points (CPU)
        target = reference_labels(model, data, ctx, cfg.failure)
        for eps in cfg.eps:
            # the point of every pair, drawn for the whole set: the same in every block
            num, idx = _pairs_in(ctx.global_generator(f"{self.name}/{eps!r}/points"),
                                 n_total, m, ctx.offset, ctx.offset + n_data)
            local = idx - ctx.offset
            # each point's noise from its own generator (seed, ε, point), in pair order
            gens = ctx.point_generators(f"{self.name}/{eps!r}", n_data)
            progress = ProportionalProgress(ctx.advance, m, len(local))
            fails = []
            for cl in _noise_chunks(local, num):
                noise = _pair_noise(gens, cl, data.x.shape[1:])
                for s in range(0, len(cl), ctx.batch_size):
                    bi = cl[s:s + ctx.batch_size]
                    delta = (noise[s:s + ctx.batch_size] * 2 - 1) * eps
                    xp = to_device((data.x[bi] + delta).clamp_(lo, hi), dev)
                    pred = model.logits(xp).argmax(1)
                    fails.append(pred != to_device(target[bi], dev))  # stays on the device
                    progress.step(len(bi))
            # one copy back per radius and block
            fail = (torch.cat(fails).cpu().numpy() if fails else np.zeros(0, dtype=bool))
            where = local.numpy()
            props.append(Proportion(
                {"eps": eps}, int(fail.sum()), len(fail),
                cluster_k=np.bincount(where, weights=fail, minlength=n_data)
                .round().astype(np.int64),
                cluster_n=np.bincount(where, minlength=n_data).astype(np.int64),
                population=POPULATION))
            per_point[f"failed@{eps:g}"] = fail
            per_point[f"index@{eps:g}"] = idx.numpy()
            per_point[f"pair@{eps:g}"] = num.numpy()
        res = self.result(props, per_point=per_point)
        return self.finalize(res, model, data, ctx) if ctx.total is None else res

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """Puts the merged pairs back in pair order (``pair@ε``, then dropped) and computes
        the failure-rate bands of the merged counts."""
        per_point = {}
        for key, arr in result.per_point.items():
            if key.startswith("pair@"):
                continue
            pair = result.per_point.get("pair@" + key.split("@", 1)[1])
            per_point[key] = arr if pair is None else arr[np.argsort(pair, kind="stable")]
        result.per_point = per_point
        bands = {}
        for prop in result.proportions:
            bands[f"{prop.params['eps']:g}"] = {
                "population": population_bands(prop, ctx.confidence),
                "on_this_evaluation_set": failure_rate_bands(prop.k, prop.n, ctx.confidence)}
        result.diagnostics = {"bands": {"confidence": float(ctx.confidence), "by_eps": bands}}
        return result


#: the points of the pairs are drawn in chunks of this many (memory); part of the definition
#: of the draws, like the seed
PAIR_CHUNK = 1 << 20


#: the pairs' noise is drawn in chunks of this many consecutive pair numbers (memory): in
#: each chunk, every point draws the U[0, 1) numbers of its pairs there, in pair order, in one
#: call to its own generator; part of the definition of the draws, like the seed
NOISE_CHUNK = 4096


def _noise_chunks(local: torch.Tensor, num: torch.Tensor):
    """The points of the pairs in each :data:`NOISE_CHUNK` of pair numbers, in pair order
    (``local``, ``num``: the points and pair numbers of this run's pairs, in pair order)."""
    if not len(num):
        return
    chunk = num // NOISE_CHUNK
    for c in torch.unique(chunk).tolist():
        sel = (chunk == c).nonzero()[:, 0]
        yield local[sel]


def _pair_noise(generators, points: torch.Tensor, shape) -> torch.Tensor:
    """U[0, 1) numbers of shape ``(len(points), *shape)`` for pairs at ``points`` (indices
    into ``generators``, in pair order): each point's rows, in pair order, from one call to
    its own generator, so a pair's numbers do not depend on which other points run."""
    out = torch.empty((len(points), *shape))
    order = torch.argsort(points, stable=True)
    sorted_points = points[order]
    uniq, counts = torch.unique_consecutive(sorted_points, return_counts=True)
    start = 0
    for p, c in zip(uniq.tolist(), counts.tolist(), strict=True):
        out[order[start:start + c]] = torch.rand((c, *shape), generator=generators[p])
        start += c
    return out


def _pairs_in(generator: torch.Generator, n_total: int, m: int, start: int, stop: int):
    """Of ``m`` pairs whose points are drawn uniformly from the ``n_total`` points of the whole
    set (with replacement), those whose point is in [start, stop): (pair numbers, points),
    both int64, in pair order."""
    nums, idxs = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for s in range(0, m, PAIR_CHUNK):
        idx = torch.randint(n_total, (min(PAIR_CHUNK, m - s),), generator=generator)
        keep = ((idx >= start) & (idx < stop)).nonzero()[:, 0]
        nums.append(keep + s)
        idxs.append(idx[keep])
    return torch.cat(nums), torch.cat(idxs)
