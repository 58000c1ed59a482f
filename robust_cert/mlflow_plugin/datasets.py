"""Evaluation data kept in MLflow: a run's artifact, read through robust_cert's data sources.

``runs:/RUN_ID/PATH`` names a file (``.npz``, ``.csv``, ``.parquet``) or a folder of images
that a run logged as an artifact; ``runs:/RUN_ID/PATH@sha256:HEX`` pins it: the downloaded
artifact's SHA-256 (of the file's bytes; of a folder, :func:`artifacts_sha256`: every file's
relative path and content) must be ``HEX``, else the data is refused before anything runs.
The artifact is downloaded into a temporary folder, read by the core source its suffix or
folder selects (its options — ``label``, ``categories``, ``image_size``, ``mode`` — pass
through), and the temporary copy is removed: nothing is written. The certificate's data
record then has ``kind`` ``mlflow-run-artifact``, ``source`` the URI, and in ``details``
the inner ``format`` (``csv``, ...) and the ``artifact_sha256`` that was read.

``dataset:RUN_ID/NAME`` names an ``mlflow.data`` dataset the run logged as an input
(``mlflow.log_input``: a pandas or numpy dataset), ``dataset:RUN_ID/NAME@DIGEST`` pins it by
MLflow's digest of it. MLflow keeps a dataset's name, digest, schema and a pointer to its
source, not the data: the source (a file path or artifact URI of a ``.csv``, ``.parquet``,
``.npz`` or image folder, as given to ``mlflow.data.from_pandas(df, source=...)``) is
downloaded into a temporary folder and read by the core source its suffix selects (options
pass through), and the data read must have the logged digest — MLflow's own digest of it
(``from_pandas`` of the table as read, ``from_numpy`` of an ``.npz``'s ``x`` and ``y``), or
the first characters of its robust_cert SHA-256 for a dataset robust_cert logged — else it
is refused naming both digests, as is a pinned digest the run did not log. (MLflow's digest
covers a table's first 10,000 rows, its length and its columns; the certificate's SHA-256
covers everything. MLflow keeps one record per name and digest in an experiment: the same
data logged again under the same name keeps the first source it was logged with.) A
dataset whose source holds no data (``code``, a Spark table) is refused naming its source
type. The certificate's data record has ``kind``
``mlflow-dataset``, ``source`` ``dataset:RUN_ID/NAME@DIGEST``, and in ``details`` the inner
``format``, the run, the dataset's name, digest, source type and source.

Registered through the entry-point group ``robust_cert.data_sources`` (pyproject.toml), so
the core never imports MLflow.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from robust_cert.data import loaded_sha256
from robust_cert.errors import DataError
from robust_cert.mlflow_plugin.registry import artifacts_sha256
from robust_cert.sources import REGISTRY as CORE_SOURCES
from robust_cert.sources import Loaded, Source

_ARTIFACT = re.compile(r"^runs:/(?P<run>[^/@]+)/(?P<path>[^@]+?)/?"
                       r"(?:@sha256:(?P<digest>[0-9a-fA-F]{64}))?$")
KIND = "mlflow-run-artifact"


def is_run_artifact(ref) -> bool:
    return isinstance(ref, str) and bool(_ARTIFACT.match(ref))


def artifact_sha256(path: Path) -> str:
    """The SHA-256 a pin names: a file's bytes, or a folder's :func:`artifacts_sha256`."""
    if path.is_dir():
        return artifacts_sha256(path)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_run_artifact(ref: str, *, input_range, **options) -> Loaded:
    """The run artifact ``ref`` names, checked against its pin and read by the core source
    its suffix or folder selects (see the module doc)."""
    import mlflow

    match = _ARTIFACT.match(ref)
    if match is None:
        raise DataError(f"{ref!r} is not runs:/RUN_ID/PATH[@sha256:HEX]")
    run_id, path, pinned = match["run"], match["path"], match["digest"]
    with tempfile.TemporaryDirectory(prefix="robust_cert_data_") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,  # pyright: ignore[reportPrivateImportUsage]  (lazy)
                                                             dst_path=tmp))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(f"{ref}: cannot download the run's artifact {path!r}: "
                            f"{type(exc).__name__}: {first}") from None
        digest = artifact_sha256(local)
        if pinned is not None and digest != pinned.lower():
            raise DataError(f"{ref}: the artifact's SHA-256 is {digest}, not the pinned "
                            f"{pinned.lower()}; refused")
        inner = CORE_SOURCES.load(str(local), input_range=input_range, options=options)
    if not isinstance(inner, Loaded):
        raise DataError(f"{ref}: the artifact is not evaluation data robust_cert reads")
    return Loaded(inner.x, inner.y, inner.name, f"runs:/{run_id}/{path}@sha256:{digest}", KIND,
                  input_range=inner.input_range,
                  details={**inner.details, "format": inner.kind, "run_id": run_id,
                           "artifact_path": path, "artifact_sha256": digest})


_DATASET = re.compile(r"^dataset:(?P<run>[^/@]+)/(?P<name>[^@]+?)"
                      r"(?:@(?P<digest>[0-9a-fA-F]{8,64}))?$")
DATASET_KIND = "mlflow-dataset"


def is_logged_dataset(ref) -> bool:
    return isinstance(ref, str) and bool(_DATASET.match(ref))


def load_logged_dataset(ref: str, *, input_range, **options) -> Loaded:
    """The ``mlflow.data`` dataset ``ref`` names (``dataset:RUN_ID/NAME[@DIGEST]``), read from
    its source and checked against its logged digest (see the module doc)."""
    import mlflow
    from mlflow.data import get_source

    match = _DATASET.match(ref)
    if match is None:
        raise DataError(f"{ref!r} is not dataset:RUN_ID/NAME[@DIGEST]")
    run_id, name, pinned = match["run"], match["name"], match["digest"]
    pinned = pinned.lower() if pinned else None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"{ref}: cannot read run {run_id}: {type(exc).__name__}: "
                        f"{first}") from None
    logged = [d.dataset for d in (run.inputs.dataset_inputs if run.inputs else [])]
    named = [d for d in logged if d.name == name]
    if not named:
        shown = ", ".join(sorted({repr(d.name) for d in logged})) or "none"
        raise DataError(f"{ref}: run {run_id} logged no dataset named {name!r} (its datasets: "
                        f"{shown})")
    digests = sorted({d.digest for d in named})
    if pinned is not None:
        named = [d for d in named if d.digest.lower() == pinned]
        if not named:
            raise DataError(f"{ref}: run {run_id} logged dataset {name!r} with digest "
                            f"{', '.join(digests)}, not the pinned {pinned}; refused")
    elif len(digests) > 1:
        raise DataError(f"{ref}: run {run_id} logged dataset {name!r} with digests "
                        f"{', '.join(digests)}; pin one: dataset:{run_id}/{name}@DIGEST")
    dataset = named[0]
    try:
        source = get_source(dataset)
    except Exception as exc:
        raise DataError(f"{ref}: cannot read the dataset's source ({dataset.source_type}): "
                        f"{type(exc).__name__}: {exc}") from None
    if dataset.source_type not in _READABLE_SOURCES:
        raise DataError(f"{ref}: the dataset's source is of type {dataset.source_type!r}, "
                        "which holds no data robust_cert can read; log the dataset with the "
                        "path or artifact URI of a .csv, .parquet or .npz file or an image "
                        "folder as its source (mlflow.data.from_pandas(df, source=...))")
    with tempfile.TemporaryDirectory(prefix="robust_cert_data_") as tmp:
        try:
            local = Path(source.load(dst_path=tmp))  # type: ignore[call-arg]
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(f"{ref}: cannot download the dataset's source {dataset.source}: "
                            f"{type(exc).__name__}: {first}") from None
        inner = CORE_SOURCES.load(str(local), input_range=input_range, options=options)
        if not isinstance(inner, Loaded):
            raise DataError(f"{ref}: the dataset's source is not evaluation data robust_cert "
                            "reads")
        found = _mlflow_digest(local, inner)
        if dataset.digest.lower() != found:  # a dataset robust_cert logged: its SHA-256
            ours = loaded_sha256(inner, input_range)[:len(dataset.digest)]
            found = ours if dataset.digest.lower() == ours else found or ours
    if dataset.digest.lower() != found:
        raise DataError(f"{ref}: the data at the dataset's source has digest {found}, not "
                        f"the digest {dataset.digest} run {run_id} logged for {name!r}; "
                        "refused (the source changed since it was logged)")
    return Loaded(inner.x, inner.y, name, f"dataset:{run_id}/{name}@{dataset.digest}",
                  DATASET_KIND, input_range=inner.input_range,
                  details={**inner.details, "format": inner.kind, "run_id": run_id,
                           "dataset_name": name, "dataset_digest": dataset.digest,
                           "dataset_source_type": dataset.source_type,
                           "dataset_source": dataset.source})


#: Source types whose ``load`` gives a local file or folder.
_READABLE_SOURCES = ("local", "http", "s3", "gs", "gcs", "wasbs", "hdfs", "ftp", "sftp",
                     "dbfs", "mlflow-artifacts", "uc_volume")


def _mlflow_digest(local: Path, inner: Loaded) -> str:
    """MLflow's digest of the data read, lower case: ``from_pandas`` of a table as pandas
    reads it, ``from_numpy`` of an ``.npz``'s ``x`` and ``y``; "" for other formats."""
    import warnings

    import numpy as np
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.data.pandas_dataset import from_pandas

    with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
        warnings.simplefilter("ignore", UserWarning)
        if inner.kind in ("csv", "parquet"):
            import pandas as pd

            frame = pd.read_csv(local) if inner.kind == "csv" else pd.read_parquet(local)
            return from_pandas(frame).digest.lower()
        if inner.kind == "npz":
            with np.load(local, allow_pickle=False) as f:
                return from_numpy(f["x"], targets=f["y"]).digest.lower()
    return ""


#: What the entry point registers.
SOURCES = [Source("runs:/RUN_ID/PATH[@sha256:HEX] (data an MLflow run logged as an artifact)",
                  is_run_artifact, load_run_artifact,
                  options=("label", "categories", "image_size", "mode")),
           Source("dataset:RUN_ID/NAME[@DIGEST] (an mlflow.data dataset a run logged)",
                  is_logged_dataset, load_logged_dataset,
                  options=("label", "categories", "image_size", "mode"))]
