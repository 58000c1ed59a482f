"""Certify a model MLflow holds and record everything in MLflow: the orchestration.

A registered version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) gets a certification
run, the signed certificate tag the registry gate trusts, summary tags and the summary in its
description. A model not (yet) registered (``runs:/RUN_ID/PATH``, ``models:/m-ID``) gets the
certification run and its report only: a check before registration, with nothing to tag.

Order matters for safety, and interrupted work changes nothing:

1. the suite runs and the certificate is complete before anything is written;
2. the certification run, its files (written beside ``--out`` and moved in only at the end)
   and the signature are made next — an error, Ctrl-C or SIGTERM up to here marks the run
   FAILED or KILLED and leaves the version's tags, description and certificate exactly as
   they were (the message says the previous certificate stands);
3. then, with SIGINT and SIGTERM held back, the version's previous signed certificate tag
   (and status, and the description's summary) is removed — the gate records the removal in
   its ledger — the new summary is written, and the new signed tag last. Only SIGKILL can
   cut this short, and then the version carries the new certificate or none, never the
   previous PASS beside new results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robust_cert.api import certify
from robust_cert.certificate import Certificate
from robust_cert.data import load_data
from robust_cert.devices import select_device
from robust_cert.errors import ModelError, TrackingError
from robust_cert.loaders import REGISTRY as LOADERS_REGISTRY
from robust_cert.mlflow_plugin.baseline import attach_comparison
from robust_cert.mlflow_plugin.client import (
    connect,
    current_tracking_uri,
    redact_uri,
    tracking_scope,
)
from robust_cert.mlflow_plugin.loaders import LOADERS, load_reference
from robust_cert.mlflow_plugin.names import CERT_TAG, DEFAULT_EXPERIMENT, KIND_TAG, MANIFEST
from robust_cert.mlflow_plugin.summary import (
    curve_points,
    headline_metrics,
    run_name,
    sandwich_metrics,
)
from robust_cert.mlflow_plugin.versions import tag_version, withdraw_certificate
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


class CertificationInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived during a certification; raised so that every ``finally``
    and context manager runs (run marked KILLED, temporary folders removed). Its message says
    what the version carries now; ``after_version_written`` when the interrupt was held back
    until the version's new certificate was in place."""

    def __init__(self, message: str = "", *, after_version_written: bool = False,
                 described: bool = False):
        super().__init__(message)
        self.after_version_written = after_version_written
        #: the message says what the interrupted certification left (the CLI prints it)
        self.described = described or after_version_written


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back while the block runs, and raise
    :class:`CertificationInterrupted` after it when one arrived (main thread only: Python
    delivers signals there; elsewhere this does nothing). For the few registry writes that
    must not be cut in the middle: SIGKILL still can, and then no stale PASS is left (the old
    certificate is withdrawn first and the new one written last)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame):
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise CertificationInterrupted(
            f"received {signal.Signals(received[0]).name} while the version was being "
            "written; it was held back until the new certificate was in place",
            after_version_written=True)


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


def certify_version(
    uri: str,
    policy,
    data: Any = "digits",  # anything load_data reads: a name, a path, a DataSpec, (x, y), …
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
    """Certify the model ``uri`` names against ``policy`` and log it to MLflow.

    ``uri`` is a registered version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) or a
    model not yet registered (``runs:/RUN_ID/PATH``, ``models:/m-ID``: a certification run
    and report only, in the experiment of the run or logged model; no tags, no signature,
    since a claim names a registered version, and no comparison with other versions).

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

    ``tracking_uri`` applies to this call only: MLflow's process-wide tracking and registry
    URIs are as before afterwards (:func:`~robust_cert.mlflow_plugin.client.tracking_scope`).

    ``announce`` is given the cost estimate before the run (:func:`robust_cert.certify`).
    Under ``torchrun`` every process calls this; the points are sharded
    (:func:`robust_cert.certify`) and rank 0 alone writes to MLflow and disk and returns the
    Certification; the other processes return None.
    """
    with terminate_as_interrupt(), tracking_scope():
        try:
            return _certify_version(uri, policy, data, tracking_uri=tracking_uri,
                                    out_dir=out_dir, device=device, seed=seed, threads=threads,
                                    progress=progress, command=command,
                                    gradient_twin=gradient_twin,
                                    allow_unsigned=allow_unsigned, announce=announce)
        except KeyboardInterrupt as exc:  # before anything was recorded: nothing changed
            if getattr(exc, "described", False):
                raise
            raise CertificationInterrupted(
                f"{exc or 'interrupted'} before anything was recorded: nothing was changed "
                f"({uri} keeps its previous certificate, if it had one)",
                described=True) from None


def _certify_version(uri, policy, data, *, tracking_uri, out_dir, device, seed, threads,
                     progress, command, gradient_twin, allow_unsigned,
                     announce=None) -> Certification | None:
    check_reference(uri)  # an unknown reference: one line, before anything is touched
    client = connect(tracking_uri)
    keyring = signing_keyring()
    pol = load_policy(policy)
    evalset = load_data(data, input_range=pol.data_range)
    from robust_cert import distributed

    # under torchrun: join the others first, each process on its local GPU
    device = distributed.device_for(distributed.world(), device)
    clf = load_reference(uri, device=select_device(device), client=client,
                         input_shape=evalset.input_shape)
    registered = clf.version is not None
    if not registered:
        keyring = None  # a claim names a registered version: nothing to sign or tag
    elif keyring is None and not allow_unsigned and \
            client.get_model_version(clf.name, str(clf.version)).tags.get(CERT_TAG):
        raise TrackingError(
            f"{clf.name} v{clf.version} holds a signed certificate, and without a signing key "
            f"({KEY_ENV} / {KEY_FILE_ENV}) this certification would withdraw it and leave an "
            "unsigned one the gate refuses; set the key, or pass --unsigned to replace it")
    label = f"v{clf.version}" if registered else \
        "run-" + (clf.extra.get("model_id") or clf.extra.get("run_id") or "model")
    out = Path(out_dir or Path("robust_cert_reports") / f"{clf.name}-{label}")
    check_output_dir(out)  # before hours of work, and before any run exists
    cert = certify(clf, evalset, pol, seed=seed, threads=threads, progress=progress,
                   command=command, gradient_twin=gradient_twin, announce=announce)
    if cert is None:  # another process of a torchrun launch: rank 0 alone writes
        return None
    # both are covered by the digest and the signature: added before anything is signed
    cert.body["tracking_uri"] = redact_uri(current_tracking_uri())
    if registered:
        attach_comparison(client, cert, clf.name, clf.version, keyring=keyring)
    return _record(client, clf, evalset, cert, out, keyring)


def check_reference(uri) -> None:
    """Raise ModelError unless ``uri`` is an MLflow model reference: a reference no loader
    accepts is refused with the forms the registered loaders accept; one another loader
    accepts (an ``.onnx`` path, a module) is certified with :func:`robust_cert.certify`,
    which records nothing in MLflow."""
    loader = LOADERS_REGISTRY.find(uri)
    if loader not in LOADERS:
        raise ModelError(f"{uri!r} is {loader.form}: certify records in MLflow and takes "
                         "models:/NAME/VERSION, models:/NAME@ALIAS, models:/m-ID or "
                         "runs:/RUN_ID/PATH; certify other models with robust_cert.certify() "
                         "in Python")


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
    """Record a finished certification: first everything that does not touch the version (a
    run, its files, the signature), then — with SIGINT and SIGTERM held back — the version's
    state in one short stretch: the old certificate withdrawn, the summary, the status and the
    new signed certificate last. An interrupt or error in the first part leaves the version
    (and the files in ``out``) exactly as they were; one in the second part waits until the
    version carries the new certificate."""
    import mlflow
    from mlflow.exceptions import MlflowException

    registered = clf.version is not None
    name = clf.name
    version = str(int(clf.version)) if registered else None
    what = f"{name} v{version}" if registered else clf.uri
    model_id = clf.extra.get("model_id")
    experiment_id = _experiment_for(client, model_id, clf.extra.get("experiment_id"))
    # the verdict names the run only once the version carries the signed certificate: a run
    # that stops before that never reads PASS
    tags = {KIND_TAG: "certification", "robust_cert.model": name}
    tags.update({"robust_cert.version": version} if registered else
                {"robust_cert.source": clf.uri})
    run = client.create_run(experiment_id, run_name=f"certify {what}", tags=tags)
    run_id = run.info.run_id
    staging = _staging_dir(out)
    try:
        token = None
        if keyring is not None:
            token = sign_certificate(cert, name, version, run_id, keyring)
        try:
            files = _write_files(cert, evalset, staging, name, version, run_id, token, keyring)
            with mlflow.start_run(run_id=run_id):
                _log_run(mlflow, clf, evalset, cert, model_id, files)
                _log_curves(client, run_id, cert)
        except Exception as exc:
            client.set_terminated(run_id, "FAILED")
            raise TrackingError(f"logging the certification run failed: {exc}; "
                                f"{_unchanged(what, registered)}") from None
        with signals_deferred():
            if registered:  # the version: withdraw, summary, status, signed certificate last
                assert version is not None  # registered
                try:
                    withdraw_certificate(client, name, version)
                    tag_version(client, name, version, cert, run_id, token,
                                experiment_id=experiment_id)
                except (MlflowException, TrackingError) as exc:
                    client.set_terminated(run_id, "FAILED")
                    reason = getattr(exc, "message", exc)
                    raise TrackingError(f"tagging {name} v{version} failed ({reason}); the "
                                        "version carries no certificate: certify it again") \
                        from None
            client.set_tag(run_id, "robust_cert.verdict", cert.verdict)
            client.update_run(run_id, name=run_name(what, cert.verdict))
            paths = _publish(staging, out, files)
    except KeyboardInterrupt as exc:
        if isinstance(exc, CertificationInterrupted) and exc.after_version_written:
            client.set_terminated(run_id, "FINISHED")  # complete: the version carries it
            raise
        client.set_terminated(run_id, "KILLED")
        raise CertificationInterrupted(f"{exc or 'interrupted'}: "
                                       f"{_unchanged(what, registered)}",
                                       described=True) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Certification(cert, run_id, experiment_id, out, paths["report.html"],
                         paths["certificate.json"])


def _unchanged(what: str, registered: bool) -> str:
    return (f"{what} keeps its previous certificate (its tags and description are unchanged)"
            if registered else f"nothing was recorded for {what}")


def _staging_dir(out: Path) -> Path:
    """A new folder beside ``out`` where the files are written before they replace those in
    ``out`` (so an interrupted certification leaves ``out`` as it was)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))


def _write_files(cert: Certificate, evalset, where: Path, name: str, version, run_id: str,
                 token: str | None, keyring: Keyring | None) -> list[Path]:
    """The report (HTML, PDF), certificate.json, per_point.npz and, when signed,
    manifest.json, written into ``where``; returns their paths."""
    report = write_report(cert, where, data=evalset)
    files = [cert.save(where / "certificate.json"), report.html,
             cert.save_per_point(where / "per_point.npz")]
    if report.pdf is not None:
        files.append(Path(report.pdf))
    if keyring is not None and token is not None:
        files.append(write_manifest(where / MANIFEST, name, version, run_id, cert, token,
                                    files, keyring))
    return [Path(f) for f in files]


def _publish(staging: Path, out: Path, files: list[Path]) -> dict[str, Path]:
    """Move the certification's files from ``staging`` into ``out`` (each replaced
    atomically); a manifest.json of an earlier certification that this one does not replace
    is removed, since it would vouch for other files. Returns the new paths by file name."""
    out.mkdir(parents=True, exist_ok=True)
    names = {f.name for f in files}
    if MANIFEST not in names:
        (out / MANIFEST).unlink(missing_ok=True)
    paths = {}
    for f in files:
        os.replace(f, out / f.name)
        paths[f.name] = out / f.name
    return paths


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


def _logged_dataset(mlflow, evalset):
    """The ``mlflow.data`` dataset a certification run logs as its input: a logged dataset it
    read (``dataset:RUN_ID/NAME``) as that same dataset (name, digest, source); else the
    data as the model saw it, digest the first 32 hex digits of its SHA-256 — from the
    float32 arrays when they are in memory, as metadata only when read on demand (uint8
    images, a factory), with the data's path as its source (a code source naming the
    reference where MLflow resolves none, e.g. ``runs:/``)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import (
        get_dataset_source_from_json,
        resolve_dataset_source,
    )
    from mlflow.data.meta_dataset import MetaDataset

    details = evalset.details
    if evalset.kind == "mlflow-dataset":
        source = get_dataset_source_from_json(details["dataset_source"],
                                              details["dataset_source_type"])
        return MetaDataset(source, name=details["dataset_name"],
                           digest=details["dataset_digest"])
    try:
        source = resolve_dataset_source(evalset.source)
    except Exception:  # MLflow has no resolver for this reference
        source = CodeDatasetSource(tags={"robust_cert.data": evalset.source})
    if isinstance(evalset.x, torch.Tensor):
        return mlflow.data.from_numpy(evalset.x.numpy(), targets=evalset.y.numpy(),
                                      name=evalset.name, digest=evalset.sha256[:32],
                                      source=source)
    return MetaDataset(source, name=evalset.name, digest=evalset.sha256[:32])


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
        dataset = _logged_dataset(mlflow, evalset)
    mlflow.log_input(dataset, context="certification")
    # a few short, distinct names (the full numbers with CIs are in the certificate), on
    # the logged model too so the experiment's Models tab compares versions
    mlflow.log_metrics(headline_metrics(cert), model_id=model_id, dataset=dataset)
    if sandwich := sandwich_metrics(cert):  # the safe radius's sandwich and ranges
        mlflow.log_metrics(sandwich)
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


def _experiment_for(client, model_id: str | None, experiment_id: str | None = None) -> str:
    """The logged model's experiment, else ``experiment_id`` (a run's), else robust_cert's."""
    if experiment_id:
        return experiment_id
    if model_id:
        try:
            return client.get_logged_model(model_id).experiment_id
        except Exception:
            log.warning("logged model %s not found; using experiment %r", model_id,
                        DEFAULT_EXPERIMENT)
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    return exp.experiment_id if exp else client.create_experiment(DEFAULT_EXPERIMENT)


