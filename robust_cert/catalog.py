"""The metric catalog: one entry of plain facts per metric family, readable without torch.

Everything outside a family's own module that needs to know something about the family — the
report (labels, untested families, generic charts and threat rows), the MLflow summary (short
names, curves), comparisons (which way is better) — reads it here. The module imports only the
standard library, so rendering a certificate, or listing families, never loads torch, numpy or
MLflow.

Each :class:`MetricEntry` is the single statement of its family's facts. The metric classes
(:mod:`robust_cert.metrics`) are built from it: ``robust_cert.metrics.REGISTRY`` imports an
entry's :attr:`MetricEntry.impl` when the family is first looked up, fills in the class
attributes the class does not set (``kind``, ``quantity``, ``higher_is_better``,
``needs_gradients``, ``shardable``) and refuses to import when a class sets one that differs
from its entry (:func:`robust_cert.metrics.register`), so the two cannot drift.

A family the catalog does not know (a certificate written by another installation or a
plugin) gets :func:`generic`: its name as label and short name, no curve, no unit; readers
never raise KeyError on it.

Adding a metric family
----------------------
1. Write its module, e.g. ``robust_cert/metrics/my_family.py``, with a
   :class:`robust_cert.metrics.base.Metric` subclass whose ``name`` is the family name (its
   ``Config``, ``description``, ``selectors``, ``cost``, ``run``; the facts below may be left
   out of the class, they come from the entry).
2. Add one entry to :data:`CATALOG` below::

       MetricEntry("my_family", "my family", "statistical", "fraction of points that ...",
                   short="my_fam", higher_is_better=True, needs_gradients=False,
                   forward_only=True, shardable=True, axis="eps",
                   unit="L∞ radius, data units", history="curve.my_family",
                   impl="robust_cert.metrics.my_family:MyFamily")

Nothing else: the policy accepts ``metrics.my_family``; the report lists it, draws a generic
curve when it has a ``history`` (and no chart functions of its own in
:data:`robust_cert.report.charts.CHARTS`) and gives it a threat-model row; the MLflow run logs
its headline metrics under ``short`` and its curve under ``history``. Chart functions and a
threat description of its own are optional refinements.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

#: What kind of number a metric produces, as the report labels it.
KINDS = ("certified", "statistical", "empirical", "estimate")


class Curve(NamedTuple):
    """A curve logged to MLflow as a metric history: the proportions indexed by ``param``
    alone, x value as the step (thousandths), under the history name ``history``."""

    param: str
    history: str


@dataclass(frozen=True)
class Quantity:
    """One of several quantities of a family, told apart by fixed parameter values: the
    proportions whose params contain every ``where`` item (e.g. ``norm = l2``)."""

    label: str
    unit: str
    where: tuple[tuple[str, Any], ...] = ()

    def matches(self, params: Mapping[str, Any]) -> bool:
        """True when ``params`` has every fixed value of :attr:`where`."""
        return all(k in params and params[k] == v for k, v in self.where)


@dataclass(frozen=True)
class MetricEntry:
    """The facts of one metric family.

    ``label``: how a reader names the family's quantity (``clean accuracy``). ``kind``: one of
    :data:`KINDS`. ``quantity``: the metric's ``quantity`` text as the certificate records it.
    ``short``: the MLflow name of its headline metrics and version tags (parameters are
    appended, see ``robust_cert.mlflow_plugin.summary.short_name``). ``higher_is_better``: of
    the reported rate. ``needs_gradients``: the family's default configuration needs input
    gradients. ``forward_only``: some configuration runs on forward passes alone (every one
    when ``needs_gradients`` is False; e.g. analytical_robustness with the softmax estimator
    when True), so the family can certify a model without gradients when so configured.
    ``shardable``: the engine may run it block by block (``Metric.shardable``). ``axis``: the
    proportion parameter its main series varies along ("" when none), ``unit``: what that
    parameter measures. ``history``: the MLflow metric-history name of the curve along
    ``axis`` ("" when none is logged). ``quantities``: where a family reports several kinds
    of proportion (per norm, mean vs. cells), their labels and units. ``impl``:
    ``module:Class`` of the implementation (imported by ``robust_cert.metrics``; "" for a
    generic entry).
    """

    name: str
    label: str
    kind: str
    quantity: str
    short: str
    higher_is_better: bool
    needs_gradients: bool
    forward_only: bool
    shardable: bool
    axis: str = ""
    unit: str = ""
    history: str = ""
    quantities: tuple[Quantity, ...] = ()
    impl: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")
        if not self.needs_gradients and not self.forward_only:
            raise ValueError(f"{self.name}: a family that needs no gradients is forward-only")
        if self.history and not self.axis:
            raise ValueError(f"{self.name}: a curve ({self.history}) needs an axis")

    @property
    def curve(self) -> Curve | None:
        """The MLflow curve (axis parameter, history name), or None when none is logged."""
        return Curve(self.axis, self.history) if self.history else None

    def quantity_for(self, params: Mapping[str, Any]) -> Quantity:
        """The quantity the proportion with ``params`` measures: the first of
        :attr:`quantities` that matches, else the family's own label and unit."""
        return next((q for q in self.quantities if q.matches(params)),
                    Quantity(self.label, self.unit))


_ENTRIES = (
    MetricEntry("accuracy", "clean accuracy", "statistical", "accuracy", short="acc",
                higher_is_better=True, needs_gradients=False, forward_only=True,
                shardable=True, impl="robust_cert.metrics.accuracy:Accuracy"),
    MetricEntry("robust_accuracy", "robust accuracy", "empirical", "robust accuracy",
                short="robust_acc", higher_is_better=True, needs_gradients=True,
                forward_only=True, shardable=True, axis="eps",
                unit="radius in the configured norm (L∞ or L2), data units",
                history="curve.robust_accuracy",
                impl="robust_cert.metrics.adversarial:RobustAccuracy"),
    MetricEntry("probabilistic_robustness", "failure rate under random noise", "statistical",
                "failure rate", short="fail_rate", higher_is_better=False,
                needs_gradients=False, forward_only=True, shardable=True, axis="eps",
                unit="L∞ radius of the uniform noise, data units",
                history="curve.failure_rate",
                impl="robust_cert.metrics.probabilistic:ProbabilisticRobustness"),
    MetricEntry("parity", "parity", "statistical", "argmax agreement", short="parity",
                higher_is_better=True, needs_gradients=False, forward_only=True,
                shardable=True, axis="eps", unit="L∞ radius of the uniform noise, data units",
                impl="robust_cert.metrics.parity:Parity"),
    MetricEntry("local_probabilistic_robustness", "fraction of points decided robust",
                "statistical", "fraction of points decided robust", short="local_robust",
                higher_is_better=True, needs_gradients=False, forward_only=True,
                shardable=True, axis="p0", unit="failure probability per point",
                impl="robust_cert.metrics.local_probabilistic:LocalProbabilisticRobustness"),
    MetricEntry("randomized_smoothing", "certified accuracy of the smoothed classifier",
                "certified", "certified accuracy of the smoothed classifier", short="cert_acc",
                higher_is_better=True, needs_gradients=False, forward_only=True,
                shardable=True, axis="radius", unit="L2 radius, data units",
                history="curve.certified_accuracy",
                impl="robust_cert.metrics.smoothing:RandomizedSmoothing"),
    MetricEntry("calibration", "selective risk", "statistical", "selective risk",
                short="sel_risk", higher_is_better=False, needs_gradients=False,
                forward_only=True, shardable=True, axis="threshold",
                unit="top-1 softmax probability",
                impl="robust_cert.metrics.calibration:Calibration"),
    MetricEntry("analytical_robustness", "fraction of points with estimated p_σ ≥ τ",
                "estimate", "fraction of points with estimated p_σ ≥ τ",
                short="analytic_robust", higher_is_better=True, needs_gradients=True,
                forward_only=True, shardable=True, axis="tau",
                unit="probability the prediction survives Gaussian noise",
                impl="robust_cert.metrics.analytical:AnalyticalRobustness"),
    MetricEntry("corruptions", "corruption accuracy", "statistical", "corruption accuracy",
                short="corr_acc", higher_is_better=True, needs_gradients=False,
                forward_only=True, shardable=True, axis="severity",
                unit="corruption severity level",
                quantities=(Quantity("mean corruption accuracy (one random corruption per "
                                     "point)", "", (("corruption", "mean"),)),),
                impl="robust_cert.metrics.corruptions:CorruptionAccuracy"),
    MetricEntry("rare_event_probability", "fraction of points with estimated p_fail ≤ p_max",
                "estimate", "fraction of points with estimated p_fail ≤ p_max",
                short="rare_event", higher_is_better=True, needs_gradients=False,
                forward_only=True, shardable=True, axis="p_max",
                unit="failure probability per point",
                impl="robust_cert.metrics.rare_events:RareEventProbability"),
    MetricEntry("safe_radius", "certified fraction", "certified", "certified fraction",
                short="safe_frac", higher_is_better=True, needs_gradients=True,
                forward_only=False, shardable=True, axis="radius",
                unit="radius in the proportion's norm, data units",
                quantities=(Quantity("certified fraction (L2)", "L2 radius, data units",
                                     (("norm", "l2"),)),
                            Quantity("certified fraction (L∞)", "L∞ radius, data units",
                                     (("norm", "linf"),)),
                            Quantity("certified fraction (L1)", "L1 radius, data units",
                                     (("norm", "l1"),))),
                impl="robust_cert.metrics.safe_radius:SafeRadius"),
    # no gateable proportion: its numbers are trend indicators in the diagnostics; the short
    # name is the family name, as MLflow runs before the catalog recorded it
    MetricEntry("surrogates", "Jacobian norm and loss curvature", "estimate",
                "Jacobian norm and loss curvature", short="surrogates",
                higher_is_better=False, needs_gradients=True, forward_only=False,
                shardable=True, impl="robust_cert.metrics.surrogates:Surrogates"),
    MetricEntry("divergence", "fraction with bounded divergence", "empirical",
                "fraction with bounded divergence", short="div_bounded",
                higher_is_better=True, needs_gradients=True, forward_only=False,
                shardable=True, axis="eps",
                unit="radius in the configured norm, data units (κ: KL divergence in nats)",
                impl="robust_cert.metrics.divergence:DivergenceBound"),
)

#: How readers name the norms of the safe radius (and other per-norm families).
NORM_LABELS = {"l2": "L2", "linf": "L∞", "l1": "L1"}

#: The safety properties ("risk kinds") of the safe radius: what holding means, and what the
#: sound lower bound and the witnessed upper bound of its maximum safe radius are.
RISK_KINDS: dict[str, dict[str, str]] = {
    "adversarial": {
        "holds": "the prediction is the label and stays the prediction on the ball",
        "lower": "Lipschitz radius, or local CROWN/IBP bounds of the margins (the larger)",
        "upper": "the closest input with another prediction found (projected search)"},
    "reachability": {
        "holds": "the output stays in [low, high] on the ball; its reachable range is "
                 "reported per radius (sound outer bounds, witnessed inner values)",
        "lower": "Lipschitz radius, or local CROWN/IBP bounds of the output (the larger)",
        "upper": "the closest input with the output outside [low, high] found"},
    "uncertainty": {
        "holds": "the top-1 probability stays ≥ τ, or KL(uniform ‖ p) stays ≥ κ, on the ball",
        "lower": "margins of top-1 ≥ τ (for κ: the top-1 π(κ, C) whose KL floor is κ; exact "
                 "for two classes), Lipschitz or local bounds",
        "upper": "the closest input where the network is unsure found"},
    "invariant": {
        "holds": "the prediction is the oracle's and the label at x; no input in the ball "
                 "changes the oracle's class while the network keeps it (invariance with "
                 "respect to the oracle O)",
        "lower": "the oracle's own certified radius, or for affine O and f the exact joint "
                 "radius min_j max_m (h^O_j − m·h^f_j)/‖∇‖_dual (the larger)",
        "upper": "the closest invariant example found by search on cat(O(x), f(x))"},
}

#: What certified a point's lower bound (the safe radius's per-point ``bound@norm``).
BOUND_LABELS = {
    "lipschitz": "global Lipschitz constant (layer operator norms)",
    "crown": "local linear relaxation (CROWN)",
    "crown-ibp": "local linear relaxation over interval intermediates (CROWN-IBP)",
    "ibp": "local interval bounds (IBP)",
    "oracle": "the oracle's own radius (O keeps its class)",
    "joint": "exact joint constant of affine O and f",
}

#: Every family this installation implements, by name, in the order policies list them.
CATALOG: dict[str, MetricEntry] = {e.name: e for e in _ENTRIES}


def generic(name: str) -> MetricEntry:
    """The entry of a family the catalog does not know: its name as label, quantity and short
    name, no axis, unit or curve; ``kind`` ``estimate`` (the weakest claim),
    ``higher_is_better`` True, not shardable, no implementation. Readers that have the
    certificate's result should prefer its own ``kind`` and ``higher_is_better``."""
    label = name.replace("_", " ")
    return MetricEntry(name, label, "estimate", label, short=name, higher_is_better=True,
                       needs_gradients=False, forward_only=True, shardable=False)


def entry(name: str) -> MetricEntry:
    """The catalog entry of ``name``, or :func:`generic` for an unknown family (never raises)."""
    found = CATALOG.get(name)
    return found if found is not None else generic(name)


def label(name: str, params: Mapping[str, Any] | None = None) -> str:
    """How a reader names the quantity of family ``name`` with ``params``."""
    return entry(name).quantity_for(params or {}).label


def short_names() -> set[str]:
    """Every family name and MLflow short name the catalog knows (the names a headline tag
    ``robust_cert.<short>[_params]`` may start with)."""
    return {*CATALOG, *(e.short for e in CATALOG.values())}
