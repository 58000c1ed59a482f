"""Known-answer tests of the metric families on linear models with hand-set weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import engine, stats
from robust_cert.metrics.accuracy import Accuracy, AccuracyConfig
from robust_cert.metrics.adversarial import RobustAccuracy, RobustAccuracyConfig
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.probabilistic import (
    ProbabilisticRobustness,
    ProbabilisticRobustnessConfig,
)
from robust_cert.verdict import INCONCLUSIVE, PASS, decide
from tests.linear_models import binary_linear

CPU = torch.device("cpu")
W = np.array([1.0, -2.0, 0.5, 1.5])  # ||w||_1 = 5
B = 0.3
WIDE = (-10.0, 10.0)
EPS = (0.1, 0.5)


def _ctx(batch_size: int = 64, seed: int = 0) -> RunContext:
    return RunContext(device=CPU, batch_size=batch_size, seed=seed)



def _margin(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    return x.astype(np.float64) @ w + b


def _linear_points(n: int = 200, seed: int = 0, gap: float = 1e-3):
    """Points in [-3, 3]^4 with no margin within ``gap`` of 0 or of any eps*||w||_1, and
    labels that are correct for about 85% of them."""
    rng = np.random.default_rng(seed)
    radii = [0.0] + [e * np.abs(W).sum() for e in EPS]
    xs = []
    while len(xs) < n:
        x = rng.uniform(-3, 3, size=len(W)).astype(np.float32)
        g = abs(float(_margin(x[None], W, B)[0]))
        if all(abs(g - r) > gap for r in radii):
            xs.append(x)
    x = np.stack(xs)
    pred = (_margin(x, W, B) > 0).astype(np.int64)
    flip = rng.random(n) < 0.15
    y = np.where(flip, 1 - pred, pred)
    return x, y


def _closed_form_robust(x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    g = _margin(x, W, B)
    correct = (g > 0).astype(np.int64) == y
    return correct & (np.abs(g) > eps * np.abs(W).sum())


def _robust(model: nn.Module, data, eps, attacks=("fgsm",), batch_size: int = 64, seed: int = 0,
            **cfg):
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    metric = RobustAccuracy(RobustAccuracyConfig(eps=list(eps), attacks=list(attacks), **cfg))
    return metric.run(clf, data, _ctx(batch_size, seed))


# --------------------------------------------------------------------------- robust accuracy


def test_fgsm_is_exact_on_a_linear_model() -> None:
    x, y = _linear_points()
    data = robust_cert.load_data((x, y), input_range=WIDE)
    res = _robust(binary_linear(W, B), data, EPS)
    robust = res.per_point["robust"]
    assert robust.shape == (len(x), len(EPS))
    for j, eps in enumerate(EPS):
        expected = _closed_form_robust(x, y, eps)
        assert 0 < expected.sum() < expected.size  # the test distinguishes outcomes
        np.testing.assert_array_equal(robust[:, j], expected)
        prop = res.find({"eps": eps})
        assert prop.k == int(expected.sum())
        assert prop.n == len(x)
    assert res.status == "ok"
    assert res.diagnostics["max_linf_excess"] <= 1e-6
    assert res.diagnostics["range_violations"] == 0
    clean_correct = (_margin(x, W, B) > 0).astype(np.int64) == y
    for j, eps in enumerate(EPS):
        broken = int(clean_correct.sum() - _closed_form_robust(x, y, eps).sum())
        assert res.diagnostics["broken_by_attack"]["fgsm"][j] == broken


def test_eps_zero_gives_clean_accuracy() -> None:
    x, y = _linear_points(n=120, seed=1)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    res = _robust(binary_linear(W, B), data, [0.0, 0.1], attacks=("fgsm", "pgd"))
    clean_correct = (_margin(x, W, B) > 0).astype(np.int64) == y
    np.testing.assert_array_equal(res.per_point["robust"][:, 0], clean_correct)
    assert res.find({"eps": 0.0}).k == int(clean_correct.sum())
    assert res.diagnostics["eps0_equals_clean"] == "passed"
    acc = Accuracy(AccuracyConfig()).run(
        robust_cert.load_model(binary_linear(W, B), input_shape=(4,)), data, _ctx())
    assert acc.proportions[0].k == res.find({"eps": 0.0}).k


def test_pgd_never_beats_clean_and_never_breaks_provably_robust_points() -> None:
    x, y = _linear_points(n=150, seed=2)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    pgd = _robust(binary_linear(W, B), data, EPS, attacks=("pgd",), steps=10)
    both = _robust(binary_linear(W, B), data, EPS, attacks=("fgsm", "pgd"), steps=10)
    fgsm = _robust(binary_linear(W, B), data, EPS, attacks=("fgsm",))
    clean_correct = (_margin(x, W, B) > 0).astype(np.int64) == y
    for j, eps in enumerate(EPS):
        r = pgd.per_point["robust"][:, j]
        assert not (r & ~clean_correct).any()  # robust implies clean-correct
        # No attack within the ball can break a point whose margin exceeds eps*||w||_1.
        exact = _closed_form_robust(x, y, eps)
        assert not (exact & ~r).any()
        # With 10 steps of 2.5*eps/10 PGD reaches the worst corner of a linear model.
        np.testing.assert_array_equal(r, exact)
        # The per-point worst case over attacks is no better than either attack alone.
        w = both.per_point["robust"][:, j]
        assert not (w & ~r).any()
        assert not (w & ~fgsm.per_point["robust"][:, j]).any()
    for res in (pgd, both):
        assert res.diagnostics["max_linf_excess"] <= 1e-6
        assert res.diagnostics["range_violations"] == 0


def test_attacks_stay_in_a_narrow_range() -> None:
    # Inputs near the edges of [0, 1]: the attack must clip to the range and stay in the ball.
    rng = np.random.default_rng(3)
    x = rng.choice([0.0, 0.02, 0.98, 1.0], size=(80, 4)).astype(np.float32)
    w, b = np.array([1.0, -1.0, 2.0, -0.5]), -0.6
    y = (_margin(x, w, b) > 0).astype(np.int64)
    data = robust_cert.load_data((x, y))
    res = _robust(binary_linear(w, b), data, [0.05, 0.3], attacks=("fgsm", "pgd"))
    assert res.diagnostics["max_linf_excess"] <= 1e-6
    assert res.diagnostics["range_violations"] == 0
    # Clipping can only help the defender: the unclipped closed form is a lower bound.
    for j, eps in enumerate([0.05, 0.3]):
        g = _margin(x, w, b)
        unclipped = np.abs(g) > eps * np.abs(w).sum() + 1e-4
        assert not (unclipped & ~res.per_point["robust"][:, j]).any()


def test_input_range_scaling_gives_same_results() -> None:
    x, y = _linear_points(n=150, seed=4)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    shifted = robust_cert.load_data((x + 10.0, y), input_range=(0.0, 20.0))
    # g(x) = w.(x' - 10) + b = w.x' + (b - 10 sum(w))
    b_shift = B - 10.0 * W.sum()
    for attacks in (("fgsm",), ("fgsm", "pgd")):
        a = _robust(binary_linear(W, B), data, EPS, attacks=attacks)
        s = _robust(binary_linear(W, b_shift), shifted, EPS, attacks=attacks)
        np.testing.assert_array_equal(a.per_point["robust"], s.per_point["robust"])
        assert [p.k for p in a.proportions] == [p.k for p in s.proportions]
        assert s.diagnostics["max_linf_excess"] <= 1e-5  # in data units of a range 20 wide
        assert s.diagnostics["range_violations"] == 0
    for j, eps in enumerate(EPS):
        np.testing.assert_array_equal(s.per_point["robust"][:, j], _closed_form_robust(x, y, eps))


def test_pgd_is_reproducible_for_a_seed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, size=(60, 4)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = robust_cert.load_data((x, y))
    a = _robust(model, data, [0.1, 0.2], attacks=("pgd",), steps=5, seed=7)
    b = _robust(model, data, [0.1, 0.2], attacks=("pgd",), steps=5, seed=7)
    np.testing.assert_array_equal(a.per_point["robust"], b.per_point["robust"])
    assert a.diagnostics == b.diagnostics


# --------------------------------------------------------------------------- probabilistic


PW, PB, PEPS = 2.0, 0.0, 0.5


def _prob_data():
    """Scalar points x with logits [0, 2x]: class 1 iff x > 0; |margin|/|w| = |x|.

    Failure probability under uniform noise in [-eps, eps] for a point at distance |x| from
    the boundary: P(flip) = max(0, eps - |x|) / (2 eps). The last two points are mislabelled.
    """
    x = np.array([0.1, 0.25, 0.4, 0.75, -0.2, -0.6, 0.3, -0.1], dtype=np.float32)
    y = np.array([1, 1, 1, 1, 0, 0, 0, 1])
    flip = np.maximum(0.0, PEPS - np.abs(x.astype(np.float64))) / (2 * PEPS)
    correct = (x > 0).astype(np.int64) == y
    misclassified = np.where(correct, flip, 1 - flip)
    return x[:, None], y, flip, misclassified


def _prob_run(failure: str = "misclassified", samples: int = 20000, seed: int = 0,
              batch_size: int = 4096):
    x, y, _, _ = _prob_data()
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(binary_linear(np.array([PW]), PB), input_shape=(1,))
    metric = ProbabilisticRobustness(ProbabilisticRobustnessConfig(
        eps=PEPS, samples=samples, failure=failure))
    return metric.run(clf, data, _ctx(batch_size, seed))


def test_flip_probability_formula() -> None:
    x, _, flip, misclassified = _prob_data()
    assert flip.tolist() == pytest.approx([0.4, 0.25, 0.1, 0.0, 0.3, 0.0, 0.2, 0.4])
    assert misclassified.mean() == pytest.approx(2.45 / 8)
    assert flip.mean() == pytest.approx(1.65 / 8)


@pytest.mark.parametrize("failure", ["misclassified", "prediction_changed"])
def test_probabilistic_failure_rate_matches_closed_form(failure: str) -> None:
    _, _, flip, misclassified = _prob_data()
    expected_per_point = misclassified if failure == "misclassified" else flip
    res = _prob_run(failure)
    (prop,) = res.proportions
    assert prop.params == {"eps": PEPS}
    assert prop.n == 20000
    lo, hi = stats.clopper_pearson(prop.k, prop.n, 0.999)
    assert lo <= expected_per_point.mean() <= hi
    failed = res.per_point[f"failed@{PEPS:g}"]
    index = res.per_point[f"index@{PEPS:g}"]
    assert failed.shape == index.shape == (20000,)
    assert int(failed.sum()) == prop.k
    # per point: never fails where the closed form says 0, always where it says 1
    for i, p in enumerate(expected_per_point):
        mine = failed[index == i]
        assert len(mine) > 2000  # x is drawn uniformly from the 8 points
        if p == 0.0:
            assert not mine.any()
        elif p == 1.0:
            assert mine.all()
        else:
            lo, hi = stats.clopper_pearson(int(mine.sum()), len(mine), 0.999)
            assert lo <= p <= hi


def test_failure_modes_differ_on_mislabelled_points() -> None:
    mis = _prob_run("misclassified", samples=4000)
    chg = _prob_run("prediction_changed", samples=4000)
    # same seed: the same (x, delta) draws, so on correctly labelled points the modes agree
    np.testing.assert_array_equal(mis.per_point["index@0.5"], chg.per_point["index@0.5"])
    index = mis.per_point["index@0.5"]
    correct = np.isin(index, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(mis.per_point["failed@0.5"][correct],
                                  chg.per_point["failed@0.5"][correct])
    # and on mislabelled points they are complements
    np.testing.assert_array_equal(mis.per_point["failed@0.5"][~correct],
                                  ~chg.per_point["failed@0.5"][~correct])
    assert mis.proportions[0].k > chg.proportions[0].k


def test_probabilistic_determinism() -> None:
    a = _prob_run(samples=3000, seed=11)
    b = _prob_run(samples=3000, seed=11, batch_size=1000)  # batching does not change the draws
    c = _prob_run(samples=3000, seed=12)
    for key in a.per_point:
        np.testing.assert_array_equal(a.per_point[key], b.per_point[key])
    assert a.proportions[0].k == b.proportions[0].k
    assert not np.array_equal(a.per_point["index@0.5"], c.per_point["index@0.5"])
    assert not np.array_equal(a.per_point["failed@0.5"], c.per_point["failed@0.5"])


def test_probabilistic_several_radii() -> None:
    x, y, _, _ = _prob_data()
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(binary_linear(np.array([PW]), PB), input_shape=(1,))
    res = ProbabilisticRobustness(ProbabilisticRobustnessConfig(
        eps=[0.05, 0.5], samples=2000)).run(clf, data, _ctx(512))
    assert [p.params for p in res.proportions] == [{"eps": 0.05}, {"eps": 0.5}]
    # at eps = 0.05 < every |x|, only the mislabelled points fail, and always
    f, idx = res.per_point["failed@0.05"], res.per_point["index@0.05"]
    np.testing.assert_array_equal(f, np.isin(idx, [6, 7]))


# --------------------------------------------------------------------------- accuracy


def test_accuracy_per_point_and_per_class() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, size=(97, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=97)
    data = robust_cert.load_data((x, y))
    clf = robust_cert.load_model(model, input_shape=(5,))
    res = Accuracy(AccuracyConfig()).run(clf, data, _ctx(batch_size=10))
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    np.testing.assert_array_equal(res.per_point["prediction"], pred)
    np.testing.assert_array_equal(res.per_point["correct"], pred == y)
    (prop,) = res.proportions
    assert prop.k == int((pred == y).sum())
    assert prop.n == 97
    per_class = res.diagnostics["per_class_recall"]
    assert set(per_class) == {"0", "1", "2", "3"}
    assert sum(v["k"] for v in per_class.values()) == prop.k
    assert sum(v["n"] for v in per_class.values()) == prop.n
    for c in range(4):
        assert per_class[str(c)] == {"k": int(((pred == y) & (y == c)).sum()),
                                     "n": int((y == c).sum())}


# --------------------------------------------------------------------------- merge


def _whole_and_merged_shards():
    """(result on 150 points, merge of results on 61 + 89) for accuracy and FGSM."""
    x, y = _linear_points(n=150, seed=7)
    clf = robust_cert.load_model(binary_linear(W, B), input_shape=(4,))
    whole = robust_cert.load_data((x, y), input_range=WIDE)
    first = robust_cert.load_data((x[:61], y[:61]), input_range=WIDE)
    second = robust_cert.load_data((x[61:], y[61:]), input_range=WIDE)
    for metric in (Accuracy(AccuracyConfig()),
                   RobustAccuracy(RobustAccuracyConfig(eps=list(EPS), attacks=["fgsm"]))):
        full = metric.run(clf, whole, _ctx(32))
        yield full, metric.run(clf, first, _ctx(32)).merge(metric.run(clf, second, _ctx(32)))


def test_merge_of_shards_equals_whole() -> None:
    for full, merged in _whole_and_merged_shards():
        assert [(p.params, p.k, p.n) for p in merged.proportions] == \
            [(p.params, p.k, p.n) for p in full.proportions]
        assert merged.per_point.keys() == full.per_point.keys()
        for key in full.per_point:
            np.testing.assert_array_equal(merged.per_point[key], full.per_point[key])
        assert merged.metric == full.metric
        assert merged.config == full.config


def test_merge_of_shards_combines_diagnostics() -> None:
    """'Results computed on shards of the data merge into the result on the whole': the
    diagnostics too (per-class counts and attack counts add up, the worst excess is the max)."""
    for full, merged in _whole_and_merged_shards():
        assert merged.diagnostics == full.diagnostics


def test_merge_refuses_different_metrics() -> None:
    x, y = _linear_points(n=20, seed=8)
    clf = robust_cert.load_model(binary_linear(W, B), input_shape=(4,))
    data = robust_cert.load_data((x, y), input_range=WIDE)
    acc = Accuracy(AccuracyConfig()).run(clf, data, _ctx())
    rob = RobustAccuracy(RobustAccuracyConfig(eps=[0.1], attacks=["fgsm"])).run(clf, data, _ctx())
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(rob)


# --------------------------------------------------------------------------- applicability


POLICY = {
    "name": "t",
    "metrics": {"accuracy": {}, "robust_accuracy": {"eps": [0.1], "attacks": ["fgsm"]}},
    "requirements": [{"metric": "accuracy", "at_least": 0.5},
                     {"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.5}],
}


def test_non_differentiable_model_is_not_applicable() -> None:
    x, y = _linear_points(n=300, seed=9)
    y = (_margin(x, W, B) > 0).astype(np.int64)  # all correct
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(binary_linear(W, B), input_shape=(4,))
    frozen = dataclasses.replace(clf, differentiable=False, format="onnx")
    pol = robust_cert.load_policy(POLICY)
    results = engine.run_suite(frozen, data, pol, progress=False)
    rob = results["robust_accuracy"]
    assert rob.status == "not_applicable"
    assert "gradients" in rob.reason
    assert rob.proportions == []
    assert results["accuracy"].status == "ok"
    overall, (oa, ob) = decide(pol, results)
    assert oa.verdict == PASS
    assert ob.verdict == INCONCLUSIVE
    assert "not applicable" in ob.reason
    assert overall == INCONCLUSIVE

    cert = robust_cert.certify(frozen, data, POLICY, progress=False)
    assert cert.verdict == INCONCLUSIVE
    assert cert.body["model"]["gradients"] is False
    (rob_body,) = [r for r in cert.results if r["metric"] == "robust_accuracy"]
    assert rob_body["status"] == "not_applicable"
    assert rob_body["values"] == []
    # the same model with gradients passes
    assert robust_cert.certify(clf, data, POLICY, progress=False).verdict == PASS


class _RandomModel(nn.Module):
    """Dropout that stays on at evaluation time."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lin = binary_linear(W, B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.drop.train()
        return self.lin(self.drop(x))


def test_random_model_is_flagged() -> None:
    x, y = _linear_points(n=64, seed=10)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    pol = {"name": "t", "metrics": {"accuracy": {}},
           "requirements": [{"metric": "accuracy", "at_least": 0.5}]}
    torch.manual_seed(0)
    cert = robust_cert.certify(_RandomModel(), data, pol, progress=False)
    assert cert.body["sanity"]["deterministic_forward"] == "failed"
    det = robust_cert.certify(binary_linear(W, B), data, pol, progress=False)
    assert det.body["sanity"]["deterministic_forward"] == "passed"
