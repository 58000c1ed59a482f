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

Registered through the entry-point group ``robust_cert.data_sources`` (pyproject.toml), so
the core never imports MLflow. Logged ``mlflow.data`` datasets (``mlflow.log_input``) are
not read: MLflow stores their schema, digest and a pointer to their source, not the data.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

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


#: What the entry point registers.
SOURCES = [Source("runs:/RUN_ID/PATH[@sha256:HEX] (data an MLflow run logged as an artifact)",
                  is_run_artifact, load_run_artifact,
                  options=("label", "categories", "image_size", "mode"))]
