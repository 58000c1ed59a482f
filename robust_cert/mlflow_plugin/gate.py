"""Registry gate: an MLflow model-registry store that refuses uncertified promotions.

Installed as the ``robustcert+sqlite://`` / ``robustcert+postgresql://`` schemes
(entry point group ``mlflow.model_registry_store``) and started as::

    mlflow server --backend-store-uri sqlite:///mlflow.db \\
                  --registry-store-uri robustcert+sqlite:///mlflow.db

Guarantees (every user-writable field — tags, descriptions, version strings, artifacts — is
treated as attacker-controlled):

- A protected alias or the Production stage is set only for a version whose certificate tag
  verifies under one of the server's public keys, names this model and (canonical) version,
  is a PASS under an allowed policy, is the certificate the ledger recorded as the version's
  current one, and whose model artifacts still hash to the certified SHA-256 (always checked).
- A certificate tag is accepted only if it verifies and is strictly newer than every
  certificate accepted or removed for the version before (a per-version sequence in the
  ledger): an older or equal claim, e.g. a PASS a later FAIL replaced in the same second, or
  a removed one, cannot be written back. Removing the tag revokes it in the ledger first.
- Versions are MLflow's canonical integers everywhere (``"01"`` and ``"1"`` are one version).
- Prompts are exempt only when the registered model was *created* as a prompt (MLflow's
  marker ``mlflow.prompt.is_prompt=true`` on the registered model), the version was created as
  a prompt version (the marker on the version) and its source is an MLflow prompt placeholder.
  The gate refuses to set or delete the marker afterwards, on registered models and versions
  alike, so the marker is state the server fixed at creation, not a switch a user can flip.

Refusals are ``PERMISSION_DENIED`` (HTTP 403: clients do not retry them) with a message
saying what to do. Settings (environment of the server):

- ``ROBUST_CERT_PUBLIC_KEYS``: required, the certifier's public key(s) (see
  :mod:`robust_cert.signing`); the server refuses registry requests without it. The server
  never needs the private key.
- ``ROBUST_CERT_PROTECTED_ALIASES``: comma-separated, case-insensitive (default
  ``production,champion``).
- ``ROBUST_CERT_ALLOWED_POLICIES``: comma-separated policy names or SHA-256 hashes allowed
  for production (default: any policy).
- ``ROBUST_CERT_ROUTES``: a routes file (:mod:`robust_cert.routes`): models of an exempt rule
  are promoted freely; a model of a required rule needs a PASS under a policy its rule names
  (name and SHA-256); a model no rule matches follows the file's ``default`` (required: the
  allowed policies above; exempt). Read at start (an invalid file stops the server); a
  restart applies a changed file.

mlflow internals are imported inside functions and in the class factory: a store module that
imports mlflow at its top can hit a circular import, which MLflow turns into a warning and an
unregistered scheme.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import cast

from robust_cert.mlflow_plugin.names import CERT_TAG
from robust_cert.verdicts import Verdict

log = logging.getLogger(__name__)

PROMPT_TAG = "mlflow.prompt.is_prompt"
#: MLflow's prompt source placeholders (the client's and the store's); MLflow's server refuses
#: a prompt-marked version with any other source.
PROMPT_SOURCES = frozenset({"dummy-source", "prompt-template"})
SCHEME_PREFIX = "robustcert+"
DEFAULT_PROTECTED = ("production", "champion")
#: Removed setting: artifacts are always verified. Named so that a server that still sets it
#: says so loudly at start.
REMOVED_VERIFY_SWITCH = "ROBUST_CERT_VERIFY_ARTIFACTS"


def _setting_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return tuple(s.strip() for s in raw.split(",") if s.strip())


def _denied(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    return MlflowException(f"robust_cert gate: {message}", error_code=PERMISSION_DENIED)


def _version_number(version) -> int | None:
    """The integer MLflow's SQL store itself takes from ``version`` (``int(version)``), or
    None when MLflow would refuse it (the store then raises its own 400)."""
    try:
        number = int(str(version))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _routes_from_env():
    """The routes file named by ``ROBUST_CERT_ROUTES``, loaded (its policies hashed; the gate
    never reads evaluation data), or None. An invalid file raises: ``mlflow server`` then
    refuses to start, naming the file and line. Read once, when the server starts: a changed
    file applies after a restart."""
    from robust_cert.routes import ROUTES_ENV, load_routes

    path = os.environ.get(ROUTES_ENV)
    if not path:
        return None
    routes = load_routes(path, check_data=False)
    for warning in routes.warnings:
        log.warning("robust_cert gate: %s: %s", path, warning)
    log.info("robust_cert gate: routes %s (sha256 %s)", path, routes.digest)
    return routes


def _store_class():
    from mlflow.entities.model_registry.model_version_stages import get_canonical_stage
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    from robust_cert.errors import RobustCertError
    from robust_cert.signing import (
        KEY_ENV,
        KEY_FILE_ENV,
        Keyring,
        SignatureError,
        token_sha256,
        verify_claim,
    )

    class GatedRegistryStore(SqlAlchemyStore):
        """SqlAlchemyStore (webhooks included) plus the certification checks."""

        def __init__(self, store_uri, tracking_uri=None):
            if not store_uri.startswith(SCHEME_PREFIX):
                raise ValueError(f"registry store URI must start with {SCHEME_PREFIX}")
            # without a key nothing can be verified: refuse every registry request, with a
            # 4xx (a 5xx would make clients retry for minutes) naming the setting
            try:
                self.keyring = Keyring.public_from_env()
            except RobustCertError as exc:
                raise _denied(f"the registry is not configured: {exc}; set it in the MLflow "
                              "server's environment and restart") from None
            if os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV):
                log.warning("robust_cert gate: %s/%s is set in the MLflow server's environment; "
                            "the gate uses only the public keys (%s) and the server should not "
                            "hold the certifier's private key", KEY_ENV, KEY_FILE_ENV,
                            ", ".join(sorted(self.keyring.public)))
            if REMOVED_VERIFY_SWITCH in os.environ:
                log.error("robust_cert gate: %s=%s is IGNORED: the setting was removed and the "
                          "gate always re-hashes model artifacts at promotion; unset it",
                          REMOVED_VERIFY_SWITCH, os.environ[REMOVED_VERIFY_SWITCH])
            self.protected = {a.lower() for a in _setting_list(
                "ROBUST_CERT_PROTECTED_ALIASES", DEFAULT_PROTECTED)}
            self.allowed_policies = set(_setting_list("ROBUST_CERT_ALLOWED_POLICIES", ()))
            self.routes = _routes_from_env()  # an invalid file stops the server from starting
            super().__init__(store_uri.removeprefix(SCHEME_PREFIX))
            self.ledger = Ledger(self.engine)

        # ---- checks -------------------------------------------------------------------
        def _is_prompt(self, name: str, version) -> bool:
            """A prompt version of a prompt: markers fixed at creation (see module doc)."""
            try:
                rm = self.get_registered_model(name)
                model_tags = getattr(rm, "_tags", None) or {}
                mv = self.get_model_version(name, version)
            except Exception:
                return False
            return (model_tags.get(PROMPT_TAG) == "true" and mv.tags.get(PROMPT_TAG) == "true"
                    and mv.source in PROMPT_SOURCES)

        def _gated(self, name: str, version, action: str) -> None:
            """Refuse ``action`` unless the routes exempt the model or it holds a
            certificate its route accepts (see :meth:`_require_certificate`)."""
            if self._is_prompt(name, version):
                return
            route = self.routes.route_for(name) if self.routes is not None else None
            if route is not None and route.gate == "exempt":
                assert self.routes is not None  # the route is theirs
                log.info("robust_cert gate: %s: %s is exempt (%s of %s)", action, name,
                         route.label, self.routes.path)
                return
            self._require_certificate(name, version, action, route)

        def _require_certificate(self, name: str, version, action: str, route=None) -> None:
            number = _version_number(version)
            mv = self.get_model_version(name, version)  # MLflow's own error if absent
            how = (f"certify it first: robust-cert promote {name} {number} (or robust-cert "
                   f"certify models:/{name}/{number} --policy POLICY)")
            value = mv.tags.get(CERT_TAG)
            if not value:
                raise _denied(f"{action} refused: {name} v{number} has no signed robust_cert "
                              f"certificate; {how}")
            try:
                claim = verify_claim(value, self.keyring, name=name, version=number)
            except SignatureError as exc:
                raise _denied(f"{action} refused: {exc}; {how}") from None
            # (number is an int: MLflow refused a version without one above)
            if self.ledger.current(name, cast(int, number)) != token_sha256(value):
                raise _denied(f"{action} refused: the certificate tag of {name} v{number} is not "
                              "the one the registry recorded as current (it was revoked, "
                              "superseded, or written around the gate); " + how)
            if claim["verdict"] != Verdict.PASS:
                raise _denied(f"{action} refused: {name} v{number} did not pass certification "
                              f"(verdict {claim['verdict']} under policy {claim['policy']!r}); "
                              "promote a version that passes")
            if route is not None and route.rule is not None:
                if not route.accepts(claim["policy"], claim["policy_sha256"]):
                    wanted = " or ".join(f"{p.name!r} (sha256 {p.sha256[:12]}…)"
                                         for p in route.policies)
                    raise _denied(f"{action} refused: {name} falls under {route.label} of the "
                                  f"routes file, which requires a certificate under policy "
                                  f"{wanted}; v{number} was certified under "
                                  f"{claim['policy']!r} (sha256 {claim['policy_sha256'][:12]}…)"
                                  f"; {how}")
            elif self.allowed_policies and not (
                    {claim["policy"], claim["policy_sha256"]} & self.allowed_policies):
                raise _denied(f"{action} refused: policy {claim['policy']!r} is not allowed for "
                              f"production (allowed: {', '.join(sorted(self.allowed_policies))}); "
                              "certify under an allowed policy")
            actual = self._artifacts_sha256(mv)
            if actual != claim["model_sha256"]:
                raise _denied(f"{action} refused: the model artifacts of {name} v{number} "
                              "no longer match the certified SHA-256; re-certify the version")

        def _artifacts_sha256(self, mv) -> str:
            from robust_cert.mlflow_plugin.registry import artifacts_sha256

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
            if str(alias).lower() in self.protected:
                self._gated(name, version, f"setting alias {alias!r}")
            return super().set_registered_model_alias(name, alias, version)

        def transition_model_version_stage(self, name, version, stage,
                                           archive_existing_versions):
            if get_canonical_stage(str(stage)) == "Production":
                self._gated(name, version, "transition to Production")
            return super().transition_model_version_stage(name, version, stage,
                                                          archive_existing_versions)

        def set_model_version_tag(self, name, version, tag):
            if tag.key == PROMPT_TAG:
                raise _denied(f"the prompt marker {PROMPT_TAG} is fixed when a version is "
                              "created; it cannot be set afterwards")
            if tag.key != CERT_TAG:
                return super().set_model_version_tag(name, version, tag)
            number = _version_number(version)
            if number is None:
                return super().set_model_version_tag(name, version, tag)  # MLflow's 400
            self.get_model_version(name, version)  # MLflow's 404 if the version is absent
            try:
                claim = verify_claim(tag.value, self.keyring, name=name, version=number)
            except SignatureError as exc:
                raise _denied(f"certificate tag refused: {exc}") from None
            # the ledger first: if the tag write then fails, the ledger names a certificate
            # the version does not carry, and promotion is refused (fails closed)
            why = self.ledger.accept(name, number, claim["issued_us"], token_sha256(tag.value))
            if why:  # a replayed older (or same-time) certificate
                raise _denied(f"certificate tag refused: {why}")
            return super().set_model_version_tag(name, version, tag)

        def delete_model_version_tag(self, name, version, key):
            if key == PROMPT_TAG:
                raise _denied(f"the prompt marker {PROMPT_TAG} is fixed when a version is "
                              "created; it cannot be deleted")
            number = _version_number(version)
            if key == CERT_TAG and number is not None:
                self.get_model_version(name, version)  # MLflow's 404 if the version is absent
                self.ledger.revoke(name, number)  # removing a certificate revokes it for good
            return super().delete_model_version_tag(name, version, key)

        def set_registered_model_tag(self, name, tag):
            if tag.key == PROMPT_TAG:
                raise _denied(f"the prompt marker {PROMPT_TAG} is fixed when the registered "
                              "model is created (mlflow.genai.register_prompt); it cannot be "
                              "set afterwards")
            return super().set_registered_model_tag(name, tag)

        def delete_registered_model_tag(self, name, key):
            if key == PROMPT_TAG:
                raise _denied(f"the prompt marker {PROMPT_TAG} is fixed when the registered "
                              "model is created; it cannot be deleted")
            return super().delete_registered_model_tag(name, key)

        def create_model_version(self, name, source, run_id=None, tags=None, *args, **kwargs):
            if any(t.key == CERT_TAG for t in tags or []):
                raise _denied("certificate tag refused: a new or copied version cannot come "
                              "with a certificate; certify it after it is registered")
            return super().create_model_version(name, source, run_id, tags, *args, **kwargs)

    return GatedRegistryStore


class Ledger:
    """Per version (canonical integer), a strictly increasing sequence of certificate events,
    in the registry's own database.

    Table ``robust_cert_claims`` holds, per (name, version): ``seq`` (bumped by every
    accepted or removed certificate), ``last_issued_us`` (the newest issue time, in the
    certifier's microseconds, ever accepted) and ``current_sha256`` (SHA-256 of the one
    certificate tag the version may be promoted with; NULL once removed). Table
    ``robust_cert_claim_log`` keeps every event (accepted / removed) for audit.

    It stops replays: a certificate is a signed, self-contained claim, so without this a user
    who kept an old PASS tag could write it back after a newer FAIL replaced it (even within
    the same second), or after it was removed. Acceptance is one conditional UPDATE
    (``last_issued_us < new``), atomic on sqlite and PostgreSQL alike.
    """

    def __init__(self, engine):
        from sqlalchemy import text

        self.engine = engine
        with engine.begin() as conn:
            conn.execute(text(
                "CREATE TABLE IF NOT EXISTS robust_cert_claims ("
                " name VARCHAR(256) NOT NULL, version BIGINT NOT NULL,"
                " seq BIGINT NOT NULL, last_issued_us BIGINT NOT NULL,"
                " current_sha256 VARCHAR(64), PRIMARY KEY (name, version))"))
            conn.execute(text(
                "CREATE TABLE IF NOT EXISTS robust_cert_claim_log ("
                " name VARCHAR(256) NOT NULL, version BIGINT NOT NULL, seq BIGINT NOT NULL,"
                " event VARCHAR(16) NOT NULL, issued_us BIGINT, token_sha256 VARCHAR(64),"
                " at_ms BIGINT NOT NULL, PRIMARY KEY (name, version, seq))"))

    def _ensure(self, conn, name: str, version: int) -> None:
        from sqlalchemy import text

        conn.execute(text(
            "INSERT INTO robust_cert_claims (name, version, seq, last_issued_us, current_sha256)"
            " VALUES (:n, :v, 0, 0, NULL) ON CONFLICT (name, version) DO NOTHING"),
            {"n": name, "v": version})

    def _log(self, conn, name, version, event, issued_us, sha) -> int:
        from sqlalchemy import text

        seq = conn.execute(text(
            "SELECT seq FROM robust_cert_claims WHERE name = :n AND version = :v"),
            {"n": name, "v": version}).scalar_one()
        conn.execute(text(
            "INSERT INTO robust_cert_claim_log (name, version, seq, event, issued_us,"
            " token_sha256, at_ms) VALUES (:n, :v, :s, :e, :i, :t, :a)"),
            {"n": name, "v": version, "s": seq, "e": event, "i": issued_us, "t": sha,
             "a": int(time.time() * 1000)})
        return seq

    def accept(self, name: str, version: int, issued_us: int, sha: str) -> str | None:
        """Record ``sha`` as the version's current certificate if it was issued strictly
        after every certificate accepted before; else return why not (nothing changes)."""
        from sqlalchemy import text

        with self.engine.begin() as conn:
            self._ensure(conn, name, version)
            done = conn.execute(text(
                "UPDATE robust_cert_claims SET seq = seq + 1, last_issued_us = :i,"
                " current_sha256 = :t WHERE name = :n AND version = :v AND last_issued_us < :i"),
                {"n": name, "v": version, "i": issued_us, "t": sha}).rowcount
            if done == 1:
                self._log(conn, name, version, "accepted", issued_us, sha)
                return None
            last = conn.execute(text(
                "SELECT last_issued_us FROM robust_cert_claims WHERE name = :n AND version = :v"),
                {"n": name, "v": version}).scalar_one()
        from robust_cert.signing import issued_at_text

        return (f"this certificate (issued {issued_at_text(issued_us)}) is not newer than one "
                f"already accepted for {name} v{version} (issued {issued_at_text(last)}): an "
                "older, replayed or removed certificate cannot be written back; re-certify")

    def revoke(self, name: str, version: int) -> None:
        """The version's certificate tag is being removed: nothing is current any more."""
        from sqlalchemy import text

        with self.engine.begin() as conn:
            self._ensure(conn, name, version)
            conn.execute(text(
                "UPDATE robust_cert_claims SET seq = seq + 1, current_sha256 = NULL"
                " WHERE name = :n AND version = :v"), {"n": name, "v": version})
            self._log(conn, name, version, "removed", None, None)

    def current(self, name: str, version: int) -> str | None:
        from sqlalchemy import text

        with self.engine.begin() as conn:
            return conn.execute(text(
                "SELECT current_sha256 FROM robust_cert_claims WHERE name = :n AND version = :v"),
                {"n": name, "v": version}).scalar()

    def events(self, name: str, version: int) -> list[tuple]:
        """(seq, event, issued_us) of every recorded event, oldest first."""
        from sqlalchemy import text

        with self.engine.begin() as conn:
            return [tuple(r) for r in conn.execute(text(
                "SELECT seq, event, issued_us FROM robust_cert_claim_log"
                " WHERE name = :n AND version = :v ORDER BY seq"), {"n": name, "v": version})]


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
