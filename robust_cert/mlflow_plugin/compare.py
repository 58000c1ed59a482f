"""`robust-cert compare`: paired comparison of certified versions of one registered model."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robust_cert.certificate import Certificate
from robust_cert.comparison import QuantityComparison, compare, paired_outcomes
from robust_cert.errors import RobustCertError
from robust_cert.report.comparison import write_comparison_html


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
    run_id: str | None = None
    path: Path | None = None
    html_path: Path | None = None

    def to_dict(self) -> dict:
        return {
            "model": self.name, "confidence": self.confidence, "data_sha256": self.data_sha256,
            "versions": self.versions, "run_id": self.run_id,
            "comparisons": [{"baseline": c.baseline, "candidate": c.candidate,
                             "quantities": [q.to_dict() for q in c.quantities]}
                            for c in self.comparisons],
        }


def _load_certification(client, name: str, version: str, tmp: Path):
    mv = client.get_model_version(name, version)
    run_id = mv.tags.get("robust_cert.run_id")
    if not run_id:
        raise RobustCertError(f"{name} v{version} has not been certified "
                              f"(run: robust-cert certify models:/{name}/{version} --policy P)")
    where = tmp / version
    where.mkdir()
    cert = Certificate.load(client.download_artifacts(run_id, "certificate.json", str(where)))
    with np.load(client.download_artifacts(run_id, "per_point.npz", str(where))) as f:
        per_point = {k: f[k] for k in f.files}
    return cert, per_point, run_id


def compare_versions(client, name: str, versions: list[str] | None = None,
                     baseline: str | None = None, *, confidence: float = 0.95,
                     out_dir: str | Path | None = None, log_run: bool = True
                     ) -> ComparisonReport:
    """Compare every version against the baseline (default: the version under the
    ``production`` alias if it is among them, else the lowest) and log the result."""
    import mlflow

    if not versions:
        found = client.search_model_versions(f"name='{name}'")
        versions = sorted((mv.version for mv in found if "robust_cert.run_id" in mv.tags),
                          key=int)
        if len(versions) < 2:
            raise RobustCertError(f"{name} has {len(versions)} certified version(s); "
                                  "comparison needs two")
    versions = [str(v) for v in versions]
    if baseline is None:
        aliases = client.get_registered_model(name).aliases
        prod = str(aliases.get("production", ""))
        baseline = prod if prod in versions else min(versions, key=int)
    if baseline not in versions:
        versions = [baseline, *versions]
    with tempfile.TemporaryDirectory(prefix="robust_cert_compare_") as tmp:
        loaded = {v: _load_certification(client, name, v, Path(tmp)) for v in versions}
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
    report = ComparisonReport(name, confidence, shas[baseline], versions, comparisons)
    out = Path(out_dir or Path("robust_cert_reports") / f"{name}-comparison")
    out.mkdir(parents=True, exist_ok=True)
    report.path = out / "comparison.json"
    report.path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    report.html_path = write_comparison_html(report.to_dict(), out)
    if log_run:
        experiment_id = client.get_run(base_run).info.experiment_id
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"compare {name}",
                              tags={"robust_cert.compare": name}) as run:
            mlflow.log_params({"baseline": baseline, "versions": ",".join(versions),
                               "confidence": confidence})
            metrics = {}
            for c in comparisons:
                for q in c.quantities:
                    metrics[f"delta.v{c.candidate}.{q.key}"] = q.delta
                    metrics[f"mcnemar_p.v{c.candidate}.{q.key}"] = q.p_value
            mlflow.log_metrics(metrics)
            report.run_id = run.info.run_id
            report.path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
            report.html_path = write_comparison_html(report.to_dict(), out)
            mlflow.log_artifact(str(report.path))
            mlflow.log_artifact(str(report.html_path))
    return report
