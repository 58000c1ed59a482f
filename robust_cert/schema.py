"""The certificate's JSON body as a typed schema, and its JSON Schema for auditors.

:class:`CertificateBody` declares every key a certificate body holds and that robust_cert reads:
what :func:`robust_cert.api.certify` writes, and the ``tracking_uri`` and ``comparison`` the
MLflow plugin adds. :class:`CertificateFile` is the whole ``certificate.json``: the body, its
digest and the optional signature block. ``robust-cert schema`` prints
:func:`certificate_json_schema` (``docs/certificate.schema.json`` keeps a copy).

The schema validates; it never serialises. A certificate's canonical JSON, and so its digest,
stay those of the body dict as written (:mod:`robust_cert.certificate`): validation neither
reorders keys, nor fills defaults in, nor touches a float. Keys added to the body after the
first v1 certificates (e.g. ``environment.processes``, a requirement's ``lower_bound``) are
optional, so older certificates still validate. Records of a fixed shape (results, their
values, requirements, sanity checks, policy, data) refuse unknown keys; the open-ended parts
(``model`` extras, ``environment`` library versions, a result's ``config`` and
``diagnostics``, the policy ``document``, the ``comparison`` entry) accept them.

Importing this module imports pydantic, not torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from robust_cert.errors import RobustCertError
from robust_cert.verdicts import Verdict

#: the ``schema`` value of every version-1 certificate body
SCHEMA = "robust_cert/certificate/v1"
#: the JSON Schema dialect :func:`certificate_json_schema` is written in
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: a SHA-256 robust_cert computed itself: 64 lower-case hex digits
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
CheckState = Literal["passed", "failed", "not_run"]


class _Closed(BaseModel):
    """A record of fixed shape: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """An open-ended record: declared keys are checked, others are kept."""

    model_config = ConfigDict(extra="allow")


class GradientTwin(_Closed):
    """The differentiable model gradient metrics attacked (``certify(gradient_twin=…)``)."""

    format: str
    sha256: str
    uri: str | None
    max_abs_logit_diff: float
    agreement: str = Field(description="points predicting the same class, 'k/n'")
    tolerance: float


class TrainingRun(_Open):
    """The registered version's training run, as the registry reports it."""

    run_name: str | None = None
    run_id: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class ModelRecord(_Open):
    """What was certified. Loaders add facts of their own (e.g. ``opset``, ``providers``)."""

    name: str | None
    version: str | None
    uri: str | None
    format: str
    sha256: str = Field(description="of the weights or file; a Classifier built by hand "
                                    "names its own")
    num_classes: int
    input_shape: list[int]
    gradients: bool = Field(description="whether the model itself has input gradients")
    gradient_twin: GradientTwin | None = None
    outputs: str | None = Field(None, description="set when probabilities were converted")
    source: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    training: TrainingRun | None = None
    intended_use: str | None = None
    version_description: str | None = None
    registered_model_description: str | None = None
    tracking_uri: str | None = None


class DataRecord(_Closed):
    """The evaluation data; ``sha256`` covers the float32 inputs and int64 labels."""

    name: str
    source: str
    sha256: Sha256
    n: int = Field(ge=0)
    input_shape: list[int]
    input_range: tuple[float, float]
    class_counts: list[int]
    kind: str | None = Field(
        default=None, description="the data source that read it: digits, npz, csv, parquet, "
        "image-folder, factory, arrays, or a plugin's (absent in certificates before sources)")
    details: dict[str, Any] | None = Field(
        default=None, description="what the source recorded: a table's features, label column "
        "and categories; an image folder's classes (label order), image_size and mode")
    features: dict[str, Any] | None = Field(
        default=None, description="the policy's per-feature threat model as fitted on this "
        "data (robust_cert.tabular): scale (range, std or none), grid, and per feature its "
        "name, index, range and where it came from (policy or data), and either its scale "
        "(ε units) or why it is immutable (policy or categorical)")


class PolicyRecord(_Closed):
    """The policy the verdict was decided under; ``document`` is its canonical JSON."""

    name: str
    version: str | None
    sha256: Sha256
    confidence: float = Field(gt=0, lt=1)
    document: dict[str, Any]


class Environment(_Open):
    """Where it ran; also the installed version of each library that changes numbers
    (``torch``, ``numpy``, …; null when absent)."""

    device: str
    device_name: str
    threads: int | None
    processes: int = 1
    platform: str
    python: str


class SanityCheck(_Closed):
    """One sanity check of a metric (``metric`` null: of the model itself)."""

    check: str
    metric: str | None
    state: CheckState
    detail: str | None = None
    requirements: list[str] | None = Field(None, description="the requirements it undermines")
    action: Literal["inconclusive", "compensated", "waived", "none"] | None = None
    compensated_by: str | None = None
    waiver: str | None = None
    made_inconclusive: list[str] | None = None


class Waiver(_Closed):
    check: str
    reason: str


class Sanity(_Closed):
    """The sanity checks that decide (:func:`robust_cert.verdict.apply_sanity`). Certificates
    before the checks were recorded hold ``deterministic_forward`` alone, as a boolean."""

    deterministic_forward: bool | CheckState | list[CheckState]
    deterministic_detail: str | None = None
    stochastic_declared: bool = False
    guarantee_for: str | None = None
    outputs: str | None = None
    checks: list[SanityCheck] = Field(default_factory=list)
    waived: list[Waiver] = Field(default_factory=list)


class ConditionalCI(_Closed):
    """The pooled interval of a clustered proportion, about this evaluation set only."""

    ci: tuple[float, float]
    interval_method: str
    population: str


class ValueRecord(_Closed):
    """One proportion of a result (:func:`robust_cert.certificate.proportion_to_dict`)."""

    params: dict[str, Any]
    k: int = Field(ge=0)
    n: int = Field(ge=0)
    estimate: float
    ci: tuple[float, float] = Field(description="two-sided, at the policy's confidence")
    ci_method: str
    interval_method: str | None = None
    population: str | None = None
    confidence: float
    points: int | None = Field(None, description="points of a clustered proportion")
    conditional_ci: ConditionalCI | None = None


class ResultRecord(_Closed):
    """One metric's result (:func:`robust_cert.certificate.result_to_dict`)."""

    metric: str
    kind: str
    quantity: str
    higher_is_better: bool
    description: str
    config: dict[str, Any]
    status: str = Field(description="'ok' when it ran, else why not ('not_applicable', …)")
    reason: str
    diagnostics: dict[str, Any]
    values: list[ValueRecord]


class RequirementRecord(_Closed):
    """The test of one requirement (:class:`robust_cert.verdict.RequirementOutcome`)."""

    id: str
    metric: str
    params: dict[str, Any]
    direction: Literal["at_least", "at_most"]
    threshold: float
    k: int | None
    n: int | None
    estimate: float | None
    ci: tuple[float, float] | None
    p_value: float | None
    adjusted_p_value: float | None
    level: float | None
    bound: float | None
    verdict: Verdict
    reason: str = ""
    population: str = ""
    interval_method: str = ""
    lower_bound: float | None = None
    upper_bound: float | None = None


class ComparedVersion(_Open):
    """The certificate a comparison was made against."""

    model: str | None = None
    version: str | None = None
    uri: str | None = None
    model_sha256: str | None = None
    certificate_digest: str | None = None
    verdict: Verdict | None = None
    issued_at: str | None = None
    policy: dict[str, Any] | None = None
    signed_by: str | None = None


class ComparedQuantity(_Open):
    """One quantity compared with the baseline (exact McNemar test, Holm)."""

    key: str
    label: str | None = None
    requirements: list[str] = Field(default_factory=list)
    higher_is_better: bool | None = None
    n: int | None = None
    baseline_rate: float | None = None
    rate: float | None = None
    delta: float | None = None
    delta_ci: tuple[float, float] | None = None
    baseline_only: int | None = None
    current_only: int | None = None
    p_value: float | None = None
    adjusted_p_value: float | None = None
    verdict: str = Field(description="'significantly better', 'significantly worse' or "
                                     "'no detectable difference', for this version")
    note: str = ""
    method: str = ""


class Comparison(_Open):
    """The comparison with a baseline certificate the MLflow plugin adds (report §8)."""

    baseline: ComparedVersion
    data_sha256: str | None = None
    confidence: float | None = None
    method: str | None = None
    quantities: list[ComparedQuantity]
    regressions: list[str] = Field(default_factory=list)
    improvements: list[str] = Field(default_factory=list)
    not_compared: list[str] = Field(default_factory=list)


class CertificateBody(_Closed):
    """The certified content: what the digest covers and the signature names."""

    model_config = ConfigDict(extra="forbid", title="robust_cert certificate body")

    schema_: Literal["robust_cert/certificate/v1"] = Field(alias="schema")
    issued_at: str = Field(description="ISO 8601, UTC")
    verdict: Verdict = Field(description="PASS only if every requirement passes")
    model: ModelRecord
    data: DataRecord
    policy: PolicyRecord
    environment: Environment
    seed: int
    command: str | None
    sanity: Sanity
    decision_rule: str
    results: list[ResultRecord]
    requirements: list[RequirementRecord]
    tracking_uri: str | None = Field(None, description="the MLflow tracking URI, redacted")
    comparison: Comparison | None = None


class Signature(_Open):
    """The Ed25519 signature block (:func:`robust_cert.signing.signature_block`)."""

    alg: str
    kid: str
    sig: str
    claim: dict[str, Any]
    token: str


class CertificateFile(_Closed):
    """A ``certificate.json`` file: the body, the SHA-256 of its canonical JSON, and the
    certifier's signature once signed."""

    model_config = ConfigDict(extra="forbid", title="robust_cert certificate")

    certificate: CertificateBody
    digest: Sha256 = Field(description="SHA-256 of the body's canonical JSON (keys sorted, no "
                                       "whitespace, UTF-8)")
    signature: Signature | None = None


def validate_body(body: Any) -> CertificateBody:
    """The typed view of a certificate body; RobustCertError, one line naming the first
    offending field (e.g. ``results[0].values[1].k``), when it does not match the schema.
    ``body`` itself is not modified."""
    try:
        return CertificateBody.model_validate(body)
    except ValidationError as exc:
        raise RobustCertError(f"not a valid robust_cert certificate: {_first_error(exc)}") \
            from None


def certificate_json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a ``certificate.json`` file."""
    return {"$schema": JSON_SCHEMA_DIALECT,
            **CertificateFile.model_json_schema(by_alias=True, mode="validation")}


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ""
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'body'}: {first['msg']}{more}"
