"""Certification policy: which metrics to run and which requirements a model must meet.

A policy is YAML validated against a schema. Its canonical hash covers the validated content
with defaults filled in, so two files that mean the same policy hash the same.

Example::

    name: digits-production
    confidence: 0.95            # family-wise, across all requirements (Holm)
    metrics:
      accuracy: {}
      robust_accuracy: {eps: [0.05, 0.1], attacks: [fgsm, pgd]}
    requirements:
      - {metric: accuracy, at_least: 0.90}
      - {metric: robust_accuracy, eps: 0.1, at_least: 0.50}
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from robust_cert.errors import PolicyError
from robust_cert.metrics import REGISTRY, Metric
from robust_cert.metrics.base import params_match

ParamValue = float | int | str | bool


class Requirement(BaseModel):
    """One acceptance criterion: a metric's proportion at given parameters vs a threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    params: dict[str, ParamValue] = Field(default_factory=dict)
    at_least: float | None = Field(default=None, ge=0, le=1)
    at_most: float | None = Field(default=None, ge=0, le=1)
    id: str = ""

    @model_validator(mode="before")
    @classmethod
    def _inline_params(cls, v: Any):
        """Accept parameters inline (``{metric: m, eps: 0.1, at_least: .5}``)."""
        if not isinstance(v, dict):
            return v
        known = {"metric", "params", "at_least", "at_most", "id"}
        inline = {k: x for k, x in v.items() if k not in known}
        if not inline:
            return v
        out = {k: x for k, x in v.items() if k in known}
        out["params"] = {**inline, **(v.get("params") or {})}
        return out

    @model_validator(mode="after")
    def _one_threshold(self):
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("give exactly one of at_least / at_most")
        if not self.id:
            args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
            object.__setattr__(self, "id", f"{self.metric}[{args}]" if args else self.metric)
        return self

    @property
    def threshold(self) -> float:
        # _one_threshold: exactly one of the two is given
        return self.at_least if self.at_least is not None else cast(float, self.at_most)

    @property
    def direction(self) -> str:
        return "at_least" if self.at_least is not None else "at_most"


#: Sanity checks a policy may waive: name -> what it checks.
SANITY_CHECKS = {
    "deterministic_forward": "two forward passes on the same input agree (the model is not "
                             "random at evaluation time)",
    "eps0_equals_clean": "the attacked view of the model reproduces its clean predictions",
    "in_range_and_ball": "attacks return inputs in the input range and the ε-ball",
    "gradients_nonzero": "at most 5% of attacked points have an exactly zero input gradient",
    "square_not_better": "the black-box Square attack is not significantly better than the "
                         "white-box attacks (exact McNemar)",
}


class ModelDeclaration(BaseModel):
    """What the policy declares about the model (``model:`` in the policy).

    ``stochastic``: the model is random at evaluation time by design (e.g. noise or dropout in
    its forward). Certification then seeds every forward pass from the run's seed, so runs
    reproduce, and every guarantee is about the random classifier. Undeclared randomness makes
    every requirement INCONCLUSIVE.
    ``outputs``: ``logits`` (default) or ``probabilities`` (rows non-negative, summing to 1);
    probabilities are converted to log-probabilities (clamped away from 0) before any metric
    sees them. Undeclared probabilities are refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stochastic: bool = False
    outputs: Literal["logits", "probabilities"] = "logits"


class FeatureSpec(BaseModel):
    """A per-feature (tabular) threat model (``features:`` in the policy); implemented by
    :mod:`robust_cert.tabular`. Inputs must be rows of ``d`` features.

    ``ranges``: ``{feature: [lo, hi]}`` by column name or index; a feature not named lies in
    the evaluation set's minimum and maximum (recorded in the certificate either way).
    ``scale``: what ε (and every noise scale) is measured in, per feature: ``range`` (a
    fraction of ``hi − lo``, default), ``std`` (standard deviations on the evaluation set) or
    ``none`` (data units). ``immutable``: features (names or indices) that no perturbation may
    change — attacks, noise, smoothing, safe radius; categorical columns a table source
    encoded are immutable too. With ``features:``, ``input_range`` is not given (the ranges
    replace it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ranges: dict[str | int, tuple[float, float]] = Field(default_factory=dict)
    scale: Literal["range", "std", "none"] = "range"
    immutable: list[str | int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ranges(self):
        for key, (lo, hi) in self.ranges.items():
            if not lo < hi:
                raise ValueError(f"ranges.{key}: [{lo:g}, {hi:g}] is empty")
        keys = [str(k) for k in self.immutable]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise ValueError(f"immutable: feature {dup!r} is listed twice")
        return self


class Waiver(BaseModel):
    """An explicit waiver of one sanity check (``waive: [{check, reason}]``): a failure of the
    check then leaves verdicts unchanged; the waiver and its reason are recorded in the
    certificate and printed on the report's cover."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    check: str
    reason: str = Field(min_length=1)

    @model_validator(mode="after")
    def _known(self):
        if self.check not in SANITY_CHECKS:
            raise ValueError(f"unknown sanity check {self.check!r}; checks that can be "
                             f"waived: {', '.join(SANITY_CHECKS)}")
        if not self.reason.strip():
            raise ValueError("a waiver needs a reason (non-blank text)")
        return self


class Policy(BaseModel):
    """A validated policy. Build with :func:`load_policy` or :meth:`from_dict`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    version: str = "1"
    description: str = ""
    #: What the certified model is for, printed in the report when the model records none.
    intended_use: str = ""
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0,
                              description="family-wise confidence across all requirements")
    input_range: tuple[float, float] = (0.0, 1.0)
    batch_size: int = Field(default=256, ge=1, le=1_000_000)
    #: wall-clock budget for the whole suite; certify estimates the cost first (a pilot run,
    #: robust_cert.plan) and refuses before anything runs when the estimate exceeds it
    time_budget_s: float | None = Field(default=None, gt=0)
    metrics: dict[str, dict[str, Any]] = Field(min_length=1)
    requirements: list[Requirement] = Field(min_length=1)
    model: ModelDeclaration = Field(default_factory=ModelDeclaration)
    waive: list[Waiver] = Field(default_factory=list)
    #: a per-feature (tabular) threat model; None: the one box ``input_range`` and ε in data
    #: units
    features: FeatureSpec | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.features is not None and "input_range" in self.model_fields_set:
            raise PolicyError("input_range: a policy with features: gives its input ranges "
                              "per feature (features.ranges, or the evaluation set's min/max); "
                              "remove input_range")
        checks = [w.check for w in self.waive]
        dup = next((c for c in checks if checks.count(c) > 1), None)
        if dup:
            raise PolicyError(f"waive: sanity check {dup!r} is waived twice")
        lo, hi = self.input_range
        if not lo < hi:
            raise ValueError(f"input_range [{lo}, {hi}] is empty")
        unknown = sorted(set(self.metrics) - set(REGISTRY))
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(sorted(REGISTRY))}")
        configs = {}
        for name, raw in self.metrics.items():
            try:
                cfg = REGISTRY[name].Config.model_validate(raw or {})
            except ValidationError as exc:
                raise PolicyError(_format(exc, prefix=f"metrics.{name}")) from None
            configs[name] = cfg.model_dump(mode="json")
        object.__setattr__(self, "metrics", configs)
        ids = set()
        for i, req in enumerate(self.requirements):
            where = f"requirements[{i}]"
            if req.metric not in self.metrics:
                raise PolicyError(f"{where}.metric: {req.metric!r} is not among the policy's "
                                  f"metrics ({', '.join(self.metrics)})")
            selectors = self.metric(req.metric).selectors()
            match = next((s for s in selectors if params_match(s, req.params)), None)
            if match is None:
                raise PolicyError(
                    f"{where}: {req.metric} produces no result for parameters {req.params}; "
                    f"available: {', '.join(json.dumps(s) for s in selectors)}"
                )
            if json.dumps(match) != json.dumps(req.params):  # canonical values: eps 1 -> 1.0
                auto = not req.model_fields_set & {"id"}
                req = Requirement.model_validate({
                    "metric": req.metric, "params": match, "at_least": req.at_least,
                    "at_most": req.at_most, **({} if auto else {"id": req.id})})
                self.requirements[i] = req
            if req.id in ids:
                raise PolicyError(f"{where}.id: duplicate requirement id {req.id!r}")
            ids.add(req.id)
        return self

    def metric(self, name: str) -> Metric:
        """A configured metric instance of the policy."""
        cls = REGISTRY[name]
        return cls(cls.Config.model_validate(self.metrics[name]))

    def canonical(self) -> dict:
        """The validated policy as JSON with defaults filled in. ``model``, ``waive``,
        ``intended_use`` and ``time_budget_s`` are left out while they hold their defaults, so
        policies written before they existed keep their hash."""
        out = self.model_dump(mode="json")
        if self.model == ModelDeclaration():
            out.pop("model")
        if not self.waive:
            out.pop("waive")
        if not self.intended_use:
            out.pop("intended_use")
        if self.time_budget_s is None:
            out.pop("time_budget_s")
        if self.features is None:
            out.pop("features")
        else:
            out.pop("input_range")
        return out

    @property
    def data_range(self) -> tuple[float, float]:
        """The range evaluation data is loaded and checked with: ``input_range``, or with a
        ``features:`` section the whole float32 line (the per-feature ranges are checked
        when the threat model is fitted, naming the feature and row)."""
        if self.features is None:
            return self.input_range
        big = float(np.finfo(np.float32).max)
        return -big, big

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of the validated policy (defaults filled in)."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "policy") -> Policy:
        if not isinstance(raw, dict):
            raise PolicyError(f"{source}: a policy must be a mapping, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None
        except ValidationError as exc:
            raise PolicyError(f"{source}: {_format(exc)}") from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-3`` (YAML 1.1 needs a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def example_policy(name: str) -> Path:
    """The example policy ``name`` (e.g. ``digits.yaml``) shipped with robust_cert: inside the
    installed wheel (``robust_cert/policies/``), or the repository's ``examples/policies/`` in
    an editable checkout. PolicyError when it is in neither."""
    package = Path(__file__).resolve().parent
    candidates = [package / "policies" / name,
                  package.parent / "examples" / "policies" / name]
    for path in candidates:
        if path.is_file():
            return path
    raise PolicyError(f"example policy {name!r} not found (looked in "
                      f"{', '.join(str(p.parent) for p in candidates)}): the installation is "
                      "incomplete; reinstall robust_cert or pass --policy")


def with_oracle(policy: str | Path | dict | Policy, oracle: str) -> Policy:
    """The policy with ``oracle`` (a model reference) as the oracle of every invariant-kind
    metric (``property: invariant``): what the CLI's ``--oracle`` does. The certificate then
    records the oracle in the policy document it ran (and hashes it). PolicyError when the
    policy has no such metric."""
    pol = load_policy(policy)
    doc = pol.canonical()
    hits = [name for name, args in doc["metrics"].items()
            if isinstance(args, dict) and args.get("property") == "invariant"]
    if not hits:
        raise PolicyError(f"--oracle {oracle}: the policy has no metric with property "
                          "invariant (e.g. metrics.safe_radius: {property: invariant})")
    for name in hits:
        doc["metrics"][name]["oracle"] = oracle
    return Policy.from_dict(doc, source="policy with --oracle")


def load_policy(policy: str | Path | dict | Policy) -> Policy:
    """Load a policy from a YAML path, a dict, or return a Policy unchanged."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    if not isinstance(policy, (str, Path)):
        raise PolicyError(f"policy must be a YAML path, a dict or a Policy, got "
                          f"{type(policy).__name__}")
    path = Path(policy)
    if not path.is_file():
        raise PolicyError(f"policy file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise PolicyError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start}); save the policy as UTF-8") from None
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    return Policy.from_dict(raw, source=str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: 'line L, column C: problem' (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _format(exc: ValidationError, prefix: str = "") -> str:
    """First validation error as 'dotted.key: why'."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
    key = ".".join(p for p in (prefix, loc) if p)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    n = len(exc.errors())
    more = f" (and {n - 1} more error{'s' * (n > 2)})" if n > 1 else ""
    return (f"{key}: {msg}" if key else msg) + more
