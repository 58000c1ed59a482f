"""The threat model a certificate actually tested, read from its metrics' configurations.

A reviewer asks "robust against what?": which perturbations, how large, and what the
attacker was assumed to know. The answer must come from the configuration that ran (with
defaults filled in), not from prose written beside it, so each family that has a threat
describes its own config here; a family without an entry is listed with its raw parameters
and, where its catalog entry declares a curve, the values along it (:func:`generic_threat`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from robust_cert import catalog


@dataclass(frozen=True)
class Threat:
    """One row of the threat-model table."""

    metric: str
    perturbation: str
    radii: str
    knowledge: str


def _radii(eps) -> str:
    values = eps if isinstance(eps, list) else [eps]
    return ", ".join(f"ε = {e:g}" for e in values) or "–"


def _accuracy(res: dict) -> Threat:
    return Threat(res["metric"], "none: clean evaluation inputs", "–", "no adversary")


#: Budgets of torchattacks' AutoAttack-standard (3.3.0), which the policy cannot change.
AUTOATTACK_BUDGET = ("AutoAttack-standard (torchattacks 3.3.0 settings: APGD-CE, APGD-T and "
                     "FAB-T 10 iterations each, APGD-T and FAB-T targeted at each other class, "
                     "Square 5,000 queries; 1 restart each)")


def _attack_budget(a: str, cfg: dict) -> str:
    """One attack with the budget it ran with (the policy's values, defaults filled in)."""
    steps = cfg.get("steps")
    if a == "fgsm":
        return "FGSM (1 step)"
    if a == "pgd":
        step = (f"step {cfg['step_size']:g}" if cfg.get("step_size")
                else "step 2.5·ε/steps")
        start = ", random start" if cfg.get("random_start") else ""
        return f"PGD ({steps} steps, {step}{start}, 1 restart)"
    if a == "apgd_ce":
        return f"APGD-CE ({steps} iterations, 1 restart)"
    if a == "apgd_t":
        return (f"APGD-T (targeted DLR loss, {steps} iterations for each other class as "
                "target, 1 restart)")
    if a == "fab":
        return f"FAB-T ({steps} iterations for each other class as target, 1 restart)"
    if a == "square":
        return (f"Square (black box, {cfg.get('square_queries')} queries per point, 1 restart, "
                "every window position)")
    if a == "autoattack":
        return AUTOATTACK_BUDGET
    return a.upper()


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{'; '.join(items[:-1])} and {items[-1]}"


def _robust_accuracy(res: dict) -> Threat:
    cfg = res["config"]
    diag = res.get("diagnostics", {})
    attacks = [_attack_budget(a, cfg) for a in cfg.get("attacks", [])]
    fallback = diag.get("fallback")
    norm = "L∞" if cfg.get("norm", "linf") == "linf" else cfg.get("norm")
    source = diag.get("attack_source")
    black_box_only = set(cfg.get("attacks", [])) <= {"square"}
    knowledge = ("black-box: output scores only" if black_box_only and source in (
                 None, "white-box on the model") else
                 "white-box: weights and input gradients" if source in (None,
                 "white-box on the model") else source)
    return Threat(res["metric"],
                  f"worst case over {_and(attacks)} in the {norm} ball, clipped to "
                  "the input range" + (f"; {fallback}" if fallback else ""),
                  _radii(cfg.get("eps", [])), knowledge)


def _probabilistic(res: dict) -> Threat:
    cfg = res["config"]
    failure = ("prediction changes" if cfg.get("failure") == "prediction_changed"
               else "misclassification")
    return Threat(res["metric"],
                  f"random noise δ uniform in the L∞ ball ({cfg.get('samples')} draws per ε), "
                  f"clipped to the input range; failure = {failure}",
                  _radii(cfg.get("eps", [])), "none: random perturbation, no adversary")


def _parity(res: dict) -> Threat:
    cfg = res["config"]
    ref = res.get("diagnostics", {}).get("reference", {})
    what = ref.get("uri") or cfg.get("reference")
    radii = _radii(cfg.get("eps", []))
    return Threat(res["metric"],
                  f"deployment: predictions compared with the reference {what}"
                  + (" on clean and uniformly perturbed inputs" if cfg.get("eps") else ""),
                  f"clean{'; ' + radii if cfg.get('eps') else ''}",
                  "no adversary")


#: Threat descriptions per metric family.
THREATS: dict[str, Callable[[dict], Threat]] = {
    "accuracy": _accuracy,
    "robust_accuracy": _robust_accuracy,
    "probabilistic_robustness": _probabilistic,
    "parity": _parity,
}


def generic_threat(res: dict) -> Threat:
    """The row of a family without a description in :data:`THREATS`: its configuration as
    recorded, and as radii the values of its catalog curve's parameter that its proportions
    were computed at (with the entry's unit; ``–`` when it declares no curve or has none)."""
    params = ", ".join(f"{k}={v}" for k, v in sorted(res["config"].items())) or "–"
    entry = catalog.entry(res["metric"])
    radii = "–"
    if entry.curve is not None:
        axis = entry.curve.param
        values = sorted({float(v["params"][axis]) for v in res.get("values", [])
                         if set(v["params"]) == {axis}})
        if values:
            symbol = "ε" if axis == "eps" else axis
            radii = ", ".join(f"{symbol} = {v:g}" for v in values) + (
                f" ({entry.unit})" if entry.unit else "")
    return Threat(res["metric"], f"as configured: {params}", radii, "see the definition")


def threat_model(results: list[dict]) -> list[Threat]:
    """One row per metric in the certificate (not-applicable ones say so)."""
    rows = []
    for res in results:
        describe = THREATS.get(res["metric"])
        row = describe(res) if describe is not None else generic_threat(res)
        if res["status"] != "ok":
            row = Threat(row.metric, f"not tested ({res['reason']})", row.radii, row.knowledge)
        rows.append(row)
    return rows


def feature_rows(data: dict) -> tuple[str, list[dict]] | None:
    """The per-feature threat model a certificate's ``data.features`` records (a policy's
    ``features:``, :mod:`robust_cert.tabular`): a one-line summary and one row per feature
    (name, range and where it came from, and how far a perturbation may move it); None
    without one."""
    rec = data.get("features")
    if not rec:
        return None
    unit = {"range": "its range", "std": "its standard deviation on the evaluation set",
            "none": "data units"}.get(rec["scale"], rec["scale"])
    rows = []
    for f in rec["features"]:
        lo, hi = f["range"]
        moves = (f"immutable ({f['immutable']})" if "immutable" in f
                 else f"ε × {f['scale']:.4g}")
        rows.append({"name": f["name"], "range": f"[{lo:.6g}, {hi:.6g}]",
                     "from": f["range_from"], "moves": moves})
    immutable = sum("immutable" in f for f in rec["features"])
    summary = (f"Per-feature threat model: ε and every noise scale in units of {unit} per "
               f"feature; {immutable} of {len(rows)} features immutable (never perturbed); "
               "every perturbed input lies in the per-feature ranges.")
    return summary, rows
