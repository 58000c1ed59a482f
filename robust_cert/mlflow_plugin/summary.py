"""The certificate as MLflow shows it: metric names, headline metrics, curves, the version's
summary tags and the markdown summary in its description. No MLflow import: these are pure
functions of a certificate."""

from __future__ import annotations

import re

from robust_cert import catalog
from robust_cert.certificate import Certificate
from robust_cert.mlflow_plugin.names import (
    DATA_TAG,
    DIGEST_TAG,
    POLICY_TAG,
    RUN_ID_TAG,
    STATUS,
    STATUS_TAG,
    TAG_PREFIX,
)


def metric_key(metric: str, params: dict, suffix: str = "") -> str:
    """MLflow metric name for one proportion, e.g. ``robust_accuracy.eps_0.1``."""
    key = metric + "".join(f".{k}_{v:g}" if isinstance(v, float) else f".{k}_{v}"
                           for k, v in sorted(params.items()))
    return key + suffix


def summary_metrics(cert: Certificate) -> dict[str, float]:
    """Every proportion's estimate and CI ends, keyed by :func:`metric_key`."""
    out = {}
    for res in cert.results:
        for v in res["values"]:
            key = metric_key(res["metric"], v["params"])
            out[key] = v["estimate"]
            out[key + ".ci_lower"], out[key + ".ci_upper"] = v["ci"]
    return out


def _param_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def short_name(metric: str, params: dict) -> str:
    """A short, distinct MLflow name for one quantity: ``acc``, ``robust_acc_0.1`` (ε),
    ``fail_rate_0.1``, ``cert_acc_r0.25`` (L2 radius); other parameters as ``<name><value>``.
    Only characters MLflow accepts in metric names and tags on every platform."""
    parts = [catalog.entry(metric).short]
    for key, value in sorted(params.items()):
        text = _param_text(value)
        parts.append(text if key == "eps" else ("r" + text if key == "radius" else key + text))
    return re.sub(r"[^\w.\-]", "_", "_".join(parts), flags=re.ASCII)


def headline_metrics(cert: Certificate) -> dict[str, float]:
    """The run's headline metrics: the estimate of every quantity a requirement is about, and
    clean accuracy, by :func:`short_name`, rounded to 4 decimals; ``pass`` is 1 for PASS."""
    out = {}
    for res in cert.results:
        if res["metric"] == "accuracy" and res["status"] == "ok" and res["values"]:
            out["acc"] = round(float(res["values"][0]["estimate"]), 4)
    for req in cert.requirements:
        if req["estimate"] is not None:
            out[short_name(req["metric"], req["params"])] = round(float(req["estimate"]), 4)
    out["pass"] = float(cert.passed)
    return out


def sandwich_metrics(cert: Certificate) -> dict[str, float]:
    """The safe radius's per-norm summaries as MLflow metrics: ``safe_radius.<kind>.<norm>.``
    ``median_lower`` / ``median_upper`` / ``median_ratio`` (certified / witnessed) /
    ``median_clever`` / ``median_estimate`` / ``sandwich_violations`` and, per certifying
    bound, ``certified_by_<bound>`` (points); for reachability each output's reachable range
    at each radius, ``safe_radius.reach.<norm>.r<r>.o<k>.{outer,found}_{lo,hi}``. Only finite
    numbers; names restricted to the characters MLflow accepts."""
    out: dict[str, float] = {}
    for res in cert.results:
        if res["metric"] != "safe_radius" or res["status"] != "ok":
            continue
        diag = res.get("diagnostics") or {}
        kind = str(diag.get("property", "adversarial"))
        for nm in catalog.NORM_LABELS:
            d = diag.get(nm)
            if not isinstance(d, dict):
                continue
            base = f"safe_radius.{kind}.{nm}."
            for key in ("median_lower", "median_upper", "median_ratio", "median_clever",
                        "median_estimate", "sandwich_violations"):
                _finite(out, base + key, d.get(key))
            for bound, count in (d.get("certified_by") or {}).items():
                _finite(out, base + f"certified_by_{bound}", count)
        for tag, row in (diag.get("ranges") or {}).items():
            nm, r, k = tag.split(":")
            base = re.sub(r"[^\w.\-]", "_", f"safe_radius.reach.{nm}.r{r}.o{k}.", flags=re.ASCII)
            for part in ("outer", "found"):
                if row.get(part):
                    _finite(out, base + f"{part}_lo", row[part][0])
                    _finite(out, base + f"{part}_hi", row[part][1])
    return out


def _finite(out: dict[str, float], key: str, value) -> None:
    if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
        out[key] = float(value)


def curve_points(cert: Certificate) -> dict[str, list[tuple[int, float]]]:
    """Each catalog curve (``catalog.entry(metric).curve``) the certificate has, as (step,
    value) points with the step the x value in thousandths (``round(1000·ε)``) and the value
    rounded to 4 decimals: logged as metric histories, MLflow's chart view draws and overlays
    them across runs."""
    out: dict[str, list[tuple[int, float]]] = {}
    for res in cert.results:
        spec = catalog.entry(res["metric"]).curve
        if spec is None or res["status"] != "ok":
            continue
        param, name = spec
        points = {}
        for v in res["values"]:
            if set(v["params"]) == {param} and v["estimate"] is not None:
                points[round(1000 * float(v["params"][param]))] = round(float(v["estimate"]), 4)
        if points:
            out[name] = sorted(points.items())
    return out


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def requirement_label(metric: str, params: dict) -> str:
    """``robust accuracy, ε = 0.1``; ``certified accuracy of the smoothed classifier, r =
    0.25``: how the description names a quantity."""
    from robust_cert.report.comparison import quantity_label

    if not params or set(params) == {"eps"}:
        return quantity_label(metric_key(metric, params))
    symbols = {"eps": "ε", "radius": "r"}
    return metric.replace("_", " ") + ", " + ", ".join(
        f"{symbols.get(k, k)} = {_param_text(v)}" for k, v in sorted(params.items()))


def description_summary(cert: Certificate, run_id: str, experiment_id: str) -> str:
    """The markdown summary written into the version description: verdict, policy, each
    requirement's estimate with its CI, threshold and verdict, the comparison with the
    baseline when there is one, and links to the certification run and its report (relative
    links of the MLflow UI)."""
    body = cert.body
    pol = body["policy"]
    conf = float(pol.get("confidence") or 0.95)
    run = f"#/experiments/{experiment_id}/runs/{run_id}"
    lines = [
        f"**Robustness: {cert.verdict}** under policy `{pol['name']}` "
        f"{pol.get('version') or ''} ({conf:.0%} family-wise confidence), issued "
        f"{str(body['issued_at']).replace('T', ' ').replace('+00:00', ' UTC')}",
        "",
        f"| Requirement | Estimate ({conf:.0%} CI) | Needed | Verdict |",
        "|---|---|---|---|",
    ]
    for req in cert.requirements:
        ci = req.get("ci")
        ci_text = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        op = "≥" if req["direction"] == "at_least" else "≤"
        lines.append(f"| {requirement_label(req['metric'], req['params'])} | "
                     f"{_fmt(req['estimate'])}{ci_text} | {op} {req['threshold']:g} | "
                     f"**{req['verdict']}** |")
    comparison = body.get("comparison")
    if isinstance(comparison, dict):
        base = comparison.get("baseline") or {}
        label = {q["key"]: q.get("label") or q["key"] for q in comparison.get("quantities", [])}
        worse = [label.get(k, k) for k in comparison.get("regressions") or []]
        better = [label.get(k, k) for k in comparison.get("improvements") or []]
        lines += ["", f"Compared with v{base.get('version')} ({base.get('verdict')}): "
                  + (f"**significantly worse**: {'; '.join(worse)}" if worse else
                     "no significant regression")
                  + (f"; significantly better: {'; '.join(better)}" if better else "") + "."]
    lines += ["", f"[Certification run]({run}) · [report]({run}/artifacts/report.html) · "
              f"certificate `{cert.digest[:12]}`"]
    return "\n".join(lines)


def version_tags(cert: Certificate, run_id: str) -> dict[str, str]:
    """The version's summary tags (besides the signed certificate): run id, policy, digest,
    the headline metrics (``robust_cert.<short name>``, 4 decimals) and the status last."""
    tags = {
        POLICY_TAG: cert.body["policy"]["name"],
        RUN_ID_TAG: run_id,
        DIGEST_TAG: cert.digest,
        DATA_TAG: cert.body["data"]["sha256"],
    }
    for key, value in headline_metrics(cert).items():
        if key != "pass":
            tags[f"{TAG_PREFIX}{key}"] = f"{value:.4f}"
    tags[STATUS_TAG] = STATUS[cert.verdict]
    return tags


def run_name(what: str, verdict: str) -> str:
    """``certify digits-cnn v2 · PASS`` for ``what`` = ``digits-cnn v2``: sorts by model and
    version, reads at a glance."""
    return f"certify {what} · {verdict}"
