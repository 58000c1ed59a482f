"""Routes: which policy, evaluation data and gate a registered model gets, for a whole
registry. No MLflow import: the gate, the certifier and the CLI read the same file.

A routes file (YAML) is an ordered list of rules; the first rule whose glob matches the
registered model's name applies, and ``default`` covers models no rule matches::

    routes:
      - match: "vision-*"             # glob on the registered model name (fnmatch, case-sensitive)
        policy: policies/vision.yaml  # the policy its versions are certified with and gated on
        data: data/vision-eval.npz    # its evaluation set (or {path: …, sha256: …} to pin it)
        gate: required                # the default
      - match: "fraud-*"
        policies: [policies/fraud.yaml, policies/fraud-strict.yaml]  # any of them passes
        data: {path: data/fraud.npz, sha256: 3b1f…}
      - match: "credit-*"
        policy: policies/credit.yaml
        data: {path: data/credit.csv, label: defaulted}   # any data source, with its options
      - match: "forecast-*"
        gate: exempt                  # promoted without a certificate
    default: required                 # or exempt

Paths are relative to the routes file. ``data`` is anything ``--data`` takes: a file or
folder (``.npz``, ``.csv``/``.parquet``, an image folder), or a reference no file holds
(``digits``, ``runs:/RUN_ID/PATH``, a factory ``package.module:function``: a value with a
colon, or ``digits``, that names no file beside the routes file), with the options the CLI
has: ``label`` (a table's label column), ``image_size`` ([H, W]) and ``image_mode`` (``L`` or
``RGB``). A pinned ``sha256`` is the hash robust_cert records, as the rule's (first) policy
loads the data (its ``input_range``). A required rule names one policy (``policy``) or
several (``policies``; the first is the one the certifier uses) and its data; optional
``input_shape`` (for models that do not declare one) and ``gradient_twin`` (a model
reference for ONNX versions; ``{version}`` is replaced by the version certified). A required
model no rule matches (``default: required``) is gated under the server's
``ROBUST_CERT_ALLOWED_POLICIES`` as without a routes file, and is not certified
automatically (no rule names its policy).

What the gate accepts for a required rule: a current signed PASS whose policy is one the rule
names, by name *and* SHA-256 (a policy of the same name with other content does not do).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from robust_cert.errors import RobustCertError

#: The server's and the certifier's setting naming the routes file.
ROUTES_ENV = "ROBUST_CERT_ROUTES"


class RoutesError(RobustCertError):
    """A routes file that cannot be used: the message names the file, the line and the rule."""


class PinnedData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                               description="the data's SHA-256 as robust_cert hashes it (64 "
                               "hex digits; quote it if it could read as a number)")
    label: str | None = Field(default=None, min_length=1,
                              description="a table's label column (--label)")
    image_size: tuple[int, int] | None = Field(default=None,
                                               description="[H, W] of an image folder's "
                                               "images (--image-size)")
    image_mode: Literal["L", "RGB"] | None = Field(default=None,
                                                  description="an image folder's mode "
                                                  "(--image-mode)")

    @property
    def options(self) -> dict[str, Any]:
        """The options the data source gets, as the CLI passes them."""
        size = self.image_size
        return {k: v for k, v in (("label", self.label), ("image_size", size),
                                  ("mode", self.image_mode)) if v is not None}


class Rule(BaseModel):
    """One rule of a routes file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(min_length=1, description="glob on the registered model name")
    gate: Literal["required", "exempt"] = "required"
    policy: str | None = None
    policies: list[str] | None = None
    data: PinnedData | None = Field(default=None, description="FILE, or {path: FILE, sha256: …}")
    input_shape: list[int] | None = None
    gradient_twin: str | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _path_alone(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _complete(self):
        if self.policy is not None and self.policies is not None:
            raise ValueError("give policy or policies, not both")
        named = self.policy is not None or bool(self.policies)
        if self.gate == "exempt":
            extra = [k for k in ("policy", "policies", "data", "input_shape", "gradient_twin")
                     if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"an exempt rule certifies nothing: remove {', '.join(extra)}")
        else:
            if not named:
                raise ValueError("a required rule names its policy (policy: FILE or "
                                 "policies: [FILE, …])")
            if self.data is None:
                raise ValueError("a required rule names its evaluation data (data: FILE)")
        if self.input_shape is not None and not all(d > 0 for d in self.input_shape):
            raise ValueError("input_shape must list positive sizes")
        return self

    @property
    def policy_files(self) -> list[str]:
        return [self.policy] if self.policy is not None else list(self.policies or [])


class RoutesDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: list[Rule] = Field(min_length=1)
    default: Literal["required", "exempt"] = "required"


@dataclass(frozen=True)
class RoutePolicy:
    """A policy a rule names, loaded: its file, name and SHA-256."""

    path: Path
    name: str
    sha256: str


@dataclass(frozen=True)
class Route:
    """What a model gets: its rule (None for the default), the gate, the policies (the first
    is the certifier's), the data, and why this route applies."""

    index: int | None  # 1-based rule number; None for the default
    rule: Rule | None
    gate: str
    policies: tuple[RoutePolicy, ...]
    data: Path | str | None  # a file or folder, or a reference no file holds (``digits``)
    data_sha256: str | None
    why: str

    @property
    def data_spec(self):
        """The rule's data as ``load_data`` and ``certify`` take it: a
        :class:`~robust_cert.sources.DataSpec` with its options, or the reference alone."""
        from robust_cert.sources import DataSpec

        if self.data is None:
            return None
        options = self.rule.data.options if self.rule is not None and self.rule.data else {}
        return DataSpec(str(self.data), **options) if options else str(self.data)

    @property
    def label(self) -> str:
        return (f"rule {self.index} ({self.rule.match!r})" if self.rule is not None
                else "the default")

    def accepts(self, policy_name: str, policy_sha256: str) -> bool:
        """Whether a certificate issued under this policy satisfies the route."""
        return any(p.name == policy_name and p.sha256 == policy_sha256 for p in self.policies)

    def gradient_twin(self, version) -> str | None:
        twin = self.rule.gradient_twin if self.rule is not None else None
        return twin.replace("{version}", str(version)) if twin else None


@dataclass(frozen=True)
class Routes:
    """A loaded, validated routes file."""

    path: Path
    document: RoutesDocument
    digest: str
    policies: dict[int, tuple[RoutePolicy, ...]]
    warnings: tuple[str, ...]

    def route_for(self, model_name: str) -> Route:
        """The route of the registered model ``model_name``: the first matching rule."""
        for i, rule in enumerate(self.document.routes, start=1):
            if fnmatch.fnmatchcase(model_name, rule.match):
                data, pin = _data_of(rule, self.path.parent)
                return Route(i, rule, rule.gate, self.policies.get(i, ()), data, pin,
                             f"{model_name!r} matches rule {i}'s glob {rule.match!r}"
                             + (" (the first that does)" if i > 1 else ""))
        return Route(None, None, self.document.default, (), None, None,
                     f"no rule's glob matches {model_name!r}: the default "
                     f"({self.document.default}) applies")

    def route_for_rule(self, index: int) -> Route:
        """The route rule ``index`` (1-based) gives the models it matches."""
        rule = self.document.routes[index - 1]
        data, pin = _data_of(rule, self.path.parent)
        return Route(index, rule, rule.gate, self.policies.get(index, ()), data, pin,
                     f"rule {index}")

    def required_rules(self) -> list[tuple[int, Rule]]:
        return [(i, r) for i, r in enumerate(self.document.routes, start=1)
                if r.gate == "required"]

    def describe(self) -> str:
        """A few lines: the digest and each rule (for ``robust-cert routes`` and doctor)."""
        lines = [f"{self.path}: {len(self.document.routes)} rules, default "
                 f"{self.document.default}; sha256 {self.digest}"]
        for i, rule in enumerate(self.document.routes, start=1):
            what = "exempt" if rule.gate == "exempt" else "required, policy " + " or ".join(
                f"{p.name} ({p.sha256[:12]}…)" for p in self.policies.get(i, ()))
            lines.append(f"  {i}. {rule.match!r}: {what}")
        return "\n".join(lines)


def _data_of(rule: Rule, root: Path) -> tuple[Path | str | None, str | None]:
    if rule.data is None:
        return None, None
    ref = rule.data.path
    file = root / ref
    if not file.exists() and (ref == "digits" or ":" in ref):
        return ref, rule.data.sha256  # a reference no file holds: digits, runs:/…, a factory
    return file, rule.data.sha256


def _line_of(node, loc: tuple) -> int | None:
    """The 1-based line of the YAML node at pydantic's ``loc`` (mapping keys, list indices)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if k.value == key), None)
            if found is None:
                break
            node = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) \
                and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def shadowed(rules: list[Rule]) -> list[str]:
    """Warnings for rules no model can reach: an earlier glob matches everything the later
    glob matches (checked by matching the later glob, as text, against the earlier one:
    ``vision-cnn`` after ``vision-*``, anything after ``*``)."""
    out = []
    for j, later in enumerate(rules):
        for i in range(j):
            if fnmatch.fnmatchcase(later.match, rules[i].match):
                out.append(f"rule {j + 1} ({later.match!r}) is unreachable: rule {i + 1} "
                           f"({rules[i].match!r}) matches every model it matches")
                break
    return out


def load_routes(path: str | Path, *, check_data: bool = True) -> Routes:
    """Read, validate and load a routes file: every policy a rule names is loaded and hashed,
    every data file must exist and, when pinned and ``check_data``, hash to its pin
    (the gate passes ``check_data=False``: it never reads evaluation data). RoutesError with
    the file and line on any problem; unreachable rules come back as warnings."""
    from robust_cert.errors import PolicyError
    from robust_cert.policy import load_policy

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutesError(f"routes file {path}: {exc.strerror or exc}") from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RoutesError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") \
            from None
    if raw is None:
        raise RoutesError(f"{path}: the routes file is empty (it needs a routes: list)")
    try:
        doc = RoutesDocument.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(k for k in err["loc"] if not (isinstance(k, str) and "[" in k))
        line = _line_of(node, loc)
        where = ".".join(str(k) for k in loc) or "the file"
        raise RoutesError(f"{path}:{line or 1}: {where}: {err['msg']}") from None
    root = path.parent
    policies: dict[int, tuple[RoutePolicy, ...]] = {}
    for i, rule in enumerate(doc.routes, start=1):
        line = _line_of(node, ("routes", i - 1))
        loaded = []
        data_range = (0.0, 1.0)
        for name in rule.policy_files:
            file = root / name
            if not file.is_file():
                raise RoutesError(f"{path}:{line}: rule {i} ({rule.match!r}): policy file "
                                  f"{file} not found")
            try:
                pol = load_policy(file)
            except PolicyError as exc:
                raise RoutesError(f"{path}:{line}: rule {i} ({rule.match!r}): {exc}") from None
            if not loaded:
                data_range = pol.data_range  # the certifier's policy reads the data
            loaded.append(RoutePolicy(file, pol.name, pol.sha256))
        policies[i] = tuple(loaded)
        data, pin = _data_of(rule, root)
        if data is not None:
            if isinstance(data, Path) and not data.exists():
                raise RoutesError(f"{path}:{line}: rule {i} ({rule.match!r}): data {data} "
                                  "not found")
            if pin is not None and check_data:
                try:
                    actual = data_digest(data, input_range=data_range,
                                         **(rule.data.options if rule.data else {}))
                except RobustCertError as exc:
                    raise RoutesError(f"{path}:{line}: rule {i} ({rule.match!r}): data "
                                      f"{data}: {exc}") from None
                if actual != pin:
                    raise RoutesError(f"{path}:{line}: rule {i} ({rule.match!r}): data {data} "
                                      f"has SHA-256 {actual}, not the pinned {pin}")
    digest = hashlib.sha256(json.dumps(
        {"document": doc.model_dump(mode="json"),
         "policies": {str(i): [p.sha256 for p in ps] for i, ps in policies.items()}},
        sort_keys=True).encode()).hexdigest()
    return Routes(path, doc, digest, policies, tuple(shadowed(doc.routes)))


def data_digest(data: Path | str, *, input_range: tuple[float, float] = (0.0, 1.0),
                **options) -> str:
    """The SHA-256 robust_cert records for the evaluation data ``data`` read with
    ``options`` (``label``, ``image_size``, ``mode``) under a policy's ``input_range`` (what
    :func:`robust_cert.data.load_data` computes: the arrays as the model sees them)."""
    from robust_cert.data import load_data

    return load_data(str(data), input_range=input_range, **options).sha256


def describe_route(routes: Routes, model_name: str) -> str:
    """Which rule applies to ``model_name`` and why, in a few lines."""
    route = routes.route_for(model_name)
    lines = [f"{model_name}: {route.label} — {route.why}", f"  gate: {route.gate}"]
    if route.policies:
        lines.append("  policy: " + " or ".join(f"{p.name} ({p.path}, sha256 {p.sha256})"
                                                 for p in route.policies))
    if route.data is not None:
        options = route.rule.data.options if route.rule is not None and route.rule.data else {}
        lines.append(f"  data: {route.data}"
                     + "".join(f", {k}={v}" for k, v in options.items())
                     + (f" (pinned sha256 {route.data_sha256})" if route.data_sha256 else ""))
    if route.rule is None and route.gate == "required":
        lines.append("  gated under ROBUST_CERT_ALLOWED_POLICIES; not certified automatically "
                     "(no rule names its policy)")
    return "\n".join(lines)


def as_dict(route: Route) -> dict[str, Any]:
    """A JSON-friendly record of a route (for logs and job payloads)."""
    return {"rule": route.index, "match": route.rule.match if route.rule else None,
            "gate": route.gate, "policies": [str(p.path) for p in route.policies],
            "data": str(route.data) if route.data else None}
