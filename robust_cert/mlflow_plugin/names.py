"""The names robust_cert writes into MLflow: tags, run kinds, markers. No MLflow import.

A version's robust_cert tags are ``robust_cert.*``: the signed certificate (:data:`CERT_TAG`,
the one the registry gate trusts), the status, the run, the policy, the digest and the
headline metrics (``robust_cert.<short name>``, see :mod:`robust_cert.catalog`). The
description's robust_cert summary lies between :data:`DESCRIPTION_BEGIN` and
:data:`DESCRIPTION_END`; the user's own text around it is kept.
"""

from __future__ import annotations

from robust_cert.verdicts import Verdict

#: The signed certificate token on a model version: what the gate verifies.
CERT_TAG = "robust_cert.certificate"

TAG_PREFIX = "robust_cert."
STATUS_TAG = "robust_cert.status"
#: The version tag robust_cert.status of each verdict.
STATUS = {Verdict.PASS: "passed", Verdict.FAIL: "failed", Verdict.INCONCLUSIVE: "inconclusive"}
DEFAULT_EXPERIMENT = "robust_cert"
MANIFEST = "manifest.json"
#: Run tag that marks what a robust_cert run is: ``certification`` or ``comparison``. Filter
#: the experiment's runs with ``tags.robust_cert.kind = 'certification'``.
KIND_TAG = "robust_cert.kind"
#: The version description's robust_cert summary lies between these markers; the user's own
#: text around them is kept, the block is replaced on re-certification.
DESCRIPTION_BEGIN = "<!-- robust_cert:begin -->"
DESCRIPTION_END = "<!-- robust_cert:end -->"
#: Version tags of a certification besides the signed certificate (CERT_TAG) and the status;
#: the headline metrics add ``robust_cert.<short name>`` (see :func:`headline_metrics`).
RUN_ID_TAG = "robust_cert.run_id"
POLICY_TAG = "robust_cert.policy"
DIGEST_TAG = "robust_cert.certificate_digest"
#: The SHA-256 of the data the version was certified on (the certifier re-certifies a version
#: whose routes rule names other data; scheduling only: the gate never reads it).
DATA_TAG = "robust_cert.data_sha256"
PRODUCTION_ALIAS = "production"


def user_description(description: str | None) -> str:
    """The user's own part of a version description: the text without the robust_cert
    summary block (see :data:`DESCRIPTION_BEGIN`)."""
    text = description or ""
    while DESCRIPTION_BEGIN in text:
        head, _, rest = text.partition(DESCRIPTION_BEGIN)
        _, found, tail = rest.partition(DESCRIPTION_END)
        if not found:  # the end marker was edited away: keep the text, drop the marker
            tail = rest
        text = head.rstrip() + ("\n\n" + tail.strip() if tail.strip() else "")
    return text.strip()


def with_summary(description: str | None, summary: str | None) -> str:
    """``description`` with its robust_cert block replaced by ``summary`` (removed when None);
    the user's text is kept, the summary first."""
    own = user_description(description)
    if summary is None:
        return own
    block = f"{DESCRIPTION_BEGIN}\n{summary.strip()}\n{DESCRIPTION_END}"
    return block + ("\n\n" + own if own else "")
