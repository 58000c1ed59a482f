"""The threat-model section states each attack's budget (issue 12, section 2)."""

from __future__ import annotations

from pathlib import Path

import yaml

from robust_cert.report.threats import threat_model

POLICIES = Path(__file__).resolve().parents[1] / "examples" / "policies"


def _row(cfg: dict, diagnostics: dict | None = None):
    res = {"metric": "robust_accuracy", "status": "ok", "config": cfg,
           "diagnostics": diagnostics or {"attack_source": "white-box on the model"}}
    return threat_model([res])[0]


def test_ensemble_budget_is_stated() -> None:
    row = _row({"eps": [0.05, 0.1], "attacks": ["apgd_ce", "apgd_t", "fab", "square"],
                "steps": 10, "square_queries": 1000, "norm": "linf"})
    text = row.perturbation
    assert "APGD-CE (10 iterations, 1 restart)" in text
    assert "APGD-T (targeted DLR loss, 10 iterations for each other class" in text
    assert "FAB-T (10 iterations for each other class as target, 1 restart)" in text
    assert "Square (black box, 1000 queries per point, 1 restart" in text
    assert "L∞ ball" in text
    assert row.knowledge.startswith("white-box")
    assert row.radii == "ε = 0.05, ε = 0.1"


def test_autoattack_fallback_and_black_box_only() -> None:
    row = _row({"eps": [0.1], "attacks": ["autoattack"], "steps": 10, "norm": "linf"},
               {"attack_source": "white-box on the model",
                "fallback": "AutoAttack-standard needs at least 4 classes; ran apgd_ce + square"})
    assert "5,000 queries" in row.perturbation
    assert "ran apgd_ce + square" in row.perturbation
    square = _row({"eps": [0.1], "attacks": ["square"], "square_queries": 300, "norm": "l2"})
    assert square.knowledge.startswith("black-box")
    assert "300 queries" in square.perturbation


def test_example_policies_run_the_standard_ensemble() -> None:
    for name in ("digits.yaml", "digits-onnx.yaml", "digits-adversarial.yaml"):
        ra = yaml.safe_load((POLICIES / name).read_text())["metrics"]["robust_accuracy"]
        assert ra["attacks"] == ["apgd_ce", "apgd_t", "fab", "square"], name
        assert ra["steps"] >= 10, name
        assert ra["square_queries"] >= 1000, name
