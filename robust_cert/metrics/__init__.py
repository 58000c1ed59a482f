"""Metric families. Each module holds one; this registry maps policy names to them."""

from __future__ import annotations

from robust_cert.metrics.accuracy import Accuracy
from robust_cert.metrics.adversarial import RobustAccuracy
from robust_cert.metrics.base import Metric, MetricResult, Proportion, RunContext
from robust_cert.metrics.parity import Parity
from robust_cert.metrics.probabilistic import ProbabilisticRobustness

REGISTRY: dict[str, type[Metric]] = {
    cls.name: cls for cls in (Accuracy, RobustAccuracy, ProbabilisticRobustness, Parity)
}

__all__ = ["REGISTRY", "Metric", "MetricResult", "Proportion", "RunContext"]
