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
    files = (p for p in root.rglob("*") if p.is_file() and p.name != _DOWNLOAD_META)
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
            return _load_onnx_flavor(local, meta, mv, sha, device)
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
                 "model_id": logged_model_id(mv)}
    return clf


def _load_onnx_flavor(local: str, meta, mv, sha: str, device: torch.device) -> Classifier:
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
                 "model_id": logged_model_id(mv)}
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
