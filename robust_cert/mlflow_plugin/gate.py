"""Registry gate: an MLflow model-registry store that refuses uncertified promotions.

Installed as the ``robustcert+sqlite://`` / ``robustcert+postgresql://`` schemes
(entry point group ``mlflow.model_registry_store``) and started as::

    mlflow server --backend-store-uri sqlite:///mlflow.db \\
                  --registry-store-uri robustcert+sqlite:///mlflow.db

Refusals are ``PERMISSION_DENIED`` (HTTP 403: clients do not retry them) with a message
saying what to do. Settings (environment of the server):

- ``ROBUST_CERT_SIGNING_KEY`` / ``ROBUST_CERT_SIGNING_KEY_FILE``: required; the server refuses
  to start without them (see :mod:`robust_cert.signing`).
- ``ROBUST_CERT_PROTECTED_ALIASES``: comma-separated, case-insensitive (default
  ``production,champion``).
- ``ROBUST_CERT_ALLOWED_POLICIES``: comma-separated policy names or SHA-256 hashes allowed
  for production (default: any policy).
- ``ROBUST_CERT_VERIFY_ARTIFACTS``: ``true`` (default) re-hashes the model artifacts at
  promotion and refuses when they no longer match the certificate.

mlflow internals are imported inside functions and in the class factory: a store module that
imports mlflow at its top can hit a circular import, which MLflow turns into a warning and an
unregistered scheme.
"""

from __future__ import annotations

import logging
import os
import tempfile

log = logging.getLogger(__name__)

CERT_TAG = "robust_cert.certificate"
PROMPT_TAG = "mlflow.prompt.is_prompt"
SCHEME_PREFIX = "robustcert+"
DEFAULT_PROTECTED = ("production", "champion")


def _setting_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return tuple(s.strip() for s in raw.split(",") if s.strip())


def _denied(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    return MlflowException(f"robust_cert gate: {message}", error_code=PERMISSION_DENIED)


def _store_class():
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    from robust_cert.errors import RobustCertError
    from robust_cert.signing import Keyring, SignatureError, verify_claim

    class GatedRegistryStore(SqlAlchemyStore):
        """SqlAlchemyStore (webhooks included) plus the certification checks."""

        def __init__(self, store_uri, tracking_uri=None):
            if not store_uri.startswith(SCHEME_PREFIX):
                raise ValueError(f"registry store URI must start with {SCHEME_PREFIX}")
            # without a key nothing can be verified: refuse every registry request, with a
            # 4xx (a 5xx would make clients retry for minutes) naming the setting
            try:
                self.keyring = Keyring.from_env()
            except RobustCertError as exc:
                raise _denied(f"the registry is not configured: {exc}; set it in the MLflow "
                              "server's environment and restart") from None
            self.protected = {a.lower() for a in _setting_list(
                "ROBUST_CERT_PROTECTED_ALIASES", DEFAULT_PROTECTED)}
            self.allowed_policies = set(_setting_list("ROBUST_CERT_ALLOWED_POLICIES", ()))
            self.verify_artifacts = os.environ.get(
                "ROBUST_CERT_VERIFY_ARTIFACTS", "true").lower() not in ("0", "false", "no")
            super().__init__(store_uri.removeprefix(SCHEME_PREFIX))
            self.ledger = _Ledger(self.engine)

        # ---- checks -------------------------------------------------------------------
        def _is_prompt(self, name: str, version=None) -> bool:
            """Prompts share the alias API; MLflow tags the prompt (and its versions)."""
            try:
                tags = dict(self.get_registered_model(name).tags)
                if version is not None:
                    tags.update(self.get_model_version(name, version).tags)
            except Exception:
                return False
            return str(tags.get(PROMPT_TAG, "")).lower() == "true"

        def _require_certificate(self, name: str, version: str, action: str) -> None:
            mv = self.get_model_version(name, version)
            how = (f"certify it first: robust-cert promote {name} {version} (or robust-cert "
                   f"certify models:/{name}/{version} --policy POLICY)")
            value = mv.tags.get(CERT_TAG)
            if not value:
                raise _denied(f"{action} refused: {name} v{version} has no signed robust_cert "
                              f"certificate; {how}")
            try:
                claim = verify_claim(value, self.keyring, name=name, version=str(version))
            except SignatureError as exc:
                raise _denied(f"{action} refused: {exc}; {how}") from None
            stale = self.ledger.why_stale(name, str(version), claim["issued_at"])
            if stale:
                raise _denied(f"{action} refused: {stale}; {how}")
            if claim["verdict"] != "PASS":
                raise _denied(f"{action} refused: {name} v{version} did not pass certification "
                              f"(verdict {claim['verdict']} under policy {claim['policy']!r}); "
                              "promote a version that passes")
            if self.allowed_policies and not (
                    {claim["policy"], claim["policy_sha256"]} & self.allowed_policies):
                raise _denied(f"{action} refused: policy {claim['policy']!r} is not allowed for "
                              f"production (allowed: {', '.join(sorted(self.allowed_policies))}); "
                              "certify under an allowed policy")
            if self.verify_artifacts:
                actual = self._artifacts_sha256(mv)
                if actual != claim["model_sha256"]:
                    raise _denied(f"{action} refused: the model artifacts of {name} v{version} "
                                  "no longer match the certified SHA-256; re-certify the version")

        def _artifacts_sha256(self, mv) -> str:
            from robust_cert.mlflow_plugin.models import artifacts_sha256

            try:
                location = self.get_model_version_download_uri(mv.name, mv.version)
                with tempfile.TemporaryDirectory(prefix="robust_cert_gate_") as tmp:
                    local = _download(location, tmp)
                    return artifacts_sha256(local)
            except Exception as exc:
                raise _denied(f"cannot verify the model artifacts of {mv.name} v{mv.version} "
                              f"({type(exc).__name__}: {exc}); refusing to promote") from None

        # ---- gated operations ---------------------------------------------------------
        def set_registered_model_alias(self, name, alias, version):
            if alias.lower() in self.protected and not self._is_prompt(name, version):
                self._require_certificate(name, version, f"setting alias {alias!r}")
            return super().set_registered_model_alias(name, alias, version)

        def transition_model_version_stage(self, name, version, stage,
                                           archive_existing_versions):
            if str(stage).lower() == "production" and not self._is_prompt(name, version):
                self._require_certificate(name, version, "transition to Production")
            return super().transition_model_version_stage(name, version, stage,
                                                          archive_existing_versions)

        def set_model_version_tag(self, name, version, tag):
            if tag.key != CERT_TAG:
                return super().set_model_version_tag(name, version, tag)
            try:
                claim = verify_claim(tag.value, self.keyring, name=name, version=str(version))
            except SignatureError as exc:
                raise _denied(f"certificate tag refused: {exc}") from None
            stale = self.ledger.why_stale(name, str(version), claim["issued_at"])
            if stale:  # a replayed older certificate (e.g. a PASS superseded by a FAIL)
                raise _denied(f"certificate tag refused: {stale}")
            out = super().set_model_version_tag(name, version, tag)
            self.ledger.issued(name, str(version), claim["issued_at"])
            return out

        def delete_model_version_tag(self, name, version, key):
            if key == CERT_TAG:  # removing a certificate revokes it for good
                value = self.get_model_version(name, version).tags.get(CERT_TAG)
                if value:
                    try:
                        claim = verify_claim(value, self.keyring)
                    except SignatureError:
                        claim = None
                    if claim is not None:
                        self.ledger.revoked(name, str(version), claim["issued_at"])
            return super().delete_model_version_tag(name, version, key)

        def create_model_version(self, name, source, run_id=None, tags=None, *args, **kwargs):
            if any(t.key == CERT_TAG for t in tags or []):
                raise _denied("certificate tag refused: a new or copied version cannot come "
                              "with a certificate; certify it after it is registered")
            return super().create_model_version(name, source, run_id, tags, *args, **kwargs)

    return GatedRegistryStore


class _Ledger:
    """Per version, the issue time of the newest certificate accepted and of the newest one
    removed, in the registry's own database (table ``robust_cert_ledger``).

    It stops replays: a certificate is a signed, self-contained claim, so without this a user
    who kept an old PASS tag could write it back after a newer FAIL replaced it, or after it
    was removed. Times are the certifier's (the claims' ``issued_at``), compared as ISO-8601
    UTC strings, so the server's clock plays no part.
    """

    def __init__(self, engine):
        from sqlalchemy import text

        self.engine = engine
        with engine.begin() as conn:
            conn.execute(text(
                "CREATE TABLE IF NOT EXISTS robust_cert_ledger ("
                " name VARCHAR(256) NOT NULL, version VARCHAR(64) NOT NULL,"
                " latest_issued VARCHAR(64), revoked_through VARCHAR(64),"
                " PRIMARY KEY (name, version))"))

    def _row(self, conn, name: str, version: str):
        from sqlalchemy import text

        return conn.execute(text(
            "SELECT latest_issued, revoked_through FROM robust_cert_ledger "
            "WHERE name = :n AND version = :v"), {"n": name, "v": version}).first()

    def why_stale(self, name: str, version: str, issued_at: str) -> str | None:
        """Why a claim issued at ``issued_at`` may no longer be used, or None."""
        with self.engine.begin() as conn:
            row = self._row(conn, name, version)
        if row is None:
            return None
        latest, revoked = row
        if latest and issued_at < latest:
            return (f"this certificate (issued {issued_at}) is older than the one issued for "
                    f"{name} v{version} at {latest}")
        if revoked and issued_at <= revoked:
            return (f"this certificate (issued {issued_at}) was revoked: the certificate of "
                    f"{name} v{version} issued at {revoked} was removed")
        return None

    def _update(self, name: str, version: str, column: str, issued_at: str) -> None:
        from sqlalchemy import text

        with self.engine.begin() as conn:
            row = self._row(conn, name, version)
            if row is None:
                conn.execute(text(
                    f"INSERT INTO robust_cert_ledger (name, version, {column}) "
                    "VALUES (:n, :v, :t)"), {"n": name, "v": version, "t": issued_at})
                return
            current = row[0] if column == "latest_issued" else row[1]
            if current is None or issued_at > current:
                conn.execute(text(
                    f"UPDATE robust_cert_ledger SET {column} = :t "
                    "WHERE name = :n AND version = :v"), {"n": name, "v": version, "t": issued_at})

    def issued(self, name: str, version: str, issued_at: str) -> None:
        self._update(name, version, "latest_issued", issued_at)

    def revoked(self, name: str, version: str, issued_at: str) -> None:
        self._update(name, version, "revoked_through", issued_at)


def _download(location: str, dst: str) -> str:
    """Download model artifacts inside the server (``mlflow-artifacts:`` maps to the server's
    --artifacts-destination)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if location.startswith("mlflow-artifacts:"):
        from mlflow.server.handlers import _get_artifact_repo_mlflow_artifacts

        path = location.removeprefix("mlflow-artifacts:").lstrip("/")
        return _get_artifact_repo_mlflow_artifacts().download_artifacts(path, dst)
    return get_artifact_repository(location).download_artifacts("", dst)


def GatedRegistryStore(store_uri, tracking_uri=None):
    """Entry point for ``mlflow.model_registry_store``: builds the gated store."""
    return _store_class()(store_uri, tracking_uri)
