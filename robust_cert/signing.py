"""HMAC-SHA256 signatures over certification claims: what the registry gate trusts.

A *claim* names exactly what was certified (model name, version, SHA-256 of the model
artifacts, policy name and hash, verdict, run id, issue time, certificate digest). Anyone
with EDIT permission can write registry tags, so the gate trusts a claim only when its
signature verifies under a key the certifier holds.

Keys: ``$ROBUST_CERT_SIGNING_KEY`` (the key itself) or ``$ROBUST_CERT_SIGNING_KEY_FILE`` (a
file with one key per line). The first key signs; every listed key verifies, so a key is
rotated by putting the new key first, keeping the old one on the second line until every
certificate it signed has been re-issued, then deleting it. Keys are identified in a
signature by ``kid``, the first 16 hex digits of SHA-256(key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from robust_cert.errors import RobustCertError

KEY_ENV = "ROBUST_CERT_SIGNING_KEY"
KEY_FILE_ENV = "ROBUST_CERT_SIGNING_KEY_FILE"
MIN_KEY_BYTES = 16
CLAIM_FIELDS = ("model", "version", "model_sha256", "policy", "policy_sha256", "verdict",
                "run_id", "issued_at", "certificate_digest")


class SignatureError(RobustCertError):
    """A claim that does not verify, or names something other than expected."""


class SigningKeyError(RobustCertError):
    """No usable signing key is configured."""


@dataclass(frozen=True)
class Keyring:
    """Signing key (the first) and every key accepted for verification, by key id."""

    keys: tuple[bytes, ...]

    @property
    def signing_key(self) -> bytes:
        return self.keys[0]

    @staticmethod
    def kid(key: bytes) -> str:
        return hashlib.sha256(key).hexdigest()[:16]

    def find(self, kid: str) -> bytes | None:
        return next((k for k in self.keys if hmac.compare_digest(self.kid(k), kid)), None)

    @classmethod
    def from_env(cls, environ=None) -> Keyring:
        """Read the keys; raise naming the settings when none is configured."""
        env = os.environ if environ is None else environ
        raw: list[str] = []
        if env.get(KEY_FILE_ENV):
            path = Path(env[KEY_FILE_ENV])
            try:
                raw = [ln.strip() for ln in path.read_text().splitlines()
                       if ln.strip() and not ln.lstrip().startswith("#")]
            except OSError as exc:
                raise SigningKeyError(f"{KEY_FILE_ENV}={path}: cannot read the key file "
                                f"({exc.strerror})") from None
        elif env.get(KEY_ENV):
            raw = [env[KEY_ENV].strip()]
        if not raw:
            raise SigningKeyError(f"no signing key: set {KEY_ENV} (the key) or {KEY_FILE_ENV} "
                                  "(a file with one key per line, the first signs)")
        keys = tuple(k.encode() for k in raw)
        short = [i for i, k in enumerate(keys) if len(k) < MIN_KEY_BYTES]
        if short:
            raise SigningKeyError(f"signing key #{short[0] + 1} is shorter than {MIN_KEY_BYTES} "
                            "bytes; generate one with: python -c 'import secrets; "
                            "print(secrets.token_hex(32))'")
        return cls(keys)


def _canonical(claim: dict) -> bytes:
    return json.dumps(claim, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_claim(claim: dict, keyring: Keyring) -> str:
    """The registry tag value: canonical JSON ``{"claim": …, "kid": …, "sig": …}``."""
    missing = [f for f in CLAIM_FIELDS if f not in claim]
    if missing:
        raise ValueError(f"claim lacks {', '.join(missing)}")
    key = keyring.signing_key
    sig = hmac.new(key, _canonical(claim), hashlib.sha256).digest()
    return json.dumps({"claim": claim, "kid": Keyring.kid(key),
                       "sig": base64.b64encode(sig).decode()},
                      sort_keys=True, separators=(",", ":"))


def verify_claim(value: str, keyring: Keyring, *, name: str | None = None,
                 version: str | None = None) -> dict:
    """Return the claim if ``value`` carries a valid signature (and names ``name``/``version``
    when given); raise SignatureError saying why not. Comparison is constant-time."""
    try:
        doc = json.loads(value)
        claim, kid, sig = doc["claim"], doc["kid"], base64.b64decode(doc["sig"], validate=True)
        if not isinstance(claim, dict):
            raise TypeError("claim is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"malformed certificate tag ({exc})") from None
    key = keyring.find(str(kid))
    if key is None:
        raise SignatureError(f"certificate signed with an unknown key (kid {kid})")
    expected = hmac.new(key, _canonical(claim), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, sig):
        raise SignatureError("certificate signature does not verify: the tag was altered or "
                             "forged")
    missing = [f for f in CLAIM_FIELDS if f not in claim]
    if missing:
        raise SignatureError(f"certificate claim lacks {', '.join(missing)}")
    if name is not None and claim["model"] != name:
        raise SignatureError(f"certificate names model {claim['model']!r}, not {name!r}")
    if version is not None and str(claim["version"]) != str(version):
        raise SignatureError(f"certificate names version {claim['version']}, not {version}")
    return claim
