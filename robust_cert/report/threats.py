"""The threat model a certificate actually tested, read from its metrics' configurations.

A reviewer asks "robust against what?": which perturbations, how large, and what the
attacker was assumed to know. The answer must come from the configuration that ran (with
defaults filled in), not from prose written beside it, so each family that has a threat
describes its own config here; a family without an entry is listed with its raw parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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


def _robust_accuracy(res: dict) -> Threat:
    cfg = res["config"]
    attacks = []
    for a in cfg.get("attacks", []):
        if a == "pgd":
            step = (f"step {cfg['step_size']:g}" if cfg.get("step_size")
                    else "step 2.5·ε/steps")
            start = ", random start" if cfg.get("random_start") else ""
            attacks.append(f"PGD ({cfg.get('steps')} steps, {step}{start})")
        else:
            attacks.append(a.upper())
    norm = "L∞" if cfg.get("norm", "linf") == "linf" else cfg.get("norm")
    source = res.get("diagnostics", {}).get("attack_source")
    knowledge = ("white-box: weights and input gradients" if source in (None,
                 "white-box on the model") else source)
    return Threat(res["metric"],
                  f"worst case over {' and '.join(attacks)} in the {norm} ball, clipped to "
                  "the input range", _radii(cfg.get("eps", [])), knowledge)


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


def threat_model(results: list[dict]) -> list[Threat]:
    """One row per metric in the certificate (not-applicable ones say so)."""
    rows = []
    for res in results:
        describe = THREATS.get(res["metric"])
        if describe is not None:
            row = describe(res)
        else:
            params = ", ".join(f"{k}={v}" for k, v in sorted(res["config"].items())) or "–"
            row = Threat(res["metric"], f"as configured: {params}", "–", "see the definition")
        if res["status"] != "ok":
            row = Threat(row.metric, f"not tested ({res['reason']})", row.radii, row.knowledge)
        rows.append(row)
    return rows
