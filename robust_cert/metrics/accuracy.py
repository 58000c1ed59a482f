"""Clean accuracy (Family A): the fraction of evaluation points the model classifies correctly."""

from __future__ import annotations

import numpy as np
import torch

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


class AccuracyConfig(MetricConfig):
    """Clean accuracy has no parameters."""


class Accuracy(Metric[AccuracyConfig]):
    """Top-1 accuracy on the evaluation set.

    Kind: statistical. The points are treated as i.i.d. draws from the deployment distribution;
    k correct of n gives an exact Clopper–Pearson interval for the true accuracy. Per-class
    recall is recorded as a diagnostic with the same kind of interval.

    Example::

        Accuracy(AccuracyConfig()).run(model, data, ctx).proportions[0].estimate
    """

    name = "accuracy"
    description = "P[argmax f(x) = y] over the evaluation set"
    Config = AccuracyConfig

    #: per-class counts add
    merge_rules = {"per_class_recall": {"*": {"k": "sum", "n": "sum"}}}
    #: nothing is drawn per point or per batch: any range of points, any batch size
    pointwise = True

    def selectors(self):
        return [{}]

    def cost(self, n_points: int) -> int:
        return n_points

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        out = []  # kept on the device: one copy to the host at the end, no sync per batch
        for sl, x, _ in batches(data, ctx.batch_size, ctx.device):
            out.append(model.logits(x).argmax(1))
            ctx.advance(sl.stop - sl.start)
        preds = torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.long)
        correct = (preds == data.y).numpy()
        per_class = {}
        for c in range(model.num_classes):
            mask = data.y.numpy() == c
            per_class[str(c)] = {"k": int(correct[mask].sum()), "n": int(mask.sum())}
        return self.result(
            [Proportion({}, int(correct.sum()), len(data))],
            per_point={"correct": correct, "prediction": preds.numpy().astype(np.int64)},
            diagnostics={"per_class_recall": per_class},
        )
