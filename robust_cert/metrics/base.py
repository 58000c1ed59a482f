"""The small interface every metric family implements, and the results they return.

A metric turns (model, data) into :class:`Proportion` counts — k of n trials, either one
i.i.d. outcome per evaluation point or several draws per point (clustered) — plus per-point
arrays and diagnostics. Counts add, per-point arrays concatenate and each diagnostic merges by
the rule its family declares (:attr:`Metric.merge_rules`, :data:`MERGE_RULES`), so results
computed on shards of the data merge into the result on the whole (see
:meth:`MetricResult.merge`).
"""

from __future__ import annotations

import copy
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from robust_cert import stats
from robust_cert.catalog import KINDS  # noqa: F401  (what kind of number: the catalog's)
from robust_cert.data import EvalSet
from robust_cert.models.base import Classifier


def value_list(name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, hint: str = ""):
    """A ``list[float]`` policy field that also accepts a single number, checks every value
    is finite and in the interval, and stores them sorted without repeats (so the canonical
    policy, and its hash, do not depend on how the list was written).

    ``value_list("ε", low=0, low_open=True)`` gives "ε must be > 0, got -1.0" on bad input.
    """
    if low is not None and high is not None:
        rule = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    elif low is not None:
        rule = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rule = f"{'<' if high_open else '<='} {high:g}"
    else:
        rule = "finite"

    def ok(x: float) -> bool:
        return (math.isfinite(x)
                and (low is None or (x > low if low_open else x >= low))
                and (high is None or (x < high if high_open else x <= high)))

    def as_list(v):
        return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    def check(v: list[float]) -> list[float]:
        bad = [x for x in v if not ok(x)]
        if bad:
            raise ValueError(f"{name} must be {rule}, got {bad[0]}{hint}")
        return sorted(set(float(x) for x in v))

    return Annotated[list[float], BeforeValidator(as_list), AfterValidator(check)]


class MetricConfig(BaseModel):
    """Base for a metric's policy parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: The config class of a metric family (``Metric[SafeRadiusConfig]``): what ``self.config`` is.
ConfigT = TypeVar("ConfigT", bound=MetricConfig)


def params_match(selector: dict, params: dict) -> bool:
    """True when two parameter dicts name the same proportion (floats compared to 1e-9)."""
    if selector.keys() != params.keys():
        return False
    for key, a in selector.items():
        b = params[key]
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif a != b:
            return False
    return True


#: What a proportion of one outcome per point covers (the default ``population``).
POINTS_POPULATION = ("inputs drawn like the evaluation points: one i.i.d. outcome per point, "
                     "any randomness of the procedure included")
#: What a clustered proportion covers unless the metric says more (the default).
CLUSTERED_POPULATION = ("inputs drawn like the evaluation points: mean of the per-point rates "
                        "(several draws per point, clustered)")
#: What the pooled Clopper–Pearson interval of clustered draws covers.
EVALUATION_SET_POPULATION = ("on this evaluation set: points drawn uniformly from it, with "
                             "replacement, × the noise")
CP_METHOD = "clopper-pearson (exact)"
BETTING_METHOD = ("betting on the per-point rates (Waudby-Smith & Ramdas 2023, hedged capital; "
                  "exact, clustered draws)")


@dataclass
class Proportion:
    """k successes in n trials for the parameter values in ``params``, with the interval and
    test that are valid for how the n trials were drawn.

    One outcome per point (``cluster_k`` is None): the n outcomes are i.i.d. Bernoulli(p) when
    the evaluation points are an i.i.d. sample of the population, so the exact binomial test
    and the Clopper–Pearson interval hold for p, the rate on that population (``population``
    says which; the default is :data:`POINTS_POPULATION`, :data:`CLUSTERED_POPULATION` for
    clustered draws).

    Several draws per point (``cluster_k``, ``cluster_n``: successes and draws of each
    evaluation point, in evaluation order, summing to k and n): the n draws are not independent
    samples of the population — draws of one point share it — so a binomial interval on k of n
    covers only the evaluation set itself (:meth:`conditional_ci`, labelled
    :data:`EVALUATION_SET_POPULATION`). Tests and bounds use the per-point rates
    r_i = cluster_k[i] / cluster_n[i] (points with no draw are left out): given the draws per
    point (fixed, or allotted independently of the points), the r_i are independent, in [0, 1],
    with common mean p = E_x[P(success | x)], the population rate; :class:`stats.BettingBound`
    gives an exact e-value test and bounds for p (:data:`BETTING_METHOD`).

    :meth:`p_value`, :meth:`bound` and :meth:`ci` dispatch on the two cases, so the verdict
    does not need to know which it has.
    """

    params: dict[str, Any]
    k: int
    n: int
    cluster_k: np.ndarray | None = field(default=None, compare=False, repr=False)
    cluster_n: np.ndarray | None = field(default=None, compare=False, repr=False)
    population: str = ""
    _betting: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        if (self.cluster_k is None) != (self.cluster_n is None):
            raise ValueError("cluster_k and cluster_n go together")
        if not self.population:
            self.population = (POINTS_POPULATION if self.cluster_k is None
                               else CLUSTERED_POPULATION)
        if self.cluster_k is None:
            return
        ck = np.asarray(self.cluster_k, dtype=np.int64)
        cn = np.asarray(self.cluster_n, dtype=np.int64)
        if ck.ndim != 1 or ck.shape != cn.shape:
            raise ValueError("cluster_k and cluster_n must be 1-D arrays of equal length")
        if np.any(ck < 0) or np.any(ck > cn):
            raise ValueError("cluster counts must satisfy 0 <= cluster_k <= cluster_n")
        if int(ck.sum()) != self.k or int(cn.sum()) != self.n:
            raise ValueError(f"cluster counts sum to {int(ck.sum())} of {int(cn.sum())}, "
                             f"not k={self.k} of n={self.n}")
        self.cluster_k, self.cluster_n = ck, cn

    @property
    def estimate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def clustered(self) -> bool:
        """True when the n trials are several draws per point (see the class docstring)."""
        return self.cluster_k is not None

    @property
    def points(self) -> int:
        """Independent units behind the interval: points with a draw, or n."""
        return int((self.cluster_n > 0).sum()) if self.cluster_n is not None else self.n

    @property
    def interval_method(self) -> str:
        return BETTING_METHOD if self.clustered else CP_METHOD

    def rates(self) -> np.ndarray:
        """Per-point success rates of the points with at least one draw (clustered only)."""
        if not self.clustered:
            raise ValueError("rates exist only for clustered proportions")
        assert self.cluster_k is not None  # clustered: __post_init__ set both arrays
        assert self.cluster_n is not None
        keep = self.cluster_n > 0
        return self.cluster_k[keep] / self.cluster_n[keep]

    def betting(self, tune_alpha: float) -> stats.BettingBound:
        """The betting bound on the per-point rates, with bets tuned for ``tune_alpha``."""
        key = float(tune_alpha)
        if key not in self._betting:
            self._betting[key] = stats.BettingBound(self.rates(), tune_alpha=key)
        return self._betting[key]

    def p_value(self, threshold: float, alternative: str,
                tune_alpha: float | None = None) -> float:
        """One-sided p-value for H1 "rate > threshold" (``greater``) or "< threshold" (``less``).

        One outcome per point: the exact binomial test. Clustered: min(1, 1/e-value) of the
        betting test on the per-point rates, bets tuned for ``tune_alpha`` (fix it before
        seeing the data, e.g. the family level; default 0.05). Valid either way:
        P(p ≤ a) ≤ a under H0, for every a.
        """
        if not self.clustered:
            return stats.binom_test_pvalue(self.k, self.n, threshold, alternative)
        return self.betting(0.05 if tune_alpha is None else tune_alpha).p_value(
            threshold, alternative)

    def bound(self, level: float, side: str, tune_alpha: float | None = None) -> float:
        """One-sided confidence bound at ``level``: P(rate < lower) ≤ level for side "lower",
        P(rate > upper) ≤ level for "upper". One outcome per point: Clopper–Pearson.
        Clustered: the betting bound (bets tuned for ``tune_alpha``, default ``level``), which
        agrees with :meth:`p_value` at the same ``tune_alpha``: p ≤ level ⇔ bound excludes the
        threshold."""
        if side not in ("lower", "upper"):
            raise ValueError(f"side must be 'lower' or 'upper', got {side!r}")
        if not self.clustered:
            lo, hi = stats.clopper_pearson(self.k, self.n, 1.0 - level, side)
            return lo if side == "lower" else hi
        return self.betting(level if tune_alpha is None else tune_alpha).bound(level, side)

    def ci(self, confidence: float) -> tuple[float, float]:
        """Two-sided interval at ``confidence`` for the rate on ``population``."""
        if not self.clustered:
            return stats.clopper_pearson(self.k, self.n, confidence)
        return self.betting((1.0 - confidence) / 2).interval(confidence)

    def conditional_ci(self, confidence: float) -> tuple[float, float]:
        """Clopper–Pearson on the pooled k of n: for clustered draws it covers only
        :data:`EVALUATION_SET_POPULATION`; otherwise it is :meth:`ci`."""
        return stats.clopper_pearson(self.k, self.n, confidence)

    def merged(self, other: Proportion) -> Proportion:
        """The proportion of two disjoint shards (counts add, per-point counts concatenate)."""
        if self.clustered != other.clustered or self.population != other.population:
            raise ValueError(f"cannot merge proportions of different kinds for {self.params}")
        ck = cn = None
        if self.clustered:
            # both clustered: __post_init__ checked that each has both arrays
            assert self.cluster_k is not None
            assert self.cluster_n is not None
            assert other.cluster_k is not None
            assert other.cluster_n is not None
            ck = np.concatenate([self.cluster_k, other.cluster_k])
            cn = np.concatenate([self.cluster_n, other.cluster_n])
        return Proportion(self.params, self.k + other.k, self.n + other.n, ck, cn,
                          self.population)


#: ``per_point`` arrays whose key starts with this hold a few chosen points, not one row per
#: point: ``example_index`` (their indices in the evaluated data) and arrays aligned with it,
#: at most :data:`MAX_EXAMPLES` of them, ordered by ``example_eps`` (when present) and index.
EXAMPLE_PREFIX = "example_"
MAX_EXAMPLES = 8


@dataclass
class MetricResult:
    """What one metric produced. ``per_point`` arrays have one row per evaluated point, except
    the ``example_*`` arrays (see :data:`EXAMPLE_PREFIX`): :meth:`merge` shifts the second
    shard's ``example_index`` by the first shard's number of points and keeps the examples the
    whole would have kept. ``merge_rules`` are the declared merge rules of the family's
    diagnostics (:attr:`Metric.merge_rules`, set by :meth:`Metric.result`); :meth:`merge`
    merges ``diagnostics`` by them alone."""

    metric: str
    kind: str
    quantity: str
    higher_is_better: bool
    description: str
    config: dict[str, Any]
    proportions: list[Proportion]
    per_point: dict[str, np.ndarray] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # "ok" | "not_applicable"
    reason: str = ""
    merge_rules: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def points(self) -> int | None:
        """The number of evaluated points: the length of the first per-point array that has
        one row per point (not an ``example_*`` array); None when there is none."""
        return next((len(v) for k, v in self.per_point.items()
                     if not k.startswith(EXAMPLE_PREFIX)), None)

    def find(self, params: dict) -> Proportion | None:
        return next((p for p in self.proportions if params_match(p.params, params)), None)

    def merge(self, other: MetricResult) -> MetricResult:
        """Combine the results of two disjoint shards of the same evaluation, ``self`` the
        earlier: proportions merge (:meth:`Proportion.merged`), per-point arrays concatenate
        and diagnostics merge by ``self.merge_rules`` (:func:`merge_diagnostics`; a key
        without a rule raises :class:`MergeError` naming the metric and the key)."""
        if other.metric != self.metric or len(other.proportions) != len(self.proportions):
            raise ValueError(f"cannot merge results of {self.metric} and {other.metric}")
        props = []
        for a, b in zip(self.proportions, other.proportions, strict=True):
            if not params_match(a.params, b.params):
                raise ValueError(f"cannot merge {a.params} with {b.params}")
            props.append(a.merged(b))
        offset = self.points()
        per_point = {}
        for k, v in self.per_point.items():
            w = other.per_point[k]
            if k == "example_index":
                if offset is None:
                    raise ValueError(f"cannot merge {self.metric}'s examples: no per-point "
                                     "array gives the shard's number of points")
                w = w + offset
            per_point[k] = np.concatenate([v, w])
        if "example_index" in per_point:  # the whole's examples: the first MAX_EXAMPLES
            eps = per_point.get("example_eps", np.zeros(len(per_point["example_index"])))
            keep = np.lexsort((per_point["example_index"], eps))[:MAX_EXAMPLES]
            per_point.update({k: v[keep] for k, v in per_point.items()
                              if k.startswith(EXAMPLE_PREFIX)})
        return MetricResult(
            self.metric, self.kind, self.quantity, self.higher_is_better, self.description,
            self.config, props, per_point,
            merge_diagnostics(self.diagnostics, other.diagnostics, self.merge_rules,
                              self.metric),
            self.status, self.reason, self.merge_rules,
        )


#: The rules a metric family declares for merging a diagnostic of two consecutive blocks of
#: points, ``a`` (the earlier block) and ``b`` (see :attr:`Metric.merge_rules`):
#:
#: - ``sum``, ``max``, ``min`` (numbers; max and min are NaN if either is NaN), ``all``,
#:   ``any`` (flags): element by element — inside a dict key by key (a key one block lacks
#:   keeps the other's value), inside lists of equal length item by item;
#: - ``same``: the blocks must hold equal values (NaN equals NaN), kept; otherwise a
#:   :class:`MergeError` naming the key;
#: - ``concat``: lists (and arrays) concatenate in block order; dicts are a union of keys that
#:   must be disjoint (e.g. keyed by the point's index in the whole set);
#: - ``first``: the earlier block's value;
#: - ``recompute``: :meth:`Metric.finalize` recomputes it from the merged result; until then
#:   the merge holds the earlier block's value.
#:
#: A nested dict of rules declares the keys of a dict-valued diagnostic (and of each item of a
#: list of dicts, item by item); its key ``"*"`` covers every key not named. A dotted key
#: ``"a.b"`` is the same as ``{"a": {"b": ...}}``.
MERGE_RULES = ("sum", "max", "min", "all", "any", "same", "concat", "first", "recompute")

#: Diagnostics any result may carry whatever its family, with their merge rules (part of
#: every family's :attr:`Metric.merge_rules`): the engine's out-of-memory retries.
COMMON_MERGE_RULES: dict[str, Any] = {"memory_retries": "concat"}


class MergeError(ValueError):
    """Two blocks' diagnostics cannot be merged: an undeclared key, blocks that disagree on a
    ``same`` value, or values the declared rule does not apply to. The message names the
    metric and the key."""


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _max(a, b):
    return a if _nan(a) else b if _nan(b) else max(a, b)


def _min(a, b):
    return a if _nan(a) else b if _nan(b) else min(a, b)


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _flag(x) -> bool:
    return isinstance(x, (bool, np.bool_))


#: element-by-element rules: (applies to the leaf values, combine)
_ELEMENTWISE: dict[str, tuple[Callable[[Any], bool], Callable[[Any, Any], Any]]] = {
    "sum": (_number, lambda a, b: a + b),
    "max": (_number, _max),
    "min": (_number, _min),
    "all": (_flag, lambda a, b: bool(a and b)),
    "any": (_flag, lambda a, b: bool(a or b)),
}


def normalize_merge_rules(rules: Mapping[str, Any], where: str = "merge_rules") -> dict:
    """``rules`` with dotted keys expanded into nested rule dicts, every rule checked: raises
    ``TypeError`` (naming ``where`` and the key) for a rule not in :data:`MERGE_RULES`, a
    value that is neither a rule nor a dict of rules, or a key declared twice."""
    out: dict[str, Any] = {}
    for key, rule in rules.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{where}: keys must be non-empty strings, got {key!r}")
        head, _, rest = key.partition(".")
        if rest:
            rule = {rest: rule}
        if isinstance(rule, Mapping):
            rule = normalize_merge_rules(rule, f"{where}.{head}")
        elif rule not in MERGE_RULES:
            raise TypeError(f"{where}: {key!r} has merge rule {rule!r}, not one of "
                            f"{', '.join(MERGE_RULES)}")
        out[head] = _join_rules(out[head], rule, f"{where}: {head}") if head in out else rule
    return out


def _join_rules(a, b, where: str) -> dict:
    """Two normalized declarations of one key joined (``"a.x"`` and ``"a.y"``); a rule
    declared twice is a ``TypeError``."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        raise TypeError(f"{where} is declared twice")
    return {**a, **{k: _join_rules(a[k], v, f"{where}.{k}") if k in a else v
                    for k, v in b.items()}}


def merge_diagnostics(a: Mapping, b: Mapping, rules: Mapping[str, Any],
                      metric: str = "metric") -> dict:
    """The diagnostics of two consecutive blocks ``a`` then ``b`` merged by ``rules`` (a
    normalized declaration, see :func:`normalize_merge_rules` and :data:`MERGE_RULES`). Keys
    keep ``a``'s order, then ``b``'s new ones. The inputs are not modified and share nothing
    with the result. Raises :class:`MergeError` naming ``metric`` and the key for a key (of
    either block, at any depth) without a rule, ``same`` values that differ, and values the
    rule does not apply to."""
    return _merge_dict(a, b, rules, metric, "")


def _merge_dict(a: Mapping, b: Mapping, rules: Mapping[str, Any], metric: str,
                path: str) -> dict:
    out = {}
    for k in {**a, **b}:
        key = f"{path}{k}"
        rule = rules.get(k, rules.get("*")) if isinstance(k, str) else rules.get("*")
        if rule is None:
            raise MergeError(f"{metric}: diagnostic {key!r} has no merge rule: declare it in "
                             f"{metric}'s merge_rules (one of {', '.join(MERGE_RULES)})")
        if k not in a or k not in b:
            out[k] = copy.deepcopy(a[k] if k in a else b[k])
        else:
            out[k] = _merge_value(a[k], b[k], rule, metric, key)
    return out


def _merge_value(a, b, rule, metric: str, path: str):
    def fail(why: str) -> MergeError:
        return MergeError(f"{metric}: cannot merge diagnostic {path!r} by {rule!r}: {why}")

    def items(a, b):
        if len(a) != len(b):
            raise fail(f"lists of different lengths {len(a)} and {len(b)}")
        return zip(a, b, strict=True)

    if isinstance(rule, dict):
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            return _merge_dict(a, b, rule, metric, path + ".")
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return [_merge_value(x, y, rule, metric, f"{path}[{i}]")
                    for i, (x, y) in enumerate(items(a, b))]
        raise fail(f"nested rules need dicts or lists of dicts, got {type(a).__name__} and "
                   f"{type(b).__name__}")
    if rule in ("first", "recompute"):
        return copy.deepcopy(a)
    if rule == "same":
        if not _equal(a, b):
            raise fail(f"the blocks disagree: {a!r} and {b!r}")
        return copy.deepcopy(a)
    if rule == "concat":
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return np.concatenate([a, b])
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return copy.deepcopy([*a, *b])
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            both = [k for k in a if k in b]
            if both:
                raise fail(f"both blocks hold key {both[0]!r}")
            return copy.deepcopy({**a, **b})
        raise fail(f"needs two lists, arrays or dicts, got {type(a).__name__} and "
                   f"{type(b).__name__}")
    applies, combine = _ELEMENTWISE[rule]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return _merge_dict(a, b, {"*": rule}, metric, path + ".")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return [_merge_value(x, y, rule, metric, f"{path}[{i}]")
                for i, (x, y) in enumerate(items(a, b))]
    if not (applies(a) and applies(b)):
        raise fail(f"got {a!r} and {b!r}")
    return combine(a, b)


def _equal(a, b) -> bool:
    """Equal values, NaN equal to NaN, arrays compared element by element."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc" and b.dtype.kind in "fc"))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return (_nan(a) and _nan(b)) or bool(a == b)


@dataclass
class RunContext:
    """What the engine hands a metric: device, batch size, seeded generators, progress.

    ``gradient_twin`` is the gradient twin given to :func:`robust_cert.certify` (a loaded,
    differentiable Classifier), or None; a metric whose ``uses_twin`` is true reads it.
    """

    device: torch.device
    batch_size: int
    seed: int
    advance: Callable[[int], None] = lambda n: None
    gradient_twin: Classifier | None = None
    #: the policy's confidence, for statements a metric makes at it (failure-rate bands)
    confidence: float = 0.95
    #: index of ``data[0]`` in the whole evaluation set: the engine runs a shardable metric
    #: (:attr:`Metric.shardable`) on consecutive blocks of points, possibly in several processes
    offset: int = 0
    #: points in the whole evaluation set; None when the ``data`` a metric gets is the whole set
    total: int | None = None
    #: most images per forward pass, set by the engine after an out-of-memory retry (None:
    #: the model's own ``max_batch``)
    forward_cap: int | None = None

    def n_total(self, data: EvalSet) -> int:
        """Points in the whole evaluation set (``len(data)`` when ``data`` is the whole)."""
        return len(data) if self.total is None else self.total

    def _block(self, label: str) -> str:
        # block 0 keeps the plain label: a run on one block draws what a whole-set run drew
        return label if self.offset == 0 else f"{label}@{self.offset}"

    def derive(self, label: str) -> int:
        """The 63-bit seed of (seed, label, block): what :meth:`generator` seeds with."""
        return _derive_seed(self.seed, self._block(label))

    def generator(self, label: str) -> torch.Generator:
        """A generator seeded from (seed, label, first point of the block): metrics draw
        independently of their order, and a block draws the same numbers whichever process
        runs it and whatever ran before it. For a draw that must be the same in every block
        (choosing a subset of the whole set) use :meth:`global_generator`."""
        g = torch.Generator(device="cpu")
        g.manual_seed(self.derive(label))
        return g

    def global_generator(self, label: str) -> torch.Generator:
        """A generator seeded from (seed, label) only: the same numbers in every block."""
        g = torch.Generator(device="cpu")
        g.manual_seed(_derive_seed(self.seed, label))
        return g

    def point_generators(self, label: str, count: int) -> list[torch.Generator]:
        """One generator for each of the ``count`` points of the data the metric got, point
        i seeded from (seed, label, ``offset`` + i, its index in the whole set): a point
        draws the same numbers in any block, batch or process, whatever runs with it
        (:attr:`Metric.pointwise`). About 30 µs per point on a CPU."""
        out = []
        for i in range(self.offset, self.offset + count):
            g = torch.Generator(device="cpu")
            g.manual_seed(_derive_seed(self.seed, f"{label}#{i}"))
            out.append(g)
        return out

    def seed_global(self, label: str) -> None:
        """Seed torch's global RNG (per block, like :meth:`generator`) for libraries that
        draw from it (torchattacks)."""
        torch.manual_seed(self.derive(label))


def draw_per_point(generators, draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """``draw(g)`` for each point's generator, stacked along a new first dimension: each
    point's numbers come from its own generator (:meth:`RunContext.point_generators`)."""
    return torch.stack([draw(g) for g in generators])


def _derive_seed(seed: int, label: str) -> int:
    import hashlib

    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


#: Called with (class, catalog entry) when a catalog family's own class is defined:
#: :func:`robust_cert.metrics.register`, set by the package (which is imported before any of
#: its family modules).
ON_FAMILY_DEFINED: Callable[[Any, Any], Any] | None = None


class Metric(ABC, Generic[ConfigT]):
    """One metric family. Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    kind: ClassVar[str]
    quantity: ClassVar[str]
    higher_is_better: ClassVar[bool]
    needs_gradients: bool = False  # a class fact; a family may refine it per instance
    #: True when :meth:`run` needs ``ctx.gradient_twin`` (checked before any metric runs).
    uses_twin: bool = False
    description: ClassVar[str]
    Config: ClassVar[type[MetricConfig]]
    #: True when the result on a set of points is the merge of the results on consecutive
    #: blocks of it: :meth:`run` on a block depends only on the block's points, ``ctx.offset``,
    #: ``ctx.total`` and the seed (draws from ``ctx.generator``), and :meth:`MetricResult.merge`
    #: of the blocks in order followed by :meth:`finalize` gives the reported result. The
    #: engine then runs it block by block (blocks of at most ``batch_size`` points, see
    #: :func:`robust_cert.engine.metric_blocks`), spread over the
    #: processes of a ``torchrun`` launch, and the result does not depend on how many there
    #: are. False: :meth:`run` sees the whole set, in one process.
    shardable: ClassVar[bool] = False
    #: True (with ``shardable``) when :meth:`run` on any consecutive range of points gives,
    #: for each point, what a run on the whole set gives it, at any ``batch_size``: whatever
    #: it draws for a point comes from that point's own generators
    #: (:meth:`RunContext.point_generators`, seeded by the point's index in the whole set),
    #: in a sequence of draws that depends on the configuration and the point's own outcomes
    #: only, and draws for the whole set come from :meth:`RunContext.global_generator`. The
    #: engine then shards it in small fixed blocks (:data:`robust_cert.engine.BLOCK_POINTS`)
    #: and runs all the points of a process's blocks in one call, in full batches; the
    #: result depends neither on the number of processes nor on the batch size (given
    #: forward passes whose outputs for a point do not depend on the other points of the
    #: batch, as on CPU for batches of at least 2). False: draws per batch, blocks of one
    #: batch each (:func:`robust_cert.engine.batch_blocks`) run one by one.
    pointwise: ClassVar[bool] = False
    #: How each diagnostic key the family produces merges over blocks (:data:`MERGE_RULES`,
    #: torchmetrics' ``dist_reduce_fx``): key → rule, or a dict of rules for a dict-valued
    #: diagnostic (dotted keys allowed). Checked and normalized when the class is defined
    #: (:func:`normalize_merge_rules`), with :data:`COMMON_MERGE_RULES` added; a key the
    #: family produces but does not declare makes :meth:`MetricResult.merge` raise.
    merge_rules: ClassVar[dict[str, Any]] = dict(COMMON_MERGE_RULES)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.merge_rules = normalize_merge_rules(
            {**COMMON_MERGE_RULES, **cls.merge_rules}, f"{cls.__name__}.merge_rules")
        # a catalog family's own class takes its facts from its entry as it is defined,
        # however its module is imported (the registry imports a family's module only when
        # the family is first looked up)
        from robust_cert.catalog import CATALOG

        entry = CATALOG.get(cls.__dict__.get("name", ""))
        if (entry is not None and entry.impl == f"{cls.__module__}:{cls.__qualname__}"
                and ON_FAMILY_DEFINED is not None):
            ON_FAMILY_DEFINED(cls, entry)

    def __init__(self, config: ConfigT):
        self.config = config

    @abstractmethod
    def selectors(self) -> list[dict[str, Any]]:
        """Parameter dicts of the proportions :meth:`run` will produce (for requirements)."""

    @abstractmethod
    def cost(self, n_points: int) -> int:
        """Units of work :meth:`run` reports through ``ctx.advance`` (for the progress bar)."""

    @abstractmethod
    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        """Evaluate on the device; report progress through ``ctx.advance``."""

    def check(self, model: Classifier, data: EvalSet, device: torch.device) -> None:
        """Refuse, before any metric runs, a configuration this model and data cannot run
        (a RobustCertError subclass with one line naming the problem: an output index the
        model lacks, a radius outside the input box, a reference model of another shape).
        :func:`robust_cert.certify` calls it for every metric of the policy. The default
        accepts everything."""

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """The reported result from the merge of the blocks' results (shardable metrics
        only): recompute what no merge rule gives — the diagnostics declared ``recompute``
        in :attr:`merge_rules` (statistics over all points: ECE, ranks, medians, p-values of
        merged counts, sanity states from merged counts). ``data`` and ``ctx`` are the whole
        set's. The default returns ``result`` unchanged."""
        return result

    def result(self, proportions, per_point=None, diagnostics=None, **kw) -> MetricResult:
        return MetricResult(
            metric=self.name,
            kind=self.kind,
            quantity=self.quantity,
            higher_is_better=self.higher_is_better,
            description=self.description,
            config=self.config.model_dump(mode="json"),
            proportions=list(proportions),
            per_point=per_point or {},
            diagnostics=diagnostics or {},
            merge_rules=self.merge_rules,
            **kw,
        )


def balanced_ranges(n: int, batch_size: int) -> list[range]:
    """``n`` points cut into as many consecutive ranges as batches of ``batch_size`` would
    be (⌈n / batch_size⌉), of sizes that differ by at most one, the larger first: 359 points
    at 256 are 180 and 179, not 256 and 103. The batches of :func:`batches` and the blocks
    of the metrics that draw per batch (:func:`robust_cert.engine.batch_blocks`), so that a
    run on the whole set and the engine's blocks cut the points alike."""
    if n <= 0:
        return []
    count = -(-n // max(1, batch_size))
    base, extra = divmod(n, count)
    starts = [i * base + min(i, extra) for i in range(count + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:], strict=False)]


def batches(data: EvalSet, batch_size: int, device: torch.device):
    """Yield (index slice, x, y) batches of the evaluation set on ``device``, at most
    ``batch_size`` points each, as many as batches of ``batch_size`` and of sizes within one
    point of each other (:func:`balanced_ranges`); copied asynchronously when the inputs
    are in page-locked memory, as the engine keeps them for CUDA (the next batch's copy then
    overlaps the current batch's work)."""
    async_copy = device.type == "cuda" and data.x.is_pinned()
    for r in balanced_ranges(len(data), batch_size):
        sl = slice(r.start, r.stop)
        yield (sl, data.x[sl].to(device, non_blocking=async_copy),
               data.y[sl].to(device, non_blocking=async_copy))
