"""Metric families. Each module holds one; this registry maps policy names to them."""

from __future__ import annotations

from robust_cert.metrics.accuracy import Accuracy
from robust_cert.metrics.adversarial import RobustAccuracy
from robust_cert.metrics.analytical import AnalyticalRobustness
from robust_cert.metrics.base import Metric, MetricResult, Proportion, RunContext
from robust_cert.metrics.calibration import Calibration
from robust_cert.metrics.corruptions import CorruptionAccuracy
from robust_cert.metrics.divergence import DivergenceBound
from robust_cert.metrics.local_probabilistic import LocalProbabilisticRobustness
from robust_cert.metrics.parity import Parity
from robust_cert.metrics.probabilistic import ProbabilisticRobustness
from robust_cert.metrics.rare_events import RareEventProbability
from robust_cert.metrics.safe_radius import SafeRadius
from robust_cert.metrics.smoothing import RandomizedSmoothing
from robust_cert.metrics.surrogates import Surrogates

REGISTRY: dict[str, type[Metric]] = {
    cls.name: cls for cls in (Accuracy, RobustAccuracy, ProbabilisticRobustness, Parity,
                              LocalProbabilisticRobustness, RandomizedSmoothing, Calibration,
                              AnalyticalRobustness, CorruptionAccuracy,
                              RareEventProbability, SafeRadius,
                              Surrogates, DivergenceBound)
}

__all__ = ["REGISTRY", "Metric", "MetricResult", "Proportion", "RunContext"]
