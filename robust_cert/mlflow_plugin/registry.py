"""Reading the model registry: parse a ``models:/`` URI, resolve it to a version, download
and hash a version's artifacts, and what the registry says about a version. MLflow is
imported inside the functions (the registry-store gate imports this module)."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from robust_cert.errors import ModelError, TrackingError
from robust_cert.mlflow_plugin.names import user_description

log = logging.getLogger(__name__)

_DOWNLOAD_META = "registered_model_meta"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


def artifacts_sha256(root: str | Path) -> str:
    """SHA-256 over every file under ``root``: relative path and content, in path order.

    Identifies the model artifacts exactly as stored; any changed, added or removed file
    changes it. ``registered_model_meta`` is skipped: MLflow's client writes it while
    downloading a ``models:/`` URI (it names the registered version), it is not stored.
    """
    root = Path(root)
    h = hashlib.sha256()
    # only the top-level file MLflow's client writes: a file of that name deeper down is a
    # model artifact like any other (and could otherwise be swapped unnoticed)
    files = (p for p in root.rglob("*") if p.is_file() and p != root / _DOWNLOAD_META)
    for path in sorted(files):
        rel = path.relative_to(root).as_posix()
        h.update(f"{rel}\n{path.stat().st_size}\n".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of a ``models:/`` URI; ModelError if it names no version."""
    m = MODEL_URI.match(uri)
    if not m:
        raise ModelError(
            f"model URI {uri!r} names no version: use models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    version = m["version"]
    if version is not None and not version.isdigit():
        raise ModelError(f"model URI {uri!r}: version {version!r} is not a number "
                         "(stages such as 'Production' are not accepted: name a version)")
    return m["name"], version, m["alias"]


def resolve_version(client, uri: str):
    """The ModelVersion a ``models:/`` URI names, with errors that say what is missing."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            what = f"alias {alias!r}" if alias else f"version {version}"
            raise ModelError(f"registered model {name!r} has no {what} ({uri})") from None
        raise TrackingError(f"registry error for {uri}: {exc.message}") from None
    except Exception as exc:  # connection refused, DNS, timeouts
        raise TrackingError(f"cannot reach the MLflow server for {uri}: "
                            f"{type(exc).__name__}: {exc}") from None


def download_version(name: str, version, dst: str) -> str:
    """Download a registered version's model artifacts into ``dst``; return the local path."""
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",  # pyright: ignore[reportPrivateImportUsage]  (lazy)
                                                   dst_path=dst)
    except Exception as exc:
        raise ModelError(f"cannot download the artifacts of {name} v{version}: {exc}") from None


def registry_facts(client, mv) -> dict:
    """What the registry says about a version, for the certificate's model section (the
    report's intended use and training rows): the registered model's description
    (``registered_model_description``), the version's own description without robust_cert's
    summary block (``version_description``), and the training run
    (``training: {run_name, run_id, params}``) when the version has a run. Each only when
    known; a registry or run that cannot be read is logged and left out."""
    from mlflow.exceptions import MlflowException

    out = {}
    try:
        text = (client.get_registered_model(mv.name).description or "").strip()
        if text:
            out["registered_model_description"] = text
    except MlflowException as exc:
        log.warning("cannot read the description of %s: %s", mv.name, exc.message)
    own = user_description(mv.description)
    if own:
        out["version_description"] = own
    if mv.run_id:
        out.update(training_facts(client, mv.run_id, f"{mv.name} v{mv.version}"))
    return out


def training_facts(client, run_id: str, label: str) -> dict:
    """``{"training": {run_name, run_id, params}}`` of the run that made a model, or {} (with
    a warning) when the run cannot be read."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        log.warning("cannot read the training run %s of %s: %s", run_id, label, exc.message)
        return {}
    return {"training": {"run_name": run.info.run_name, "run_id": run.info.run_id,
                         "params": dict(sorted(run.data.params.items()))}}


def logged_model_id(mv) -> str | None:
    """The logged model id behind a version (OSS leaves ``mv.model_id`` empty; see mv.source)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = re.match(r"^models:/(m-[0-9a-f]+)$", mv.source or "")
    return m[1] if m else None
