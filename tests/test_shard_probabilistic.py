"""Sharding of the probabilistic families (issue 14): probabilistic_robustness,
local_probabilistic_robustness, randomized_smoothing, analytical_robustness and
rare_event_probability run block by block through the engine.

For each metric: (a) the blocked result of the real engine (``run_suite``, ≥ 3 blocks) is right
— equal to one ``run`` on the whole set where the result is deterministic, and the known
answers hold where it is random; (b) the finalized summaries are what the merged per-point
arrays give; (c) the result does not depend on how the blocks are spread over processes:
ranks are simulated as the engine runs them (each block with its offset and the total, merged
in block order, then ``finalize``), in order, in reverse order and with other work (another
run of the same metric, the global random generators reseeded) in between, and every result is
bit-identical to the engine's.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

import robust_cert
from robust_cert import engine, stats
from robust_cert.distributed import World
from robust_cert.metrics.analytical import AnalyticalConfig, AnalyticalRobustness, _bias
from robust_cert.metrics.base import MetricResult, RunContext
from robust_cert.metrics.local_probabilistic import (
    NOT_ROBUST,
    ROBUST,
    LocalProbabilisticConfig,
    LocalProbabilisticRobustness,
)
from robust_cert.metrics.probabilistic import (
    ProbabilisticRobustness,
    ProbabilisticRobustnessConfig,
    failure_rate_bands,
    population_bands,
)
from robust_cert.metrics.rare_events import RareEventConfig, RareEventProbability
from robust_cert.metrics.smoothing import (
    ABSTAIN,
    RandomizedSmoothing,
    SmoothingConfig,
    p_lower_bound,
    radius_cap,
)
from tests.helpers import assert_identical
from tests.linear_models import binary_linear

torch.set_num_threads(1)

CPU = torch.device("cpu")
WIDE = (-10.0, 10.0)
BATCH = 16  # 56 points: 4 blocks of 14 (per batch), of 16, 16, 16, 8 (pointwise)


# --------------------------------------------------------------------------- helpers


def _policy(name: str, config: dict, requirement: dict):
    return robust_cert.load_policy({
        "name": f"shard-{name}", "batch_size": BATCH, "metrics": {name: config},
        "requirements": [{"metric": name, **requirement}]})


def _engine(clf, data, pol, name: str, seed: int = 0) -> MetricResult:
    assert len(engine.batch_blocks(len(data), pol.batch_size)) >= 3
    return engine.run_suite(clf, data, pol, seed=seed, progress=False)[name]


def _whole(metric, clf, data, seed: int = 0) -> MetricResult:
    """One run on the whole set (offset 0, total None), as before sharding."""
    return metric.run(clf, data, RunContext(device=CPU, batch_size=BATCH, seed=seed))


def _block(data, block: range):
    return dataclasses.replace(data, x=data.x[block.start:block.stop],
                               y=data.y[block.start:block.stop])


def _sharded(metric, clf, data, *, size: int = 1, reverse: bool = False, between=None,
             seed: int = 0, confidence: float = 0.95, advanced: list | None = None
             ) -> MetricResult:
    """What the engine does with ``size`` processes, without processes: each simulated rank
    runs its share of the blocks (ranks run last first when ``reverse``), ``between`` runs
    after every block, rank 0 merges every block's result in block order and finalizes."""
    n = len(data)
    blocks = engine.batch_blocks(n, BATCH)
    whole = RunContext(device=CPU, batch_size=BATCH, seed=seed, confidence=confidence)
    ranks = [World(rank=r, size=size) for r in range(size)]
    gathered: dict[int, list] = {}
    for world in (reversed(ranks) if reverse else ranks):
        local = []
        for b in world.share(len(blocks)):
            ctx = dataclasses.replace(whole, offset=blocks[b].start, total=n)
            if advanced is not None:
                steps: list[int] = []
                ctx = dataclasses.replace(ctx, advance=steps.append)
                advanced.append((len(blocks[b]), steps))
            local.append(metric.run(clf, _block(data, blocks[b]), ctx))
            if between is not None:
                between()
        gathered[world.rank] = local
    shards = [r for rank in range(size) for r in gathered[rank]]
    merged = shards[0]
    for r in shards[1:]:
        merged = merged.merge(r)
    return metric.finalize(merged, clf, data, whole)


def _disturber(metric, clf, data):
    """Other work between two blocks: the global generators reseeded and drawn from, and the
    same metric object run on other points at another offset."""
    other = _block(data, range(0, 5))

    def between():
        torch.manual_seed(1234)
        torch.rand(7)
        np.random.seed(5)  # noqa: NPY002 (the legacy global state, on purpose)
        np.random.rand(3)  # noqa: NPY002
        metric.run(clf, other, RunContext(device=CPU, batch_size=4, seed=99, offset=7,
                                          total=len(data) + 41))
    return between


def _world_size_invariance(metric, clf, data, reference: MetricResult) -> None:
    """(c): every simulated spread of the blocks gives the engine's result, bit for bit."""
    between = _disturber(metric, clf, data)
    n_blocks = len(engine.batch_blocks(len(data), BATCH))
    for kw in ({}, {"size": 2, "between": between}, {"size": n_blocks, "reverse": True},
               {"size": 3, "reverse": True, "between": between}):
        assert_identical(_sharded(metric, clf, data, **kw), reference)


def _progress_is_the_cost(metric, clf, data) -> None:
    """Every block advances the progress bar by exactly ``cost(len(block))``, the engine's
    total for it (the bar then ends full whatever the blocks hold)."""
    advanced: list = []
    _sharded(metric, clf, data, advanced=advanced)
    for points, steps in advanced:
        assert sum(steps) == metric.cost(points)
        assert all(s >= 0 for s in steps)


# --------------------------------------------------------------------------- global noise


# 1-d, class 1 iff x > 0; the last two base points are mislabelled. Under uniform noise in
# [-ε, ε] a point flips with probability max(0, ε − |x|) / (2ε).
PX = np.array([0.1, 0.25, 0.4, 0.75, -0.2, -0.6, 0.3, -0.1])
PY = np.array([1, 1, 1, 1, 0, 0, 0, 1])
PEPS = 0.5


def _prob_setup():
    x = np.tile(PX, 7).astype(np.float32)[:, None]  # 56 points
    y = np.tile(PY, 7)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(binary_linear(np.array([1.0])), input_shape=(1,))
    cfg = {"eps": [0.05, PEPS], "samples": 4000}
    return data, clf, cfg


def test_probabilistic_robustness_sharded() -> None:
    data, clf, cfg = _prob_setup()
    metric = ProbabilisticRobustness(ProbabilisticRobustnessConfig(**cfg))
    assert metric.shardable
    pol = _policy("probabilistic_robustness", cfg, {"eps": PEPS, "at_most": 0.5})
    res = _engine(clf, data, pol, "probabilistic_robustness")
    whole = _whole(metric, clf, data)
    assert list(res.per_point) == ["failed@0.05", "index@0.05", "failed@0.5", "index@0.5"]
    assert list(res.per_point) == list(whole.per_point)

    # (a) the points of the pairs are drawn for the whole set, in pair order: as one run
    for eps in ("0.05", "0.5"):
        np.testing.assert_array_equal(res.per_point[f"index@{eps}"],
                                      whole.per_point[f"index@{eps}"])
    # at ε = 0.05 < every |x| the outcome is deterministic (only mislabelled points fail):
    # the blocked result is the whole-set result
    small, small_whole = res.find({"eps": 0.05}), whole.find({"eps": 0.05})
    np.testing.assert_array_equal(res.per_point["failed@0.05"],
                                  np.isin(res.per_point["index@0.05"] % 8, [6, 7]))
    np.testing.assert_array_equal(res.per_point["failed@0.05"], whole.per_point["failed@0.05"])
    assert (small.k, small.n) == (small_whole.k, small_whole.n)
    np.testing.assert_array_equal(small.cluster_k, small_whole.cluster_k)
    np.testing.assert_array_equal(small.cluster_n, small_whole.cluster_n)
    # at ε = 0.5 the known answer: the failure rate is the mean misclassification probability
    flip = np.maximum(0.0, PEPS - np.abs(PX)) / (2 * PEPS)
    mis = np.where((PX > 0).astype(int) == PY, flip, 1 - flip)
    prop = res.find({"eps": PEPS})
    assert prop.n == 4000
    lo, hi = stats.clopper_pearson(prop.k, prop.n, 0.999)
    assert lo <= mis.mean() <= hi
    failed, index = res.per_point["failed@0.5"], res.per_point["index@0.5"]
    for i, p in enumerate(mis):
        mine = failed[index % 8 == i]
        if p == 0.0:
            assert not mine.any()
        else:
            lo, hi = stats.clopper_pearson(int(mine.sum()), len(mine), 0.999)
            assert lo <= p <= hi

    # (b) counts and bands are those of the merged per-pair arrays
    for eps in (0.05, PEPS):
        p = res.find({"eps": eps})
        f, idx = res.per_point[f"failed@{eps:g}"], res.per_point[f"index@{eps:g}"]
        assert (p.k, p.n) == (int(f.sum()), len(f))
        np.testing.assert_array_equal(p.cluster_n, np.bincount(idx, minlength=len(data)))
        np.testing.assert_array_equal(p.cluster_k,
                                      np.bincount(idx, weights=f, minlength=len(data)))
        band = res.diagnostics["bands"]["by_eps"][f"{eps:g}"]
        assert band["population"] == population_bands(p, pol.confidence)
        assert band["on_this_evaluation_set"] == failure_rate_bands(p.k, p.n, pol.confidence)
        assert band["population"]["points"] == len(data)
    assert res.diagnostics["bands"]["confidence"] == pol.confidence

    # (c) any spread of the blocks over processes gives the same certificate
    _world_size_invariance(metric, clf, data, res)
    _progress_is_the_cost(metric, clf, data)


def test_probabilistic_prediction_changed_sharded() -> None:
    data, clf, cfg = _prob_setup()
    cfg = {**cfg, "failure": "prediction_changed"}
    metric = ProbabilisticRobustness(ProbabilisticRobustnessConfig(**cfg))
    res = _engine(clf, data, _policy("probabilistic_robustness", cfg,
                                     {"eps": PEPS, "at_most": 0.5}), "probabilistic_robustness")
    # at ε = 0.05 no prediction changes, mislabelled or not
    assert res.find({"eps": 0.05}).k == 0
    _world_size_invariance(metric, clf, data, res)


# --------------------------------------------------------------------------- local SPRT


def _local_setup():
    # p_fail 0 (robust), 0 (robust), 1 (mislabelled, fails surely) and 0.3 (fragile)
    x = np.tile([2.0, -2.0, 3.0, 0.4], 14).astype(np.float32)[:, None]  # 56 points
    y = np.tile([1, 0, 0, 1], 14)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(binary_linear(np.array([1.0])), input_shape=(1,))
    return data, clf, {"eps": 1.0}


def test_local_probabilistic_sharded() -> None:
    data, clf, cfg = _local_setup()
    metric = LocalProbabilisticRobustness(LocalProbabilisticConfig(**cfg))
    assert metric.shardable
    pol = _policy("local_probabilistic_robustness", cfg, {"p0": 0.01, "at_least": 0.3})
    res = _engine(clf, data, pol, "local_probabilistic_robustness")
    whole = _whole(metric, clf, data)

    # (a) the points whose outcome is sure decide exactly as in one run; the fragile ones are
    # decided not robust
    sure = np.tile([True, True, True, False], 14)
    for key in ("decision", "draws", "failures", "decided_at_budget"):
        np.testing.assert_array_equal(res.per_point[key][sure], whole.per_point[key][sure])
    dec = res.per_point["decision"]
    np.testing.assert_array_equal(dec, np.tile([ROBUST, ROBUST, NOT_ROBUST, NOT_ROBUST], 14))
    np.testing.assert_array_equal(res.per_point["draws"][np.tile([1, 1, 0, 0], 14) == 1], 326)
    np.testing.assert_array_equal(res.per_point["draws"][2::4], 2)
    (prop,) = res.proportions
    assert (prop.k, prop.n) == (28, 56)

    # (b) the summaries are those of all 56 points, not sums of the blocks'
    d = res.diagnostics
    m = len(data)
    e_robust = 0.05 / 0.95 + 0.05
    assert (d["robust"], d["not_robust"], d["undecided"]) == (28, 28, 0)
    assert d["draws_used"] == int(res.per_point["draws"].sum())
    assert d["decided_at_budget"] == 0
    assert d["min_draws_to_decide_robust"] == 326
    # ⌈56·0.1026⌉ = 6, where the blocks' ceilings would add up to 2 + 2 + 2 + 1 = 7
    assert d["expected_wrong_robust_decisions_at_most"] == math.ceil(m * e_robust) == 6
    assert d["expected_wrong_not_robust_decisions_at_most"] == math.ceil(m * e_robust)
    frac = d["robust_population_fraction_at_least"]
    assert frac["value"] == pytest.approx(
        stats.clopper_pearson(28, 56, pol.confidence, "lower")[0] - e_robust)
    assert frac["confidence"] == pol.confidence
    random = ("forward_images", "draws_used")  # the fragile points' draws are random
    assert {k: v for k, v in d.items() if k not in random} == \
        {k: v for k, v in whole.diagnostics.items() if k not in random}
    # forward images add up over the blocks
    blocks = engine.batch_blocks(m, BATCH)
    per_block = [metric.run(clf, _block(data, b), RunContext(
        device=CPU, batch_size=BATCH, seed=0, offset=b.start, total=m)) for b in blocks]
    assert d["forward_images"] == sum(r.diagnostics["forward_images"] for r in per_block)

    # (c)
    _world_size_invariance(metric, clf, data, res)
    _progress_is_the_cost(metric, clf, data)


# --------------------------------------------------------------------------- smoothing


SW = np.array([1.0, -2.0, 0.5, 1.5])
SB = 0.3


def _linear4_points(n: int = 56, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
    g = x.astype(np.float64) @ SW + SB
    return x, g


def test_randomized_smoothing_sharded() -> None:
    x, g = _linear4_points()
    y = (g > 0).astype(np.int64)
    y[:5] = 1 - y[:5]  # mislabelled: never certified correct
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(binary_linear(SW, SB), input_shape=(4,))
    cfg = {"sigma": 0.5, "n0": 50, "n": 1000, "alpha": 0.001, "radii": [0.0, 0.25, 0.5]}
    metric = RandomizedSmoothing(SmoothingConfig(**cfg))
    assert metric.shardable
    pol = _policy("randomized_smoothing", cfg, {"radius": 0.25, "at_least": 0.3})
    res = _engine(clf, data, pol, "randomized_smoothing")
    pp = res.per_point
    pred, radius, n_a = pp["prediction"], pp["radius"], pp["n_a"]

    # (a) known answers: f = sign(w·x + b) is its own smoothed classifier, with exact radius
    # |g|/‖w‖; a certificate never exceeds it (w.p. ≥ 1 − α per point) nor the cap
    ok = pred != ABSTAIN
    assert ok.sum() > len(x) // 2
    np.testing.assert_array_equal(pred[ok], (g[ok] > 0).astype(np.int64))
    exact = np.abs(g) / np.linalg.norm(SW)
    assert (radius[ok] <= exact[ok] + 1e-9).all()
    assert (radius[ok] <= radius_cap(0.5, 1000, 0.001) + 1e-12).all()
    np.testing.assert_allclose(pp["p_lower"], p_lower_bound(n_a, 1000, 0.001))
    assert np.isnan(radius[~ok]).all()
    assert not pp["correct"][:5].any()

    # (b) proportions and diagnostics from the merged per-point arrays
    for p in res.proportions:
        good = pp["correct"] & (np.nan_to_num(radius, nan=-1) >= p.params["radius"])
        assert (p.k, p.n) == (int(good.sum()), len(data))
    d = res.diagnostics
    assert d["abstained"] == int((~ok).sum())
    assert d["certified_correct"] == int(pp["correct"].sum())
    # ⌈56·0.001⌉ = 1, where the four blocks' ceilings would add up to 4
    assert d["expected_wrong_certificates_at_most"] == 1
    assert d["forward_images"] == len(data) * 1050
    assert d["radius_cap"] == pytest.approx(radius_cap(0.5, 1000, 0.001))

    # (c)
    _world_size_invariance(metric, clf, data, res)
    _progress_is_the_cost(metric, clf, data)


# --------------------------------------------------------------------------- analytical


def test_analytical_robustness_sharded() -> None:
    x, g = _linear4_points(seed=4)
    y = (g > 0).astype(np.int64)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    lin = torch.nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(np.stack([np.zeros(4), SW]), dtype=torch.float32))
        lin.bias.copy_(torch.tensor([0.0, SB]))
    clf = robust_cert.load_model(lin, input_shape=(4,))
    sigma = 0.5
    cfg = {"sigma": sigma, "estimators": ["taylor", "mmse", "mvs", "softmax"],
           "primary": "mmse", "mmse_samples": 8, "validate_points": 12,
           "validate_draws": 1000, "top_k": 5, "thresholds": [0.5, 0.9]}
    metric = AnalyticalRobustness(AnalyticalConfig(**cfg))
    assert metric.shardable
    pol = _policy("analytical_robustness", cfg, {"tau": 0.9, "at_least": 0.01})
    res = _engine(clf, data, pol, "analytical_robustness")
    whole = _whole(metric, clf, data)
    pp = res.per_point

    # (a) taylor and mvs draw nothing per point (the QMC scramble is the whole set's): equal
    # to one run; the validated points are the whole set's; mmse is exact on an affine model
    for key in ("p_taylor", "p_mvs", "prediction"):
        np.testing.assert_allclose(pp[key], whole.per_point[key], rtol=0, atol=1e-12)
    z = np.abs(g) / (sigma * np.linalg.norm(SW))
    exact = st.norm.cdf(z / np.sqrt(1 + 1e-5))
    np.testing.assert_allclose(pp["p_taylor"], exact, atol=1e-5)
    np.testing.assert_allclose(pp["p_mmse"], exact, atol=1e-5)
    assert ((pp["p_softmax"] >= 0) & (pp["p_softmax"] <= 1)).all()
    val = res.diagnostics["validation"]
    assert val["indices"] == whole.diagnostics["validation"]["indices"]
    assert val["points"] == len(set(val["indices"])) == 12
    assert val["taylor"]["mae"] < 0.05
    assert sorted(np.flatnonzero(pp["validation_hits"] >= 0).tolist()) == val["indices"]

    # (b) ranks, most vulnerable points, class means and validation errors from the merged
    # per-point arrays
    primary = pp["p_mmse"]
    order = np.argsort(primary, kind="stable")
    np.testing.assert_array_equal(pp["rank"][order], np.arange(len(data)))
    d = res.diagnostics
    assert d["most_vulnerable"] == order[:5].tolist()
    assert d["robustness_bias"] == _bias(primary, y, 0.95)
    for c, cls in d["robustness_bias"]["per_class"].items():
        assert cls["mean"] == pytest.approx(primary[y == int(c)].mean())
        assert cls["n"] == int((y == int(c)).sum())
    idx = np.array(val["indices"])
    p_mc = pp["validation_hits"][idx] / 1000
    for name in cfg["estimators"]:
        err = np.abs(pp[f"p_{name}"][idx] - p_mc)
        assert val[name]["mae"] == pytest.approx(err.mean())
        assert val[name]["max_abs_error"] == pytest.approx(err.max())
    for p in res.proportions:
        assert (p.k, p.n) == (int((primary >= p.params["tau"]).sum()), len(data))
    assert d["qmc_std_error_max"] == 0.0  # two classes: the CDF is one-dimensional, exact

    # (c)
    _world_size_invariance(metric, clf, data, res)
    _progress_is_the_cost(metric, clf, data)


# --------------------------------------------------------------------------- rare events


RD = 10
RW = np.ones(RD) / np.sqrt(RD)  # ‖w‖ = 1


def test_rare_event_probability_sharded() -> None:
    z = np.tile([2.0, 2.5, 3.0, 2.0], 14)  # margins z·σ‖w‖, σ = 1: p = Φ(−z)
    x = (z[:, None] * RW).astype(np.float32)
    data = robust_cert.load_data((x, np.ones(len(z), np.int64)), input_range=(-100.0, 100.0))
    clf = robust_cert.load_model(binary_linear(RW), input_shape=(RD,))
    cfg = {"sigma": 1.0, "runs": 2, "particles": 200, "mcmc_steps": 5, "points": 10,
           "p_max": [1e-3, 0.01]}
    metric = RareEventProbability(RareEventConfig(**cfg))
    assert metric.shardable
    pol = _policy("rare_event_probability", cfg, {"p_max": 0.01, "at_least": 0.01})
    res = _engine(clf, data, pol, "rare_event_probability")
    whole = _whole(metric, clf, data)
    pp = res.per_point

    # (a) the subset is the whole set's (global indices), and the known answer holds
    idx = pp["index"]
    np.testing.assert_array_equal(idx, whole.per_point["index"])
    assert len(idx) == 10
    assert (np.diff(idx) > 0).all()
    assert idx.max() < len(data)
    # the subset spreads over several blocks, so the blocks really shared it out
    assert len(set((idx // BATCH).tolist())) >= 2
    exact = np.log10(st.norm.cdf(-z[idx]))
    runs = pp["log10_p_runs"]
    assert runs.shape == (10, 2)
    sd = math.sqrt(-math.log(st.norm.cdf(-2.5)) / (-math.log(0.5) * 200)) / math.log(10)
    assert abs((runs - exact[:, None]).mean()) < 4 * sd / math.sqrt(runs.size)
    assert pp["reached"].all()

    # (b) summaries of the 10 evaluated points
    d = res.diagnostics
    assert (d["points"], d["runs"]) == (10, 2)
    assert d["median_spread_log10"] == float(np.median(pp["log10_p_spread"]))
    assert d["not_reached"] == 0
    assert d["zero_estimates"] == int((~np.isfinite(runs)).sum())
    np.testing.assert_allclose(pp["log10_p"], runs.mean(1))
    np.testing.assert_allclose(pp["log10_p_spread"], runs.std(1, ddof=1))
    for p in res.proportions:
        assert (p.k, p.n) == (int((pp["log10_p"] <= math.log10(p.params["p_max"])).sum()), 10)

    # (c)
    _world_size_invariance(metric, clf, data, res)
    _progress_is_the_cost(metric, clf, data)


def test_rare_event_all_points_sharded() -> None:
    """Without ``points`` every point of every block is evaluated, with global indices."""
    x = (np.full(40, 2.0)[:, None] * RW).astype(np.float32)
    data = robust_cert.load_data((x, np.ones(40, np.int64)), input_range=(-100.0, 100.0))
    clf = robust_cert.load_model(binary_linear(RW), input_shape=(RD,))
    cfg = {"sigma": 1.0, "runs": 2, "particles": 50, "mcmc_steps": 2}
    metric = RareEventProbability(RareEventConfig(**cfg))
    res = _engine(clf, data, _policy("rare_event_probability", cfg,
                                     {"p_max": 1e-6, "at_least": 0.0}),
                  "rare_event_probability")
    np.testing.assert_array_equal(res.per_point["index"], np.arange(40))
    assert res.diagnostics["points"] == 40
    _world_size_invariance(metric, clf, data, res)


def test_analytical_multiclass_integrals_do_not_depend_on_the_blocks() -> None:
    """With three classes the MVN CDF is integrated by randomized QMC: its scramble is drawn
    for the whole set, so the blocked taylor estimates are those of one run, bit for bit."""
    rng = np.random.default_rng(7)
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32))
        lin.bias.copy_(torch.tensor(rng.normal(size=3) * 0.3, dtype=torch.float32))
    x = rng.uniform(-1, 1, size=(56, 4)).astype(np.float32)
    with torch.no_grad():
        y = lin(torch.from_numpy(x)).argmax(1).numpy()
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(lin, input_shape=(4,))
    cfg = {"sigma": 0.4, "estimators": ["taylor", "mvs"], "primary": "taylor",
           "qmc_points": 256, "validate_points": 0}
    metric = AnalyticalRobustness(AnalyticalConfig(**cfg))
    res = _engine(clf, data, _policy("analytical_robustness", cfg,
                                     {"tau": 0.5, "at_least": 0.01}), "analytical_robustness")
    whole = _whole(metric, clf, data)
    assert res.diagnostics["qmc_std_error_max"] > 0  # a real QMC integral
    assert_identical(res, whole)
    assert "validation_hits" not in res.per_point
    _world_size_invariance(metric, clf, data, res)
