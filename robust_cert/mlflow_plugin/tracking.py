"""Certify a registered model version and record everything in MLflow.

Order matters for safety: the suite runs and the certificate is complete before anything is
written; then the version's signed certificate tag (and its status tag, then the summary in
its description) is removed — the gate records the removal in its ledger — before anything
of the new certification is written, and the new signed tag is written last. A crash or
kill at any point therefore leaves either the new certificate or none, never the previous
PASS beside a new run. SIGTERM (like SIGINT) interrupts a certification cleanly in the main
thread: the run ends KILLED (FAILED on an error) and temporary folders are removed; only
SIGKILL can leave a run RUNNING, and then the version still carries no certificate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from robust_cert import catalog
from robust_cert.api import certify
from robust_cert.certificate import Certificate
from robust_cert.data import load_data
from robust_cert.engine import select_device
from robust_cert.errors import TrackingError
from robust_cert.mlflow_plugin.gate import CERT_TAG
from robust_cert.mlflow_plugin.models import load_mlflow_model
from robust_cert.policy import load_policy
from robust_cert.report import write_report
from robust_cert.signing import (
    KEY_ENV,
    KEY_FILE_ENV,
    Keyring,
    file_sha256,
    now_us,
    sign_claim,
    sign_manifest,
    signature_block,
    verify_claim,
)

log = logging.getLogger(__name__)

TAG_PREFIX = "robust_cert."
STATUS_TAG = "robust_cert.status"
STATUS = {"PASS": "passed", "FAIL": "failed", "INCONCLUSIVE": "inconclusive"}
DEFAULT_EXPERIMENT = "robust_cert"
MANIFEST = "manifest.json"
#: Run tag that marks what a robust_cert run is: ``certification`` or ``comparison``. Filter
#: the experiment's runs with ``tags.robust_cert.kind = 'certification'``.
KIND_TAG = "robust_cert.kind"
#: The version description's robust_cert summary lies between these markers; the user's own
#: text around them is kept, the block is replaced on re-certification.
DESCRIPTION_BEGIN = "<!-- robust_cert:begin -->"
DESCRIPTION_END = "<!-- robust_cert:end -->"
#: Version tags of a certification besides the signed certificate (CERT_TAG) and the status;
#: the headline metrics add ``robust_cert.<short name>`` (see :func:`headline_metrics`).
RUN_ID_TAG = "robust_cert.run_id"
POLICY_TAG = "robust_cert.policy"
DIGEST_TAG = "robust_cert.certificate_digest"


class CertificationInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived during a certification; raised so that every ``finally``
    and context manager runs (run marked KILLED, temporary folders removed)."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """Turn SIGTERM into :class:`CertificationInterrupted` while the block runs (main thread
    only: Python delivers signals there; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise CertificationInterrupted(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def _param_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def short_name(metric: str, params: dict) -> str:
    """A short, distinct MLflow name for one quantity: ``acc``, ``robust_acc_0.1`` (ε),
    ``fail_rate_0.1``, ``cert_acc_r0.25`` (L2 radius); other parameters as ``<name><value>``.
    Only characters MLflow accepts in metric names and tags on every platform."""
    parts = [catalog.entry(metric).short]
    for key, value in sorted(params.items()):
        text = _param_text(value)
        parts.append(text if key == "eps" else ("r" + text if key == "radius" else key + text))
    return re.sub(r"[^\w.\-]", "_", "_".join(parts), flags=re.ASCII)


def headline_metrics(cert: Certificate) -> dict[str, float]:
    """The run's headline metrics: the estimate of every quantity a requirement is about, and
    clean accuracy, by :func:`short_name`, rounded to 4 decimals; ``pass`` is 1 for PASS."""
    out = {}
    for res in cert.results:
        if res["metric"] == "accuracy" and res["status"] == "ok" and res["values"]:
            out["acc"] = round(float(res["values"][0]["estimate"]), 4)
    for req in cert.requirements:
        if req["estimate"] is not None:
            out[short_name(req["metric"], req["params"])] = round(float(req["estimate"]), 4)
    out["pass"] = float(cert.passed)
    return out


def curve_points(cert: Certificate) -> dict[str, list[tuple[int, float]]]:
    """Each catalog curve (``catalog.entry(metric).curve``) the certificate has, as (step,
    value) points with the step the x value in thousandths (``round(1000·ε)``) and the value
    rounded to 4 decimals: logged as metric histories, MLflow's chart view draws and overlays
    them across runs."""
    out: dict[str, list[tuple[int, float]]] = {}
    for res in cert.results:
        spec = catalog.entry(res["metric"]).curve
        if spec is None or res["status"] != "ok":
            continue
        param, name = spec
        points = {}
        for v in res["values"]:
            if set(v["params"]) == {param} and v["estimate"] is not None:
                points[round(1000 * float(v["params"][param]))] = round(float(v["estimate"]), 4)
        if points:
            out[name] = sorted(points.items())
    return out


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without credentials: ``user:password@`` and the query string are dropped."""
    if not uri:
        return uri
    scheme, sep, rest = uri.partition("://")
    if not sep:  # a local path
        return uri
    authority, slash, path = rest.split("?", 1)[0].split("#", 1)[0].partition("/")
    return f"{scheme}://{authority.rsplit('@', 1)[-1]}{slash}{path}"


def user_description(description: str | None) -> str:
    """The user's own part of a version description: the text without the robust_cert
    summary block (see :data:`DESCRIPTION_BEGIN`)."""
    text = description or ""
    while DESCRIPTION_BEGIN in text:
        head, _, rest = text.partition(DESCRIPTION_BEGIN)
        _, found, tail = rest.partition(DESCRIPTION_END)
        if not found:  # the end marker was edited away: keep the text, drop the marker
            tail = rest
        text = head.rstrip() + ("\n\n" + tail.strip() if tail.strip() else "")
    return text.strip()


def with_summary(description: str | None, summary: str | None) -> str:
    """``description`` with its robust_cert block replaced by ``summary`` (removed when None);
    the user's text is kept, the summary first."""
    own = user_description(description)
    if summary is None:
        return own
    block = f"{DESCRIPTION_BEGIN}\n{summary.strip()}\n{DESCRIPTION_END}"
    return block + ("\n\n" + own if own else "")


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def requirement_label(metric: str, params: dict) -> str:
    """``robust accuracy, ε = 0.1``; ``certified accuracy of the smoothed classifier, r =
    0.25``: how the description names a quantity."""
    from robust_cert.report.comparison import quantity_label

    if not params or set(params) == {"eps"}:
        return quantity_label(metric_key(metric, params))
    symbols = {"eps": "ε", "radius": "r"}
    return metric.replace("_", " ") + ", " + ", ".join(
        f"{symbols.get(k, k)} = {_param_text(v)}" for k, v in sorted(params.items()))


def description_summary(cert: Certificate, run_id: str, experiment_id: str) -> str:
    """The markdown summary written into the version description: verdict, policy, each
    requirement's estimate with its CI, threshold and verdict, the comparison with the
    baseline when there is one, and links to the certification run and its report (relative
    links of the MLflow UI)."""
    body = cert.body
    pol = body["policy"]
    conf = float(pol.get("confidence") or 0.95)
    run = f"#/experiments/{experiment_id}/runs/{run_id}"
    lines = [
        f"**Robustness: {cert.verdict}** under policy `{pol['name']}` "
        f"{pol.get('version') or ''} ({conf:.0%} family-wise confidence), issued "
        f"{str(body['issued_at']).replace('T', ' ').replace('+00:00', ' UTC')}",
        "",
        f"| Requirement | Estimate ({conf:.0%} CI) | Needed | Verdict |",
        "|---|---|---|---|",
    ]
    for req in cert.requirements:
        ci = req.get("ci")
        ci_text = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        op = "≥" if req["direction"] == "at_least" else "≤"
        lines.append(f"| {requirement_label(req['metric'], req['params'])} | "
                     f"{_fmt(req['estimate'])}{ci_text} | {op} {req['threshold']:g} | "
                     f"**{req['verdict']}** |")
    comparison = body.get("comparison")
    if isinstance(comparison, dict):
        base = comparison.get("baseline") or {}
        label = {q["key"]: q.get("label") or q["key"] for q in comparison.get("quantities", [])}
        worse = [label.get(k, k) for k in comparison.get("regressions") or []]
        better = [label.get(k, k) for k in comparison.get("improvements") or []]
        lines += ["", f"Compared with v{base.get('version')} ({base.get('verdict')}): "
                  + (f"**significantly worse**: {'; '.join(worse)}" if worse else
                     "no significant regression")
                  + (f"; significantly better: {'; '.join(better)}" if better else "") + "."]
    lines += ["", f"[Certification run]({run}) · [report]({run}/artifacts/report.html) · "
              f"certificate `{cert.digest[:12]}`"]
    return "\n".join(lines)


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


#: URI schemes an MLflow client can track to ("" is a local path).
_TRACKING_SCHEMES = ("", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "file",
                     "databricks", "databricks-uc", "uc")


def check_server(tracking_uri: str) -> None:
    """Fail fast (seconds, not the client's minutes of retries) when the server is down, and
    name an unsupported URI scheme before MLflow raises deep inside its store registry."""
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0].lower() \
        if "://" in tracking_uri else ""
    if scheme not in _TRACKING_SCHEMES:
        raise TrackingError(f"unsupported MLflow tracking URI {tracking_uri!r}: use "
                            "http(s)://HOST:PORT, sqlite:///PATH.db, postgresql://…, "
                            "mysql://…, file:///DIR, databricks or a local path")
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
    allow_unsigned: bool = False,
    announce=None,
) -> Certification | None:
    """Certify the version ``uri`` names against ``policy`` and log it to MLflow.

    Creates one certification run named ``certify NAME vN · VERDICT`` and tagged
    ``robust_cert.kind=certification`` (in the experiment of the version's logged model, so
    the experiment's Models tab compares versions), logs the headline metrics
    (:func:`headline_metrics`) once with the logged model id and a named dataset, the curves
    as metric histories (:func:`curve_points`), the certificate, report and per-point
    results as artifacts, writes the summary into the version's description
    (:func:`description_summary`, between :data:`DESCRIPTION_BEGIN` and
    :data:`DESCRIPTION_END`; the user's text is kept) and sets the version's few
    ``robust_cert.*`` tags (:func:`version_tags`). Before anything is signed, the certificate
    gets the tracking URI (no credentials) and, when an earlier certification is comparable,
    the paired comparison with it (:func:`attach_comparison`, the report's Section 8).
    Raises before writing anything if the model, data, policy or server is bad.

    ``gradient_twin`` (e.g. ``models:/NAME/2``, the PyTorch version an ONNX version was
    exported from) is passed to :func:`robust_cert.certify`: a twin that disagrees with the
    model on the data is refused before anything is written.

    Without a signing key the certificate is unsigned, and a new certification withdraws the
    version's signed one first: that is refused (TrackingError, before anything runs) when
    the version holds a signed certificate, unless ``allow_unsigned``.

    ``announce`` is given the cost estimate before the run (:func:`robust_cert.certify`).
    Under ``torchrun`` every process calls this; the points are sharded
    (:func:`robust_cert.certify`) and rank 0 alone writes to MLflow and disk and returns the
    Certification; the other processes return None.
    """
    with terminate_as_interrupt():
        return _certify_version(uri, policy, data, tracking_uri=tracking_uri, out_dir=out_dir,
                                device=device, seed=seed, threads=threads, progress=progress,
                                command=command, gradient_twin=gradient_twin,
                                allow_unsigned=allow_unsigned, announce=announce)


def _certify_version(uri, policy, data, *, tracking_uri, out_dir, device, seed, threads,
                     progress, command, gradient_twin, allow_unsigned,
                     announce=None) -> Certification | None:
    client = connect(tracking_uri)
    keyring = signing_keyring()
    pol = load_policy(policy)
    evalset = load_data(data, input_range=pol.input_range)
    from robust_cert import distributed

    # under torchrun: join the others first, each process on its local GPU
    device = distributed.device_for(distributed.world(), device)
    clf = load_mlflow_model(uri, device=select_device(device), client=client)
    if keyring is None and not allow_unsigned and \
            client.get_model_version(clf.name, str(clf.version)).tags.get(CERT_TAG):
        raise TrackingError(
            f"{clf.name} v{clf.version} holds a signed certificate, and without a signing key "
            f"({KEY_ENV} / {KEY_FILE_ENV}) this certification would withdraw it and leave an "
            "unsigned one the gate refuses; set the key, or pass --unsigned to replace it")
    out = Path(out_dir or Path("robust_cert_reports") / f"{clf.name}-v{clf.version}")
    check_output_dir(out)  # before hours of work, and before any run exists
    cert = certify(clf, evalset, pol, seed=seed, threads=threads, progress=progress,
                   command=command, gradient_twin=gradient_twin, announce=announce)
    if cert is None:  # another process of a torchrun launch: rank 0 alone writes
        return None
    # both are covered by the digest and the signature: added before anything is signed
    cert.body["tracking_uri"] = redact_uri(_current_tracking_uri())
    attach_comparison(client, cert, clf.name, clf.version, keyring=keyring)
    return _record(client, clf, evalset, cert, out, keyring)


def _current_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


PRODUCTION_ALIAS = "production"


def find_baseline(client, name: str, version, data_sha256: str,
                  keyring: Keyring | None = None):
    """The certification Section 8 compares with: ``(certificate, per-point arrays, version)``
    of the version under the ``production`` alias when it is another certified version, else
    of the highest certified version below ``version``; only versions whose certification run
    holds ``certificate.json`` and ``per_point.npz`` and was made on the same data (SHA-256)
    qualify, the next candidate is tried otherwise. With ``keyring`` (a signed certification),
    the baseline's certificate must also carry a signature the keyring verifies, issued for
    that run: run artifacts are writable by any user, and a signed report must not compare
    with a forged baseline. None when nothing qualifies or the registry cannot be read (a
    warning says why)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    version = int(version)
    try:
        aliases = client.get_registered_model(name).aliases or {}
        found = client.search_model_versions("name='{}'".format(name.replace("'", "\\'")))
    except MlflowException as exc:
        log.warning("no comparison with an earlier version: cannot read %s from the registry "
                    "(%s)", name, exc.message)
        return None
    certified = {int(mv.version): mv.tags[RUN_ID_TAG] for mv in found
                 if mv.tags.get(RUN_ID_TAG) and str(mv.version).isdigit()}
    order = [int(v) for alias, v in aliases.items()
             if alias.lower() == PRODUCTION_ALIAS and str(v).isdigit()
             and int(v) != version and int(v) in certified][:1]
    order += [v for v in sorted(certified, reverse=True) if v < version and v not in order]
    with tempfile.TemporaryDirectory(prefix="robust_cert_baseline_") as tmp:
        for v in order:
            loaded = _load_certification_run(client, certified[v], data_sha256,
                                             Path(tmp) / str(v), keyring)
            if loaded is not None:
                return (*loaded, str(v))
    return None


def _load_certification_run(client, run_id: str, data_sha256: str, where: Path,
                            keyring: Keyring | None = None):
    """(certificate, per-point arrays) of a certification run made on ``data_sha256``, or
    None (with the reason logged at INFO) when it lacks either file, used other data, or (with
    ``keyring``) its certificate is not signed for this run by a key the keyring trusts."""
    import numpy as np
    from mlflow.exceptions import MlflowException

    from robust_cert.errors import RobustCertError

    try:
        run = client.get_run(run_id)
        if run.data.params.get("data_sha256", data_sha256) != data_sha256:
            log.info("run %s was certified on other data: not a baseline", run_id)
            return None
        names = {f.path for f in client.list_artifacts(run_id)}
        if not {"certificate.json", "per_point.npz"} <= names:
            log.info("run %s lacks certificate.json or per_point.npz: not a baseline", run_id)
            return None
        where.mkdir(parents=True, exist_ok=True)
        cert = Certificate.load(client.download_artifacts(run_id, "certificate.json",
                                                          str(where)))
        if cert.body["data"]["sha256"] != data_sha256:
            return None
        if keyring is not None:
            from robust_cert.mlflow_plugin.promotion import verify_certificate_file

            check = verify_certificate_file(cert, keyring)
            if not check.ok or check.claim.get("run_id") != run_id:
                log.warning("run %s cannot serve as the comparison baseline: its certificate "
                            "does not verify for this run (%s)", run_id, check.message)
                return None
        with np.load(client.download_artifacts(run_id, "per_point.npz", str(where))) as f:
            per_point = {k: f[k] for k in f.files}
    except (MlflowException, RobustCertError, OSError, ValueError, KeyError) as exc:
        log.warning("run %s cannot serve as the comparison baseline: %s", run_id,
                    getattr(exc, "message", exc))
        return None
    return cert, per_point


def attach_comparison(client, cert: Certificate, name: str, version,
                      keyring: Keyring | None = None) -> dict | None:
    """Put the paired comparison with the baseline of :func:`find_baseline` into
    ``cert.body["comparison"]`` (the report's Section 8); return it, or None (the certificate
    then has no comparison) when no earlier certification is comparable."""
    from robust_cert.errors import RobustCertError
    from robust_cert.report.comparison import comparison_entry

    found = find_baseline(client, name, version, cert.body["data"]["sha256"], keyring)
    if found is None:
        return None
    base_cert, base_pp, base_version = found
    try:
        entry = comparison_entry(cert, base_cert, current_per_point=cert.per_point,
                                 baseline_per_point=base_pp)
    except RobustCertError as exc:
        log.warning("no comparison with %s v%s: %s", name, base_version, exc)
        return None
    cert.body["comparison"] = entry
    return entry


def check_output_dir(out: Path) -> None:
    """Raise TrackingError unless ``out`` is (or can be made) a writable directory."""
    if out.exists() and not out.is_dir():
        raise TrackingError(f"--out {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise TrackingError(f"--out {out}: {probe} is not a writable directory")


def signing_keyring() -> Keyring | None:
    """The certifier's keys (with the private key), or None (with a warning) when no private
    key is configured at all."""
    if not (os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV)):
        log.warning("no signing key (%s / %s): the certificate is unsigned and the registry "
                    "gate will refuse to promote this version", KEY_ENV, KEY_FILE_ENV)
        return None
    return Keyring.from_env(require_private=True)


def claim_for(cert: Certificate, name: str, version, run_id: str,
              issued_us: int | None = None) -> dict:
    """What the signature covers: the identity of the model (name, canonical version,
    artifact SHA-256), policy, verdict, certificate digest and run, and the issue time in
    microseconds (default: now), which the gate requires to increase per version."""
    body = cert.body
    return {
        "model": name, "version": int(version), "model_sha256": body["model"]["sha256"],
        "policy": body["policy"]["name"], "policy_sha256": body["policy"]["sha256"],
        "verdict": cert.verdict, "run_id": run_id, "certificate_digest": cert.digest,
        "issued_us": issued_us if issued_us is not None else now_us(),
    }


def sign_certificate(cert: Certificate, name: str, version, run_id: str,
                     keyring: Keyring) -> str:
    """Sign the claim for ``cert`` (see :func:`claim_for`), put the signature block (algorithm,
    key id, signature, readable claim, token) into ``cert.signature`` so the report prints
    them, and return the registry token."""
    token = sign_claim(claim_for(cert, name, version, run_id), keyring)
    cert.signature = signature_block(token, verify_claim(token, keyring, name=name,
                                                         version=version))
    return token


def _record(client, clf, evalset, cert: Certificate, out: Path,
            keyring: Keyring | None) -> Certification:
    import mlflow
    from mlflow.exceptions import MlflowException

    name, version = clf.name, str(int(clf.version))
    # 1. withdraw the previous certificate before anything of this one is written
    withdraw_certificate(client, name, version)
    model_id = clf.extra.get("model_id")
    experiment_id = _experiment_for(client, model_id)
    # the verdict names the run only once the version carries the signed certificate: a crash
    # before that must not leave a run that reads PASS
    run = client.create_run(experiment_id, run_name=f"certify {name} v{version}",
                            tags={KIND_TAG: "certification", "robust_cert.model": name,
                                  "robust_cert.version": version})
    run_id = run.info.run_id
    try:
        token = None
        if keyring is not None:
            token = sign_certificate(cert, name, version, run_id, keyring)
        try:
            report = write_report(cert, out, data=evalset)
            report_path = report.html
            cert_path = cert.save(out / "certificate.json")
            per_point = cert.save_per_point(out / "per_point.npz")
            files = [cert_path, report_path, per_point]
            if report.pdf is not None:
                files.append(Path(report.pdf))
            manifest_path = None
            if keyring is not None:
                manifest_path = write_manifest(out / MANIFEST, name, version, run_id, cert,
                                               token, files, keyring)
            else:  # an earlier signed manifest here would vouch for other files
                (out / MANIFEST).unlink(missing_ok=True)
            with mlflow.start_run(run_id=run_id):
                _log_run(mlflow, clf, evalset, cert, model_id, files + (
                    [manifest_path] if manifest_path else []))
                _log_curves(client, run_id, cert)
        except Exception as exc:
            client.set_terminated(run_id, "FAILED")
            raise TrackingError(f"logging the certification run failed: {exc}") from None
        # 2. the version's summary tags, then the signed certificate last
        try:
            _tag_version(client, name, version, cert, run_id, token,
                         experiment_id=experiment_id)
        except MlflowException as exc:
            raise TrackingError(f"tagging {name} v{version} failed ({exc.message}); the version "
                                "carries no certificate: certify it again") from None
        client.set_tag(run_id, "robust_cert.verdict", cert.verdict)
        client.update_run(run_id, name=run_name(name, version, cert.verdict))
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    return Certification(cert, run_id, experiment_id, out, report_path, cert_path)


def write_manifest(path: Path, name: str, version: str, run_id: str, cert: Certificate,
                   token: str, files: list[Path], keyring: Keyring) -> Path:
    """Sign and write ``manifest.json``: the claim token and the SHA-256 of each file (the
    certificate, the HTML and PDF reports, the per-point results), by file name. Verify with
    ``robust-cert verify manifest.json`` beside the files (or the run's artifacts)."""
    import json

    manifest = {
        "schema": "robust_cert.manifest/1", "model": name, "version": int(version),
        "run_id": run_id, "certificate_digest": cert.digest, "verdict": cert.verdict,
        "claim": token, "files": {Path(f).name: file_sha256(f) for f in files},
    }
    doc = sign_manifest(manifest, keyring)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def run_name(name: str, version, verdict: str) -> str:
    """``certify digits-cnn v2 · PASS``: sorts by model and version, reads at a glance."""
    return f"certify {name} v{version} · {verdict}"


def _log_run(mlflow, clf, evalset, cert: Certificate, model_id, files: list[Path]) -> None:
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
    # a few short, distinct names (the full numbers with CIs are in the certificate), on
    # the logged model too so the experiment's Models tab compares versions
    mlflow.log_metrics(headline_metrics(cert), model_id=model_id, dataset=dataset)
    for f in files:
        mlflow.log_artifact(str(f))


def _log_curves(client, run_id: str, cert: Certificate) -> None:
    """Each curve of :func:`curve_points` as one metric history, step = x in thousandths."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(name, value, ts, step) for name, points in curve_points(cert).items()
               for step, value in points]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def withdraw_certificate(client, name: str, version: str) -> None:
    """Remove the version's signed certificate and status tags (the gate records the removal
    in its ledger, so the old certificate can never be written back), then the robust_cert
    summary from its description, so no earlier verdict is shown beside a new run. Raises
    TrackingError when a removal fails: nothing of a new certification may be written
    before it."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, version)
        for key in (CERT_TAG, STATUS_TAG):
            if key in mv.tags:
                client.delete_model_version_tag(name, version, key)
        if DESCRIPTION_BEGIN in (mv.description or ""):
            client.update_model_version(name, version,
                                        description=with_summary(mv.description, None))
    except MlflowException as exc:
        raise TrackingError(f"cannot remove the previous certificate of {name} v{version} "
                            f"({exc.message}); nothing was written") from None


def _experiment_for(client, model_id: str | None) -> str:
    if model_id:
        try:
            return client.get_logged_model(model_id).experiment_id
        except Exception:
            log.warning("logged model %s not found; using experiment %r", model_id,
                        DEFAULT_EXPERIMENT)
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    return exp.experiment_id if exp else client.create_experiment(DEFAULT_EXPERIMENT)




def version_tags(cert: Certificate, run_id: str) -> dict[str, str]:
    """The version's summary tags (besides the signed certificate): run id, policy, digest,
    the headline metrics (``robust_cert.<short name>``, 4 decimals) and the status last."""
    tags = {
        POLICY_TAG: cert.body["policy"]["name"],
        RUN_ID_TAG: run_id,
        DIGEST_TAG: cert.digest,
    }
    for key, value in headline_metrics(cert).items():
        if key != "pass":
            tags[f"{TAG_PREFIX}{key}"] = f"{value:.4f}"
    tags[STATUS_TAG] = STATUS[cert.verdict]
    return tags


#: Summary tags of earlier releases of this plugin (replaced by the headline tags).
_LEGACY_TAGS = ("robust_cert.metric.", "robust_cert.policy_sha256", "robust_cert.issued_at")


def _summary_tag(key: str) -> bool:
    """Whether ``key`` is a summary tag a certification writes (a headline metric or a
    legacy summary tag), which a new certification replaces; other ``robust_cert.*`` tags
    (the certificate, the status, tags of other tools) are not touched here."""
    if key.startswith(_LEGACY_TAGS):
        return True
    if not key.startswith(TAG_PREFIX):
        return False
    short = key[len(TAG_PREFIX):]
    return short == "pass" or any(short == n or short.startswith(n + "_")
                                  for n in catalog.short_names())


def _tag_version(client, name: str, version: str, cert: Certificate, run_id: str,
                 signed: str | None, *, experiment_id: str) -> None:
    """Summary tags, the description's summary, the status, and the signed certificate last
    (see the module doc). robust_cert tags of an earlier certification that this one does not
    sets (headline metrics of other requirements, older tag names) are removed, so none is
    left stale."""
    tags = version_tags(cert, run_id)
    status = tags.pop(STATUS_TAG)
    mv = client.get_model_version(name, version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    for key in sorted(mv.tags):
        if key not in tags and _summary_tag(key):
            client.delete_model_version_tag(name, version, key)
    summary = description_summary(cert, run_id, experiment_id)
    client.update_model_version(name, version, description=with_summary(mv.description,
                                                                        summary))
    client.set_model_version_tag(name, version, STATUS_TAG, status)
    if signed is not None:
        client.set_model_version_tag(name, version, CERT_TAG, signed)
