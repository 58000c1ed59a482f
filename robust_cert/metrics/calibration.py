"""Calibration (Family A): ECE with a bootstrap CI, NLL, Brier, and selective risk with CP.

One algorithm: one forward pass per point gives the softmax; every calibration number is a
function of the per-point softmax and label. Forward only, so it runs on ONNX models too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
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
    Thresholds = list[float]
else:
    Thresholds = value_list("confidence thresholds", low=0, high=1)


class CalibrationConfig(MetricConfig):
    """Parameters of :class:`Calibration`."""

    bins: int = Field(default=15, ge=1, le=1000, description="equal-width confidence bins")
    bootstrap: int = Field(default=1000, ge=10, le=100_000,
                           description="bootstrap resamples for the ECE interval")
    ci_level: float = Field(default=0.95, gt=0, lt=1, description="bootstrap interval level")
    thresholds: Thresholds = Field(
        default_factory=list,
        description="confidence thresholds τ for selective risk P[wrong | max prob >= τ]")


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """ECE = Σ_b |B_b|/n · |acc(B_b) − conf(B_b)| over equal-width bins of the top-1 confidence
    (bin b holds confidences in ((b−1)/bins, b/bins]; confidence 0 goes to the first bin)."""
    return float(_ece_many(confidence[None, :], correct[None, :].astype(np.float64), bins)[0])


def _ece_many(conf: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of (R, n) arrays of confidences and 0/1 outcomes, vectorised."""
    r, n = conf.shape
    b = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    flat = (b + bins * np.arange(r)[:, None]).ravel()
    gap = np.bincount(flat, weights=(correct - conf).ravel(), minlength=r * bins)
    return np.abs(gap).reshape(r, bins).sum(1) / n


class Calibration(Metric[CalibrationConfig]):
    """How well the top-1 softmax probability matches the chance of being right.

    Per point (``per_point``): ``confidence`` (max softmax probability), ``correct``, ``nll``
    (−log p_y) and ``brier`` (Σ_c (p_c − 1[c = y])², in [0, 2]).

    Summaries (``diagnostics``), kind **estimate**: ``ece`` with a percentile-bootstrap
    interval at ``ci_level`` (``ece_ci``; resampling points, seeded from the run's seed — the
    plug-in ECE is biased upwards on small sets, and the interval inherits that bias),
    ``nll`` and ``brier`` (means), ``reliability`` (per bin: count, mean confidence,
    accuracy; for a reliability diagram), and ``coverage`` per threshold.

    Proportions (gateable), kind **statistical**: for each threshold τ, the selective risk
    P[wrong | confidence ≥ τ] as k wrong of the n points with confidence ≥ τ, with an exact
    Clopper–Pearson interval (conditional on n; the accepted points are i.i.d. draws from the
    accepted part of the distribution). A threshold no point reaches gives no proportion
    (a requirement on it is then inconclusive). Lower is better.

    Sharding (``shardable``): a block of points gives its per-point arrays and, per threshold,
    its counts (also of 0 points); nothing is drawn per block. :meth:`finalize` computes every
    summary from the merged per-point arrays — ECE, its bootstrap interval (resampling all n
    points, from a generator seeded by (seed, label) only, so the same for any number of
    processes), NLL, Brier, reliability, coverage — and drops the proportions of thresholds no
    point reaches. :meth:`run` on the whole set (``ctx.total`` None) returns it finalized.

    Args (policy ``metrics.calibration``):
        bins: number of equal-width bins (default 15).
        bootstrap: resamples for the ECE interval (default 1,000).
        ci_level: bootstrap interval level (default 0.95).
        thresholds: list of τ in [0, 1] for selective risk (default none).

    Example (policy)::

        calibration: {bins: 15, thresholds: [0.9]}
        requirements:
          - {metric: calibration, threshold: 0.9, at_most: 0.02}
    """

    name = "calibration"
    description = "P[argmax f(x) != y | max softmax f(x) >= τ]; ECE, NLL and Brier as estimates"
    Config = CalibrationConfig

    #: blocks carry no diagnostics; every summary is over all points (:meth:`finalize`)
    merge_rules = {"ece": "recompute", "ece_ci": "recompute", "ece_ci_method": "same",
                   "nll": "recompute", "brier": "recompute", "reliability": "recompute",
                   "coverage": {"*": {"k": "sum", "n": "sum"}}, "kinds": "same"}
    #: nothing is drawn per point or per batch: any range of points, any batch size
    pointwise = True

    def selectors(self):
        return [{"threshold": t} for t in self.config.thresholds]

    def cost(self, n_points: int) -> int:
        return n_points

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        c = model.num_classes
        # kept on the device: one copy to the host per call, no sync per batch
        parts: dict[str, list[torch.Tensor]] = {"conf": [], "correct": [], "nll": [],
                                                "brier": []}
        for sl, x, y in batches(data, ctx.batch_size, ctx.device):
            logp = torch.log_softmax(model.logits(x).double(), dim=1)
            p = logp.exp()
            top, pred = p.max(1)
            parts["conf"].append(top)
            parts["correct"].append(pred == y)
            parts["nll"].append(-logp.gather(1, y[:, None])[:, 0])
            onehot = torch.nn.functional.one_hot(y, c).double()
            parts["brier"].append(((p - onehot) ** 2).sum(1))
            ctx.advance(sl.stop - sl.start)
        conf, nll, brier = (_host(parts[k], torch.float64) for k in ("conf", "nll", "brier"))
        correct = _host(parts["correct"], torch.bool)
        # every threshold gets a proportion (possibly of 0 points), so that the blocks of a
        # sharded run merge; :meth:`finalize` drops the ones no point reaches
        props = []
        for t in cfg.thresholds:
            accepted = conf >= t
            props.append(Proportion({"threshold": t}, int((~correct[accepted]).sum()),
                                    int(accepted.sum())))
        res = self.result(props, per_point={"confidence": conf, "correct": correct, "nll": nll,
                                            "brier": brier})
        return res if ctx.total is not None else self.finalize(res, model, data, ctx)

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """The summaries over all points, from the merged per-point arrays: ECE and its
        bootstrap interval (resampling all points, from a generator seeded by (seed, label)
        alone), NLL and Brier means, the reliability bins, the coverage per threshold; the
        thresholds no point reaches lose their proportion."""
        cfg = self.config
        conf = result.per_point["confidence"]
        correct = result.per_point["correct"].astype(bool)
        nll, brier = result.per_point["nll"], result.per_point["brier"]
        n = len(conf)
        ece = expected_calibration_error(conf, correct, cfg.bins)
        g = np.random.default_rng(int(ctx.global_generator(f"{self.name}/bootstrap")
                                      .initial_seed()))
        idx = g.integers(0, n, size=(cfg.bootstrap, n))
        boot = _ece_many(conf[idx], correct[idx].astype(np.float64), cfg.bins)
        tail = (1 - cfg.ci_level) / 2
        lo, hi = np.quantile(boot, [tail, 1 - tail])
        coverage = {f"{t:g}": {"k": int((conf >= t).sum()), "n": n} for t in cfg.thresholds}
        result.proportions = [p for p in result.proportions if p.n > 0]
        result.diagnostics = {
            "ece": ece,
            "ece_ci": [float(lo), float(hi)],
            "ece_ci_method": f"percentile bootstrap, {cfg.bootstrap} resamples, "
                             f"level {cfg.ci_level:g}",
            "nll": _finite(float(nll.mean())),
            "brier": float(brier.mean()),
            "reliability": _reliability(conf, correct, cfg.bins),
            "coverage": coverage,
            "kinds": {"ece": "estimate", "nll": "estimate", "brier": "estimate",
                      "selective_risk": "statistical"},
        }
        return result


def _host(parts: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
    """The batches' values concatenated, copied to the host once."""
    return (torch.cat(parts) if parts else torch.empty(0, dtype=dtype)).cpu().numpy()


def _finite(v: float) -> float | None:
    """Certificates are JSON without NaN/inf: an infinite NLL (p_y = 0) is recorded as None."""
    return v if math.isfinite(v) else None


def _reliability(conf: np.ndarray, correct: np.ndarray, bins: int) -> list[dict]:
    b = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for i in range(bins):
        m = b == i
        k = int(m.sum())
        out.append({"lo": i / bins, "hi": (i + 1) / bins, "n": k,
                    "confidence": float(conf[m].mean()) if k else None,
                    "accuracy": float(correct[m].mean()) if k else None})
    return out
