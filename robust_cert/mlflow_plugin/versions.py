"""A registered version's robust_cert state: withdrawing a certificate, writing the summary
tags, the description's summary and the signed certificate (last)."""

from __future__ import annotations

from robust_cert import catalog
from robust_cert.certificate import Certificate
from robust_cert.errors import TrackingError
from robust_cert.mlflow_plugin.names import (
    CERT_TAG,
    DESCRIPTION_BEGIN,
    STATUS_TAG,
    TAG_PREFIX,
    with_summary,
)
from robust_cert.mlflow_plugin.summary import description_summary, version_tags


def withdraw_certificate(client, name: str, version: str) -> None:
    """Remove the version's signed certificate and status tags (the gate records the removal
    in its ledger, so the old certificate can never be written back), then the robust_cert
    summary from its description, so no earlier verdict is shown beside a new run. Raises
    TrackingError when a removal fails: nothing of a new certification may be written
    before it."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, version)
        for key in (CERT_TAG, STATUS_TAG):
            if key in mv.tags:
                client.delete_model_version_tag(name, version, key)
        if DESCRIPTION_BEGIN in (mv.description or ""):
            client.update_model_version(name, version,
                                        description=with_summary(mv.description, None))
    except MlflowException as exc:
        raise TrackingError(f"cannot remove the previous certificate of {name} v{version} "
                            f"({exc.message}); nothing was written") from None
#: Summary tags of earlier releases of this plugin (replaced by the headline tags).
_LEGACY_TAGS = ("robust_cert.metric.", "robust_cert.policy_sha256", "robust_cert.issued_at")


def _summary_tag(key: str) -> bool:
    """Whether ``key`` is a summary tag a certification writes (a headline metric or a
    legacy summary tag), which a new certification replaces; other ``robust_cert.*`` tags
    (the certificate, the status, tags of other tools) are not touched here."""
    if key.startswith(_LEGACY_TAGS):
        return True
    if not key.startswith(TAG_PREFIX):
        return False
    short = key[len(TAG_PREFIX):]
    return short == "pass" or any(short == n or short.startswith(n + "_")
                                  for n in catalog.short_names())


def tag_version(client, name: str, version: str, cert: Certificate, run_id: str,
                 signed: str | None, *, experiment_id: str) -> None:
    """Summary tags, the description's summary, the status, and the signed certificate last
    (see the module doc). robust_cert tags of an earlier certification that this one does not
    sets (headline metrics of other requirements, older tag names) are removed, so none is
    left stale."""
    tags = version_tags(cert, run_id)
    status = tags.pop(STATUS_TAG)
    mv = client.get_model_version(name, version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    for key in sorted(mv.tags):
        if key not in tags and _summary_tag(key):
            client.delete_model_version_tag(name, version, key)
    summary = description_summary(cert, run_id, experiment_id)
    client.update_model_version(name, version, description=with_summary(mv.description,
                                                                        summary))
    client.set_model_version_tag(name, version, STATUS_TAG, status)
    if signed is not None:
        client.set_model_version_tag(name, version, CERT_TAG, signed)
