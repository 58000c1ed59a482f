"""Known-answer tests of calibration: ECE, NLL, Brier and selective risk on hand-set logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import stats
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.calibration import (
    Calibration,
    CalibrationConfig,
    expected_calibration_error,
)

CPU = torch.device("cpu")


class _Lookup(nn.Module):
    """Returns the logits stored for each point: the input is the point's index."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.table = torch.tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.table[x[:, 0].round().long()]


def _run(logits, y, seed=0, batch_size=7, **cfg):
    x = np.arange(len(y), dtype=np.float32)[:, None]
    data = robust_cert.load_data((x, y), input_range=(0.0, float(len(y))))
    clf = robust_cert.load_model(_Lookup(logits), input_shape=(1,))
    ctx = RunContext(device=CPU, batch_size=batch_size, seed=seed)
    return Calibration(CalibrationConfig(**cfg)).run(clf, data, ctx)


def _binary_logits(p1: np.ndarray) -> np.ndarray:
    """Logits [0, logit(p1)]: softmax gives P(class 1) = p1."""
    return np.stack([np.zeros_like(p1), np.log(p1 / (1 - p1))], axis=1)


def test_closed_forms_on_a_two_bin_example() -> None:
    # 10 points at confidence 0.85 for class 1 (8 right), 10 at 0.65 for class 0 (3 right).
    p1 = np.array([0.85] * 10 + [0.35] * 10)
    y = np.array([1] * 8 + [0] * 2 + [0] * 3 + [1] * 7)
    res = _run(_binary_logits(p1), y, bins=10, bootstrap=200, thresholds=[0.0, 0.7, 0.95])
    d = res.diagnostics
    # ECE = 0.5 |0.8 - 0.85| + 0.5 |0.3 - 0.65| = 0.2
    assert d["ece"] == pytest.approx(0.2, abs=1e-6)
    # NLL: -[8 ln .85 + 2 ln .15 + 3 ln .65 + 7 ln .35] / 20
    nll = -(8 * math.log(.85) + 2 * math.log(.15) + 3 * math.log(.65) + 7 * math.log(.35)) / 20
    assert d["nll"] == pytest.approx(nll, rel=1e-5)
    # Brier (two classes): 2 (p_y - 1)^2 per point
    brier = 2 * (8 * .15 ** 2 + 2 * .85 ** 2 + 3 * .35 ** 2 + 7 * .65 ** 2) / 20
    assert d["brier"] == pytest.approx(brier, rel=1e-5)
    lo, hi = d["ece_ci"]
    assert lo <= d["ece"] <= hi
    # selective risk: τ = 0 accepts all (9 wrong of 20); τ = 0.7 accepts the 0.85 group
    assert res.find({"threshold": 0.0}).k == 9
    assert res.find({"threshold": 0.0}).n == 20
    assert (res.find({"threshold": 0.7}).k, res.find({"threshold": 0.7}).n) == (2, 10)
    assert res.find({"threshold": 0.95}) is None  # nobody is that confident
    assert d["coverage"]["0.95"] == {"k": 0, "n": 20}
    rel = d["reliability"]
    assert rel[8]["n"] == 10
    assert rel[8]["accuracy"] == pytest.approx(0.8)
    assert rel[6]["n"] == 10
    assert rel[6]["confidence"] == pytest.approx(0.65)
    np.testing.assert_allclose(res.per_point["confidence"], np.where(p1 > .5, p1, 1 - p1))


def test_perfectly_calibrated_sample_has_small_ece_and_ci_covers_zero_bias() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    p1 = rng.uniform(0.05, 0.95, n)
    y = (rng.random(n) < p1).astype(np.int64)
    res = _run(_binary_logits(p1), y, batch_size=512, bins=10, bootstrap=300)
    assert res.diagnostics["ece"] < 0.03
    assert res.diagnostics["ece_ci"][0] < 0.03
    # the ECE function agrees with a direct loop
    conf = res.per_point["confidence"]
    correct = res.per_point["correct"]
    direct = 0.0
    for b in range(10):
        m = (conf > b / 10) & (conf <= (b + 1) / 10)
        if m.any():
            direct += m.mean() * abs(correct[m].mean() - conf[m].mean())
    assert expected_calibration_error(conf, correct, 10) == pytest.approx(direct, abs=1e-12)


def test_bootstrap_is_seeded_and_selective_risk_ci_is_exact() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 3)) * 2
    y = rng.integers(0, 3, 300)
    a = _run(logits, y, seed=3, bins=5, bootstrap=100, thresholds=[0.5])
    b = _run(logits, y, seed=3, batch_size=50, bins=5, bootstrap=100, thresholds=[0.5])
    c = _run(logits, y, seed=4, bins=5, bootstrap=100, thresholds=[0.5])
    assert a.diagnostics == b.diagnostics
    assert a.diagnostics["ece_ci"] != c.diagnostics["ece_ci"]
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 1).numpy()
    acc = p.max(1) >= 0.5
    wrong = p.argmax(1) != y
    prop = a.find({"threshold": 0.5})
    assert (prop.k, prop.n) == (int((wrong & acc).sum()), int(acc.sum()))
    assert stats.clopper_pearson(prop.k, prop.n)[0] <= prop.estimate
    assert a.kind == "statistical"
    assert a.higher_is_better is False


def test_config_validation_and_policy() -> None:
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        CalibrationConfig(thresholds=[1.5])
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        CalibrationConfig(bins=0)
    pol = robust_cert.load_policy({
        "name": "t", "metrics": {"calibration": {"thresholds": 0.9}},
        "requirements": [{"metric": "calibration", "threshold": 0.9, "at_most": 0.1}]})
    assert pol.metric("calibration").selectors() == [{"threshold": 0.9}]
