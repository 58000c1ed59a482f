"""Model loaders for MLflow references, registered in robust_cert's loader registry
(:mod:`robust_cert.loaders`, entry point ``robust_cert.model_loaders: mlflow``):

- ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``: a registered version;
- ``models:/m-ID``: an MLflow 3 logged model, registered or not;
- ``runs:/RUN_ID/PATH``: a model logged by a run (its name or artifact path).

The pytorch flavor (pickle and pt2 formats) and the onnx flavor are loaded, and the
black-box flavors (:mod:`robust_cert.models.blackbox`, no input gradients): ``sklearn`` (any
estimator with ``predict_proba``), ``xgboost`` and ``lightgbm`` (their sklearn APIs and
native boosters) and ``python_function`` models whose ``predict`` returns one probability per
class. A model with several flavors is loaded by the first of pytorch, onnx, sklearn,
xgboost, lightgbm, python_function it has. The model's SHA-256 is its artifacts'
(:func:`~robust_cert.mlflow_plugin.registry.artifacts_sha256`), so
the certificate names exactly the bytes that were downloaded. A registered version's
Classifier carries its name and version; a logged model's or run's has no version (it can be
certified before registration, but not tagged or promoted).
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import TypeGuard, cast

import torch

from robust_cert.errors import ModelError, TrackingError
from robust_cert.loaders import Loader
from robust_cert.mlflow_plugin.registry import (
    artifacts_sha256,
    download_version,
    logged_model_id,
    registry_facts,
    resolve_version,
    training_facts,
)
from robust_cert.models.base import Classifier
from robust_cert.models.torch import from_module

log = logging.getLogger(__name__)

_LOGGED = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)$")
_RUN = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+?)/?$")


def is_registered_reference(ref) -> TypeGuard[str]:
    """A ``models:/`` URI that is not a logged model's id: ``models:/NAME/VERSION`` or
    ``models:/NAME@ALIAS``, or a malformed one that loading refuses with a precise message
    (``models:/NAME`` names no version)."""
    return isinstance(ref, str) and ref.startswith("models:/") and not _LOGGED.match(ref)


def is_logged_reference(ref) -> bool:
    """``models:/m-ID`` (an MLflow 3 logged model) or ``runs:/RUN_ID/PATH``."""
    return isinstance(ref, str) and bool(_LOGGED.match(ref) or _RUN.match(ref))


def load_reference(uri: str, *, device: torch.device, client=None,
                   input_shape: tuple[int, ...] | None = None) -> Classifier:
    """Any MLflow reference this module loads (see the module doc). ``input_shape``: the
    evaluation data's per-sample shape, when known (a black-box model takes it when it holds
    as many values as the model's features, e.g. an 8×8 image for 64 pixel features)."""
    if is_registered_reference(uri):
        return load_mlflow_model(uri, device=device, client=client, input_shape=input_shape)
    if is_logged_reference(uri):
        return load_logged_model(uri, device=device, client=client, input_shape=input_shape)
    raise ModelError(f"{uri!r} is not an MLflow model reference: use models:/NAME/VERSION, "
                     "models:/NAME@ALIAS, models:/m-ID or runs:/RUN_ID/PATH")


def _client(client):
    if client is not None:
        return client
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def load_mlflow_model(uri: str, *, device: torch.device, client=None,
                      input_shape: tuple[int, ...] | None = None) -> Classifier:
    """Download a registered model version, hash its artifacts and wrap it (the flavors of
    the module doc; ``input_shape`` as :func:`load_reference` takes it).

    Supports both save formats of ``mlflow.pytorch``: pickle (``data/model.pth``) and pt2
    (``data/model.pt2``, a torch.export program that stays on the device it was saved on),
    and the ``onnx`` flavor (used when there is no pytorch flavor; no input gradients).
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = _client(client)
    mv = resolve_version(client, uri)
    with tempfile.TemporaryDirectory(prefix="robust_cert_model_") as tmp:
        local = download_version(mv.name, mv.version, tmp)
        clf = _from_local(local, f"{mv.name} v{mv.version}", mv.name, device, input_shape)
    clf.version = str(mv.version)
    clf.uri = f"models:/{mv.name}/{mv.version}"
    clf.extra = {**clf.extra, "source": mv.source, "run_id": mv.run_id or None,
                 "model_id": logged_model_id(mv), **registry_facts(client, mv)}
    return clf


def load_logged_model(uri: str, *, device: torch.device, client=None,
                      input_shape: tuple[int, ...] | None = None) -> Classifier:
    """Download a logged model (``models:/m-ID``) or a run's model (``runs:/RUN_ID/PATH``),
    hash its artifacts and wrap it. The Classifier's name is the logged model's name (or the
    path in the run), its version None; ``extra`` names the run and the logged model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = _client(client)
    logged = _LOGGED.match(uri)
    try:
        if logged:
            lm = client.get_logged_model(logged["id"])
            name, run_id, model_id = lm.name, lm.source_run_id, lm.model_id
            experiment_id = lm.experiment_id
        else:
            found = _RUN.match(uri)
            assert found is not None  # the loader accepted a runs:/ reference
            run_id, name = found["run"], found["path"]
            experiment_id = client.get_run(run_id).info.experiment_id
            model_id = _run_model_id(client, experiment_id, run_id, name)
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelError(f"{uri}: no such {'logged model' if logged else 'run'} "
                             f"({exc.message.splitlines()[0]})") from None
        raise TrackingError(f"registry error for {uri}: {exc.message}") from None
    with tempfile.TemporaryDirectory(prefix="robust_cert_model_") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)  # pyright: ignore[reportPrivateImportUsage]  (lazy)
        except Exception as exc:
            raise ModelError(f"cannot download the artifacts of {uri}: {exc}") from None
        clf = _from_local(local, uri, name, device, input_shape)
    clf.version = None
    clf.uri = uri
    clf.extra = {**clf.extra, "source": uri, "run_id": run_id or None, "model_id": model_id,
                 "experiment_id": experiment_id,
                 **(training_facts(client, run_id, uri) if run_id else {})}
    return clf


def _run_model_id(client, experiment_id: str, run_id: str, name: str) -> str | None:
    """The id of the logged model a run logged under ``name`` (MLflow 3), or None."""
    try:
        found = client.search_logged_models(
            experiment_ids=[experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    except Exception:  # an older server without logged models
        return None
    return found[0].model_id if len(found) == 1 else None


def _from_local(local: str, label: str, name: str, device: torch.device,
                input_shape: tuple[int, ...] | None = None) -> Classifier:
    """The Classifier of a downloaded MLflow model folder ``local`` (hashed here)."""
    import mlflow
    from mlflow.models import Model

    sha = artifacts_sha256(local)
    try:
        meta = Model.load(local)
    except Exception as exc:
        raise ModelError(f"{label}: no readable MLmodel file ({exc})") from None
    if "pytorch" not in meta.flavors and "onnx" in meta.flavors:
        return _load_onnx_flavor(local, meta, label, name, sha, device)
    if "pytorch" not in meta.flavors:
        return _load_black_box(local, meta, label, name, sha, input_shape)
    input_shape = _input_shape(meta, label)
    data_dir = Path(local) / meta.flavors["pytorch"].get("model_data", "data")
    fmt = "pytorch-pt2" if (data_dir / "model.pt2").exists() else "pytorch-pickle"
    try:
        kwargs = {} if fmt == "pytorch-pt2" else {"map_location": "cpu", "weights_only": False}
        module = mlflow.pytorch.load_model(local, **kwargs)  # pyright: ignore[reportPrivateImportUsage]  (lazy)
    except Exception as exc:
        raise ModelError(f"cannot load {label} ({fmt}): {type(exc).__name__}: {exc}") from None
    if fmt == "pytorch-pt2":
        param = next(iter(module.parameters()), None)
        placed = param.device if param is not None else torch.device("cpu")
        if placed.type != device.type:
            log.warning("%s is a pt2 program saved on %s; it runs there, not on %s",
                        label, placed, device)
            device = placed
    return from_module(module, input_shape, device=device, fmt=fmt, sha256=sha, name=name)


def _load_onnx_flavor(local: str, meta, label: str, name: str, sha: str,
                      device: torch.device) -> Classifier:
    """The ``onnx`` flavor: the graph file is ``flavors.onnx.data`` (weights may lie beside it,
    which onnxruntime reads while ``local`` still exists). The per-sample shape comes from the
    signature when it fixes every dimension, else from the graph itself."""
    from robust_cert.models.onnx import from_onnx

    shape = None
    if meta.signature is not None and meta.signature.inputs is not None:
        try:
            shape = _input_shape(meta, label)
        except ModelError:  # a column signature: the graph decides
            shape = None
        if shape is not None and not all(d > 0 for d in shape):
            shape = None  # variable dimensions in the signature: the graph decides
    path = Path(local) / meta.flavors["onnx"].get("data", "model.onnx")
    try:
        return from_onnx(path, device=device, sha256=sha, name=name, input_shape=shape)
    except ModelError as exc:
        raise ModelError(f"{label} (onnx flavor): {exc}") from None


#: The black-box flavors whose loader returns an estimator, in the order they are preferred.
BLACK_BOX_FLAVORS = ("sklearn", "xgboost", "lightgbm")
#: Column types of a pyfunc signature a perturbed feature may have, and the dtype fed.
_REAL_COLUMNS = {"double": "float64", "float": "float32"}


def _load_black_box(local: str, meta, label: str, name: str, sha: str,
                    input_shape: tuple[int, ...] | None) -> Classifier:
    """The sklearn, xgboost or lightgbm flavor (the estimator MLflow's own loader returns), or
    else the python_function flavor (its ``predict``), as a black-box Classifier. Feature
    count and column names come from the signature where the estimator does not state them;
    a pyfunc's tensor signature fixes the shape and dtype its ``predict`` gets, its column
    signature the DataFrame's column names and dtypes (double or float columns only)."""
    import importlib

    from robust_cert.models.blackbox import from_estimator, from_predict

    flavor = next((f for f in BLACK_BOX_FLAVORS if f in meta.flavors), None)
    if flavor is None and "python_function" not in meta.flavors:
        raise ModelError(f"{label} has flavors {', '.join(meta.flavors)}; robust_cert loads the "
                         "pytorch, onnx, sklearn, xgboost, lightgbm and python_function flavors")
    spec = _signature_features(meta, label)
    if flavor is not None:
        try:
            estimator = importlib.import_module(f"mlflow.{flavor}").load_model(local)
        except Exception as exc:
            raise ModelError(f"cannot load {label} ({flavor} flavor): {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
        clf = from_estimator(estimator, fmt=flavor, sha256=sha, name=label,
                             input_shape=input_shape, n_features=spec["n_features"],
                             columns=spec["columns"], extra={"flavor": flavor})
    else:
        import mlflow.pyfunc

        if spec["n_features"] is None and input_shape is None:
            raise ModelError(f"{label} has no input signature; log the model with an "
                             "input_example (batch of 2 or more) or signature")
        bad = {c: t for c, t in spec["column_types"].items() if t not in _REAL_COLUMNS}
        if bad:
            col, kind = next(iter(bad.items()))
            raise ModelError(f"{label}: input column {col!r} is {kind}; robust_cert perturbs "
                             "features as real numbers, so a python_function model needs "
                             "double or float input columns")
        try:
            model = mlflow.pyfunc.load_model(local)
        except Exception as exc:
            raise ModelError(f"cannot load {label} (python_function flavor): "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None
        # (input_shape is given when the signature has no feature count: checked above)
        count = spec["n_features"] or math.prod(int(d) for d in cast(tuple, input_shape))
        clf = from_predict(
            model.predict, n_features=count, fmt="pyfunc", sha256=sha, name=label,
            input_shape=input_shape, columns=spec["columns"],
            column_dtypes={c: _REAL_COLUMNS[t] for c, t in spec["column_types"].items()},
            feature_shape=spec["feature_shape"], dtype=spec["dtype"] or "float64",
            extra={"flavor": "python_function",
                   "loader_module": meta.flavors["python_function"].get("loader_module")})
    clf.name = name
    return clf


def _signature_features(meta, label: str) -> dict:
    """What the input signature says of the features: ``n_features`` (None when unknown),
    ``columns`` and their ``column_types`` (a column signature), ``feature_shape`` and
    ``dtype`` (a tensor signature with every per-sample dimension fixed)."""
    out = {"n_features": None, "columns": None, "column_types": {}, "feature_shape": None,
           "dtype": None}
    sig = meta.signature
    if sig is None or sig.inputs is None:
        return out
    if sig.inputs.is_tensor_spec():
        spec = sig.inputs.inputs[0]
        dims = tuple(int(d) for d in (spec.shape or ())[1:])
        out["dtype"] = str(spec.type)
        if dims and all(d > 0 for d in dims):
            out["n_features"], out["feature_shape"] = math.prod(dims), dims
        return out
    names = sig.inputs.input_names()
    if any(not isinstance(n, str) for n in names):
        raise ModelError(f"{label}: the input signature has unnamed columns")
    out["columns"], out["n_features"] = list(names), len(names)
    out["column_types"] = {c.name: getattr(c.type, "name", str(c.type))
                           for c in sig.inputs.inputs}
    return out


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _input_shape(meta, label: str) -> tuple[int, ...]:
    sig = meta.signature
    if sig is None or sig.inputs is None:
        raise ModelError(f"{label} has no input signature; log the model with "
                         "an input_example (batch of 2 or more) or signature")
    spec = sig.inputs.inputs[0]
    shape = getattr(spec, "shape", None)
    if not shape:
        raise ModelError(f"{label}: the input signature is not a tensor spec")
    return tuple(int(d) for d in shape[1:])


def _load(loader):
    def load(ref, *, input_shape, device):
        return loader(ref, device=device, input_shape=input_shape)

    return load


#: Registered through the entry point ``robust_cert.model_loaders: mlflow``.
LOADERS = [
    Loader("models:/NAME/VERSION (a registered MLflow version)",
           lambda ref: is_registered_reference(ref) and "@" not in ref,
           _load(load_mlflow_model)),
    Loader("models:/NAME@ALIAS (the registered version an alias names)",
           lambda ref: is_registered_reference(ref) and "@" in ref,
           _load(load_mlflow_model)),
    Loader("models:/m-ID (an MLflow logged model)",
           lambda ref: isinstance(ref, str) and _LOGGED.match(ref) is not None,
           _load(load_logged_model)),
    Loader("runs:/RUN_ID/PATH (a model logged by an MLflow run)",
           lambda ref: isinstance(ref, str) and _RUN.match(ref) is not None,
           _load(load_logged_model)),
]
