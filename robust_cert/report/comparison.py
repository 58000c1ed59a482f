"""Version comparisons in reports: the certificate's ``comparison`` entry (section 8 of the
report) and the separate comparison page of ``robust-cert compare``.

:func:`comparison_entry` builds, from two certificates of the same evaluation data and their
per-point arrays, the JSON entry a certificate carries as ``body["comparison"]`` (so it is
covered by the digest and signature); the report renders it as section 8 and marks any
"significantly worse" quantity on its cover. The statistics are
:func:`robust_cert.comparison.compare`'s (exact McNemar on paired per-point outcomes, Holm
across quantities, an unconditional interval for Δ); nothing here recomputes them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from robust_cert import catalog
from robust_cert.certificate import Certificate
from robust_cert.comparison import WORSE, compare, paired_outcomes
from robust_cert.errors import RobustCertError
from robust_cert.report.html import STYLESHEET, _environment, templates_dir

TEMPLATE = "comparison.html.j2"
#: What the entry's ``method`` says (shown in the report's section 8).
METHOD = ("Paired per-point outcomes of the two versions on the same evaluation points (and, "
          "for failure rates under noise, the same seeded draws). One outcome per point: exact "
          "McNemar test on the discordant points and Tango's unconditional score interval for "
          "Δ; several noise draws per point: the betting e-value test and interval on the "
          "per-point differences (each row names its test). Holm's correction across the "
          "compared quantities at the family-wise confidence; each interval is at that "
          "confidence on its own. A difference is called significant only when Holm rejects and "
          "the interval excludes 0 on the same side.")
_KEY = re.compile(r"^(?P<metric>[a-z_]+)(?:\.eps_(?P<eps>.+))?$")


def quantity_label(key: str) -> str:
    """``robust_accuracy.eps_0.1`` -> ``robust accuracy, ε = 0.1``: the family's catalog label
    (:func:`robust_cert.catalog.label`), then ε."""
    m = _KEY.match(key)
    if not m:
        return key
    name = catalog.label(m["metric"])
    return f"{name}, ε = {m['eps']}" if m["eps"] is not None else name


def _requirements_of(key: str, body: dict) -> list[str]:
    """Ids of the certificate's requirements on the quantity ``key``."""
    m = _KEY.match(key)
    if not m:
        return []
    out = []
    for r in body.get("requirements", []):
        if r["metric"] != m["metric"]:
            continue
        eps = r["params"].get("eps")
        if m["eps"] is None and not r["params"]:
            out.append(r["id"])
        elif m["eps"] is not None and eps is not None and set(r["params"]) == {"eps"}:
            try:
                if np.isclose(float(m["eps"]), float(eps), rtol=0, atol=1e-12):
                    out.append(r["id"])
            except ValueError:
                continue
    return out


def _identity(cert: Certificate) -> dict:
    body = cert.body
    sig = cert.signature if isinstance(cert.signature, dict) else {}
    return {
        "model": body["model"].get("name"),
        "version": body["model"].get("version"),
        "uri": body["model"].get("uri"),
        "model_sha256": body["model"].get("sha256"),
        "certificate_digest": cert.digest,
        "verdict": body.get("verdict"),
        "issued_at": body.get("issued_at"),
        "policy": {k: body["policy"].get(k) for k in ("name", "version", "sha256")},
        "signed_by": sig.get("kid"),
    }


def comparison_entry(current: Certificate, baseline: Certificate, *,
                     current_per_point: dict | None = None,
                     baseline_per_point: dict | None = None,
                     confidence: float | None = None) -> dict:
    """The ``comparison`` entry for ``current``'s certificate body: ``current`` against
    ``baseline`` (e.g. the previous certified version), quantity by quantity.

    ``*_per_point``: the per-point arrays (``Certificate.per_point`` of the run, or loaded
    from its ``per_point.npz``); default each certificate's own. ``confidence``: default the
    current policy's. Both certificates must be about the same evaluation data (SHA-256).

    Returns JSON-ready data::

        {"baseline": {model, version, uri, model_sha256, certificate_digest, verdict,
                      issued_at, policy: {name, version, sha256}, signed_by},
         "data_sha256", "confidence", "method",
         "quantities": [{key, label, requirements, higher_is_better, n, baseline_rate, rate,
                         delta, delta_ci: [lo, hi], baseline_only, current_only, p_value,
                         adjusted_p_value, verdict, note, method}],
         "regressions": [keys], "improvements": [keys], "not_compared": [keys]}

    ``verdict`` is "significantly better", "significantly worse" or "no detectable
    difference", for this version relative to the baseline; ``delta`` is this version's
    rate minus the baseline's, in the rate's own sense (for a failure rate, negative is
    better). Raises RobustCertError when the data differ or per-point arrays are missing.
    """
    a_pp = baseline.per_point if baseline_per_point is None else baseline_per_point
    b_pp = current.per_point if current_per_point is None else current_per_point
    if not a_pp or not b_pp:
        which = "baseline" if not a_pp else "current"
        raise RobustCertError(f"the {which} certificate has no per-point arrays: pass the "
                              "certification run's per-point results (per_point.npz)")
    a_sha, b_sha = baseline.body["data"]["sha256"], current.body["data"]["sha256"]
    if a_sha != b_sha:
        raise RobustCertError(f"the versions were certified on different data (sha256 "
                              f"{a_sha[:12]}… vs {b_sha[:12]}…): no paired comparison")
    conf = float(current.body["policy"]["confidence"] if confidence is None else confidence)
    a = paired_outcomes({k: np.asarray(v) for k, v in a_pp.items()}, baseline.body)
    b = paired_outcomes({k: np.asarray(v) for k, v in b_pp.items()}, current.body)
    rows = compare(a, b, confidence=conf)
    quantities = []
    for q in rows:
        d = q.to_dict()
        quantities.append({
            "key": q.key, "label": quantity_label(q.key),
            "requirements": _requirements_of(q.key, current.body),
            "higher_is_better": bool(a[q.key][1]), "n": int(d["n"]),
            "baseline_rate": float(d["rate_a"]), "rate": float(d["rate_b"]),
            "delta": float(d["delta"]), "delta_ci": [float(x) for x in d["delta_ci"]],
            "baseline_only": int(d["a_only"]), "current_only": int(d["b_only"]),
            "p_value": float(d["p_value"]), "adjusted_p_value": float(d["adjusted_p_value"]),
            "verdict": d["verdict"], "note": d.get("note", ""),
            "method": d.get("method", ""),
        })
    compared = {q["key"] for q in quantities}
    return {
        "baseline": _identity(baseline),
        "data_sha256": b_sha,
        "confidence": conf,
        "method": METHOD,
        "quantities": quantities,
        "regressions": [q["key"] for q in quantities if q["verdict"] == WORSE],
        "improvements": [q["key"] for q in quantities
                         if q["verdict"] == "significantly better"],
        "not_compared": sorted((set(a) | set(b)) - compared),
    }


def render_comparison_html(comparison: dict) -> str:
    """HTML for the dict of :meth:`ComparisonReport.to_dict` (deterministic for the same dict)."""
    css = (templates_dir() / STYLESHEET).read_text(encoding="utf-8")
    return _environment().get_template(TEMPLATE).render(r=comparison, css=css)


def write_comparison_html(comparison: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "comparison.html"
        tmp = path.with_suffix(".html.partial")
        tmp.write_text(render_comparison_html(comparison), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise RobustCertError(f"cannot write the comparison report into {out}: "
                              f"{exc.strerror}") from None
    return path
