"""Load a registered MLflow model (``models:/name/version`` or ``models:/name@alias``)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from robust_cert.errors import ModelError, TrackingError
from robust_cert.models.base import Classifier
from robust_cert.models.torch import from_module

log = logging.getLogger(__name__)

_DOWNLOAD_META = "registered_model_meta"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


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
    m = _URI.match(uri)
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
        return mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                   dst_path=dst)
    except Exception as exc:
        raise ModelError(f"cannot download the artifacts of {name} v{version}: {exc}") from None


def load_mlflow_model(uri: str, *, device: torch.device, client=None) -> Classifier:
    """Download a registered PyTorch or ONNX model version, hash its artifacts and wrap it.

    Supports both save formats of ``mlflow.pytorch``: pickle (``data/model.pth``) and pt2
    (``data/model.pt2``, a torch.export program that stays on the device it was saved on),
    and the ``onnx`` flavor (used when there is no pytorch flavor; no input gradients).
    """
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = client or MlflowClient()
    mv = resolve_version(client, uri)
    with tempfile.TemporaryDirectory(prefix="robust_cert_model_") as tmp:
        local = download_version(mv.name, mv.version, tmp)
        sha = artifacts_sha256(local)
        try:
            meta = Model.load(local)
        except Exception as exc:
            raise ModelError(f"{mv.name} v{mv.version}: no readable MLmodel file ({exc})") from None
        if "pytorch" not in meta.flavors and "onnx" in meta.flavors:
            return _load_onnx_flavor(local, meta, mv, sha, device, client)
        if "pytorch" not in meta.flavors:
            raise ModelError(f"{mv.name} v{mv.version} has flavors {', '.join(meta.flavors)}; "
                             "robust_cert loads the pytorch and onnx flavors")
        input_shape = _input_shape(meta, mv)
        data_dir = Path(local) / meta.flavors["pytorch"].get("model_data", "data")
        fmt = "pytorch-pt2" if (data_dir / "model.pt2").exists() else "pytorch-pickle"
        try:
            kwargs = {} if fmt == "pytorch-pt2" else {"map_location": "cpu",
                                                      "weights_only": False}
            module = mlflow.pytorch.load_model(local, **kwargs)
        except Exception as exc:
            raise ModelError(f"cannot load {mv.name} v{mv.version} ({fmt}): "
                             f"{type(exc).__name__}: {exc}") from None
    if fmt == "pytorch-pt2":
        param = next(iter(module.parameters()), None)
        placed = param.device if param is not None else torch.device("cpu")
        if placed.type != device.type:
            log.warning("%s v%s is a pt2 program saved on %s; it runs there, not on %s",
                        mv.name, mv.version, placed, device)
            device = placed
    clf = from_module(module, input_shape, device=device, fmt=fmt, sha256=sha, name=mv.name)
    clf.version = str(mv.version)
    clf.uri = f"models:/{mv.name}/{mv.version}"
    clf.extra = {"source": mv.source, "run_id": mv.run_id or None,
                 "model_id": logged_model_id(mv), **registry_facts(client, mv)}
    return clf


def registry_facts(client, mv) -> dict:
    """What the registry says about a version, for the certificate's model section (the
    report's intended use and training rows): the registered model's description
    (``registered_model_description``), the version's own description without robust_cert's
    summary block (``version_description``), and the training run
    (``training: {run_name, run_id, params}``) when the version has a run. Each only when
    known; a registry or run that cannot be read is logged and left out."""
    from mlflow.exceptions import MlflowException

    from robust_cert.mlflow_plugin.tracking import user_description

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
        try:
            run = client.get_run(mv.run_id)
        except MlflowException as exc:
            log.warning("cannot read the training run %s of %s v%s: %s", mv.run_id, mv.name,
                        mv.version, exc.message)
        else:
            out["training"] = {"run_name": run.info.run_name, "run_id": run.info.run_id,
                               "params": dict(sorted(run.data.params.items()))}
    return out


def _load_onnx_flavor(local: str, meta, mv, sha: str, device: torch.device,
                      client) -> Classifier:
    """The ``onnx`` flavor: the graph file is ``flavors.onnx.data`` (weights may lie beside it,
    which onnxruntime reads while ``local`` still exists). The per-sample shape comes from the
    signature when it fixes every dimension, else from the graph itself."""
    from robust_cert.models.onnx import from_onnx

    shape = None
    if meta.signature is not None and meta.signature.inputs is not None:
        try:
            shape = _input_shape(meta, mv)
        except ModelError:  # a column signature: the graph decides
            shape = None
        if shape is not None and not all(d > 0 for d in shape):
            shape = None  # variable dimensions in the signature: the graph decides
    path = Path(local) / meta.flavors["onnx"].get("data", "model.onnx")
    try:
        clf = from_onnx(path, device=device, sha256=sha, name=mv.name, input_shape=shape)
    except ModelError as exc:
        raise ModelError(f"{mv.name} v{mv.version} (onnx flavor): {exc}") from None
    clf.version = str(mv.version)
    clf.uri = f"models:/{mv.name}/{mv.version}"
    clf.extra = {**clf.extra, "source": mv.source, "run_id": mv.run_id or None,
                 "model_id": logged_model_id(mv), **registry_facts(client, mv)}
    return clf


def logged_model_id(mv) -> str | None:
    """The logged model id behind a version (OSS leaves ``mv.model_id`` empty; see mv.source)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = re.match(r"^models:/(m-[0-9a-f]+)$", mv.source or "")
    return m[1] if m else None


def _input_shape(meta, mv) -> tuple[int, ...]:
    sig = meta.signature
    if sig is None or sig.inputs is None:
        raise ModelError(f"{mv.name} v{mv.version} has no input signature; log the model with "
                         "an input_example (batch of 2 or more) or signature")
    spec = sig.inputs.inputs[0]
    shape = getattr(spec, "shape", None)
    if not shape:
        raise ModelError(f"{mv.name} v{mv.version}: the input signature is not a tensor spec")
    return tuple(int(d) for d in shape[1:])


ALLOWED_POLICIES_ENV = "ROBUST_CERT_ALLOWED_POLICIES"


def load_verified(uri: str, *, allowed_policies=None, keyring=None, client=None,
                  tracking_uri: str | None = None, flavor: str = "pyfunc",
                  dst_path: str | Path | None = None, **load_kwargs):
    """Load a registered model only if its certificate verifies; what deployments call.

    ``uri`` is ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``. Before returning the model
    this checks that the version's ``robust_cert.certificate`` tag carries a valid Ed25519
    signature by a trusted public key (``keyring``, default ``$ROBUST_CERT_PUBLIC_KEYS`` /
    the signing key's public half) naming this model and version, that the verdict is PASS,
    that the policy (name or SHA-256) is in ``allowed_policies`` (default
    ``$ROBUST_CERT_ALLOWED_POLICIES``; one of the two is required), and that the downloaded
    artifacts hash to the certified SHA-256. The model is then loaded from exactly the bytes
    that were hashed, so artifacts swapped on the server after promotion are refused, not
    served. Raises :class:`~robust_cert.mlflow_plugin.promotion.VerificationError` saying why.

    ``flavor`` names the MLflow flavor module that loads it (``pyfunc`` default, ``pytorch``,
    ``onnx``, ``sklearn``, …; ``load_kwargs`` are passed on). The files are downloaded into
    ``dst_path`` (kept) or a temporary folder removed after loading.
    """
    import importlib

    from robust_cert.mlflow_plugin.promotion import VerificationError, verify_version
    from robust_cert.signing import Keyring

    if allowed_policies is None:
        raw = os.environ.get(ALLOWED_POLICIES_ENV, "")
        allowed_policies = [p.strip() for p in raw.split(",") if p.strip()]
    elif isinstance(allowed_policies, str):
        allowed_policies = [allowed_policies]
    allowed = set(allowed_policies)
    if not allowed:
        raise VerificationError(f"{uri}: no policy allow-list: pass allowed_policies=[...] or "
                                f"set {ALLOWED_POLICIES_ENV} (policy names or SHA-256 hashes)")
    keyring = keyring or Keyring.from_env()
    if client is None:
        from robust_cert.mlflow_plugin.tracking import connect

        client = connect(tracking_uri)
    try:
        loader = importlib.import_module(f"mlflow.{flavor}").load_model
    except (ImportError, AttributeError):
        raise ModelError(f"unknown MLflow flavor {flavor!r} (e.g. pyfunc, pytorch, onnx)") \
            from None
    mv = resolve_version(client, uri)
    label = f"{uri} ({mv.name} v{mv.version})"
    # the signature and the claim's model and version; artifacts are hashed below, on the
    # very bytes that are then loaded
    check = verify_version(client, mv.name, mv.version, keyring, check_artifacts=False)
    if not check.ok:
        raise VerificationError(f"{label} NOT VERIFIED: {check.message}")
    claim = check.claim
    if claim["verdict"] != "PASS":
        raise VerificationError(f"{label} NOT VERIFIED: verdict {claim['verdict']} under "
                                f"policy {claim['policy']!r}")
    if not ({claim["policy"], claim["policy_sha256"]} & allowed):
        raise VerificationError(f"{label} NOT VERIFIED: policy {claim['policy']!r} is not "
                                f"allowed (allowed: {', '.join(sorted(allowed))})")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def _load(dst: str):
        local = download_version(mv.name, mv.version, dst)
        if artifacts_sha256(local) != claim["model_sha256"]:
            raise VerificationError(f"{label} NOT VERIFIED: the model artifacts do not match "
                                    "the certified SHA-256 (changed after certification)")
        try:
            return loader(local, **load_kwargs)
        except Exception as exc:
            raise ModelError(f"{label}: verified, but mlflow.{flavor} cannot load it: "
                             f"{type(exc).__name__}: {exc}") from None

    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
        model = _load(str(dst_path))
    else:
        with tempfile.TemporaryDirectory(prefix="robust_cert_verified_") as tmp:
            model = _load(tmp)
    log.info("%s verified: PASS under %r (key %s, issued %s)", label, claim["policy"],
             claim["kid"], claim["issued_at"])
    return model
