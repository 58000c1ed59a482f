"""What the report shows for certificate values: formulas, numbers, labels, sanity checks,
the bound that decided, intended use (pure functions; no certification run, fast)."""

from __future__ import annotations

import pytest

from robust_cert import stats
from robust_cert.policy import Policy
from robust_cert.report import present
from robust_cert.report.html import intended_use, tracking_uri

# --------------------------------------------------------------------------- formulas


def test_formulas_are_typeset_as_html_text():
    probabilistic = str(present.formula("P_{x~data, δ~U(B∞(ε))}[f(clip(x+δ)) fails]"))
    assert probabilistic == ("<i>P</i><sub><i>x</i>∼data, δ∼<i>U</i>(<i>B</i>∞(ε))</sub>"
                             "[<i>f</i>(clip(<i>x</i>+δ)) fails]")
    attack = str(present.formula("P[f(x') = y for every attack's x' with ||x' - x|| <= ε]"))
    assert "‖<i>x</i>′ − <i>x</i>‖ ≤ ε" in attack
    assert "attack’s" in attack  # a prime after a variable, an apostrophe in a word
    assert "<i>y</i>" in attack
    assert "_{" not in probabilistic
    assert "||" not in attack
    assert "<=" not in attack
    assert str(present.formula("P_δ[f(x) fails] ≤ p1")).startswith("<i>P</i><sub>δ</sub>")
    assert str(present.formula("σ^{2} of a ball")) == "σ<sup>2</sup> of a ball"  # "a": a word
    # the text is escaped: a description cannot inject markup
    assert str(present.formula("<script>x</script>")) == (
        "&lt;script&gt;<i>x</i>&lt;/script&gt;")


# --------------------------------------------------------------------------- numbers, ids


def test_numbers_have_one_precision():
    assert present.interval([0.98, 0.99934]) == "[0.9800, 0.9993]"
    assert present.interval(None) == "–"
    assert present.fixed(0.9) == "0.9000"
    assert present.fixed(0) == "0.0000"
    assert present.fixed(1.5e-6) == "1.500e-06"  # a rare-event rate is not shown as 0.0000
    assert present.fixed(None) == "–"
    assert present.signed(-0.05571) == "−0.0557"
    assert present.signed(0.0028) == "+0.0028"
    assert present.signed_interval([-0.0917, 0.0233]) == "[−0.0917, +0.0233]"
    assert present.pvalue(4.3e-12) == "4.3e-12"


def test_requirement_ids_break_only_between_their_parts():
    shown = str(present.breakable("probabilistic_robustness[eps=0.1]"))
    assert shown == "probabilistic_<wbr>robustness<wbr>[eps=0.1]"
    assert shown.replace("<wbr>", "") == "probabilistic_robustness[eps=0.1]"
    assert str(present.breakable("a<b")) == "a&lt;b"


# --------------------------------------------------------------------------- key/value tables


def test_key_value_rows_have_labels_and_no_nulls():
    config = {"attacks": ["fgsm", "pgd"], "eps": [0.05, 0.1], "norm": "linf",
              "random_start": True, "square_queries": 1000, "step_size": None, "steps": 10}
    rows = dict(present.kv_rows(config))
    assert rows == {"Attacks": "FGSM, PGD", "ε (radii)": "0.05, 0.1", "Norm": "L∞",
                    "Random start (PGD)": "yes", "Square query budget": "1000",
                    "Attack iterations": "10"}
    model = {"model_id": "m-0a1b", "source": "models:/m-0a1b",
             "gradient_twin": {"format": "pytorch-module", "max_abs_logit_diff": 0.0,
                               "agreement": "359/359", "uri": None},
             "providers": ["CPUExecutionProvider"]}
    rows = dict(present.kv_rows(model))
    assert rows["MLflow logged model id"] == "m-0a1b"
    assert rows["Artifact source (MLflow)"] == "models:/m-0a1b"
    assert rows["Gradient twin › Largest |Δ logit| against the model"] == "0"
    assert rows["Gradient twin › Same prediction on"] == "359/359"
    assert rows["ONNX Runtime execution providers"] == "CPUExecutionProvider"
    assert not any("URI" in k for k in rows)  # null left out
    nested = {"bands": {"by_eps": {"0.1": {"population": {"upper_bound": 0.0389}}}},
              "surface": [[0.0] * 11] * 11, "many": list(range(40))}
    rows = dict(present.kv_rows(nested))
    assert rows["Demonstrated bands › ε = 0.1 › Population › Upper bound"] == "0.0389"
    assert rows["Surface"] == "11×11 values (in the certificate JSON)"
    assert rows["Many"] == "40 values (in the certificate JSON)"


# --------------------------------------------------------------------------- sanity checks


def _body(sanity: dict | None, diagnostics: dict) -> dict:
    return {"sanity": sanity, "results": [{"metric": "robust_accuracy",
                                           "diagnostics": diagnostics}]}


def test_sanity_rows_show_three_states_with_evidence_and_action():
    diagnostics = {"range_violations": 0, "max_linf_excess": 2.2e-8, "norm": "linf",
                   "zero_gradient_points": 30, "gradient_points_probed": 300,
                   "square_vs_white_box": []}
    sanity = {
        "deterministic_forward": "passed",
        "deterministic_detail": "two forward passes on the same 64 inputs agree",
        "checks": [
            {"check": "eps0_equals_clean", "metric": "robust_accuracy", "state": "not_run"},
            {"check": "in_range_and_ball", "metric": "robust_accuracy", "state": "passed"},
            {"check": "gradients_nonzero", "metric": "robust_accuracy", "state": "failed",
             "detail": "gradient masking suspected: 30 of 300 points", "action": "inconclusive",
             "made_inconclusive": ["robust_accuracy[eps=0.1]"]},
            {"check": "square_not_better", "metric": "robust_accuracy", "state": "failed",
             "detail": "Square broke more", "action": "waived", "waiver": "known masking"},
        ],
    }
    rows = {r["check"]: r for r in present.sanity_rows(_body(sanity, diagnostics))}
    assert list(rows) == ["deterministic_forward", "eps0_equals_clean", "in_range_and_ball",
                          "gradients_nonzero", "square_not_better"]
    assert rows["deterministic_forward"]["metric"] is None
    assert rows["deterministic_forward"]["state_text"] == "passed"
    assert "64 inputs agree" in rows["deterministic_forward"]["evidence"]
    assert rows["eps0_equals_clean"]["state_text"] == "not run"
    assert rows["eps0_equals_clean"]["evidence"].startswith("not run: the attacked view")
    assert rows["in_range_and_ball"]["evidence"] == (
        "0 attack outputs outside the range or ball; largest excess 2.2e-08")
    assert rows["gradients_nonzero"]["state"] == "failed"
    assert rows["gradients_nonzero"]["action"] == ("made INCONCLUSIVE: "
                                                   "robust_accuracy[eps=0.1]")
    assert rows["square_not_better"]["action"] == "waived by the policy: known masking"


def test_sanity_rows_read_legacy_booleans_and_metric_diagnostics():
    """Certificates from before the three states: booleans, and checks recorded only in the
    metric's diagnostics. An unknown value never reads as passed."""
    diagnostics = {"sanity": {"gradients_nonzero": True, "in_range_and_ball": False,
                              "square_not_better": ["passed", "failed"],
                              "mystery": "maybe"},
                   "eps0_equals_clean": True, "zero_gradient_points": 0,
                   "gradient_points_probed": 10, "range_violations": 3}
    rows = {r["check"]: r for r in
            present.sanity_rows(_body({"deterministic_forward": False}, diagnostics))}
    assert rows["deterministic_forward"]["state"] == "failed"
    assert rows["gradients_nonzero"]["state"] == "passed"
    assert rows["gradients_nonzero"]["evidence"].startswith("0 of 10 points")
    assert rows["in_range_and_ball"]["state"] == "failed"
    assert rows["in_range_and_ball"]["evidence"].startswith("3 attack outputs")
    assert rows["square_not_better"]["state"] == "failed"  # merged shards: any failed
    assert rows["eps0_equals_clean"]["state"] == "passed"
    assert rows["mystery"]["state"] == "not_run"
    assert present.sanity_rows({"results": []}) == []


# --------------------------------------------------------------------------- decisive bound


def _requirement(verdict, direction="at_least", **kw):
    base = {"id": "r", "direction": direction, "threshold": 0.7, "verdict": verdict,
            "k": 173, "n": 359, "level": 0.025, "bound": 0.4291,
            "interval_method": "clopper-pearson (exact)", "reason": ""}
    return {**base, **kw}


def test_the_bound_that_decided_is_shown():
    assert present.decisive_bound(_requirement("PASS")) == {"side": "lower", "value": 0.4291}
    assert present.decisive_bound(_requirement("PASS", "at_most", bound=0.01)) == {
        "side": "upper", "value": 0.01}
    assert present.decisive_bound(_requirement("INCONCLUSIVE"))["side"] == "lower"
    # FAIL of "at least": the upper bound excluded the threshold (recomputed exactly)
    fail = present.decisive_bound(_requirement(
        "FAIL", reason="upper bound 0.5349 is below the threshold 0.7"))
    upper = stats.clopper_pearson(173, 359, 0.975, "upper")[1]
    assert fail == {"side": "upper", "value": upper}
    assert f"{upper:.4g}" == "0.5349"  # the number the reason cites
    # clustered draws (betting): the bound as the verdict's reason states it
    betting = present.decisive_bound(_requirement(
        "FAIL", "at_most", interval_method="betting on the per-point rates",
        reason="lower bound 0.0312 is above the threshold 0.02"))
    assert betting == {"side": "lower", "value": 0.0312}
    # recorded by the certificate: taken as recorded
    assert present.decisive_bound(_requirement("FAIL", upper_bound=0.5))["value"] == 0.5


# --------------------------------------------------------------------------- intended use


def test_intended_use_comes_from_the_model_first():
    policy = {"name": "p", "document": {"description": "policy text"}}
    body = {"model": {"version_description": "Reads digits on forms."}, "policy": policy}
    assert intended_use(body) == ("Reads digits on forms.",
                                  "the registered model version's description")
    body["model"]["intended_use"] = "Set by the user."
    assert intended_use(body)[0] == "Set by the user."
    body = {"model": {}, "policy": {"name": "p", "document": {
        "description": "policy text", "intended_use": "Sorting mail."}}}
    assert intended_use(body) == ("Sorting mail.", "declared by the policy p")
    text, source = intended_use({"model": {}, "policy": policy})
    assert text == "policy text"
    assert "neither the model nor the policy records an intended use" in source
    assert tracking_uri({"environment": {"tracking_uri": "http://h:5000"}}) == "http://h:5000"
    assert tracking_uri({"environment": {}, "model": {}}) is None


@pytest.mark.parametrize("intended", ["", "Reads digits on bank forms."])
def test_policy_intended_use_is_optional_and_keeps_old_hashes(intended):
    raw = {"name": "p", "metrics": {"accuracy": {}},
           "requirements": [{"metric": "accuracy", "at_least": 0.5}]}
    with_field = Policy.from_dict({**raw, "intended_use": intended})
    assert (with_field.sha256 == Policy.from_dict(raw).sha256) == (not intended)
    assert with_field.canonical().get("intended_use") == (intended or None)


def test_a_random_model_is_one_row_with_what_it_did():
    sanity = {"deterministic_forward": "failed",
              "deterministic_detail": "two forward passes disagree on 64 of 64 inputs",
              "checks": [{"check": "deterministic_forward", "metric": None, "state": "failed",
                          "detail": "…", "action": "inconclusive",
                          "made_inconclusive": ["accuracy", "robust_accuracy[eps=0.1]"]}]}
    rows = present.sanity_rows(_body(sanity, {}))
    assert len(rows) == 1
    (row,) = rows
    assert row["state"] == "failed"
    assert row["evidence"] == "two forward passes disagree on 64 of 64 inputs"
    assert row["action"] == "made INCONCLUSIVE: accuracy, robust_accuracy[eps=0.1]"
