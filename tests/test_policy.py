"""Policy loading, canonical hashing and validation errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from robust_cert import Policy, PolicyError, load_policy

REPO = Path(__file__).resolve().parents[1]
DIGITS_POLICY = REPO / "examples" / "policies" / "digits.yaml"


def _base() -> dict:
    """A small valid policy used as the starting point of the invalid variants."""
    return {
        "name": "t",
        "metrics": {
            "accuracy": {},
            "robust_accuracy": {"eps": [0.05, 0.1], "attacks": ["fgsm"]},
        },
        "requirements": [
            {"metric": "accuracy", "at_least": 0.9},
            {"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.5},
        ],
    }


def _error(raw) -> str:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(raw)
    return str(info.value)


# --------------------------------------------------------------------------- valid policies


def test_example_policy_loads() -> None:
    pol = load_policy(DIGITS_POLICY)
    assert pol.name == "digits-production"
    assert pol.confidence == 0.95
    assert list(pol.metrics) == ["accuracy", "robust_accuracy", "probabilistic_robustness"]
    assert pol.metrics["robust_accuracy"]["eps"] == [0.025, 0.05, 0.075, 0.1]
    assert pol.metrics["robust_accuracy"]["attacks"] == ["apgd_ce", "apgd_t", "fab", "square"]
    # defaults are filled in (a scalar eps becomes a list: see the scientific-notation test)
    assert pol.metrics["probabilistic_robustness"]["eps"] == [0.025, 0.05, 0.075, 0.1]
    assert pol.metrics["probabilistic_robustness"]["samples"] == 2995
    assert pol.metrics["probabilistic_robustness"]["distribution"] == "uniform_linf"
    assert [r.id for r in pol.requirements] == [
        "accuracy", "robust_accuracy[eps=0.1]", "probabilistic_robustness[eps=0.1]"]
    assert [r.direction for r in pol.requirements] == ["at_least", "at_least", "at_most"]
    assert [r.threshold for r in pol.requirements] == [0.9, 0.7, 0.05]
    assert load_policy(pol) is pol


def test_hash_is_stable_and_hex() -> None:
    a = load_policy(DIGITS_POLICY).sha256
    b = load_policy(DIGITS_POLICY).sha256
    assert a == b
    assert len(a) == 64
    assert int(a, 16) >= 0


def test_yaml_file_and_equivalent_dict_hash_equal() -> None:
    minimal = {
        "name": "digits-production",
        "version": "1.0",
        "description": "Minimum robustness for an 8x8 digit classifier going to production.",
        "metrics": {
            "accuracy": {},
            # order and defaults differ
            "robust_accuracy": {"eps": [0.1, 0.05, 0.075, 0.025],
                                "attacks": ["apgd_ce", "apgd_t", "fab", "square"]},
            "probabilistic_robustness": {"eps": [0.075, 0.1, 0.025, 0.05]},
        },
        "requirements": [
            {"metric": "accuracy", "at_least": 0.90},
            {"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.70},
            {"metric": "probabilistic_robustness", "params": {"eps": 0.1}, "at_most": 0.05},
        ],
    }
    assert Policy.from_dict(minimal).sha256 == load_policy(DIGITS_POLICY).sha256


def test_hash_equal_with_defaults_omitted_or_spelled_out() -> None:
    omitted = _base()
    spelled = {
        "name": "t",
        "version": "1",
        "description": "",
        "confidence": 0.95,
        "input_range": [0.0, 1.0],
        "batch_size": 256,
        "metrics": {
            "accuracy": {},
            "robust_accuracy": {"eps": [0.05, 0.1], "attacks": ["fgsm"], "norm": "linf",
                                "steps": 10, "step_size": None, "random_start": True},
        },
        "requirements": [
            {"metric": "accuracy", "params": {}, "at_least": 0.9, "id": "accuracy"},
            {"metric": "robust_accuracy", "params": {"eps": 0.1}, "at_least": 0.5,
             "at_most": None, "id": "robust_accuracy[eps=0.1]"},
        ],
    }
    a, b = Policy.from_dict(omitted), Policy.from_dict(spelled)
    assert a.canonical() == b.canonical()
    assert a.sha256 == b.sha256


def test_hash_changes_with_content() -> None:
    base = Policy.from_dict(_base()).sha256
    changed = _base()
    changed["requirements"][1]["at_least"] = 0.51
    assert Policy.from_dict(changed).sha256 != base
    conf = _base()
    conf["confidence"] = 0.99
    assert Policy.from_dict(conf).sha256 != base
    steps = _base()
    steps["metrics"]["robust_accuracy"]["steps"] = 11
    assert Policy.from_dict(steps).sha256 != base


def test_inline_params_equal_explicit_params() -> None:
    inline = _base()
    explicit = _base()
    explicit["requirements"][1] = {"metric": "robust_accuracy", "params": {"eps": 0.1},
                                   "at_least": 0.5}
    a, b = Policy.from_dict(inline), Policy.from_dict(explicit)
    assert a.requirements[1].params == {"eps": 0.1}
    assert a.requirements[1] == b.requirements[1]
    assert a.sha256 == b.sha256


def test_metric_instance_from_policy() -> None:
    pol = Policy.from_dict(_base())
    m = pol.metric("robust_accuracy")
    assert m.selectors() == [{"eps": 0.05}, {"eps": 0.1}]
    assert m.config.attacks == ["fgsm"]


# --------------------------------------------------------------------------- invalid policies


def test_unknown_top_level_key() -> None:
    raw = _base()
    raw["threshold"] = 0.5
    msg = _error(raw)
    assert "threshold" in msg
    assert "unknown key" in msg


def test_unknown_metric() -> None:
    raw = _base()
    raw["metrics"]["bogus_metric"] = {}
    msg = _error(raw)
    assert "bogus_metric" in msg
    assert "unknown metric" in msg
    assert "robust_accuracy" in msg  # lists the known ones


@pytest.mark.parametrize(
    ("param", "value", "expect"),
    [
        ("eps", -1, "metrics.robust_accuracy.eps"),
        ("steps", 0, "metrics.robust_accuracy.steps"),
        ("attacks", ["cw"], "metrics.robust_accuracy.attacks"),
        ("step_size", 0, "metrics.robust_accuracy.step_size"),
    ],
)
def test_bad_metric_parameter(param: str, value, expect: str) -> None:
    raw = _base()
    raw["metrics"]["robust_accuracy"][param] = value
    assert expect in _error(raw)


def test_bad_probabilistic_parameter() -> None:
    raw = _base()
    raw["metrics"]["probabilistic_robustness"] = {"eps": 0.0}
    msg = _error(raw)
    assert "metrics.probabilistic_robustness.eps" in msg
    raw["metrics"]["probabilistic_robustness"] = {"eps": 0.1, "samples": 0}
    assert "metrics.probabilistic_robustness.samples" in _error(raw)
    raw["metrics"]["probabilistic_robustness"] = {"eps": 0.1, "failure": "sometimes"}
    assert "metrics.probabilistic_robustness.failure" in _error(raw)


def test_unknown_parameter_inside_metric() -> None:
    raw = _base()
    raw["metrics"]["robust_accuracy"]["restarts"] = 3
    msg = _error(raw)
    assert "metrics.robust_accuracy.restarts" in msg
    assert "unknown key" in msg


def test_metric_missing_required_parameter() -> None:
    raw = _base()
    raw["metrics"]["robust_accuracy"] = {}
    assert "metrics.robust_accuracy.eps" in _error(raw)


@pytest.mark.parametrize("confidence", [1.5, 1.0, 0.5, -0.1])
def test_bad_confidence(confidence: float) -> None:
    raw = _base()
    raw["confidence"] = confidence
    assert "confidence" in _error(raw)


def test_requirement_metric_not_configured() -> None:
    raw = _base()
    raw["requirements"].append(
        {"metric": "probabilistic_robustness", "eps": 0.1, "at_most": 0.01})
    msg = _error(raw)
    assert "requirements[2]" in msg
    assert "probabilistic_robustness" in msg
    assert "not among" in msg


def test_requirement_eps_not_configured_lists_available() -> None:
    raw = _base()
    raw["requirements"][1]["eps"] = 0.2
    msg = _error(raw)
    assert "requirements[1]" in msg
    assert "0.2" in msg
    assert "available" in msg
    assert '{"eps": 0.05}' in msg
    assert '{"eps": 0.1}' in msg


def test_requirement_unknown_parameter() -> None:
    raw = _base()
    raw["requirements"][0]["eps"] = 0.1  # accuracy takes no parameters
    msg = _error(raw)
    assert "requirements[0]" in msg
    assert "accuracy" in msg


@pytest.mark.parametrize(
    "req",
    [
        {"metric": "accuracy", "at_least": 0.5, "at_most": 0.9},
        {"metric": "accuracy"},
    ],
)
def test_requirement_needs_exactly_one_threshold(req: dict) -> None:
    raw = _base()
    raw["requirements"][0] = req
    msg = _error(raw)
    assert "requirements" in msg
    assert "at_least" in msg
    assert "at_most" in msg


@pytest.mark.parametrize(("key", "value"), [("at_least", 1.5), ("at_most", -0.1)])
def test_threshold_outside_unit_interval(key: str, value: float) -> None:
    raw = _base()
    raw["requirements"][0] = {"metric": "accuracy", key: value}
    msg = _error(raw)
    assert key in msg
    assert "requirements" in msg


def test_duplicate_requirement_id() -> None:
    raw = _base()
    raw["requirements"].append({"metric": "accuracy", "at_least": 0.8})
    msg = _error(raw)
    assert "duplicate" in msg
    assert "accuracy" in msg


def test_empty_requirements() -> None:
    raw = _base()
    raw["requirements"] = []
    assert "requirements" in _error(raw)


def test_empty_metrics() -> None:
    raw = _base()
    raw["metrics"] = {}
    assert "metrics" in _error(raw)


def test_missing_name() -> None:
    raw = _base()
    del raw["name"]
    assert "name" in _error(raw)


def test_empty_input_range() -> None:
    raw = _base()
    raw["input_range"] = [1.0, 0.0]
    assert "input_range" in _error(raw)


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\nmetrics: {accuracy: {}\nrequirements: [\n")
    with pytest.raises(PolicyError, match="not valid YAML") as info:
        load_policy(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match="not found") as info:
        load_policy(path)
    assert "nope.yaml" in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_non_mapping_document(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match="must be a mapping") as info:
        load_policy(path)
    assert "list.yaml" in str(info.value)


def test_invalid_yaml_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    raw = copy.deepcopy(_base())
    raw["metrics"]["robust_accuracy"]["steps"] = 0
    import yaml

    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    assert "p.yaml" in msg
    assert "metrics.robust_accuracy.steps" in msg


def test_yaml_file_round_trip(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_base()))
    assert load_policy(path).sha256 == Policy.from_dict(_base()).sha256


def test_yaml_scientific_notation_is_a_number(tmp_path: Path) -> None:
    """Failure-rate thresholds and radii are naturally written 1e-3, 1e-1 in a policy file.

    PyYAML (YAML 1.1) reads ``1e-1`` (no dot) as a string; the policy must still mean the
    number 0.1 and hash like the same policy written with decimals.
    """
    sci = tmp_path / "sci.yaml"
    sci.write_text(
        "name: t\n"
        "metrics:\n"
        "  accuracy: {}\n"
        "  probabilistic_robustness: {eps: 1e-1, samples: 10}\n"
        "requirements:\n"
        "  - {metric: accuracy, at_least: 9e-1}\n"
        "  - {metric: probabilistic_robustness, eps: 1e-1, at_most: 1e-3}\n"
    )
    dec = tmp_path / "dec.yaml"
    dec.write_text(
        "name: t\n"
        "metrics:\n"
        "  accuracy: {}\n"
        "  probabilistic_robustness: {eps: 0.1, samples: 10}\n"
        "requirements:\n"
        "  - {metric: accuracy, at_least: 0.9}\n"
        "  - {metric: probabilistic_robustness, eps: 0.1, at_most: 0.001}\n"
    )
    pol = load_policy(sci)
    assert pol.metrics["probabilistic_robustness"]["eps"] == [0.1]
    assert pol.requirements[1].params == {"eps": 0.1}
    assert pol.requirements[1].threshold == 0.001
    assert pol.sha256 == load_policy(dec).sha256


def test_integer_and_float_radii_mean_the_same_policy() -> None:
    """'Two files that mean the same policy hash the same': eps 1 and eps 1.0 are one radius."""

    def pol(eps):
        return Policy.from_dict({
            "name": "t",
            "metrics": {"robust_accuracy": {"eps": [0, 1]}},
            "requirements": [{"metric": "robust_accuracy", "eps": eps, "at_least": 0.5}],
        })

    assert pol(1).metrics == pol(1.0).metrics
    assert pol(1).sha256 == pol(1.0).sha256
    assert pol(0).sha256 == pol(0.0).sha256


def test_the_readme_policy_is_valid() -> None:
    """The policy shown in README.md validates (the docs and the schema agree)."""
    import re

    import yaml

    from tests.conftest import REPO

    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Policies\s+```yaml\n(.*?)```", text, re.S)
    assert block is not None
    pol = Policy.from_dict(yaml.safe_load(block[1]))
    assert pol.time_budget_s == 3600
    assert pol.metrics["robust_accuracy"]["attacks"] == ["apgd_ce", "apgd_t", "fab", "square"]
