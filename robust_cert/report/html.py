"""Render a certificate as one self-contained HTML document (jinja2 templates in ``templates/``).

The same HTML is the browser report and the source of the PDF (print rules in the stylesheet),
so the two never disagree. Everything shown comes from the certificate; the run's in-memory
per-point arrays and evaluation inputs add figures when present, and a report re-rendered
from the certificate JSON leaves those figures out and says so.

Optional certificate fields the report shows when present (nothing is invented when absent):

- ``model.intended_use`` (set by the user), else ``model.version_description`` /
  ``model.description`` / ``model.registered_model_description`` (MLflow), else the policy's
  ``intended_use``, else the policy's description, labelled as the policy's.
- ``model.training``: how the version was trained, e.g. ``{"run_name", "run_id",
  "params": {...}}`` (further keys are shown as labelled rows).
- ``command`` (the replayable command line) and ``tracking_uri`` (top level, or in
  ``environment``).
- ``comparison``: the entry of :func:`robust_cert.report.comparison.comparison_entry`
  (section 8, and regressions on the cover).
- ``sanity``: ``deterministic_forward`` and ``checks`` records, and each metric's
  ``diagnostics["sanity"]`` (states or legacy booleans), as the sanity-check table.
- ``signature``: ``alg``, ``kid``, ``sig`` and the signed ``claim``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import jinja2
from markupsafe import Markup

from robust_cert.catalog import CATALOG
from robust_cert.certificate import Certificate
from robust_cert.errors import RobustCertError
from robust_cert.report import present
from robust_cert.report.charts import ChartInputs, charts_for, comparison_chart, omitted_for
from robust_cert.report.threats import feature_rows, threat_model
from robust_cert.verdicts import Verdict

TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"


class SignatureCheck(Protocol):
    """The outcome of checking a certificate's signature, e.g. what
    :func:`robust_cert.verification.verify_certificate_file` returns."""

    ok: bool
    message: str


def templates_dir() -> Path:
    """Where the templates are: inside the installed wheel (``robust_cert/templates``), or the
    repository's top-level ``templates/`` in an editable checkout."""
    package = Path(__file__).resolve().parents[1]
    candidates = [package / "templates", package.parent / "templates"]
    for path in candidates:
        if (path / TEMPLATE).is_file():
            return path
    raise RobustCertError(
        f"report templates not found (looked in {', '.join(map(str, candidates))}); the "
        "installation is incomplete: reinstall robust_cert (pip install --force-reinstall)"
    )


def _css_string(value: Any) -> Markup:
    """A quoted CSS string for ``content:`` in the stylesheet: every character that is not
    plainly safe is a hex escape (six digits and the space that ends it), so no model name
    can end the string or the ``<style>``."""
    out = []
    for ch in str(value).replace("\n", " "):
        out.append(ch if ch.isalnum() and ch.isascii() or ch in " .,:;-_/()[]@#=+"
                   else f"\\{ord(ch):06x} ")
    return Markup('"' + "".join(out) + '"')


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.2f}%"
    env.filters["num"] = lambda v, d=4: "–" if v is None else f"{v:.{d}g}"
    env.filters["params"] = lambda p: ", ".join(f"{k}={v}" for k, v in p.items()) or "–"
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True,
                                                        ensure_ascii=False)
    env.filters["css_string"] = _css_string
    env.filters["fixed"] = present.fixed
    env.filters["interval"] = present.interval
    env.filters["signed"] = present.signed
    env.filters["signed_interval"] = present.signed_interval
    env.filters["pvalue"] = present.pvalue
    env.filters["breakable"] = present.breakable
    env.filters["formula"] = present.formula
    env.filters["kv"] = present.kv_rows
    env.filters["label"] = present.label
    env.filters["text"] = present.value_text
    return env


def not_verified_reason(cert: Certificate, verification: SignatureCheck | None) -> str | None:
    """Why the report must carry the NOT VERIFIED banner, or None: the signature check
    failed, or the certificate carries no signature at all."""
    if verification is not None and not verification.ok:
        return verification.message
    if cert.signature is None:
        return "the certificate is unsigned"
    return None


def _chart_inputs(cert: Certificate, data) -> ChartInputs:
    x: Any = None  # an array, or an ArrayView that reads only the points indexed
    y = None
    if data is not None:
        if data.sha256 != cert.body["data"]["sha256"]:
            raise RobustCertError(
                f"the data given to the report ({data.name}, sha256 {data.sha256[:12]}…) is "
                f"not the certified data (sha256 {cert.body['data']['sha256'][:12]}…)")
        from robust_cert.inputs import ArrayView, Inputs  # (data given: torch is loaded)

        y = data.y.detach().cpu().numpy()
        # inputs read on demand stay so: the charts read only the points they show
        x = ArrayView(data.x) if isinstance(data.x, Inputs) else data.x.detach().cpu().numpy()
    return ChartInputs(cert.body, dict(cert.per_point), x, y)


#: Model fields the identity table shows in rows of their own (the rest: labelled extras).
_MODEL_SHOWN = {"name", "version", "uri", "format", "sha256", "num_classes", "input_shape",
                "gradients", "run_id", "opset", "training", "intended_use", "description",
                "version_description", "registered_model_description"}
#: Where the intended use may be recorded, most specific first: (model field, source).
_INTENDED_USE = (("intended_use", "recorded with the model"),
                 ("version_description", "the registered model version's description"),
                 ("description", "the model's description"),
                 ("registered_model_description", "the registered model's description"))


def intended_use(body: dict) -> tuple[str, str]:
    """(text, where it comes from): the model's own record (``model.intended_use``, or the
    MLflow version or registered-model description), else the policy's ``intended_use``,
    else the policy's description, said to be the policy's."""
    model = body.get("model") or {}
    for key, source in _INTENDED_USE:
        if isinstance(model.get(key), str) and model[key].strip():
            return model[key].strip(), source
    doc = (body.get("policy") or {}).get("document") or {}
    name = (body.get("policy") or {}).get("name", "")
    if isinstance(doc.get("intended_use"), str) and doc["intended_use"].strip():
        return doc["intended_use"].strip(), f"declared by the policy {name}"
    if isinstance(doc.get("description"), str) and doc["description"].strip():
        return (doc["description"].strip(), f"the description of the policy {name}: neither "
                "the model nor the policy records an intended use")
    return "", "not recorded (neither the model nor the policy states one)"


def tracking_uri(body: dict) -> str | None:
    """The MLflow tracking URI the certification used, where the certificate records it."""
    for where in (body, body.get("environment") or {}, body.get("model") or {}):
        if isinstance(where.get("tracking_uri"), str) and where["tracking_uri"]:
            return where["tracking_uri"]
    return None


def _comparison(body: dict) -> dict | None:
    """The certificate's ``comparison`` entry (see
    :func:`robust_cert.report.comparison.comparison_entry`) with its chart, or None."""
    entry = body.get("comparison")
    if not isinstance(entry, dict) or not isinstance(entry.get("quantities"), list):
        return None
    worse = [q for q in entry["quantities"] if q.get("verdict") == "significantly worse"]
    better = [q for q in entry["quantities"] if q.get("verdict") == "significantly better"]
    return {"entry": entry, "baseline": entry.get("baseline") or {}, "worse": worse,
            "better": better, "chart": comparison_chart(entry)}


def _context(cert: Certificate, verification: SignatureCheck | None, data) -> dict:
    body = cert.body
    inputs = _chart_inputs(cert, data)
    results = body["results"]
    ran = [r for r in results if r["status"] == "ok"]
    sections = [{"result": r, "charts": charts_for(r["metric"], inputs),
                 "omitted": omitted_for(r["metric"], inputs),
                 "requirements": [q for q in body["requirements"] if q["metric"] == r["metric"]]}
                for r in ran]
    counts = body["data"].get("class_counts") or []
    total = sum(counts) or 1
    verdicts = [q["verdict"] for q in body["requirements"]]
    use, use_source = intended_use(body)
    training = body["model"].get("training")
    return {
        "c": body,
        "digest": cert.digest,
        "signature": cert.signature,
        "report_id": cert.digest[:12],
        "not_verified": not_verified_reason(cert, verification),
        "verification": verification,
        "threats": threat_model(results),
        "feature_threat": feature_rows(body["data"]),
        "sections": sections,
        "not_run": [r for r in results if r["status"] != "ok"],
        "untested": sorted(set(CATALOG) - {r["metric"] for r in results}),
        "kinds": sorted({r["kind"] for r in ran}),
        "class_balance": [(i, n, n / total) for i, n in enumerate(counts)],
        "model_extra": present.kv_rows({k: body["model"][k] for k in sorted(body["model"])
                                        if k not in _MODEL_SHOWN}),
        "intended_use": use,
        "intended_use_source": use_source,
        "training": training if isinstance(training, dict) else None,
        "sanity_rows": present.sanity_rows(body),
        "decisive": {q["id"]: present.decisive_bound(q) for q in body["requirements"]},
        "tracking_uri": tracking_uri(body),
        "comparison": _comparison(body),
        "tally": {str(v): verdicts.count(v) for v in Verdict},
    }


def render_html(cert: Certificate, *, verification: SignatureCheck | None = None,
                data=None) -> str:
    """The report for ``cert`` as one HTML document with its stylesheet and charts inlined.

    ``verification``: the outcome of checking the signature (anything with ``ok`` and
    ``message``); a failed check, or an unsigned certificate, puts a NOT VERIFIED banner on
    the report. None means the signature was not checked and the report says so.
    ``data``: the certified EvalSet (its SHA-256 must match), for the figures that show test
    points; with the certificate's in-memory ``per_point`` arrays.
    """
    css = (templates_dir() / STYLESHEET).read_text(encoding="utf-8")
    return _environment().get_template(TEMPLATE).render(
        css=Markup(css), **_context(cert, verification, data))
