"""Verifying signed files without MLflow: a certificate JSON and a ``manifest.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from robust_cert.certificate import Certificate
from robust_cert.errors import RobustCertError
from robust_cert.signing import (
    Keyring,
    SignatureError,
    verify_claim,
    verify_manifest,
    verify_signature_block,
)


@dataclass
class Verification:
    ok: bool
    message: str
    claim: dict | None = None


class VerificationError(RobustCertError):
    """A model or certificate did not verify (signature, verdict, policy or artifact hash)."""


def verify_certificate_file(cert: Certificate, keyring: Keyring) -> Verification:
    """A certificate JSON verifies when its digest matches its content (checked on load),
    it carries a signature block, the Ed25519 signature verifies under a trusted key, and the
    signed claim names this digest and verdict."""
    if cert.signature is None:
        return Verification(False, "certificate is not signed")
    try:
        claim = verify_signature_block(cert.signature, keyring)
    except SignatureError as exc:
        return Verification(False, str(exc))
    if claim["certificate_digest"] != cert.digest:
        return Verification(False, "the signature covers another certificate (digest differs)")
    if claim["verdict"] != cert.verdict:
        return Verification(False, "the signed verdict differs from the certificate's")
    return Verification(True, f"valid {cert.signature.get('alg', 'Ed25519')} signature (key "
                              f"{claim['kid']}); verdict {claim['verdict']} for "
                              f"{claim['model']} v{claim['version']}", claim)


def verify_manifest_file(path: str | Path, keyring: Keyring) -> Verification:
    """``manifest.json`` verifies when its signature does and every file it lists, beside it,
    still has the recorded SHA-256 (the report files included)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        manifest = verify_manifest(doc, keyring, root=path.parent)
    except (OSError, ValueError) as exc:
        return Verification(False, f"cannot read {path}: {exc}")
    except SignatureError as exc:
        return Verification(False, str(exc))
    claim = None
    if manifest.get("claim") is not None:  # a certification's manifest: its signed claim too
        try:
            claim = verify_claim(manifest["claim"], keyring, name=manifest["model"],
                                 version=manifest["version"])
        except (SignatureError, KeyError) as exc:
            return Verification(False, f"the manifest's claim does not verify: {exc}")
        if (claim["verdict"], claim["certificate_digest"]) != \
                (manifest.get("verdict"), manifest.get("certificate_digest")):
            return Verification(False, "the manifest's verdict or certificate digest differs "
                                       "from its signed claim")
    what = f"; verdict {claim['verdict']}" if claim else ""
    return Verification(True, f"valid signature (key {doc['kid']}); {len(manifest['files'])} "
                              f"files match: {', '.join(sorted(manifest['files']))}{what}",
                        claim)
