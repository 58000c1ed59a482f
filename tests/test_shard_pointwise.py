"""Pointwise metrics (``Metric.pointwise``): draws seeded per point, small fixed blocks, each
process running all the points of its blocks in one call in full batches. Through the real
engine (:func:`robust_cert.engine.run_suite`, its processes simulated by threads exchanging
in memory), the results are bit-identical for 1, 2 and 3 processes and for every batch size;
what the per-point draws count keeps its known distribution (closed forms)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from scipy import stats as st
from torch import nn

import robust_cert
from robust_cert import engine
from robust_cert.distributed import World
from robust_cert.metrics import REGISTRY
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.local_probabilistic import (
    LocalProbabilisticConfig,
    LocalProbabilisticRobustness,
)
from robust_cert.metrics.probabilistic import (
    ProbabilisticRobustness,
    ProbabilisticRobustnessConfig,
)
from robust_cert.metrics.smoothing import RandomizedSmoothing, SmoothingConfig
from robust_cert.models.base import Classifier
from robust_cert.policy import load_policy
from tests.helpers import assert_identical
from tests.test_shard_misc import digits_points, small_cnn

torch.set_num_threads(1)
CPU = torch.device("cpu")

#: every pointwise family, with a small configuration
POINTWISE = {
    "accuracy": {},
    "calibration": {"bins": 5, "thresholds": [0.5, 0.9]},
    "probabilistic_robustness": {"eps": [0.05, 0.2], "samples": 300},
    "local_probabilistic_robustness": {"distribution": "uniform_l2", "eps": 0.6, "p0": 0.2,
                                       "p1": 0.05, "max_draws": 60},
    "randomized_smoothing": {"sigma": 0.25, "n0": 8, "n": 40, "alpha": 0.1,
                             "radii": [0.0, 0.1]},
}


@dataclasses.dataclass
class _Board:
    size: int
    slots: list = dataclasses.field(default_factory=list)
    barrier: threading.Barrier | None = None

    def __post_init__(self):
        self.slots = [None] * self.size
        self.barrier = threading.Barrier(self.size)


@dataclasses.dataclass
class ThreadWorld(World):
    """A process of a world simulated by a thread: exchanges go through ``board``."""

    board: _Board | None = None

    def exchange(self, payload, error=None):
        assert self.board is not None
        assert self.board.barrier is not None
        self.board.slots[self.rank] = (error, payload)
        self.board.barrier.wait()
        out = list(self.board.slots)
        self.board.barrier.wait()
        failed = [e for e, _ in out if e is not None]
        if failed:
            raise failed[0]
        return [p for _, p in out]


def run_world(model, data, policy, size: int, seed: int = 0) -> dict:
    """:func:`engine.run_suite` on ``size`` simulated processes; rank 0's results."""
    board = _Board(size)
    results: list = [None] * size
    errors: list = []

    def one(rank: int) -> None:
        try:
            results[rank] = engine.run_suite(
                model, data, policy, seed=seed, progress=False,
                world=ThreadWorld(rank=rank, size=size, board=board))
        except BaseException as exc:  # re-raised below
            errors.append(exc)
            board.barrier.abort()  # type: ignore[union-attr]

    threads = [threading.Thread(target=one, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert all(r is None for r in results[1:])
    return results[0]


def _policy(batch_size: int, metrics: dict = POINTWISE):
    return load_policy({"name": "pointwise", "version": "1", "batch_size": batch_size,
                        "metrics": metrics,
                        "requirements": [{"metric": "accuracy", "at_least": 0.0}]})


@pytest.fixture(scope="module")
def setup():
    return robust_cert.load_model(small_cnn(), input_shape=(1, 8, 8)), digits_points(70)


def test_the_pointwise_families_are_the_ones_that_draw_per_point() -> None:
    assert {name for name, cls in REGISTRY.items() if cls.pointwise} == set(POINTWISE)
    assert all(cls.shardable for cls in REGISTRY.values() if cls.pointwise)


def test_pointwise_blocks_do_not_depend_on_the_batch_size_and_run_together() -> None:
    metric = _policy(16).metric("accuracy")
    for batch in (1, 7, 16, 300):
        blocks = engine.metric_blocks(metric, 70, batch)
        assert [len(b) for b in blocks] == [16, 16, 16, 16, 6]
    blocks = engine.metric_blocks(metric, 70, 256)
    shares = [World(rank=r, size=2).share(len(blocks)) for r in range(2)]
    assert [engine.runs_of(blocks, s, True) for s in shares] == [[range(0, 48)],
                                                                 [range(48, 70)]]
    # a metric drawing per batch keeps one batch per block, run one by one: as many blocks
    # as batches of 32 would be (3), of sizes within one point (24, 23, 23), not 32, 32, 6
    adversarial = load_policy({"name": "a", "batch_size": 32, "metrics": {
        "robust_accuracy": {"eps": [0.1], "attacks": ["pgd"]}},
        "requirements": [{"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.0}]})
    atk = adversarial.metric("robust_accuracy")
    assert not atk.pointwise
    blocks = engine.metric_blocks(atk, 70, 32)
    assert blocks == [range(0, 24), range(24, 47), range(47, 70)] == engine.batch_blocks(70, 32)
    assert engine.runs_of(blocks, range(0, 2), False) == [range(0, 24), range(24, 47)]
    for n in range(1, 300):
        for batch in (1, 7, 32, 256):
            sizes = [len(b) for b in engine.batch_blocks(n, batch)]
            assert sum(sizes) == n
            assert len(sizes) == -(-n // batch)
            assert max(sizes) <= batch
            assert max(sizes) - min(sizes) <= 1 or len(sizes) == 1


def test_results_are_identical_for_1_2_3_processes_and_any_batch_size(setup) -> None:
    model, data = setup
    base = run_world(model, data, _policy(64), 1)
    assert list(base) == list(POINTWISE)
    for size, batch in ((1, 5), (1, 16), (2, 7), (2, 64), (3, 16), (3, 33)):
        got = run_world(model, data, _policy(batch), size)
        for name in POINTWISE:
            try:
                assert_identical(got[name], base[name])
            except AssertionError as exc:
                raise AssertionError(f"{name}, {size} processes, batch {batch}") from exc


def test_a_point_draws_the_same_in_any_range_and_differently_from_its_twin(setup) -> None:
    """Run on points 20..49 alone, a pointwise metric gives those points what the whole run
    gives them; two copies of the same input at different indices draw different noise."""
    model, data = setup
    metric = RandomizedSmoothing(SmoothingConfig(**POINTWISE["randomized_smoothing"]))
    whole = metric.run(model, data, RunContext(CPU, batch_size=64, seed=3))
    part = dataclasses.replace(data, x=data.x[20:50], y=data.y[20:50])
    some = metric.run(model, part, RunContext(CPU, batch_size=4, seed=3, offset=20,
                                              total=len(data)))
    for key in ("prediction", "n_a", "p_lower"):
        np.testing.assert_array_equal(some.per_point[key], whole.per_point[key][20:50])
    twins = dataclasses.replace(data, x=data.x[:1].repeat(40, 1, 1, 1), y=data.y[:1].repeat(40))
    metric = LocalProbabilisticRobustness(LocalProbabilisticConfig(
        distribution="gaussian", sigma=0.5, p0=0.2, p1=0.05, max_draws=60))
    res = metric.run(model, twins, RunContext(CPU, batch_size=16, seed=0))
    assert len(set(zip(res.per_point["draws"].tolist(),
                       res.per_point["failures"].tolist(), strict=True))) > 1


def _threshold_model() -> Classifier:
    """1-D input, class 1 iff x > 0.5 (logits [0, x − 0.5])."""
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0], [1.0]]))
        lin.bias.copy_(torch.tensor([0.0, -0.5]))
    return robust_cert.load_model(lin, input_shape=(1,))


def test_pair_failures_keep_their_binomial_distribution() -> None:
    """Points at x = 0.5 + c (class 1), noise δ ~ U[−ε, ε]: a pair fails iff δ < −c, with
    probability (ε − c)/(2ε) = 0.3 for c = 0.04, ε = 0.1. Over 3 seeds × 4,000 pairs drawn
    per point, k is Binomial(n, 0.3): two-sided exact test at 1e-4 (and the 3 seeds draw
    differently)."""
    clf = _threshold_model()
    n_points = 50
    x = np.full((n_points, 1), 0.54, dtype=np.float32)
    data = robust_cert.load_data((x, np.ones(n_points, dtype=np.int64)))
    metric = ProbabilisticRobustness(ProbabilisticRobustnessConfig(eps=[0.1], samples=4000))
    ks = []
    for seed in range(3):
        prop = metric.run(clf, data, RunContext(CPU, batch_size=64, seed=seed)).proportions[0]
        assert prop.n == 4000
        assert st.binomtest(prop.k, prop.n, 0.3).pvalue > 1e-4
        ks.append(prop.k)
    assert len(set(ks)) > 1


def test_smoothing_counts_keep_their_binomial_distribution() -> None:
    """x = 0.5 + c, δ ~ N(0, σ²): f(x + δ) = 1 iff δ > −c, probability Φ(c/σ). The n_a of
    60 points × 200 draws (each point its own generator) is Binomial(12,000, Φ(c/σ)), and a
    per-point chi-square test of the 60 counts does not reject (independent points)."""
    clf = _threshold_model()
    c, sigma, n = 0.15, 0.1, 200
    m = 60
    x = np.full((m, 1), 0.5 + c, dtype=np.float32)
    data = robust_cert.load_data((x, np.ones(m, dtype=np.int64)))
    metric = RandomizedSmoothing(SmoothingConfig(sigma=sigma, n0=10, n=n, alpha=0.1,
                                                 radii=[0.0]))
    res = metric.run(clf, data, RunContext(CPU, batch_size=7, seed=0))
    p = float(st.norm.cdf(c / sigma))
    n_a = res.per_point["n_a"]
    assert (res.per_point["prediction"] == 1).all()
    assert st.binomtest(int(n_a.sum()), m * n, p).pvalue > 1e-4
    chi2 = float((((n_a - n * p) ** 2) / (n * p * (1 - p))).sum())
    assert st.chi2.sf(chi2, m) > 1e-4
