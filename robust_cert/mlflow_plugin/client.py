"""The MLflow client: connecting to a tracking server, checking it answers, URIs without
credentials."""

from __future__ import annotations

import contextlib
import os

from robust_cert.errors import TrackingError

#: The environment variables MLflow exports when its tracking / registry URI is set.
_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def tracking_scope():
    """Run the block with MLflow's tracking and registry URIs as they are now, and leave them
    so afterwards: whatever :func:`connect` (or MLflow's fluent API) sets inside — the two
    process-wide URIs and the ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` variables
    MLflow exports with them — is restored on exit, on error and on interrupt too. The Python
    API's ``tracking_uri=`` arguments therefore apply to that one call, not to the rest of
    the caller's process (a notebook keeps its own server)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    saved = (getattr(tracking, "_tracking_uri", None), getattr(registry, "_registry_uri", None),
             {k: os.environ.get(k) for k in _URI_ENV})
    try:
        yield
    finally:
        if getattr(tracking, "_tracking_uri", None) != saved[0]:
            # (also resets what MLflow keeps per URI; None, which its code handles, unsets it)
            mlflow.set_tracking_uri(saved[0])  # pyright: ignore[reportArgumentType]
        registry._registry_uri = saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connect(tracking_uri: str | None = None):
    """An MlflowClient for ``tracking_uri`` (also the registry; default: MLflow's own
    resolution), after checking that the server answers. This sets MLflow's process-wide
    URIs, which the fluent calls of a certification read: callers of the Python API run it
    inside :func:`tracking_scope`, which puts them back afterwards."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    check_server(mlflow.get_tracking_uri())
    return MlflowClient()
#: The MLflow store modules a tracking URI's scheme is read and written through (the
#: tracking store and the model registry's), which MLflow imports when it first connects.
_STORE_MODULES = {
    scheme: ("mlflow.store.tracking.sqlalchemy_store",
             "mlflow.store.model_registry.sqlalchemy_store")
    for scheme in ("sqlite", "postgresql", "mysql", "mssql")
}


def import_store_modules(tracking_uri: str | None = None) -> None:
    """Import now what connecting to ``tracking_uri`` (default: MLflow's own resolution) will
    import — mlflow, its client and, for a database URI, its SQLAlchemy stores (about a second
    of imports) — so that a command can import everything it needs in one stretch (see
    ``robust_cert.cli``). Touches no server and no file; a store module that this MLflow does
    not have is left to MLflow to find when it connects."""
    import importlib

    import mlflow
    import mlflow.tracking  # (the client)

    uri = tracking_uri or mlflow.get_tracking_uri()
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    for module in _STORE_MODULES.get(scheme, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


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


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without credentials: ``user:password@`` and the query string are dropped."""
    if not uri:
        return uri
    scheme, sep, rest = uri.partition("://")
    if not sep:  # a local path
        return uri
    authority, slash, path = rest.split("?", 1)[0].split("#", 1)[0].partition("/")
    return f"{scheme}://{authority.rsplit('@', 1)[-1]}{slash}{path}"


def current_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
