"""How the report shows certificate values to a reader: labels, numbers, formulas, tables.

Pure functions from certificate JSON to display values (strings and :class:`Markup`), so the
template stays declarative and each rule is tested on its own. Nothing here changes a value:
it chooses a label, a precision, or a typographic form (subscripts, italics) that both
Chromium and WeasyPrint render (WeasyPrint has no MathML, so formulas are HTML text).
"""

from __future__ import annotations

import math
import re
from typing import Any

from markupsafe import Markup, escape

from robust_cert import stats
from robust_cert.verdicts import Verdict

# --------------------------------------------------------------------------- numbers


def fixed(v: float | None, digits: int = 4) -> str:
    """A rate or bound at a fixed number of decimals (``0.9800``); values too small to show
    at that precision (e.g. a rare-event probability) in scientific notation."""
    if v is None:
        return "–"
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v != 0 and abs(v) < 10 ** -(digits - 1):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}f}"


def interval(ci, digits: int = 4) -> str:
    """``[0.9800, 0.9993]``, or – when there is none."""
    if not ci:
        return "–"
    return f"[{fixed(ci[0], digits)}, {fixed(ci[1], digits)}]"


def signed(v: float | None, digits: int = 4) -> str:
    """A difference with its sign: ``+0.0123``, ``−0.0456`` (a true minus sign)."""
    if v is None:
        return "–"
    text = fixed(abs(v), digits)
    return ("+" if v > 0 else "−" if v < 0 else "±") + text


def signed_interval(ci, digits: int = 4) -> str:
    if not ci:
        return "–"
    return f"[{signed(ci[0], digits)}, {signed(ci[1], digits)}]"


def pvalue(v: float | None) -> str:
    """p-values span orders of magnitude: three significant digits."""
    if v is None:
        return "–"
    return f"{float(v):.3g}"


def breakable(text: Any) -> Markup:
    """``text`` escaped, with line-break opportunities (``<wbr>``) after ``_`` and ``,`` and
    before ``[`` only, so an identifier such as ``probabilistic_robustness[eps=0.1]`` wraps
    at its parts (``probabilistic_`` / ``robustness`` / ``[eps=0.1]``), never mid-word."""
    out = re.sub(r"([_,])", r"\1<wbr>", str(escape(str(text))))
    return Markup(out.replace("[", "<wbr>["))


# --------------------------------------------------------------------------- formulas

_SCRIPT = re.compile(r"(_\{[^{}]*\}|\^\{[^{}]*\}|_[^\W_])")
#: Single letters that are words, not variables.
_WORDS = {"a", "A", "I"}
_VARIABLE = re.compile(r"(?<![\w&#’])([A-Za-z])(?![\w;’])")
_SYMBOLS = (("<=", "≤"), (">=", "≥"), ("!=", "≠"), ("||", "‖"), ("~", "∼"), (" - ", " − "))


def _italic_variables(escaped: str) -> str:
    return _VARIABLE.sub(lambda m: m[1] if m[1] in _WORDS else f"<i>{m[1]}</i>", escaped)


def _typeset(text: str) -> str:
    for ascii_, symbol in _SYMBOLS:
        text = text.replace(ascii_, symbol)
    text = re.sub(r"(?<!\w)([A-Za-z])'", "\\1′", text)  # a variable's prime: x' -> x′
    text = text.replace("'", "’")  # an apostrophe in a word: attack's -> attack’s
    out = []
    for part in _SCRIPT.split(text):
        if not part:
            continue
        if _SCRIPT.fullmatch(part):
            tag = "sub" if part[0] == "_" else "sup"
            inner = part[2:-1] if part[1] == "{" else part[1:]
            out.append(f"<{tag}>{_italic_variables(str(escape(inner)))}</{tag}>")
        else:
            out.append(_italic_variables(str(escape(part))))
    return "".join(out)


def formula(text: Any) -> Markup:
    """A metric definition written in ASCII math (``P_{x~data, δ~U(B∞(ε))}[f(x) fails]``,
    ``||x' - x|| <= ε``) as typeset HTML: subscripts and superscripts, italic one-letter
    variables, ≤ ≥ ≠ ‖ ∼ ′ and a true minus."""
    return Markup(_typeset(str(text)))


# --------------------------------------------------------------------------- key/value tables

#: Human labels of configuration, diagnostics and model fields (others: key with spaces).
LABELS = {
    "eps": "ε (radii)", "attacks": "Attacks", "steps": "Attack iterations",
    "step_size": "PGD step size", "random_start": "Random start (PGD)",
    "square_queries": "Square query budget", "norm": "Norm", "samples": "Draws per ε",
    "failure": "Counted as a failure", "distribution": "Noise distribution",
    "sigma": "σ (noise scale)", "n0": "Draws to select the class", "n": "Draws to certify",
    "alpha": "α per point", "radii": "Radii", "batch_size": "Batch size",
    "broken_by_attack": "Points broken, by attack (per ε)", "attack_order": "Attack order",
    "attack_source": "Where attacks are crafted", "gradient_points_probed":
    "Points whose first gradient was inspected", "zero_gradient_points":
    "Points with an exactly zero input gradient", "max_linf_excess":
    "Largest L∞ step outside the ball (before projection)", "max_l2_excess":
    "Largest L2 step outside the ball (before projection)", "range_violations":
    "Attack outputs outside the range or ball (projected back)", "square_only_breaks":
    "Points only Square broke", "square_vs_white_box": "Square vs white-box (McNemar)",
    "fallback": "Fallback", "per_class_recall": "Recall per class", "bands": "Demonstrated bands",
    "by_eps": "", "confidence": "Confidence", "on_this_evaluation_set":
    "On this evaluation set", "population": "Population", "best_band": "Best band shown",
    "demonstrated": "Bands demonstrated", "next_band": "Next band",
    "more_failure_free_draws": "Failure-free draws needed for the next band",
    "upper_bound": "Upper bound", "interval_method": "Interval method", "points": "Points",
    "abstained": "Abstained points", "radius_cap": "Largest certifiable radius",
    # model identity
    "model_id": "MLflow logged model id", "source": "Artifact source (MLflow)",
    "run_id": "Training run id", "gradient_twin": "Gradient twin", "format": "Format",
    "sha256": "SHA-256", "uri": "URI", "max_abs_logit_diff":
    "Largest |Δ logit| against the model", "agreement": "Same prediction on",
    "tolerance": "Allowed |Δ logit|", "providers": "ONNX Runtime execution providers",
    "onnxruntime": "ONNX Runtime version", "outputs": "Model outputs", "opset": "ONNX opset",
    "white_box_only": "only white-box broke", "square_only": "only Square broke",
    "p_value": "p", "k": "k", "params": "Parameters",
    # sharded runs and memory
    "clean_correct_points": "Clean-correct points (attacked)", "view_mismatch_points":
    "Points where the attacked view disagrees with the model", "attacked_inputs":
    "Inputs attacked (points × ε × attacks)", "memory_retries":
    "Out-of-memory retries (batch halved)", "stage": "Stage",
}
#: Display forms of recorded enumeration values.
VALUE_NAMES = {"linf": "L∞", "l2": "L2", "uniform_linf": "uniform in the L∞ ball",
               "gaussian": "Gaussian", "prediction_changed": "prediction changed"}
ATTACK_NAMES = {"fgsm": "FGSM", "pgd": "PGD", "apgd_ce": "APGD-CE", "apgd_t": "APGD-T",
                "fab": "FAB-T", "square": "Square", "autoattack": "AutoAttack-standard"}
#: Lists longer than this are left to the certificate JSON (e.g. decision-surface grids).
MAX_LIST = 12


def label(key: str) -> str:
    if key in LABELS and LABELS[key]:
        return LABELS[key]
    text = str(key).replace("_", " ")
    return text[:1].upper() + text[1:]


def value_text(v: Any, key: str = "") -> str:
    """One scalar or short list as text: yes/no, four significant digits, attack names."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str):
        if key in ("attacks", "attack_order"):
            return ATTACK_NAMES.get(v, v)
        return VALUE_NAMES.get(v, v)
    if isinstance(v, (list, tuple)):
        return ", ".join(value_text(x, key) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{label(k) if not _is_number(k) else k}: {value_text(x, k)}"
                         for k, x in v.items() if x is not None)
    return str(v)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def kv_rows(mapping: dict[str, Any] | None, *, skip: tuple[str, ...] = (), prefix: str = "",
            parent: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(label, text) rows of a JSON mapping for a two-column table: human labels, nulls and
    empty values left out, nested mappings flattened as "Parent › child" (four levels),
    lists of scalars joined, short lists of mappings one item per line, long lists left to
    the certificate JSON."""
    rows: list[tuple[str, str]] = []
    for key, v in (mapping or {}).items():
        if key in skip or v is None or v in ("", [], {}):
            continue
        name = (f"ε = {key}" if parent in ("by_eps", "eps") and _is_number(key)
                else ATTACK_NAMES.get(key, key) if parent == "broken_by_attack"
                else LABELS[key] if key in LABELS else label(key))
        name = f"{prefix} › {name}" if prefix and name else prefix or name
        if isinstance(v, dict):
            if depth < 4:
                rows += kv_rows(v, prefix=name, parent=key, depth=depth + 1)
            else:
                rows.append((name, value_text(v, key)))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            if len(v) > 6:
                rows.append((name, f"{len(v)} entries (in the certificate JSON)"))
            else:
                rows.append((name, "\n".join(value_text(x, key) for x in v)))
        elif isinstance(v, list) and len(v) > MAX_LIST:
            rows.append((name, f"{len(v)} values (in the certificate JSON)"))
        elif isinstance(v, list) and any(isinstance(x, list) for x in v):
            rows.append((name, f"{len(v)}×{len(v[0])} values (in the certificate JSON)"
                         if all(isinstance(x, list) for x in v) else
                         f"{len(v)} values (in the certificate JSON)"))
        else:
            rows.append((name, value_text(v, key)))
    return rows


# --------------------------------------------------------------------------- sanity checks

PASSED, FAILED, NOT_RUN = "passed", "failed", "not_run"
STATE_TEXT = {PASSED: "passed", FAILED: "failed", NOT_RUN: "not run"}
#: What each known check verifies (the raw id is shown too).
CHECKS = {
    "deterministic_forward": "Model is deterministic at evaluation time",
    "eps0_equals_clean": "Attacked view reproduces the clean predictions (ε = 0)",
    "in_range_and_ball": "Attack outputs stay in the input range and the ε-ball",
    "gradients_nonzero": "Input gradients are non-zero (no gradient masking)",
    "square_not_better": "Black-box Square is not better than white-box attacks",
}
_WHY_NOT_RUN = {
    "eps0_equals_clean": "the attacked view is the model itself (no gradient twin, no "
                         "rescaled range or reshaped input): nothing to compare",
    "gradients_nonzero": "no white-box attack configured",
    "square_not_better": "needs both Square and a white-box attack in the policy",
    "in_range_and_ball": "no point was attacked",
}


def sanity_state(value: Any) -> str:
    """``passed`` / ``failed`` / ``not_run`` from a recorded state; legacy booleans read as
    passed/failed, a list (merged shards) as failed if any failed, else passed if any
    passed; anything unrecognised as not run (never as passed)."""
    if isinstance(value, bool):
        return PASSED if value else FAILED
    if isinstance(value, list):
        states = {sanity_state(v) for v in value}
        return FAILED if FAILED in states else PASSED if PASSED in states else NOT_RUN
    if isinstance(value, str):
        v = value.strip().lower().replace(" ", "_").replace("-", "_")
        if v in (PASSED, FAILED, NOT_RUN):
            return v
        if v in ("pass", "ok", "true"):
            return PASSED
        if v in ("fail", "false"):
            return FAILED
    if isinstance(value, dict) and "state" in value:
        return sanity_state(value["state"])
    return NOT_RUN


def _evidence(check: str, state: str, diag: dict) -> str:
    """What the metric's diagnostics show for a check that passed or did not run."""
    if state == NOT_RUN:
        return "not run: " + _WHY_NOT_RUN.get(check, "not applicable to this configuration")
    if check == "in_range_and_ball":
        norm = diag.get("norm", "linf")
        excess = diag.get(f"max_{norm}_excess")
        parts = [f"{diag.get('range_violations', 0)} attack outputs outside the range or ball"]
        if excess is not None:
            parts.append(f"largest excess {float(excess):.2g}")
        return "; ".join(parts)
    if check == "gradients_nonzero" and "gradient_points_probed" in diag:
        return (f"{diag.get('zero_gradient_points', 0)} of {diag['gradient_points_probed']} "
                "points had an exactly zero input gradient (limit 5%)")
    if check == "square_not_better" and diag.get("square_vs_white_box"):
        return "; ".join(f"ε = {c['eps']:g}: only white-box broke {c['white_box_only']}, "
                         f"only Square broke {c['square_only']}, one-sided McNemar p = "
                         f"{c['p_value']:.2g}" for c in diag["square_vs_white_box"])
    if check == "eps0_equals_clean" and state == PASSED:
        return "the attacked view predicts as the model on every point"
    return ""


def _action(rec: dict) -> str:
    action = rec.get("action")
    if action == "inconclusive":
        return "made INCONCLUSIVE: " + ", ".join(rec.get("made_inconclusive") or [])
    if action == "compensated":
        return f"verdicts stand: compensated by {rec.get('compensated_by')}"
    if action == "waived":
        return f"waived by the policy: {rec.get('waiver')}"
    if action == "none":
        return "verdicts stand (they do not rely on this check)"
    return ""


def sanity_rows(body: dict) -> list[dict]:
    """One row per sanity check in the certificate: ``check`` (raw id), ``title``,
    ``metric`` (None for checks of the model), ``state`` (passed / failed / not_run),
    ``evidence`` and ``action`` (what a failure did to the verdicts).

    Reads ``body["sanity"]`` (``deterministic_forward`` and the ``checks`` records of
    :func:`robust_cert.verdict.apply_sanity`) and, for checks not recorded there (older
    certificates), each metric's ``diagnostics["sanity"]`` (states or legacy booleans) and
    the legacy ``diagnostics["eps0_equals_clean"]``."""
    sanity = body.get("sanity") or {}
    diags = {r["metric"]: r.get("diagnostics") or {} for r in body.get("results", [])}
    rows: list[dict] = []
    seen: set[tuple[str | None, str]] = set()

    def add(check, metric, state, evidence, action=""):
        seen.add((metric, check))
        rows.append({"check": check, "title": CHECKS.get(check, label(check)),
                     "metric": metric, "state": state, "state_text": STATE_TEXT[state],
                     "evidence": evidence, "action": action})

    if "deterministic_forward" in sanity:
        state = sanity_state(sanity["deterministic_forward"])
        detail = sanity.get("deterministic_detail") or ""
        action = ""
        if state == FAILED:
            action = ("the policy declares the model stochastic: guarantees are about "
                      f"{sanity.get('guarantee_for')}" if sanity.get("stochastic_declared")
                      else "")
        add("deterministic_forward", None, state, detail, action)
    for rec in sanity.get("checks") or []:
        if not isinstance(rec, dict) or "check" not in rec:
            continue
        metric, check = rec.get("metric"), rec["check"]
        if (metric, check) in seen:
            for row in rows:  # the model-level record of a check shown above: add its action
                if (row["metric"], row["check"]) == (metric, check) and not row["action"]:
                    row["action"] = _action(rec)
            continue
        state = sanity_state(rec.get("state"))
        evidence = rec.get("detail") or _evidence(check, state, diags.get(metric, {}))
        add(check, metric, state, evidence, _action(rec))
    for metric, diag in diags.items():
        raw = dict(diag.get("sanity") or {})
        if "eps0_equals_clean" in diag and "eps0_equals_clean" not in raw:
            raw["eps0_equals_clean"] = diag["eps0_equals_clean"]  # legacy boolean
        findings = diag.get("sanity_findings") or {}
        for check, value in raw.items():
            if (metric, check) in seen:
                continue
            state = sanity_state(value)
            finding = findings.get(check) or {}
            evidence = finding.get("detail") or _evidence(check, state, diag)
            add(check, metric, state, evidence,
                f"verdicts stand: compensated by {finding['compensated_by']}"
                if finding.get("compensated_by") else "")
    return rows


# --------------------------------------------------------------------------- results

_BOUND_IN_REASON = re.compile(r"\b(lower|upper) bound (-?[0-9.]+(?:e-?[0-9]+)?)")


def decisive_bound(req: dict) -> dict:
    """The one-sided bound, at the requirement's Holm level, that decided its verdict:
    ``{"side": "lower" | "upper", "value": float | None}``.

    PASS: the bound that cleared the threshold (lower for ``at_least``, upper for
    ``at_most``; the certificate's ``bound``). FAIL: the opposite bound, which excluded the
    threshold (recorded as ``lower_bound``/``upper_bound`` when the certificate has them,
    else recomputed exactly for Clopper–Pearson proportions, else as stated in the reason).
    INCONCLUSIVE: the bound that failed to clear the threshold (``bound``)."""
    at_least = req.get("direction") == "at_least"
    pass_side = "lower" if at_least else "upper"
    if req.get("verdict") != Verdict.FAIL:
        return {"side": pass_side, "value": req.get("bound")}
    side = "upper" if at_least else "lower"
    if req.get(f"{side}_bound") is not None:
        return {"side": side, "value": float(req[f"{side}_bound"])}
    # certificates issued before both bounds were recorded
    method = str(req.get("interval_method") or "")
    k, n, level = req.get("k"), req.get("n"), req.get("level")
    if (method.startswith("clopper-pearson") and k is not None and n is not None
            and level is not None and n):
        lo, hi = stats.clopper_pearson(int(k), int(n), 1.0 - float(level), side)
        return {"side": side, "value": lo if side == "lower" else hi}
    m = _BOUND_IN_REASON.search(str(req.get("reason") or ""))
    if m and m[1] == side:
        return {"side": side, "value": float(m[2])}
    return {"side": side, "value": None}
