"""Verify a registered version's certificate, check that a registry is gated, and ask it to
promote a version (the server decides). Certificate and manifest files are verified without
MLflow, in :mod:`robust_cert.verification`."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from robust_cert.errors import RobustCertError, TrackingError
from robust_cert.mlflow_plugin.names import CERT_TAG
from robust_cert.mlflow_plugin.registry import artifacts_sha256, download_version, resolve_version
from robust_cert.signing import Keyring, SignatureError, verify_claim
from robust_cert.verification import Verification

log = logging.getLogger(__name__)

#: Prefix of the registered models ``robust-cert doctor`` creates (and deletes) as probes.
PROBE_PREFIX = "robust-cert-doctor-probe-"


def verify_version(client, name: str, version, keyring: Keyring, *,
                   check_artifacts: bool = True,
                   allowed_policies: set[str] | None = None,
                   policy_sha256: str | None = None) -> Verification:
    """The version's certificate tag verifies, names it (canonical version), and (by
    default) its model artifacts still hash to the certified SHA-256. With
    ``allowed_policies``, the policy (name or SHA-256) must be one of them; with
    ``policy_sha256``, the certificate must have been issued under exactly that policy (its
    SHA-256: a policy of the same name but other content does not do)."""
    mv = resolve_version(client, f"models:/{name}/{version}")
    value = mv.tags.get(CERT_TAG)
    if not value:
        return Verification(False, f"{name} v{mv.version} has no signed robust_cert "
                                   f"certificate (tag {CERT_TAG})")
    try:
        claim = verify_claim(value, keyring, name=mv.name, version=mv.version)
    except SignatureError as exc:
        return Verification(False, str(exc))
    if allowed_policies is not None and not (
            {claim["policy"], claim["policy_sha256"]} & set(allowed_policies)):
        return Verification(False, f"policy {claim['policy']!r} is not allowed (allowed: "
                                   f"{', '.join(sorted(allowed_policies))})", claim)
    if policy_sha256 is not None and claim["policy_sha256"] != policy_sha256:
        return Verification(False, f"issued under another policy ({claim['policy']!r}, SHA-256 "
                                   f"{claim['policy_sha256'][:12]}…, not {policy_sha256[:12]}…)",
                            claim)
    if check_artifacts:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="robust_cert_verify_") as tmp:
            if artifacts_sha256(download_version(mv.name, mv.version, tmp)) != \
                    claim["model_sha256"]:
                return Verification(False, "model artifacts no longer match the certified "
                                           "SHA-256", claim)
    return Verification(True, f"valid signature (key {claim['kid']}); verdict "
                              f"{claim['verdict']} under policy {claim['policy']!r}, issued "
                              f"{claim['issued_at']}", claim)


def has_current_certificate(client, name: str, version: str, keyring: Keyring | None, *,
                            policy_sha256: str | None = None) -> bool:
    """True when the version already carries a certificate this key verifies (any verdict)
    and, with ``policy_sha256``, that was issued under that policy (the certifier's: one
    under another policy is not current, so changing the policy re-certifies)."""
    if keyring is None:
        return False
    try:
        return verify_version(client, name, version, keyring, check_artifacts=False,
                              policy_sha256=policy_sha256).ok
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


# ---- is the registry gated? ---------------------------------------------------------------
@dataclass
class GateCheck:
    """Outcome of :func:`check_gated`: ``ok`` when every probe was refused by the gate."""

    ok: bool
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, passed, detail)
    cleanup: str | None = None  # why the probe model could not be deleted, if it could not

    def summary(self) -> str:
        lines = [f"  [{'ok' if passed else 'FAIL'}] {what}: {detail}"
                 for what, passed, detail in self.checks]
        if self.cleanup:
            lines.append(f"  [warn] {self.cleanup}")
        return "\n".join(lines)


def check_gated(client, alias: str = "production") -> GateCheck:
    """Check from the outside that the registry behind ``client`` is gated for ``alias``.

    Creates a probe registered model (``robust-cert-doctor-probe-…``) with one version and
    no certificate, then expects PERMISSION_DENIED from the robust_cert gate for: setting
    ``alias`` on it, writing a certificate tag that is not signed, and setting the prompt
    marker on the version (the prompt-exemption bypass). Deletes the probe afterwards
    (needs the right to create and delete registered models). Never raises for an ungated
    registry: the result says so; raises TrackingError when the server cannot be used."""
    from mlflow.exceptions import MlflowException

    name = PROBE_PREFIX + uuid.uuid4().hex[:12]
    result = GateCheck(ok=False)
    try:
        client.create_registered_model(
            name, description="temporary probe of robust-cert doctor; safe to delete")
    except MlflowException as exc:
        raise TrackingError(f"cannot create the probe registered model {name} "
                            f"({exc.message})") from None
    run = None
    try:
        try:  # the server wants a version's source inside its run's artifacts
            run = client.create_run(_probe_experiment(client), run_name=name,
                                    tags={"robust_cert.doctor_probe": "true"})
            mv = client.create_model_version(name, f"{run.info.artifact_uri}/probe",
                                             run.info.run_id)
        except MlflowException as exc:
            raise TrackingError(f"cannot create a probe model version ({exc.message})") from None
        probes = [
            (f"protected alias {alias!r} on an uncertified version",
             lambda: client.set_registered_model_alias(name, alias, mv.version)),
            ("unsigned certificate tag",
             lambda: client.set_model_version_tag(name, mv.version, CERT_TAG, "forged")),
            ("prompt marker set on a model version",
             lambda: client.set_model_version_tag(name, mv.version,
                                                  "mlflow.prompt.is_prompt", "true")),
        ]
        for what, call in probes:
            try:
                call()
                result.checks.append((what, False, "ACCEPTED: the registry is not gated"))
            except MlflowException as exc:
                gated = (getattr(exc, "error_code", "") == "PERMISSION_DENIED"
                         and "robust_cert gate" in (exc.message or ""))
                detail = ("refused by the robust_cert gate (PERMISSION_DENIED)" if gated else
                          f"refused, but not by the robust_cert gate: {exc.error_code}: "
                          f"{(exc.message or '').splitlines()[0][:200]}")
                result.checks.append((what, gated, detail))
        result.ok = all(passed for _, passed, _ in result.checks)
    finally:
        try:
            client.delete_registered_model(name)
            if run is not None:
                client.delete_run(run.info.run_id)
        except MlflowException as exc:
            result.cleanup = (f"could not delete the probe registered model {name} or its run "
                              f"({exc.message}); delete them by hand")
    return result


def _probe_experiment(client) -> str:
    """The experiment for the probe's run: MLflow's Default one, else ``robust-cert-doctor``."""
    for exp_name in ("Default", "robust-cert-doctor"):
        exp = client.get_experiment_by_name(exp_name)
        if exp is not None and exp.lifecycle_stage == "active":
            return exp.experiment_id
    return client.create_experiment("robust-cert-doctor")
