"""`robust-cert compare`: paired comparison of certified versions of one registered model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from robust_cert.comparison import QuantityComparison, compare, paired_outcomes
from robust_cert.errors import RobustCertError
from robust_cert.mlflow_plugin.baseline import NotABaseline, load_certification_run
from robust_cert.mlflow_plugin.names import RUN_ID_TAG
from robust_cert.report.comparison import render_comparison_html, write_comparison_html

log = logging.getLogger(__name__)

#: Files of a comparison report, and the MLflow table artifact.
TABLE_ARTIFACT = "comparison_table.json"
MANIFEST = "manifest.json"


@dataclass
class VersionComparison:
    baseline: str
    candidate: str
    quantities: list[QuantityComparison]


@dataclass
class ComparisonReport:
    name: str
    confidence: float
    data_sha256: str
    versions: list[str]
    comparisons: list[VersionComparison]
    #: Per version: certificate digest, verdict, policy, issue time and certification run.
    certificates: dict[str, dict] = field(default_factory=dict)
    created_at: str = ""
    run_id: str | None = None
    path: Path | None = None
    html_path: Path | None = None
    pdf_path: Path | None = None
    manifest_path: Path | None = None

    @property
    def id(self) -> str:
        """``cmp-`` and 12 hex digits: a hash of what was compared (model, versions and their
        certificate digests, confidence) and when."""
        what = json.dumps([self.name, self.versions, {v: c.get("certificate_digest") for v, c in
                                                      sorted(self.certificates.items())},
                           self.confidence, self.created_at], sort_keys=True)
        return "cmp-" + hashlib.sha256(what.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {
            "id": self.id, "created_at": self.created_at,
            "model": self.name, "confidence": self.confidence, "data_sha256": self.data_sha256,
            "versions": self.versions, "run_id": self.run_id,
            "certificates": self.certificates,
            "comparisons": [{"baseline": c.baseline, "candidate": c.candidate,
                             "quantities": [q.to_dict() for q in c.quantities]}
                            for c in self.comparisons],
        }

    def table(self) -> dict[str, list]:
        """One row per compared quantity (what ``mlflow.log_table`` shows), 4 decimals."""
        cols = ("candidate", "baseline", "quantity", "verdict", "delta", "delta_ci_lower",
                "delta_ci_upper", "rate_baseline", "rate_candidate", "p_value", "p_holm")
        rows = {c: [] for c in cols}
        for c in self.comparisons:
            for q in c.quantities:
                values = (f"v{c.candidate}", f"v{c.baseline}", q.key, q.verdict, q.delta,
                          q.delta_ci[0], q.delta_ci[1], q.rate_a, q.rate_b, q.p_value,
                          q.adjusted_p_value)
                for col, value in zip(cols, values, strict=True):
                    rows[col].append(round(float(value), 4) if isinstance(value, float)
                                     else value)
        return rows


def _canonical_version(version) -> str:
    """MLflow's version numbers are positive integers; a command-line "02" means "2" (ASCII
    digits only: "²" is a digit to str.isdigit, not to int)."""
    text = str(version).strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise RobustCertError(f"version {version!r} is not a version number (1, 2, ...)")
    return str(int(text))


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RobustCertError(f"registered model {name!r} does not exist") from None
        raise RobustCertError(f"cannot read registered model {name!r}: {exc.message}") from None


def _model_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RobustCertError(f"registered model {name!r} has no version {version}") \
                from None
        raise RobustCertError(f"cannot read {name} v{version}: {exc.message}") from None


def _load_certification(client, name: str, version: str, tmp: Path, keyring):
    """(certificate, per-point arrays, run id) of the version's certification, through the
    one verified loader (:func:`~robust_cert.mlflow_plugin.baseline.load_certification_run`):
    with ``keyring`` its certificate must verify for that run."""
    mv = _model_version(client, name, version)
    run_id = mv.tags.get(RUN_ID_TAG)
    if not run_id:
        raise RobustCertError(f"{name} v{version} has not been certified "
                              f"(run: robust-cert certify models:/{name}/{version} --policy P)")
    try:
        cert, per_point = load_certification_run(client, run_id, tmp / version,
                                                 keyring=keyring)
    except NotABaseline as exc:
        raise RobustCertError(f"{name} v{version}: {exc}") from exc
    return cert, per_point, run_id


def _verifying_keyring():
    """The configured keys (public or private), or None with a warning: without keys the
    certificates compared are not checked."""
    from robust_cert.signing import Keyring, SigningKeyError

    try:
        return Keyring.from_env()
    except SigningKeyError:
        log.warning("no keys configured (ROBUST_CERT_PUBLIC_KEYS): the certificates compared "
                    "are not verified")
        return None


def compare_versions(client, name: str, versions: list[str] | None = None,
                     baseline: str | None = None, *, confidence: float = 0.95,
                     out_dir: str | Path | None = None, log_run: bool = True
                     ) -> ComparisonReport:
    """Compare every version against the baseline (default: the version under the
    ``production`` alias if it is among them, else the lowest) and log the result."""
    import mlflow

    if not 0 < confidence < 1:
        raise RobustCertError(f"--confidence must be in (0, 1), got {confidence:g}")
    registered = _registered_model(client, name)
    if not versions:
        found = client.search_model_versions(f"name='{name}'")
        versions = sorted((mv.version for mv in found if RUN_ID_TAG in mv.tags),
                          key=int)
        if len(versions) < 2:
            raise RobustCertError(f"{name} has {len(versions)} certified version(s); "
                                  "comparison needs two")
    versions = [_canonical_version(v) for v in versions]
    repeated = sorted({v for v in versions if versions.count(v) > 1}, key=int)
    if repeated:
        raise RobustCertError(f"version {', '.join(repeated)} is listed more than once; "
                              "compare distinct versions")
    if baseline is None:
        prod = str(registered.aliases.get("production", ""))
        baseline = prod if prod in versions else min(versions, key=int)
    baseline = _canonical_version(baseline)
    if baseline not in versions:
        versions = [baseline, *versions]
    if len(versions) < 2:
        raise RobustCertError("comparison needs two versions (give --versions A B, or a "
                              "--baseline other than the one version listed)")
    for v in versions:  # every version exists before anything is downloaded or written
        _model_version(client, name, v)
    with tempfile.TemporaryDirectory(prefix="robust_cert_compare_") as tmp:
        keyring = _verifying_keyring()
        loaded = {v: _load_certification(client, name, v, Path(tmp), keyring)
                  for v in versions}
    shas = {v: c.body["data"]["sha256"] for v, (c, _, _) in loaded.items()}
    if len(set(shas.values())) > 1:
        raise RobustCertError("the versions were certified on different data "
                              f"({', '.join(f'v{v}: {s[:12]}' for v, s in shas.items())}); "
                              "re-certify them on the same data to compare")
    base_cert, base_pp, base_run = loaded[baseline]
    base_out = paired_outcomes(base_pp, base_cert.body)
    comparisons = []
    for v in versions:
        if v == baseline:
            continue
        cert, pp, _ = loaded[v]
        comparisons.append(VersionComparison(
            baseline, v, compare(base_out, paired_outcomes(pp, cert.body),
                                 confidence=confidence)))
    certificates = {v: {"certificate_digest": c.digest, "verdict": c.verdict,
                        "policy": c.body["policy"]["name"], "issued_at": c.body["issued_at"],
                        "run_id": run} for v, (c, _, run) in loaded.items()}
    report = ComparisonReport(
        name, confidence, shas[baseline], versions, comparisons, certificates=certificates,
        created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    out = Path(out_dir or Path("robust_cert_reports") / f"{name}-comparison")
    out.mkdir(parents=True, exist_ok=True)
    if not log_run:
        _write_files(report, out)
        return report
    experiment_id = client.get_run(base_run).info.experiment_id
    run_name = f"compare {name} " + " · ".join(f"v{v}" for v in versions)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                          tags={"robust_cert.kind": "comparison",
                                "robust_cert.compare": name}) as run:
        report.run_id = run.info.run_id
        mlflow.log_params({"baseline": baseline, "versions": ",".join(versions),
                           "confidence": confidence, "comparison_id": report.id})
        metrics = {}
        for c in comparisons:
            for q in c.quantities:
                metrics[f"delta.v{c.candidate}.{q.key}"] = q.delta
                metrics[f"mcnemar_p.v{c.candidate}.{q.key}"] = q.p_value
                metrics[f"delta_ci_lower.v{c.candidate}.{q.key}"] = q.delta_ci[0]
                metrics[f"delta_ci_upper.v{c.candidate}.{q.key}"] = q.delta_ci[1]
        mlflow.log_metrics(metrics)
        mlflow.log_table(data=report.table(), artifact_file=TABLE_ARTIFACT)
        for path in _write_files(report, out):
            mlflow.log_artifact(str(path))
    return report


def _write_files(report: ComparisonReport, out: Path) -> list[Path]:
    """comparison.json, comparison.html, comparison.pdf (PDF/A-3b with comparison.json
    attached, when WeasyPrint is installed) and, with a signing key, manifest.json signed like
    a certification's (``robust-cert verify manifest.json``); returns the paths written."""
    from robust_cert.signing import KEY_ENV, KEY_FILE_ENV

    report.path = out / "comparison.json"
    data = report.to_dict()
    report.path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    report.html_path = write_comparison_html(data, out)
    files = [report.path, report.html_path]
    report.pdf_path = _write_pdf(data, out)
    if report.pdf_path is not None:
        files.append(report.pdf_path)
    manifest = out / MANIFEST
    if os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV):
        from robust_cert.signing import Keyring, file_sha256, sign_manifest

        doc = sign_manifest({
            "schema": "robust_cert.comparison_manifest/1", "id": report.id,
            "created_at": report.created_at, "model": report.name,
            "versions": report.versions, "run_id": report.run_id,
            "certificates": {v: c["certificate_digest"]
                             for v, c in sorted(report.certificates.items())},
            "files": {p.name: file_sha256(p) for p in files},
        }, Keyring.from_env(require_private=True))
        manifest.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        report.manifest_path = manifest
        files.append(manifest)
    else:  # an earlier signed manifest here would vouch for other files
        manifest.unlink(missing_ok=True)
        log.warning("no signing key (%s / %s): the comparison report is unsigned", KEY_ENV,
                    KEY_FILE_ENV)
    return files


def _write_pdf(data: dict, out: Path) -> Path | None:
    """comparison.pdf, printed from the comparison HTML by the report's PDF engine (PDF/A-3b,
    comparison.json attached, dated by the comparison), or None (warning) without WeasyPrint."""
    from robust_cert.report.pdf import PdfUnavailable, pdf_a3b

    path = out / "comparison.pdf"
    try:
        pdf = pdf_a3b(render_comparison_html(data),
                      attachment=json.dumps(data, indent=2, sort_keys=True),
                      name="comparison.json", description=f"robust_cert comparison {data['id']}",
                      dated=datetime.fromisoformat(data["created_at"]))
    except PdfUnavailable as exc:
        log.warning("comparison.pdf skipped: %s", exc)
        path.unlink(missing_ok=True)
        return None
    except Exception as exc:  # a layout bug must not lose the comparison's HTML and JSON
        log.warning("comparison.pdf skipped: rendering failed: %s: %s", type(exc).__name__,
                    exc)
        path.unlink(missing_ok=True)
        return None
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(pdf)
    tmp.replace(path)
    return path
