"""What deployments call: load a registered model only if its certificate verifies."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from robust_cert.errors import ModelError
from robust_cert.mlflow_plugin.registry import artifacts_sha256, download_version, resolve_version
from robust_cert.verdicts import Verdict

log = logging.getLogger(__name__)

ALLOWED_POLICIES_ENV = "ROBUST_CERT_ALLOWED_POLICIES"


def load_verified(uri: str, *, allowed_policies=None, keyring=None, client=None,
                  tracking_uri: str | None = None, flavor: str = "pyfunc",
                  dst_path: str | Path | None = None, **load_kwargs):
    """Load a registered model only if its certificate verifies; what deployments call.

    ``uri`` is ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``. Before returning the model
    this checks that the version's ``robust_cert.certificate`` tag carries a valid Ed25519
    signature by a trusted public key (``keyring``, default ``$ROBUST_CERT_PUBLIC_KEYS`` /
    the signing key's public half) naming this model and version, that the verdict is PASS,
    that the policy (name or SHA-256) is in ``allowed_policies`` (default
    ``$ROBUST_CERT_ALLOWED_POLICIES``; one of the two is required), and that the downloaded
    artifacts hash to the certified SHA-256. The model is then loaded from exactly the bytes
    that were hashed, so artifacts swapped on the server after promotion are refused, not
    served. Raises :class:`~robust_cert.verification.VerificationError` saying why.

    ``flavor`` names the MLflow flavor module that loads it (``pyfunc`` default, ``pytorch``,
    ``onnx``, ``sklearn``, …; ``load_kwargs`` are passed on). The files are downloaded into
    ``dst_path`` (kept) or a temporary folder removed after loading. ``tracking_uri`` applies to
    this call only: MLflow's process-wide URIs are as before afterwards.
    """
    from robust_cert.mlflow_plugin.client import tracking_scope

    with tracking_scope():
        return _load_verified(uri, allowed_policies=allowed_policies, keyring=keyring,
                              client=client, tracking_uri=tracking_uri, flavor=flavor,
                              dst_path=dst_path, **load_kwargs)


def _load_verified(uri: str, *, allowed_policies, keyring, client, tracking_uri, flavor,
                   dst_path, **load_kwargs):
    import importlib

    from robust_cert.mlflow_plugin.promotion import verify_version
    from robust_cert.signing import Keyring
    from robust_cert.verification import VerificationError

    if allowed_policies is None:
        raw = os.environ.get(ALLOWED_POLICIES_ENV, "")
        allowed_policies = [p.strip() for p in raw.split(",") if p.strip()]
    elif isinstance(allowed_policies, str):
        allowed_policies = [allowed_policies]
    allowed = set(allowed_policies)
    if not allowed:
        raise VerificationError(f"{uri}: no policy allow-list: pass allowed_policies=[...] or "
                                f"set {ALLOWED_POLICIES_ENV} (policy names or SHA-256 hashes)")
    keyring = keyring or Keyring.from_env()
    if client is None:
        from robust_cert.mlflow_plugin.client import connect

        client = connect(tracking_uri)
    try:
        loader = importlib.import_module(f"mlflow.{flavor}").load_model
    except (ImportError, AttributeError):
        raise ModelError(f"unknown MLflow flavor {flavor!r} (e.g. pyfunc, pytorch, onnx)") \
            from None
    mv = resolve_version(client, uri)
    label = f"{uri} ({mv.name} v{mv.version})"
    # the signature and the claim's model and version; artifacts are hashed below, on the
    # very bytes that are then loaded
    check = verify_version(client, mv.name, mv.version, keyring, check_artifacts=False)
    if not check.ok:
        raise VerificationError(f"{label} NOT VERIFIED: {check.message}")
    assert check.claim is not None  # a version that verifies has its signed claim
    claim = check.claim
    if claim["verdict"] != Verdict.PASS:
        raise VerificationError(f"{label} NOT VERIFIED: verdict {claim['verdict']} under "
                                f"policy {claim['policy']!r}")
    if not ({claim["policy"], claim["policy_sha256"]} & allowed):
        raise VerificationError(f"{label} NOT VERIFIED: policy {claim['policy']!r} is not "
                                f"allowed (allowed: {', '.join(sorted(allowed))})")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def _load(dst: str):
        local = download_version(mv.name, mv.version, dst)
        if artifacts_sha256(local) != claim["model_sha256"]:
            raise VerificationError(f"{label} NOT VERIFIED: the model artifacts do not match "
                                    "the certified SHA-256 (changed after certification)")
        try:
            return loader(local, **load_kwargs)
        except Exception as exc:
            raise ModelError(f"{label}: verified, but mlflow.{flavor} cannot load it: "
                             f"{type(exc).__name__}: {exc}") from None

    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
        model = _load(str(dst_path))
    else:
        with tempfile.TemporaryDirectory(prefix="robust_cert_verified_") as tmp:
            model = _load(tmp)
    log.info("%s verified: PASS under %r (key %s, issued %s)", label, claim["policy"],
             claim["kid"], claim["issued_at"])
    return model
