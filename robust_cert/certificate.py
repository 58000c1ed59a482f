"""The certificate: canonical JSON of what was certified, how, and with what result.

Canonical form: keys sorted, no insignificant whitespace, UTF-8, no NaN. The digest is the
SHA-256 of the canonical body (everything but the signature), so it identifies the content.
The body's shape is declared in :mod:`robust_cert.schema`; a certificate built by
:func:`robust_cert.certify` or loaded from JSON is validated against it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from robust_cert.errors import RobustCertError
from robust_cert.schema import SCHEMA, CertificateBody, validate_body
from robust_cert.verdicts import Verdict

_LIBRARIES = ("robust_cert", "torch", "torchattacks", "mlflow", "numpy", "scipy", "onnxruntime")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that change numbers (None when absent)."""
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def proportion_to_dict(p, confidence: float) -> dict:
    """One proportion as certificate JSON: a two-sided CI at ``confidence`` by the same method
    as the verdict's test (for display: the verdict's own one-sided bounds, at each
    requirement's Holm level, are in the requirement outcomes; for clustered proportions the
    betting interval's bets are tuned for this CI's level, so it is not the verdict's bound),
    the population it covers and how it was computed. Clustered proportions (several draws per
    point) add ``points`` and ``conditional_ci``, the pooled Clopper–Pearson interval, which
    covers only this evaluation set (its ``population``)."""
    out = {
        "params": p.params,
        "k": p.k,
        "n": p.n,
        "estimate": p.estimate,
        "ci": list(p.ci(confidence)),
        "ci_method": f"{p.interval_method}, two-sided",
        "interval_method": p.interval_method,
        "population": p.population,
        "confidence": confidence,
    }
    if p.clustered:
        from robust_cert.metrics.base import CP_METHOD, EVALUATION_SET_POPULATION

        out["points"] = p.points
        out["conditional_ci"] = {
            "ci": list(p.conditional_ci(confidence)),
            "interval_method": f"{CP_METHOD} on the pooled k of n, two-sided",
            "population": EVALUATION_SET_POPULATION,
        }
    return out


def result_to_dict(res, confidence: float) -> dict:
    """A MetricResult as certificate JSON: summaries with two-sided CIs that say which
    population they cover (:func:`proportion_to_dict`), no per-point data."""
    return {
        "metric": res.metric,
        "kind": res.kind,
        "quantity": res.quantity,
        "higher_is_better": res.higher_is_better,
        "description": res.description,
        "config": res.config,
        "status": res.status,
        "reason": res.reason,
        "diagnostics": res.diagnostics,
        "values": [proportion_to_dict(p, confidence) for p in res.proportions],
    }


@dataclass
class Certificate:
    """A finished certification. ``body`` is the JSON content; ``signature`` is added later.

    ``per_point`` holds the metrics' per-point arrays (``"metric/array"`` keys) from the run
    that made the certificate; they are not part of the JSON (see :meth:`save_per_point`).
    """

    body: dict[str, Any]
    signature: dict[str, Any] | None = field(default=None)
    per_point: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def verdict(self) -> Verdict:
        return Verdict(self.body["verdict"])

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical body."""
        return hashlib.sha256(canonical_json(self.body).encode()).hexdigest()

    @property
    def requirements(self) -> list[dict]:
        return self.body["requirements"]

    @property
    def results(self) -> list[dict]:
        return self.body["results"]

    def validate(self) -> CertificateBody:
        """The body's typed view (:class:`robust_cert.schema.CertificateBody`); raises
        RobustCertError naming the first field that does not match. The body is unchanged."""
        return validate_body(self.body)

    def to_dict(self) -> dict:
        out = {"certificate": self.body, "digest": self.digest}
        if self.signature is not None:
            out["signature"] = self.signature
        return out

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def save_per_point(self, path: str | Path) -> Path:
        """Write the per-point arrays as a compressed .npz (e.g. for paired comparisons)."""
        import numpy as np

        path = Path(path)
        with path.open("wb") as f:
            np.savez_compressed(f, **self.per_point)
        return path

    @classmethod
    def from_json(cls, text: str) -> Certificate:
        """Parse a certificate; the stored digest must match the content, and the content
        the schema (:mod:`robust_cert.schema`)."""
        try:
            raw = json.loads(text)
            body, digest = raw["certificate"], raw["digest"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RobustCertError(f"not a robust_cert certificate: {exc}") from None
        if not isinstance(body, dict) or body.get("schema") != SCHEMA:
            raise RobustCertError(f"not a robust_cert certificate (schema {SCHEMA} expected)")
        cert = cls(body=body, signature=raw.get("signature"))
        if cert.digest != digest:
            raise RobustCertError("certificate digest does not match its content: it was altered")
        cert.validate()
        return cert

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        path = Path(path)
        if not path.is_file():
            raise RobustCertError(f"certificate file not found: {path}")
        return cls.from_json(path.read_text(encoding="utf-8"))
