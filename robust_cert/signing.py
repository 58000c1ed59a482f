"""Ed25519 signatures over certification claims: what the registry gate trusts.

A *claim* names exactly what was certified: the model name and (canonical integer) version,
the verdict, the policy name and hash, the SHA-256 of the model artifacts, the certificate
digest, the certification run id, the issue time in microseconds and the signer's key id.
Anyone with EDIT permission can write registry tags, so the gate trusts a claim only when its
signature verifies under a public key it was given.

Keys (asymmetric: whoever verifies cannot sign):

- The **certifier** holds the private key: ``$ROBUST_CERT_SIGNING_KEY`` (the PKCS#8 PEM text)
  or ``$ROBUST_CERT_SIGNING_KEY_FILE`` (a path to it). Make one with ``robust-cert keygen``.
- The **gate** and ``robust-cert verify`` hold public keys only: ``$ROBUST_CERT_PUBLIC_KEYS``,
  either PEM text (one or more ``PUBLIC KEY`` blocks) or a list of paths separated by
  ``os.pathsep`` (``:``), each a PEM file or a directory whose ``*.pem`` files are read. Every
  key listed verifies, so a key is rotated by adding the new public key, switching the
  certifier to the new private key, re-certifying, then removing the old public key.
- A key is named by its key id (``kid``): the first 16 hex digits of SHA-256 of the raw
  32-byte public key. Every claim names the kid that signed it.

The registry tag is a compact token (about 330 characters), not JSON::

    rc1;KID;VERDICT;POLICY;POLICY_SHA256;MODEL_SHA256;CERT_DIGEST;RUN_ID;ISSUED_US;SIG

hashes and the signature in unpadded base64url, the policy name percent-encoded. The model
name and version are not in the token: the signature covers them, so a token copied to
another version does not verify there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from robust_cert.errors import RobustCertError
from robust_cert.verdicts import Verdict

if TYPE_CHECKING:  # cryptography is imported where it is used
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_ENV = "ROBUST_CERT_SIGNING_KEY"
KEY_FILE_ENV = "ROBUST_CERT_SIGNING_KEY_FILE"
PUBLIC_KEYS_ENV = "ROBUST_CERT_PUBLIC_KEYS"
ALG = "Ed25519"
TOKEN_PREFIX = "rc1"
_DOMAIN = b"robust_cert claim v1\n"
_MANIFEST_DOMAIN = b"robust_cert manifest v1\n"
CLAIM_FIELDS = ("model", "version", "verdict", "policy", "policy_sha256", "model_sha256",
                "certificate_digest", "run_id", "issued_us", "kid")
#: the verdicts a claim may carry, as written in the token
VERDICTS = tuple(v.value for v in Verdict)
# \A…\Z, not ^…$: "$" also matches before a trailing newline ("1\n" is not canonical)
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_KID = re.compile(r"\A[0-9a-f]{16}\Z")
_RUN_ID = re.compile(r"\A[0-9a-zA-Z_-]{1,64}\Z")
_CANONICAL_VERSION = re.compile(r"\A[1-9][0-9]{0,17}\Z")


class SignatureError(RobustCertError):
    """A claim that does not verify, or names something other than expected."""


class SigningKeyError(RobustCertError):
    """No usable key is configured."""


def canonical_version(version) -> int:
    """MLflow's canonical version number: a positive integer written without sign, spaces or
    leading zeros. ``"01"``, ``"+1"``, ``" 1"`` and ``1.0`` are refused (ValueError) so that
    one version has one spelling in claims and in the ledger."""
    if isinstance(version, bool):
        raise ValueError(f"version {version!r} is not a version number")
    if isinstance(version, int):
        if version < 1:
            raise ValueError(f"version {version} is not a positive integer")
        return version
    if isinstance(version, str) and _CANONICAL_VERSION.match(version):
        return int(version)
    raise ValueError(f"version {version!r} is not canonical (a positive integer without "
                     "sign, spaces or leading zeros, e.g. '1')")


def kid_of(public_key) -> str:
    """Key id: the first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_private_key_pem() -> str:
    """A new Ed25519 private key as PKCS#8 PEM (unencrypted: protect the file)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return private_pem(Ed25519PrivateKey.generate())


def private_pem(private_key) -> str:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    return private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                     NoEncryption()).decode()


def public_pem(public_key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def _load_private(pem: str, where: str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.strip().encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{where}: not an unencrypted PEM private key ({exc}); make one "
                              "with: robust-cert keygen DIR") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{where}: the private key is not an Ed25519 key; make one with: "
                              "robust-cert keygen DIR")
    return key


_PEM_BLOCK = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


def _load_publics(text: str, where: str) -> list:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    blocks = _PEM_BLOCK.findall(text)
    if not blocks:
        raise SigningKeyError(f"{where}: no '-----BEGIN PUBLIC KEY-----' block (a public key "
                              "PEM, as robust-cert keygen writes it)")
    keys = []
    for block in blocks:
        try:
            key = load_pem_public_key(block.encode())
        except ValueError as exc:
            raise SigningKeyError(f"{where}: unreadable public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"{where}: a public key is not an Ed25519 key")
        keys.append(key)
    return keys


def _read(path: Path, setting: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise SigningKeyError(f"{setting}={path}: cannot read it ({exc.strerror})") from None


@dataclass(frozen=True)
class Keyring:
    """Public keys that verify (by key id) and, for a certifier, the private key that signs.

    The gate builds it with :meth:`public_from_env` (public keys only); certifiers and
    ``verify`` use :meth:`from_env` (the private key if configured, whose public half is
    then also trusted, plus every listed public key)."""

    public: dict = field(default_factory=dict)
    private: Ed25519PrivateKey | None = None

    @property
    def signing_kid(self) -> str | None:
        return None if self.private is None else kid_of(self.private.public_key())

    def find(self, kid: str):
        return self.public.get(kid)

    @classmethod
    def from_private_pem(cls, pem: str, where: str = "private key") -> Keyring:
        key = _load_private(pem, where)
        return cls({kid_of(key.public_key()): key.public_key()}, key)

    @classmethod
    def from_public_pems(cls, *pems: str) -> Keyring:
        keys = [k for pem in pems for k in _load_publics(pem, "public key")]
        return cls({kid_of(k): k for k in keys})

    @staticmethod
    def _private_from_env(env):
        if env.get(KEY_FILE_ENV):
            path = Path(env[KEY_FILE_ENV])
            return _load_private(_read(path, KEY_FILE_ENV), f"{KEY_FILE_ENV}={path}")
        if env.get(KEY_ENV):
            value = env[KEY_ENV].strip()
            if not value.startswith("-----BEGIN"):
                raise SigningKeyError(f"{KEY_ENV} must be the PEM text of an Ed25519 private key "
                                      f"(or use {KEY_FILE_ENV}=PATH); make one with: "
                                      "robust-cert keygen DIR")
            return _load_private(value, KEY_ENV)
        return None

    @staticmethod
    def _publics_from_env(env) -> list:
        raw = env.get(PUBLIC_KEYS_ENV, "").strip()
        if not raw:
            return []
        if raw.startswith("-----BEGIN"):
            return _load_publics(raw, PUBLIC_KEYS_ENV)
        keys = []
        for part in filter(None, raw.split(os.pathsep)):
            path = Path(part)
            if path.is_dir():
                files = sorted(path.glob("*.pem"))
                if not files:
                    raise SigningKeyError(f"{PUBLIC_KEYS_ENV}: directory {path} holds no *.pem")
                for f in files:
                    keys += _load_publics(_read(f, PUBLIC_KEYS_ENV), f"{PUBLIC_KEYS_ENV}: {f}")
            else:
                keys += _load_publics(_read(path, PUBLIC_KEYS_ENV), f"{PUBLIC_KEYS_ENV}: {path}")
        return keys

    @classmethod
    def public_from_env(cls, environ=None) -> Keyring:
        """Public keys only (``$ROBUST_CERT_PUBLIC_KEYS``): what the gate holds. Raises
        SigningKeyError naming the setting when none is configured."""
        env = os.environ if environ is None else environ
        keys = cls._publics_from_env(env)
        if not keys:
            raise SigningKeyError(f"no public key: set {PUBLIC_KEYS_ENV} to the certifier's "
                                  "public key PEM, or to PEM files / directories of *.pem "
                                  f"separated by '{os.pathsep}' (robust-cert keygen writes one)")
        return cls({kid_of(k): k for k in keys})

    @classmethod
    def from_env(cls, environ=None, *, require_private: bool = False) -> Keyring:
        """The private key (if configured) and every trusted public key. Raises
        SigningKeyError naming the settings when nothing is configured, or when
        ``require_private`` and there is no private key."""
        env = os.environ if environ is None else environ
        private = cls._private_from_env(env)
        publics = cls._publics_from_env(env)
        if private is None and (require_private or not publics):
            need = "" if require_private else f", or {PUBLIC_KEYS_ENV} to verify only"
            raise SigningKeyError(f"no signing key: set {KEY_ENV} (PEM text) or {KEY_FILE_ENV} "
                                  f"(a PEM file) to the certifier's Ed25519 private key{need}; "
                                  "make one with: robust-cert keygen DIR")
        keys = {kid_of(k): k for k in publics}
        if private is not None:
            keys[kid_of(private.public_key())] = private.public_key()
        return cls(keys, private)


# ---- claims ------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hex_to_b64(h: str) -> str:
    return _b64(bytes.fromhex(h))


def _b64_to_hex(text: str) -> str:
    raw = _unb64(text)
    if len(raw) != 32:
        raise ValueError("a hash is not 32 bytes")
    return raw.hex()


def issued_at_text(issued_us: int) -> str:
    """ISO-8601 UTC with microseconds, e.g. ``2026-01-31T12:00:00.123456Z``."""
    seconds, micro = divmod(int(issued_us), 1_000_000)
    dt = datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=micro)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_us() -> int:
    """Microseconds since the epoch (UTC), exact."""
    return time.time_ns() // 1000


def _check_claim(claim: dict) -> dict:
    missing = [f for f in CLAIM_FIELDS if f not in claim]
    if missing:
        raise ValueError(f"claim lacks {', '.join(missing)}")
    out = {f: claim[f] for f in CLAIM_FIELDS}
    out["version"] = canonical_version(claim["version"])
    if not isinstance(out["model"], str) or not out["model"]:
        raise ValueError("claim names no model")
    if out["verdict"] not in VERDICTS:
        raise ValueError(f"claim verdict {out['verdict']!r} is not one of {VERDICTS}")
    out["verdict"] = Verdict(out["verdict"]).value  # a plain string, as the token reads back
    for f in ("policy_sha256", "model_sha256", "certificate_digest"):
        if not isinstance(out[f], str) or not _HEX64.match(out[f]):
            raise ValueError(f"claim {f} is not a lower-case hex SHA-256")
    if not isinstance(out["run_id"], str) or not _RUN_ID.match(out["run_id"]):
        raise ValueError("claim run_id is not a run id")
    if not isinstance(out["issued_us"], int) or isinstance(out["issued_us"], bool) \
            or out["issued_us"] <= 0:
        raise ValueError("claim issued_us is not a positive integer (microseconds)")
    if not isinstance(out["policy"], str) or not out["policy"]:
        raise ValueError("claim names no policy")
    if not _KID.match(str(out["kid"])):
        raise ValueError("claim kid is not 16 hex digits")
    return out


def _message(claim: dict) -> bytes:
    return _DOMAIN + json.dumps(claim, sort_keys=True, separators=(",", ":"),
                                ensure_ascii=False).encode()


def sign_claim(claim: dict, keyring: Keyring) -> str:
    """Sign ``claim`` (see :data:`CLAIM_FIELDS`; ``kid`` is filled in) with the keyring's
    private key; return the compact registry token."""
    if keyring.private is None:
        raise SigningKeyError(f"no private key to sign with: set {KEY_ENV} or {KEY_FILE_ENV}")
    claim = _check_claim({**claim, "kid": keyring.signing_kid})
    sig = keyring.private.sign(_message(claim))
    fields = [TOKEN_PREFIX, claim["kid"], claim["verdict"], quote(claim["policy"], safe=""),
              _hex_to_b64(claim["policy_sha256"]), _hex_to_b64(claim["model_sha256"]),
              _hex_to_b64(claim["certificate_digest"]), claim["run_id"],
              str(claim["issued_us"]), _b64(sig)]
    return ";".join(fields)


def parse_token(token: str, name: str, version) -> tuple[dict, bytes]:
    """(claim, signature) of a token for ``name`` / ``version``, unverified."""
    try:
        parts = token.split(";")
        if len(parts) != 10 or parts[0] != TOKEN_PREFIX:
            raise ValueError(f"expected {TOKEN_PREFIX};… with 10 fields")
        _, kid, verdict, policy, policy_sha, model_sha, digest, run_id, issued, sig = parts
        if not re.fullmatch(r"[1-9][0-9]{0,18}", issued):
            raise ValueError("issue time is not an integer")
        claim = _check_claim({
            "model": name, "version": version, "verdict": verdict, "policy": unquote(policy),
            "policy_sha256": _b64_to_hex(policy_sha), "model_sha256": _b64_to_hex(model_sha),
            "certificate_digest": _b64_to_hex(digest), "run_id": run_id,
            "issued_us": int(issued), "kid": kid})
        signature = _unb64(sig)
        if len(signature) != 64:
            raise ValueError("the signature is not 64 bytes")
    except (ValueError, TypeError, AttributeError) as exc:
        raise SignatureError(f"malformed certificate tag ({exc})") from None
    return claim, signature


def verify_claim(token: str, keyring: Keyring, *, name: str, version) -> dict:
    """Return the claim if ``token`` carries a valid Ed25519 signature by a trusted key for
    model ``name`` version ``version`` (canonical integer, else SignatureError); raise
    SignatureError saying why not. The returned claim also has ``issued_at`` (ISO-8601)."""
    from cryptography.exceptions import InvalidSignature

    try:
        version = canonical_version(version)
    except ValueError as exc:
        raise SignatureError(str(exc)) from None
    claim, signature = parse_token(token, name, version)
    key = keyring.find(claim["kid"])
    if key is None:
        raise SignatureError(f"certificate signed with an unknown key (kid {claim['kid']})")
    try:
        key.verify(signature, _message(claim))
    except InvalidSignature:
        raise SignatureError(f"certificate signature does not verify for {name} v{version}: "
                             "the tag was altered, forged, or issued for another model or "
                             "version") from None
    return {**claim, "issued_at": issued_at_text(claim["issued_us"])}


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def signature_block(token: str, claim: dict) -> dict:
    """What a certificate file carries as its ``signature``: algorithm, key id, the signature
    value (base64url), the signed claim in readable form and the registry token itself."""
    return {"alg": ALG, "kid": claim["kid"], "sig": token.rsplit(";", 1)[1],
            "claim": {k: claim[k] for k in CLAIM_FIELDS} | {
                "issued_at": issued_at_text(claim["issued_us"])},
            "token": token}


def verify_signature_block(block: dict, keyring: Keyring) -> dict:
    """Verify a certificate file's ``signature`` block; return the claim."""
    try:
        token, claim = block["token"], block["claim"]
        name, version = claim["model"], claim["version"]
    except (KeyError, TypeError) as exc:
        raise SignatureError(f"malformed signature block (lacks {exc})") from None
    verified = verify_claim(token, keyring, name=name, version=version)
    shown = {k: claim.get(k) for k in CLAIM_FIELDS}
    if shown != {k: verified[k] for k in CLAIM_FIELDS}:
        raise SignatureError("the readable claim in the signature block differs from the "
                             "signed token")
    return verified


# ---- manifests ---------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sign_manifest(manifest: dict, keyring: Keyring) -> dict:
    """``{"manifest": …, "alg", "kid", "sig"}``: an Ed25519 signature over the canonical JSON
    of ``manifest`` (e.g. the claim token and the SHA-256 of every report file)."""
    if keyring.private is None:
        raise SigningKeyError(f"no private key to sign with: set {KEY_ENV} or {KEY_FILE_ENV}")
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    sig = keyring.private.sign(_MANIFEST_DOMAIN + body.encode())
    return {"manifest": manifest, "alg": ALG, "kid": keyring.signing_kid, "sig": _b64(sig)}


def verify_manifest(doc: dict, keyring: Keyring, root: str | Path | None = None) -> dict:
    """Verify a signed manifest; with ``root``, also check that every file it lists (path
    relative to ``root``) still has the recorded SHA-256. Returns the manifest."""
    from cryptography.exceptions import InvalidSignature

    try:
        manifest, kid, sig = doc["manifest"], doc["kid"], _unb64(doc["sig"])
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise SignatureError(f"malformed manifest ({exc})") from None
    key = keyring.find(str(kid))
    if key is None:
        raise SignatureError(f"manifest signed with an unknown key (kid {kid})")
    try:
        key.verify(sig, _MANIFEST_DOMAIN + body.encode())
    except InvalidSignature:
        raise SignatureError("manifest signature does not verify: it was altered or forged") \
            from None
    if root is not None:
        for rel, expected in sorted(manifest.get("files", {}).items()):
            path = Path(root) / rel
            if not path.is_file():
                raise SignatureError(f"{rel}: listed in the manifest but missing")
            if file_sha256(path) != expected:
                raise SignatureError(f"{rel}: SHA-256 differs from the signed manifest (the "
                                     "file was changed)")
    return manifest
