"""Certify a registered model version and record everything in MLflow.

Order matters for safety: the suite runs and the certificate is complete before anything is
written; the version's ``robust_cert.status`` tag is removed before new results are written
and set last, so a crash at any point leaves no PASS behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from robust_cert.api import certify
from robust_cert.certificate import Certificate
from robust_cert.data import load_data
from robust_cert.engine import select_device
from robust_cert.errors import TrackingError
from robust_cert.mlflow_plugin.gate import CERT_TAG
from robust_cert.mlflow_plugin.models import load_mlflow_model
from robust_cert.policy import load_policy
from robust_cert.report import write_report
from robust_cert.signing import KEY_ENV, KEY_FILE_ENV, Keyring, sign_claim

log = logging.getLogger(__name__)

TAG_PREFIX = "robust_cert."
STATUS_TAG = "robust_cert.status"
STATUS = {"PASS": "passed", "FAIL": "failed", "INCONCLUSIVE": "inconclusive"}
DEFAULT_EXPERIMENT = "robust_cert"


@dataclass
class Certification:
    """What :func:`certify_version` produced."""

    certificate: Certificate
    run_id: str
    experiment_id: str
    out_dir: Path
    report_path: Path
    certificate_path: Path


def metric_key(metric: str, params: dict, suffix: str = "") -> str:
    """MLflow metric name for one proportion, e.g. ``robust_accuracy.eps_0.1``."""
    key = metric + "".join(f".{k}_{v:g}" if isinstance(v, float) else f".{k}_{v}"
                           for k, v in sorted(params.items()))
    return key + suffix


def summary_metrics(cert: Certificate) -> dict[str, float]:
    """Every proportion's estimate and CI ends, keyed by :func:`metric_key`."""
    out = {}
    for res in cert.results:
        for v in res["values"]:
            key = metric_key(res["metric"], v["params"])
            out[key] = v["estimate"]
            out[key + ".ci_lower"], out[key + ".ci_upper"] = v["ci"]
    return out


def connect(tracking_uri: str | None = None):
    """An MlflowClient for ``tracking_uri`` (also the registry; default: MLflow's own
    resolution), after checking that the server answers."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    check_server(mlflow.get_tracking_uri())
    return MlflowClient()


def check_server(tracking_uri: str) -> None:
    """Fail fast (seconds, not the client's minutes of retries) when the server is down."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answers; auth or routing problems surface on the first real call
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"cannot reach the MLflow tracking server at {tracking_uri}: "
                            f"{reason}") from None


def certify_version(
    uri: str,
    policy,
    data="digits",
    *,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    command: str | None = None,
    gradient_twin: str | None = None,
) -> Certification:
    """Certify the version ``uri`` names against ``policy`` and log it to MLflow.

    Creates one certification run (in the experiment of the version's logged model, so the
    experiment's Models tab compares versions), logs metrics once with the logged model id
    and a named dataset, logs the certificate, report and per-point results as artifacts,
    and sets the version's ``robust_cert.*`` tags. Raises before writing anything if the
    model, data, policy or server is bad.

    ``gradient_twin`` (e.g. ``models:/NAME/2``, the PyTorch version an ONNX version was
    exported from) is passed to :func:`robust_cert.certify`: a twin that disagrees with the
    model on the data is refused before anything is written.
    """
    client = connect(tracking_uri)
    keyring = signing_keyring()
    pol = load_policy(policy)
    evalset = load_data(data, input_range=pol.input_range)
    clf = load_mlflow_model(uri, device=select_device(device), client=client)
    cert = certify(clf, evalset, pol, seed=seed, threads=threads, progress=progress,
                   command=command, gradient_twin=gradient_twin)
    out = Path(out_dir or Path("robust_cert_reports") / f"{clf.name}-v{clf.version}")
    return _record(client, clf, evalset, cert, out, keyring)


def signing_keyring() -> Keyring | None:
    """The certifier's keys, or None (with a warning) when no key is configured at all."""
    if not (os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV)):
        log.warning("no signing key (%s / %s): the certificate is unsigned and the registry "
                    "gate will refuse to promote this version", KEY_ENV, KEY_FILE_ENV)
        return None
    return Keyring.from_env()


def claim_for(cert: Certificate, name: str, version: str, run_id: str) -> dict:
    """What the signature covers: the identity of the model, policy, verdict and run."""
    body = cert.body
    return {
        "model": name, "version": version, "model_sha256": body["model"]["sha256"],
        "policy": body["policy"]["name"], "policy_sha256": body["policy"]["sha256"],
        "verdict": cert.verdict, "run_id": run_id, "issued_at": body["issued_at"],
        "certificate_digest": cert.digest,
    }


def _record(client, clf, evalset, cert: Certificate, out: Path,
            keyring: Keyring | None) -> Certification:
    import mlflow

    model_id = clf.extra.get("model_id")
    experiment_id = _experiment_for(client, model_id)
    run = client.create_run(experiment_id, run_name=f"certify {clf.name} v{clf.version}",
                            tags={"robust_cert.model": clf.name,
                                  "robust_cert.version": str(clf.version),
                                  "robust_cert.verdict": cert.verdict})
    run_id = run.info.run_id
    tag_value = None
    if keyring is not None:
        tag_value = sign_claim(claim_for(cert, clf.name, str(clf.version), run_id), keyring)
        cert.signature = json.loads(tag_value)
    with tempfile.TemporaryDirectory(prefix="robust_cert_run_") as tmp:
        try:
            report = write_report(cert, out, data=evalset)
            report_path = report.html
            cert_path = cert.save(out / "certificate.json")
            with mlflow.start_run(run_id=run_id):
                body = cert.body
                mlflow.log_params({
                    "policy": body["policy"]["name"], "policy_sha256": body["policy"]["sha256"],
                    "model_sha256": clf.sha256, "data_sha256": evalset.sha256,
                    "seed": body["seed"], "device": body["environment"]["device"],
                    "threads": body["environment"]["threads"],
                })
                with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
                    warnings.simplefilter("ignore", UserWarning)
                    dataset = mlflow.data.from_numpy(
                        evalset.x.numpy(), targets=evalset.y.numpy(), name=evalset.name,
                        digest=evalset.sha256[:32], source=evalset.source)
                mlflow.log_input(dataset, context="certification")
                metrics = summary_metrics(cert)
                metrics["verdict_pass"] = float(cert.passed)
                mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
                mlflow.log_artifact(str(cert_path))
                mlflow.log_artifact(str(report_path))
                if report.pdf is not None:
                    mlflow.log_artifact(str(report.pdf))
                mlflow.log_artifact(str(cert.save_per_point(Path(tmp) / "per_point.npz")))
        except Exception as exc:
            client.set_terminated(run_id, "FAILED")
            raise TrackingError(f"logging the certification run failed: {exc}") from None
        _tag_version(client, clf, cert, run_id, tag_value)
    return Certification(cert, run_id, experiment_id, out, report_path, cert_path)


def _experiment_for(client, model_id: str | None) -> str:
    if model_id:
        try:
            return client.get_logged_model(model_id).experiment_id
        except Exception:
            log.warning("logged model %s not found; using experiment %r", model_id,
                        DEFAULT_EXPERIMENT)
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    return exp.experiment_id if exp else client.create_experiment(DEFAULT_EXPERIMENT)


def _tag_version(client, clf, cert: Certificate, run_id: str, signed: str | None) -> None:
    name, version = clf.name, str(clf.version)
    # a new signed certificate replaces the old one (the gate refuses to take an older one
    # back); an unsigned certification removes it, which revokes it
    for stale in (STATUS_TAG,) if signed is not None else (STATUS_TAG, CERT_TAG):
        try:
            client.delete_model_version_tag(name, version, stale)
        except Exception:
            pass  # nothing to remove
    tags = {
        "robust_cert.run_id": run_id,
        "robust_cert.policy": cert.body["policy"]["name"],
        "robust_cert.policy_sha256": cert.body["policy"]["sha256"],
        "robust_cert.certificate_digest": cert.digest,
        "robust_cert.issued_at": cert.body["issued_at"],
    }
    for req in cert.requirements:
        if req["estimate"] is not None:
            key = metric_key(req["metric"], req["params"])
            tags[f"robust_cert.metric.{key}"] = f"{req['estimate']:.4f}"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if signed is not None:
        client.set_model_version_tag(name, version, CERT_TAG, signed)
    client.set_model_version_tag(name, version, STATUS_TAG, STATUS[cert.verdict])
