"""Declared merge rules of the diagnostics of sharded results (``merge_rules``, metrics/base.py
:data:`MERGE_RULES`): each rule merges as documented, a key without a rule is an error naming
the metric and the key, declarations are checked when a family is defined, and every shipped
family declares a rule for every diagnostic key it produces (in a block's result and in a
finalized one)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import robust_cert
from robust_cert import engine
from robust_cert.metrics import REGISTRY
from robust_cert.metrics.base import (
    COMMON_MERGE_RULES,
    MERGE_RULES,
    MergeError,
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    merge_diagnostics,
    normalize_merge_rules,
)
from tests.linear_models import binary_linear
from tests.test_shard_misc import digits_points, small_cnn

torch.set_num_threads(1)
CPU = torch.device("cpu")
NAN = float("nan")


def _merge(a, b, rules):
    return merge_diagnostics(a, b, normalize_merge_rules(rules), "toy")


# --------------------------------------------------------------------------- each rule


def test_sum_max_min_all_any_merge_element_by_element() -> None:
    rules = {"n": "sum", "worst": "max", "best": "min", "ok": "all", "seen": "any",
             "per": "sum", "counts": "sum"}
    a = {"n": 2, "worst": 0.5, "best": 0.5, "ok": True, "seen": False,
         "per": {"x": 1, "y": 2}, "counts": [1, 2]}
    b = {"n": 3, "worst": 0.7, "best": 0.1, "ok": False, "seen": True,
         "per": {"y": 5, "z": 1}, "counts": [10, 20]}
    out = _merge(a, b, rules)
    assert out == {"n": 5, "worst": 0.7, "best": 0.1, "ok": False, "seen": True,
                   "per": {"x": 1, "y": 7, "z": 1}, "counts": [11, 22]}
    assert type(out["n"]) is int
    assert type(out["ok"]) is bool
    assert list(out["per"]) == ["x", "y", "z"]  # the earlier block's keys first
    assert _merge({"ok": True, "seen": False}, {"ok": True, "seen": False},
                  {"ok": "all", "seen": "any"}) == {"ok": True, "seen": False}
    assert _merge({"w": 3, "v": -1.5}, {"w": 1, "v": 2.0}, {"w": "max", "v": "min"}) == \
        {"w": 3, "v": -1.5}


def test_max_and_min_are_nan_when_a_block_is_nan() -> None:
    for a, b in ((NAN, 1.0), (1.0, NAN)):
        out = _merge({"hi": a, "lo": a}, {"hi": b, "lo": b}, {"hi": "max", "lo": "min"})
        assert math.isnan(out["hi"])
        assert math.isnan(out["lo"])


def test_same_keeps_equal_values_and_refuses_different_ones() -> None:
    a = {"norm": "linf", "layers": [{"layer": "0", "l2": 1.5}], "gap": NAN,
         "arr": np.array([1.0, NAN])}
    b = {"norm": "linf", "layers": [{"layer": "0", "l2": 1.5}], "gap": NAN,
         "arr": np.array([1.0, NAN])}
    out = _merge(a, b, {k: "same" for k in a})
    assert out["norm"] == "linf"
    assert out["layers"] == a["layers"]
    assert math.isnan(out["gap"])
    np.testing.assert_array_equal(out["arr"], a["arr"])
    with pytest.raises(MergeError, match=r"toy: cannot merge diagnostic 'norm' by 'same'.*"
                                         r"'linf' and 'l2'"):
        _merge({"norm": "linf"}, {"norm": "l2"}, {"norm": "same"})
    with pytest.raises(MergeError, match="'layers'"):
        _merge({"layers": [1.5]}, {"layers": [1.5, 2.0]}, {"layers": "same"})


def test_concat_joins_lists_arrays_and_disjoint_dicts_in_block_order() -> None:
    out = _merge({"l": [1], "a": np.array([1, 2]), "d": {3: "u", 1: "v"}},
                 {"l": [2, 3], "a": np.array([3]), "d": {7: "w"}},
                 {"l": "concat", "a": "concat", "d": "concat"})
    assert out["l"] == [1, 2, 3]
    np.testing.assert_array_equal(out["a"], [1, 2, 3])
    assert list(out["d"].items()) == [(3, "u"), (1, "v"), (7, "w")]
    with pytest.raises(MergeError, match=r"'d' by 'concat': both blocks hold key 3"):
        _merge({"d": {3: "u"}}, {"d": {3: "x"}}, {"d": "concat"})
    with pytest.raises(MergeError, match="'l' by 'concat'"):
        _merge({"l": 1}, {"l": 2}, {"l": "concat"})


def test_first_and_recompute_keep_the_earlier_blocks_value() -> None:
    out = _merge({"f": {"x": 1}, "r": [0.1]}, {"f": {"x": 2}, "r": [0.9]},
                 {"f": "first", "r": "recompute"})
    assert out == {"f": {"x": 1}, "r": [0.1]}


def test_a_key_one_block_lacks_keeps_the_other_blocks_value() -> None:
    out = _merge({"n": 1}, {"n": 2, "fallback": "note"}, {"n": "sum", "fallback": "same"})
    assert out == {"n": 3, "fallback": "note"}


def test_nested_rules_wildcard_dotted_keys_and_lists_of_dicts() -> None:
    rules = normalize_merge_rules({
        "cmp": {"eps": "same", "k": "sum", "p": "recompute"},
        "by_class.*.k": "sum", "by_class.*.n": "sum", "top.fixed": "same"})
    assert rules == {"cmp": {"eps": "same", "k": "sum", "p": "recompute"},
                     "by_class": {"*": {"k": "sum", "n": "sum"}}, "top": {"fixed": "same"}}
    a = {"cmp": [{"eps": 0.1, "k": 1, "p": 0.5}, {"eps": 0.2, "k": 0, "p": 1.0}],
         "by_class": {"0": {"k": 1, "n": 2}, "1": {"k": 0, "n": 1}}, "top": {"fixed": 4}}
    b = {"cmp": [{"eps": 0.1, "k": 2, "p": 0.1}, {"eps": 0.2, "k": 3, "p": 0.2}],
         "by_class": {"1": {"k": 1, "n": 1}, "2": {"k": 1, "n": 1}}, "top": {"fixed": 4}}
    out = merge_diagnostics(a, b, rules, "toy")
    assert out == {"cmp": [{"eps": 0.1, "k": 3, "p": 0.5}, {"eps": 0.2, "k": 3, "p": 1.0}],
                   "by_class": {"0": {"k": 1, "n": 2}, "1": {"k": 1, "n": 2},
                                "2": {"k": 1, "n": 1}},
                   "top": {"fixed": 4}}
    with pytest.raises(MergeError, match=r"'cmp\[1\]\.eps' by 'same'"):
        merge_diagnostics(a, {**b, "cmp": [b["cmp"][0], {**b["cmp"][1], "eps": 0.3}]},
                          rules, "toy")
    with pytest.raises(MergeError, match=r"'cmp' by .*different lengths 2 and 1"):
        merge_diagnostics(a, {**b, "cmp": b["cmp"][:1]}, rules, "toy")


def test_an_undeclared_key_raises_naming_the_metric_and_the_key() -> None:
    rules = {"n": "sum", "per": {"k": "sum"}}
    with pytest.raises(MergeError, match=r"^toy: diagnostic 'extra' has no merge rule"):
        _merge({"n": 1, "extra": 2}, {"n": 1, "extra": 2}, rules)
    # also when only one block has it, and at any depth
    with pytest.raises(MergeError, match=r"toy: diagnostic 'extra' has no merge rule"):
        _merge({"n": 1}, {"n": 1, "extra": 2}, rules)
    with pytest.raises(MergeError, match=r"toy: diagnostic 'per\.n' has no merge rule"):
        _merge({"per": {"k": 1, "n": 2}}, {"per": {"k": 1, "n": 2}}, rules)
    with pytest.raises(MergeError, match=r"toy: diagnostic 'per\.n' has no merge rule"):
        _merge({"per": {"k": 1}}, {"per": {"k": 1, "n": 2}}, rules)


def test_values_a_rule_does_not_apply_to_are_errors() -> None:
    for a, b, rule in (("x", "y", "sum"), (True, False, "sum"), (1, 2, "all"),
                       (None, 1.0, "max"), ([1, 2], [1], "sum"), (1, 2, {"k": "sum"})):
        with pytest.raises(MergeError, match=r"toy: cannot merge diagnostic 'v'"):
            _merge({"v": a}, {"v": b}, {"v": rule})


def test_the_merge_shares_nothing_with_its_inputs() -> None:
    a = {"f": {"x": [1]}, "s": {"y": [2]}, "only": {"z": [3]}}
    b = {"f": {"x": [4]}, "s": {"y": [2]}}
    out = _merge(a, b, {"f": "first", "s": "same", "only": "recompute"})
    out["f"]["x"].append(0)
    out["s"]["y"].append(0)
    out["only"]["z"].append(0)
    assert a == {"f": {"x": [1]}, "s": {"y": [2]}, "only": {"z": [3]}}
    assert b == {"f": {"x": [4]}, "s": {"y": [2]}}


# --------------------------------------------------------------------------- declarations


class _ToyConfig(MetricConfig):
    pass


def _toy(rules: dict) -> type[Metric]:
    class Toy(Metric):
        name = "toy"
        kind = "statistical"
        quantity = "q"
        higher_is_better = True
        description = "d"
        Config = _ToyConfig
        merge_rules = rules

        def selectors(self):
            return [{}]

        def cost(self, n_points):
            return n_points

        def run(self, model, data, ctx):
            raise NotImplementedError

    return Toy


def test_declarations_are_checked_when_the_family_is_defined() -> None:
    with pytest.raises(TypeError, match=r"Toy\.merge_rules: 'x' has merge rule 'mean'"):
        _toy({"x": "mean"})
    with pytest.raises(TypeError, match=r"Toy\.merge_rules\.a: 'b' has merge rule 3"):
        _toy({"a.b": 3})
    with pytest.raises(TypeError, match=r"Toy\.merge_rules: a\.b is declared twice"):
        _toy({"a": {"b": "sum"}, "a.b": "max"})
    with pytest.raises(TypeError, match=r"Toy\.merge_rules: a\.\*\.k is declared twice"):
        _toy({"a.*.k": "sum", "a": {"*": {"n": "sum", "k": "max"}}})
    with pytest.raises(TypeError, match=r"Toy\.merge_rules: a is declared twice"):
        _toy({"a": "sum", "a.b": "max"})
    assert _toy({"a.b": "sum"}).merge_rules == {**COMMON_MERGE_RULES, "a": {"b": "sum"}}


def test_a_result_carries_its_familys_rules_and_merge_follows_them() -> None:
    toy = _toy({"n": "sum", "note": "same"})(_ToyConfig())

    def result(k, extra=None):
        return toy.result([Proportion({}, k, 2)], per_point={"ok": np.ones(2, bool)},
                          diagnostics={"n": k, "note": "x", **(extra or {})})

    assert result(1).merge_rules == toy.merge_rules
    merged = result(1).merge(result(2))
    assert merged.diagnostics == {"n": 3, "note": "x"}
    assert merged.merge_rules == toy.merge_rules  # a merged result merges on
    assert merged.merge(result(2)).diagnostics == {"n": 5, "note": "x"}
    # the engine's out-of-memory notes are declared for every family
    retried = result(1, {"memory_retries": [{"batch_size": 8}]}).merge(
        result(1, {"memory_retries": [{"batch_size": 4}]}))
    assert retried.diagnostics["memory_retries"] == [{"batch_size": 8}, {"batch_size": 4}]
    with pytest.raises(MergeError, match=r"^toy: diagnostic 'surprise' has no merge rule"):
        result(1, {"surprise": 1.0}).merge(result(2, {"surprise": 2.0}))
    # a result made without rules merges no diagnostic
    bare = MetricResult("toy", "statistical", "q", True, "d", {}, [], {}, {"n": 1})
    with pytest.raises(MergeError, match=r"toy: diagnostic 'n' has no merge rule"):
        bare.merge(bare)


def test_every_registered_family_declares_its_own_rules() -> None:
    for name, cls in REGISTRY.items():
        assert "merge_rules" in vars(cls), name
        assert cls.merge_rules == normalize_merge_rules(cls.merge_rules), name
        assert cls.merge_rules["memory_retries"] == COMMON_MERGE_RULES["memory_retries"]
    assert set(MERGE_RULES) == {"sum", "max", "min", "all", "any", "same", "concat", "first",
                                "recompute"}


# --------------------------------------------------------------------------- shipped families


#: one tiny configuration per family (every family must have one), chosen to produce every
#: diagnostic key it can: ε = 0, paired Square, both norms, validation, thresholds
CONFIGS = {
    "accuracy": {},
    "robust_accuracy": {"eps": [0.0, 0.1], "attacks": ["pgd", "square"], "steps": 2,
                        "square_queries": 5},
    "probabilistic_robustness": {"eps": [0.1], "samples": 30},
    "parity": {"reference": "twin", "eps": [0.1]},
    "local_probabilistic_robustness": {"eps": 0.1, "p0": 0.5, "p1": 0.2, "max_draws": 50},
    "randomized_smoothing": {"sigma": 0.25, "n0": 5, "n": 20, "radii": [0.0]},
    "calibration": {"bins": 3, "bootstrap": 10, "thresholds": [0.5]},
    "analytical_robustness": {"sigma": 0.1, "estimators": ["taylor", "mmse", "mvs", "mmse_mvs",
                                                           "softmax"],
                              "mmse_samples": 2, "qmc_points": 8, "validate_points": 4,
                              "validate_draws": 10, "top_k": 2},
    "corruptions": {"corruptions": ["gaussian_noise"], "severities": [1]},
    "rare_event_probability": {"sigma": 0.3, "particles": 10, "mcmc_steps": 1,
                               "max_levels": 3, "runs": 2, "points": 4},
    "safe_radius": {"norms": ["l2", "linf"], "radii": [0.0], "clever_batches": 2,
                    "clever_samples": 2, "bisection_steps": 1, "attack_steps": 1,
                    "power_iterations": 2},
    "surrogates": {"power_iterations": 2},
    "divergence": {"eps": [0.1], "steps": 1, "thresholds": [0.1], "surface_points": 2,
                   "surface_grid": 3},
}


def _undeclared(diagnostics: dict, rules: dict, path: str = "") -> list[str]:
    """The keys (dotted paths) of ``diagnostics`` no rule in ``rules`` covers."""
    out = []
    for k, v in diagnostics.items():
        rule = rules.get(k, rules.get("*")) if isinstance(k, str) else rules.get("*")
        if rule is None:
            out.append(f"{path}{k}")
        elif isinstance(rule, dict):
            for item in [v] if isinstance(v, dict) else v:
                if isinstance(item, dict):
                    out += _undeclared(item, rule, f"{path}{k}.")
    return out


def _check_family(name: str, cfg: dict, clf, data, batch: int) -> MetricResult:
    """Two blocks merged and finalized, and two finalized halves merged: every key of every
    result is declared, and the merges succeed. Returns the finalized merge of the blocks."""
    cls = REGISTRY[name]
    metric = cls(cls.Config(**cfg))
    whole = RunContext(device=CPU, batch_size=batch, seed=0, gradient_twin=clf)
    blocks = engine.batch_blocks(len(data), batch)
    assert len(blocks) == 2
    parts = [engine._subset(data, b) for b in blocks]
    runs = [metric.run(clf, p, dataclasses.replace(whole, offset=b.start, total=len(data)))
            for p, b in zip(parts, blocks, strict=True)]
    finalized = metric.finalize(runs[0].merge(runs[1]), clf, data, whole)
    halves = [metric.run(clf, p, whole) for p in parts]
    again = halves[0].merge(halves[1])
    for res in (*runs, finalized, *halves, again):
        assert res.status == "ok", (name, res.reason)
        assert _undeclared(res.diagnostics, cls.merge_rules) == [], name
    assert finalized.diagnostics, name
    return finalized


@pytest.fixture
def fast_clever(monkeypatch):
    """CLEVER's reverse-Weibull fit replaced by the largest sampled norm (the fit takes ~0.1 s
    per point and is tested in tests/test_safe_radius.py; it adds no diagnostic key)."""
    import robust_cert.metrics.safe_radius as sr

    monkeypatch.setattr(sr, "reverse_weibull_location", lambda m: float(np.max(m)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_shipped_family_declares_every_key_it_emits(name, fast_clever) -> None:
    assert set(CONFIGS) == set(REGISTRY)  # a new family needs a configuration here
    data = digits_points(12)
    clf = robust_cert.load_model(small_cnn(), input_shape=data.input_shape)
    _check_family(name, CONFIGS[name], clf, data, batch=6)


def test_robust_accuracy_declares_its_l2_and_fallback_keys() -> None:
    """The keys of the other norm (``max_l2_excess``) and of AutoAttack's fallback on a
    model with fewer than 4 classes (``fallback``)."""
    data = digits_points(12)
    clf = robust_cert.load_model(small_cnn(), input_shape=data.input_shape)
    l2 = _check_family("robust_accuracy", {"eps": [0.1], "attacks": ["pgd"], "norm": "l2",
                                           "steps": 1}, clf, data, batch=6)
    assert "max_l2_excess" in l2.diagnostics
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=(12, 4)).astype(np.float32)
    w = np.array([1.0, -2.0, 0.5, 1.5])
    y = (x @ w > 0).astype(np.int64)
    lin = robust_cert.load_data((x, y), input_range=(-10.0, 10.0))
    binary = robust_cert.load_model(binary_linear(w), input_shape=(4,))
    fell_back = _check_family("robust_accuracy", {"eps": [0.2], "attacks": ["autoattack"],
                                                  "steps": 2, "square_queries": 5},
                              binary, lin, batch=6)
    assert "apgd_ce + square" in fell_back.diagnostics["fallback"]
