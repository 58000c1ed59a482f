"""Earlier certifications to compare with: one loader of a certification run's certificate
and per-point results, which checks the certificate's signature when a keyring is given;
used by the report's Section 8 (:func:`find_baseline`) and by ``robust-cert compare``."""

from __future__ import annotations

import logging
from pathlib import Path

from robust_cert.certificate import Certificate
from robust_cert.errors import RobustCertError
from robust_cert.mlflow_plugin.names import PRODUCTION_ALIAS, RUN_ID_TAG
from robust_cert.signing import Keyring

log = logging.getLogger(__name__)



def find_baseline(client, name: str, version, data_sha256: str,
                  keyring: Keyring | None = None):
    """The certification Section 8 compares with: ``(certificate, per-point arrays, version)``
    of the version under the ``production`` alias when it is another certified version, else
    of the highest certified version below ``version``; only versions whose certification run
    holds ``certificate.json`` and ``per_point.npz`` and was made on the same data (SHA-256)
    qualify, the next candidate is tried otherwise. With ``keyring`` (a signed certification),
    the baseline's certificate must also carry a signature the keyring verifies, issued for
    that run: run artifacts are writable by any user, and a signed report must not compare
    with a forged baseline. None when nothing qualifies or the registry cannot be read (a
    warning says why)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    version = int(version)
    try:
        aliases = client.get_registered_model(name).aliases or {}
        found = client.search_model_versions("name='{}'".format(name.replace("'", "\\'")))
    except MlflowException as exc:
        log.warning("no comparison with an earlier version: cannot read %s from the registry "
                    "(%s)", name, exc.message)
        return None
    certified = {int(mv.version): mv.tags[RUN_ID_TAG] for mv in found
                 if mv.tags.get(RUN_ID_TAG) and str(mv.version).isdigit()}
    order = [int(v) for alias, v in aliases.items()
             if alias.lower() == PRODUCTION_ALIAS and str(v).isdigit()
             and int(v) != version and int(v) in certified][:1]
    order += [v for v in sorted(certified, reverse=True) if v < version and v not in order]
    with tempfile.TemporaryDirectory(prefix="robust_cert_baseline_") as tmp:
        for v in order:
            loaded = _load_certification_run(client, certified[v], data_sha256,
                                             Path(tmp) / str(v), keyring)
            if loaded is not None:
                return (*loaded, str(v))
    return None


class NotABaseline(RobustCertError):
    """A certification run that cannot be compared with: why, in one line."""


def load_certification_run(client, run_id: str, where: Path, *,
                           data_sha256: str | None = None,
                           keyring: Keyring | None = None) -> tuple[Certificate, dict]:
    """(certificate, per-point arrays) of the certification run ``run_id``, downloaded into
    ``where``. Raises :class:`NotABaseline` saying why when the run lacks
    ``certificate.json`` or ``per_point.npz``, was certified on other data than
    ``data_sha256`` (when given), or — with ``keyring`` — its certificate does not carry a
    signature the keyring verifies, issued for this very run: run artifacts are writable by
    any user of the tracking server, so only a verified certificate may stand as a baseline.
    """
    import numpy as np
    from mlflow.exceptions import MlflowException

    from robust_cert.verification import verify_certificate_file

    try:
        run = client.get_run(run_id)
        if data_sha256 is not None and \
                run.data.params.get("data_sha256", data_sha256) != data_sha256:
            raise NotABaseline(f"run {run_id} was certified on other data")
        names = {f.path for f in client.list_artifacts(run_id)}
        if not {"certificate.json", "per_point.npz"} <= names:
            raise NotABaseline(f"run {run_id} lacks certificate.json or per_point.npz")
        where.mkdir(parents=True, exist_ok=True)
        cert = Certificate.load(client.download_artifacts(run_id, "certificate.json",
                                                          str(where)))
        if data_sha256 is not None and cert.body["data"]["sha256"] != data_sha256:
            raise NotABaseline(f"run {run_id} was certified on other data")
        if keyring is not None:
            check = verify_certificate_file(cert, keyring)
            if not check.ok or (check.claim or {}).get("run_id") != run_id:  # ok: a claim
                raise NotABaseline(f"the certificate of run {run_id} does not verify for this "
                                   f"run ({check.message})")
        with np.load(client.download_artifacts(run_id, "per_point.npz", str(where))) as f:
            per_point = {k: f[k] for k in f.files}
    except NotABaseline:
        raise
    except (MlflowException, RobustCertError, OSError, ValueError, KeyError) as exc:
        raise NotABaseline(f"run {run_id}: {getattr(exc, 'message', exc)}") from exc
    return cert, per_point


def _load_certification_run(client, run_id: str, data_sha256: str, where: Path,
                            keyring: Keyring | None = None):
    """:func:`load_certification_run`, or None with the reason logged."""
    try:
        return load_certification_run(client, run_id, where, data_sha256=data_sha256,
                                      keyring=keyring)
    except NotABaseline as exc:
        log.warning("not a comparison baseline: %s", exc)
        return None


def attach_comparison(client, cert: Certificate, name: str, version,
                      keyring: Keyring | None = None) -> dict | None:
    """Put the paired comparison with the baseline of :func:`find_baseline` into
    ``cert.body["comparison"]`` (the report's Section 8); return it, or None (the certificate
    then has no comparison) when no earlier certification is comparable."""
    from robust_cert.report.comparison import comparison_entry

    found = find_baseline(client, name, version, cert.body["data"]["sha256"], keyring)
    if found is None:
        return None
    base_cert, base_pp, base_version = found
    try:
        entry = comparison_entry(cert, base_cert, current_per_point=cert.per_point,
                                 baseline_per_point=base_pp)
    except RobustCertError as exc:
        log.warning("no comparison with %s v%s: %s", name, base_version, exc)
        return None
    cert.body["comparison"] = entry
    return entry
