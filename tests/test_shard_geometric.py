"""Sharded runs of the geometric metrics (issue 14): calibration, corruptions, safe radius.

The engine runs a shardable metric on consecutive blocks of points (possibly in
several processes), merges the blocks' results in order and finalizes. These tests check, per
metric, through the real engine (60 digits points in 4 blocks of 15, or the known-answer models
of the metric's own tests): (a) the blocked result is right — equal to one ``run`` on the
whole set, and the known answers still hold; (b) the finalized summaries are those of the
merged per-point arrays; (c) the result does not depend on how blocks are spread over
processes: simulated ranks running the blocks in order, in reverse, or with other metrics and
global-RNG traffic in between give bit-identical results.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import robust_cert
from robust_cert import engine, stats
from robust_cert.data import digits_split
from robust_cert.metrics.base import MetricResult, RunContext, _derive_seed
from robust_cert.metrics.calibration import (
    Calibration,
    CalibrationConfig,
    _ece_many,
    _reliability,
    expected_calibration_error,
)
from robust_cert.metrics.corruptions import CorruptionAccuracy, CorruptionsConfig
from robust_cert.metrics.safe_radius import SafeRadius, SafeRadiusConfig
from tests.helpers import assert_identical as _assert_identical
from tests.linear_models import binary_linear

torch.set_num_threads(1)
CPU = torch.device("cpu")
N, BS, SEED = 60, 16, 3  # 4 blocks of 15

CAL = {"bins": 10, "bootstrap": 200, "thresholds": [0.5, 0.99995, 1.0]}
COR = {"corruptions": ["gaussian_noise", "shot_noise", "glass_blur", "fog", "contrast"],
       "severities": [1, 5]}
SR = {"norms": ["l2", "linf"], "radii": [0.0, 0.05], "clever_batches": 2, "clever_samples": 4,
      "clever_radius": 0.5, "bisection_steps": 3, "attack_steps": 3, "power_iterations": 5,
      "local_bound": "ibp", "bound_steps": 4}  # the cheap local bound: merging is under test
METRICS = {"calibration": (Calibration, CalibrationConfig, CAL),
           "corruptions": (CorruptionAccuracy, CorruptionsConfig, COR),
           "safe_radius": (SafeRadius, SafeRadiusConfig, SR)}
REQUIREMENTS = {"calibration": {"threshold": 0.5, "at_most": 0.5},
                "corruptions": {"corruption": "mean", "at_least": 0.1},
                "safe_radius": {"norm": "l2", "radius": 0.0, "at_least": 0.1}}


@pytest.fixture(scope="module")
def digits(digits_model):
    x, y = digits_split("test")
    data = robust_cert.load_data((x[:N], y[:N]), input_range=(0.0, 1.0))
    clf = robust_cert.load_model(digits_model, input_shape=data.input_shape)
    return clf, data


@pytest.fixture
def fast_clever(monkeypatch):
    """CLEVER's reverse-Weibull fit (scipy Nelder–Mead, ~0.1 s per point, margin and norm on
    one CPU thread: minutes for 60 ten-class digits) replaced by the largest observed norm, a
    deterministic function of the same sampled maxima: the sampling, which is what sharding
    could disturb, is unchanged. The fit itself is tested in tests/test_safe_radius.py."""
    import robust_cert.metrics.safe_radius as sr

    monkeypatch.setattr(sr, "reverse_weibull_location", lambda m: float(np.max(m)))


def _metric(name: str):
    cls, cfg, kw = METRICS[name]
    return cls(cfg(**kw))


def _policy(names, batch_size=BS, configs=None) -> dict:
    configs = {k: METRICS[k][2] for k in names} | (configs or {})
    reqs = [{"metric": k, **REQUIREMENTS[k]} for k in names]
    for r in reqs:  # a configured radius
        if r["metric"] == "safe_radius":
            r["radius"] = configs["safe_radius"]["radii"][0]
    return {"name": "shard", "batch_size": batch_size,
            "metrics": {k: configs[k] for k in names}, "requirements": reqs}


def _engine(clf, data, names, seed=SEED, batch_size=BS, configs=None):
    pol = robust_cert.load_policy(_policy(names, batch_size, configs))
    return engine.run_suite(clf, data, pol, seed=seed, progress=False)


def _whole(metric, clf, data, seed=SEED, batch_size=BS) -> MetricResult:
    """One ``run`` on the whole set (offset 0, total None): finalized by ``run`` itself."""
    return metric.run(clf, data, RunContext(CPU, batch_size=batch_size, seed=seed))


def _ranks(metrics: dict, clf, data, order, seed=SEED, batch_size=BS, noise=False) -> dict:
    """The engine's pieces by hand: every block of every metric run as a rank would (ctx
    offset/total of the block), in ``order`` of block indices, the metrics interleaved block
    by block; then per metric the blocks merged in block order and finalized. ``noise``
    reseeds and draws from torch's global generator between blocks."""
    n = len(data)
    blocks = engine.batch_blocks(n, batch_size)
    whole = RunContext(CPU, batch_size=batch_size, seed=seed)
    parts: dict = {name: {} for name in metrics}
    for step, b in enumerate(order(range(len(blocks)))):
        for name, metric in metrics.items():
            ctx = dataclasses.replace(whole, offset=blocks[b].start, total=n)
            parts[name][b] = metric.run(clf, engine._subset(data, blocks[b]), ctx)
            if noise:
                torch.manual_seed(1000 + step)
                torch.rand(7)
    out = {}
    for name, metric in metrics.items():
        merged = parts[name][0]
        for b in range(1, len(blocks)):
            merged = merged.merge(parts[name][b])
        out[name] = metric.finalize(merged, clf, data, whole)
    return out


# --------------------------------------------------------------------------- (c) all three


def test_blocks_in_any_order_and_interleaving_give_bit_identical_results(digits,
                                                                         fast_clever) -> None:
    """World-size invariance without processes: in order, in reverse, and with the other
    metrics (and global-RNG traffic) between blocks, with one metric instance for all blocks
    or a fresh one per block — every result bit-identical, and equal to the engine's."""
    clf, data = digits
    names = list(METRICS)
    forward = _ranks({k: _metric(k) for k in names}, clf, data, list)
    backward = _ranks({k: _metric(k) for k in names}, clf, data,
                      lambda r: list(reversed(r)), noise=True)
    solo = {k: _ranks({k: _metric(k)}, clf, data, list)[k] for k in names}

    class Fresh:  # a new instance for every block: no cache carried between blocks
        def __init__(self, name):
            self.name = name

        def run(self, *args):
            return _metric(self.name).run(*args)

        def finalize(self, *args):
            return _metric(self.name).finalize(*args)

    fresh = _ranks({k: Fresh(k) for k in names}, clf, data, lambda r: [2, 0, 3, 1])
    ran = _engine(clf, data, names)
    for k in names:
        for other in (backward, solo, fresh, ran):
            _assert_identical(forward[k], other[k])
        assert forward[k].status == "ok"


# --------------------------------------------------------------------------- calibration


def test_calibration_through_the_engine(digits) -> None:
    clf, data = digits
    res = _engine(clf, data, ["calibration"])["calibration"]
    # (a) deterministic: equal to one run on the whole set
    whole = _whole(_metric("calibration"), clf, data)
    _assert_identical(res, whole)
    # (b) every summary from the merged per-point arrays
    conf, correct = res.per_point["confidence"], res.per_point["correct"]
    assert len(conf) == N
    d = res.diagnostics
    assert d["ece"] == expected_calibration_error(conf, correct, CAL["bins"])
    assert d["nll"] == pytest.approx(float(res.per_point["nll"].mean()), rel=1e-12)
    assert d["brier"] == pytest.approx(float(res.per_point["brier"].mean()), rel=1e-12)
    assert d["reliability"] == _reliability(conf, correct, CAL["bins"])
    # the bootstrap resamples all N points, from the (seed, label) generator
    g = np.random.default_rng(_derive_seed(SEED, "calibration/bootstrap"))
    idx = g.integers(0, N, size=(CAL["bootstrap"], N))
    boot = _ece_many(conf[idx], correct[idx].astype(np.float64), CAL["bins"])
    tail = (1 - 0.95) / 2  # ci_level 0.95, as the metric computes it
    assert d["ece_ci"] == [float(q) for q in np.quantile(boot, [tail, 1 - tail])]
    for t in CAL["thresholds"]:
        acc = conf >= t
        assert d["coverage"][f"{t:g}"] == {"k": int(acc.sum()), "n": N}
        prop = res.find({"threshold": t})
        if acc.any():
            assert (prop.k, prop.n) == (int((~correct[acc]).sum()), int(acc.sum()))
        else:  # a threshold no point reaches gives no proportion, as in a whole run
            assert prop is None
    # some block reaches 0.99995 and some does not: the blocks' 0-point proportions merged
    blocks = [conf[s:s + BS] >= 0.99995 for s in range(0, N, BS)]
    assert any(b.any() for b in blocks)
    assert not all(b.any() for b in blocks)


# --------------------------------------------------------------------------- corruptions


def test_corruptions_through_the_engine(digits) -> None:
    clf, data = digits
    res = _engine(clf, data, ["corruptions"])["corruptions"]
    # (a) the draws are seeded by the batch's position in the whole set: the blocked result
    # is the whole run's with the same batch size
    _assert_identical(res, _whole(_metric("corruptions"), clf, data))
    # (b) the summaries and the mean-cell proportion from the merged per-point arrays
    correct, clean = res.per_point["correct"], res.per_point["clean_correct"]
    cells = _metric("corruptions").cells()
    assert correct.shape == (N, len(cells))
    d = res.diagnostics
    assert d["clean_correct"] == int(clean.sum())
    assert d["mean_corruption_accuracy"] == float(correct.mean())
    for c in COR["corruptions"]:
        cols = [j for j, (cj, _) in enumerate(cells) if cj == c]
        assert d["per_type_accuracy"][c] == pytest.approx(correct[:, cols].mean(), rel=1e-12)
    for j, (c, s) in enumerate(cells):
        b = int((clean & ~correct[:, j]).sum())
        cc = int((~clean & correct[:, j]).sum())
        assert d["mcnemar"][c][str(s)] == {"b": b, "c": cc, "p_value": stats.mcnemar_exact(b, cc)}
        assert res.find({"corruption": c, "severity": s}).k == int(correct[:, j].sum())
    # the mean cell of every point is drawn once for the whole set
    g = torch.Generator().manual_seed(_derive_seed(SEED, "corruptions/mean-cell"))
    pick = torch.randint(len(cells), (N,), generator=g).numpy()
    np.testing.assert_array_equal(res.per_point["mean_cell"], pick)
    mean = res.find({"corruption": "mean"})
    assert (mean.k, mean.n) == (int(correct[np.arange(N), pick].sum()), N)
    np.testing.assert_array_equal(res.per_point["mean_correct"], correct[np.arange(N), pick])
    # different blocks draw different noise (no block reuses another's generator)
    noisy = cells.index(("gaussian_noise", 5))
    assert 0 < correct[:, noisy].sum() <= N


def test_corruptions_known_answers_hold_through_the_engine() -> None:
    from tests.test_corruptions import _Brightness

    v = np.linspace(0.02, 0.98, 49)
    x = np.repeat(v[:, None, None, None], 64, axis=1).reshape(49, 1, 8, 8).astype(np.float32)
    y = (v > 0.5).astype(np.int64)
    y[:3] = 1 - y[:3]
    data = robust_cert.load_data((x, y))
    clf = robust_cert.load_model(_Brightness(), input_shape=(1, 8, 8))
    cfg = {"corruptions": ["contrast", "brightness", "gaussian_noise"], "severities": [1, 5]}
    res = _engine(clf, data, ["corruptions"], configs={"corruptions": cfg})["corruptions"]
    clean = (v > 0.5).astype(np.int64) == y
    assert res.diagnostics["clean_correct"] == int(clean.sum())
    for s in (1, 5):
        assert res.find({"corruption": "contrast", "severity": s}).k == int(clean.sum())
        assert res.diagnostics["mcnemar"]["contrast"][str(s)] == {"b": 0, "c": 0,
                                                                  "p_value": 1.0}
    for s, add in ((1, 0.05), (5, 0.3)):
        pred = (np.minimum(v + add, 1) > 0.5).astype(np.int64)
        assert res.find({"corruption": "brightness", "severity": s}).k == int((pred == y).sum())
    assert res.find({"corruption": "mean"}).n == 49
    # not applicable on tabular data, through the engine too
    tab = robust_cert.load_data((np.random.default_rng(0).random((40, 4)), np.zeros(40, int)))
    lin = robust_cert.load_model(binary_linear(np.ones(4)), input_shape=(4,))
    res = _engine(lin, tab, ["corruptions"], configs={"corruptions": cfg})["corruptions"]
    assert res.status == "not_applicable"
    assert res.proportions == []


# --------------------------------------------------------------------------- safe radius


def test_safe_radius_through_the_engine(digits, fast_clever, monkeypatch) -> None:
    import robust_cert.metrics.safe_radius as sr

    calls = []
    real = sr.lipschitz_bound
    monkeypatch.setattr(sr, "lipschitz_bound", lambda *a: calls.append(1) or real(*a))
    clf, data = digits
    res = _engine(clf, data, ["safe_radius"])["safe_radius"]
    assert len(calls) == 1  # the network is bounded once, not once per block
    # (a) equal to one run on the whole set with the same batch size
    _assert_identical(res, _whole(_metric("safe_radius"), clf, data))
    # (b) the summaries from the merged per-point arrays
    pp, d = res.per_point, res.diagnostics
    holds = pp["holds"]
    assert d["holds"] == int(holds.sum()) > 0
    assert d["lower_bound"] == "ok"
    for nm in SR["norms"]:
        lower, upper, clever = (pp[f"{k}@{nm}"] for k in ("lower", "upper", "clever"))
        assert len(lower) == N
        for k, v in (("lower", lower), ("upper", upper), ("clever", clever)):
            w = v[holds & np.isfinite(v)]
            assert d[nm][f"median_{k}"] == (float(np.median(w)) if w.size else None)
        assert d[nm]["no_witness"] == int((holds & ~np.isfinite(upper)).sum())
        both = np.isfinite(lower) & np.isfinite(upper)
        assert d[nm]["sandwich_violations"] == int(
            (lower[both] > upper[both] * (1 + 1e-6) + 1e-9).sum()) == 0
        for r in SR["radii"]:
            assert res.find({"norm": nm, "radius": r}).k == int((holds & (lower > r)).sum())
    assert res.find({"norm": "l2", "radius": 0.0}).n == N


def test_safe_radius_known_answers_hold_through_the_engine() -> None:
    """The linear known answers (MSR₂ = |g|/‖w‖₂, MSR∞ = |g|/‖w‖₁) on 40 points in 5 blocks."""
    from tests.test_safe_radius import DUAL, WIDE, B, W, _check_sandwich, _data

    x, y, g = _data()
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(binary_linear(W, B), input_shape=data.input_shape)
    cfg = dict(norms=["l2", "linf"], radii=[0.1, 0.3], clever_radius=100.0, clever_samples=20,
               bisection_steps=20, max_radius=5.0)
    res = _engine(clf, data, ["safe_radius"], batch_size=8,
                  configs={"safe_radius": cfg})["safe_radius"]
    for nm in ("l2", "linf"):
        expected = np.abs(g) / DUAL[nm]
        _check_sandwich(res, expected, np.ones(len(x), bool), nm, x=x)
        for r in (0.1, 0.3):
            assert res.find({"norm": nm, "radius": r}).k == int((expected > r).sum())
        assert res.diagnostics[nm]["sandwich_violations"] == 0
    assert math.isclose(res.diagnostics["lipschitz"]["prefix"]["l2"], 1.0, rel_tol=1e-6)


def test_safe_radius_not_applicable_merges() -> None:
    """A gradient twin makes the lower bound not applicable in every block: the merged result
    keeps the status and reason, with the witnesses and CLEVER of every point."""
    from tests.test_safe_radius import WIDE, W, _data, _Wrapped

    x, y, _ = _data(n=20)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    twin = binary_linear(W, 0.3)
    clf = dataclasses.replace(robust_cert.load_model(_Wrapped(twin), input_shape=(4,)),
                              gradient_forward=twin)
    metric = SafeRadius(SafeRadiusConfig(norms=["l2"], radii=[0.1], clever_samples=5,
                                         bisection_steps=3))
    res = _ranks({"safe_radius": metric}, clf, data, list, batch_size=6)["safe_radius"]
    whole = _whole(metric, clf, data, batch_size=6)
    _assert_identical(res, whole)
    assert res.status == "not_applicable"
    assert "gradient twin" in res.reason
    assert np.isfinite(res.per_point["clever@l2"]).all()
    assert res.diagnostics["holds"] == int(res.per_point["holds"].sum())
