"""Verify certificates and ask the registry to promote a version (the server decides)."""

from __future__ import annotations

from dataclasses import dataclass

from robust_cert.certificate import Certificate
from robust_cert.errors import RobustCertError, TrackingError
from robust_cert.mlflow_plugin.gate import CERT_TAG
from robust_cert.signing import Keyring, SignatureError, verify_claim


@dataclass
class Verification:
    ok: bool
    message: str
    claim: dict | None = None


def verify_certificate_file(cert: Certificate, keyring: Keyring) -> Verification:
    """A certificate JSON verifies when its digest matches its content (checked on load),
    it carries a signature, the signature verifies, and the signed claim names this digest."""
    if cert.signature is None:
        return Verification(False, "certificate is not signed")
    import json

    try:
        claim = verify_claim(json.dumps(cert.signature), keyring)
    except SignatureError as exc:
        return Verification(False, str(exc))
    if claim["certificate_digest"] != cert.digest:
        return Verification(False, "the signature covers another certificate (digest differs)")
    if claim["verdict"] != cert.verdict:
        return Verification(False, "the signed verdict differs from the certificate's")
    return Verification(True, f"valid signature; verdict {claim['verdict']} for "
                              f"{claim['model']} v{claim['version']}", claim)


def verify_version(client, name: str, version: str, keyring: Keyring,
                   *, check_artifacts: bool = True) -> Verification:
    """The version's certificate tag verifies, names it, and (by default) its model artifacts
    still hash to the certified SHA-256."""
    from robust_cert.mlflow_plugin.models import (
        artifacts_sha256,
        download_version,
        resolve_version,
    )

    mv = resolve_version(client, f"models:/{name}/{version}")
    value = mv.tags.get(CERT_TAG)
    if not value:
        return Verification(False, f"{name} v{version} has no certificate tag")
    try:
        claim = verify_claim(value, keyring, name=name, version=str(version))
    except SignatureError as exc:
        return Verification(False, str(exc))
    if check_artifacts:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            if artifacts_sha256(download_version(name, version, tmp)) != claim["model_sha256"]:
                return Verification(False, "model artifacts no longer match the certified "
                                           "SHA-256", claim)
    return Verification(True, f"valid signature; verdict {claim['verdict']} under policy "
                              f"{claim['policy']!r}, issued {claim['issued_at']}", claim)


def has_current_certificate(client, name: str, version: str, keyring: Keyring | None) -> bool:
    """True when the version already carries a certificate this key verifies (any verdict)."""
    if keyring is None:
        return False
    try:
        return verify_version(client, name, version, keyring, check_artifacts=False).ok
    except RobustCertError:
        return False


def request_alias(client, name: str, version: str, alias: str) -> None:
    """Ask the server to set the alias; a gate refusal becomes a RobustCertError with the
    server's message."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "PERMISSION_DENIED":
            raise PromotionRefused(exc.message) from None
        raise TrackingError(f"setting alias {alias!r} failed: {exc.message}") from None


class PromotionRefused(RobustCertError):
    """The registry (its robust_cert gate) refused the promotion."""
