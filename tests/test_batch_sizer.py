"""The CPU batch sizer (``models.base.CpuBatchSizer``): which sizes it tries, which it keeps
(from a fake clock with known costs per image), that it only splits a batch (pieces of at
most the cap, never one image alone, the same logits, the same input gradients through the
attack views), and that the engine sets it on CPU (but for a model seeded per call)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import engine
from robust_cert.metrics.adversarial import RobustAccuracy, RobustAccuracyConfig
from robust_cert.metrics.probabilistic import (
    ProbabilisticRobustness,
    ProbabilisticRobustnessConfig,
)
from robust_cert.models.base import CpuBatchSizer
from tests.helpers import assert_identical
from tests.test_shard_misc import digits_points, small_cnn
from tests.test_soundness_checks import DropoutOn

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.mark.parametrize(("cap", "sizes"), [
    (256, [32, 64, 128, 256]), (64, [32, 64]), (100, [32, 64, 100]), (32, [32]), (20, [20]),
    (1, [1])])
def test_candidate_sizes(cap, sizes):
    assert CpuBatchSizer(cap).sizes == sizes


def test_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="cap must be >= 1"):
        CpuBatchSizer(0)


class FakeCost:
    """A forward function whose calls advance a fake clock by cost[size] per image (the
    first call at each size costs 100× more: the one-time set-up the sizer discards)."""

    def __init__(self, cost: dict[int, float]):
        self.cost, self.now, self.calls, self.seen = cost, 0.0, [], set()

    def clock(self) -> float:
        return self.now

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        per = self.cost.get(k, 10.0)
        self.now += k * per * (100 if k not in self.seen else 1)
        self.seen.add(k)
        self.calls.append(k)
        return x.flatten(1)[:, :3] * 2


def sized(cost: dict[int, float], cap: int = 256) -> tuple[CpuBatchSizer, FakeCost]:
    sizer, fn = CpuBatchSizer(cap), FakeCost(cost)
    sizer.clock = fn.clock
    return sizer, fn


@pytest.mark.parametrize(("cost", "best", "tried"), [
    ({32: 2.0, 64: 1.0, 128: 1.5, 256: 3.0}, 64, [32, 64, 128]),  # stops at the first worse
    ({32: 1.0, 64: 1.2, 128: 0.5, 256: 0.4}, 32, [32, 64]),  # no look past a worse size
    ({32: 4.0, 64: 3.0, 128: 2.0, 256: 1.0}, 256, [32, 64, 128, 256]),  # the cap
    ({32: 1.0, 64: 1.0, 128: 1.0, 256: 1.0}, 32, [32, 64]),  # no better: the smaller
])
def test_keeps_the_size_with_the_least_time_per_image(cost, best, tried):
    sizer, fn = sized(cost)
    x = torch.rand(600, 1, 2, 2)
    for _ in range(8):
        out = sizer.run(fn, x, 256)
        torch.testing.assert_close(out, fn(x), rtol=0, atol=0)
    assert sizer.best == best
    assert sorted(sizer.timings) == tried
    assert all(len(sizer.timings[s]) == CpuBatchSizer.CALLS for s in tried)
    fn.calls.clear()
    sizer.run(fn, x, 256)  # once chosen: pieces of the best size (the last one shorter)
    assert fn.calls[:-1] == [best] * (len(fn.calls) - 1)


def test_pieces_never_leave_one_image_alone_and_respect_the_cap():
    sizer, fn = sized({32: 2.0, 64: 1.0, 128: 1.5, 256: 3.0})
    for n in [3, 33, 65, 97, 129, 200, 257, 513, 1]:
        x = torch.rand(n, 1, 2, 2)
        fn.calls.clear()
        out = sizer.run(fn, x, 100)
        assert out.shape == (n, 3)
        assert sum(fn.calls) == n
        assert all(k <= 100 for k in fn.calls)
        assert n == 1 or all(k >= 2 for k in fn.calls)


def test_calls_too_small_for_the_size_being_tried_run_at_the_best_so_far():
    sizer, fn = sized({32: 2.0, 64: 1.0, 128: 0.5, 256: 0.4})
    x = torch.rand(200, 1, 2, 2)
    for _ in range(10):
        sizer.run(fn, x, 256)
    assert sizer.best is None  # 256 never fits a call of 200: still being tried
    assert sorted(sizer.timings) == [32, 64, 128]
    fn.calls.clear()
    sizer.run(fn, x, 256)
    assert fn.calls == [128, 72]


def test_small_calls_are_not_split_and_try_nothing():
    sizer, fn = sized({32: 2.0, 64: 1.0})
    for _ in range(5):
        sizer.run(fn, torch.rand(20, 1, 2, 2), 256)
    assert fn.calls == [20] * 5
    assert sizer.timings == {}
    assert sizer.best is None


def test_engine_sets_it_on_cpu_and_the_logits_do_not_change():
    clf = robust_cert.load_model(small_cnn(), input_shape=(1, 8, 8), device=CPU)
    capped = engine.device_capped(clf, 256)
    assert capped.max_batch == 256
    assert isinstance(capped.batch_sizer, CpuBatchSizer)
    x = torch.rand(700, 1, 8, 8)
    whole = clf.logits(x)
    for _ in range(12):  # through the trial sizes to the chosen one
        torch.testing.assert_close(capped.logits(x), whole, rtol=0, atol=0)
    assert capped.batch_sizer.best is not None


def test_a_metric_through_the_sizer_is_bit_identical():
    data = digits_points(40)
    clf = robust_cert.load_model(small_cnn(), input_shape=(1, 8, 8), device=CPU)
    metric = ProbabilisticRobustness(ProbabilisticRobustnessConfig(eps=[0.1], samples=3000))
    ctx = robust_cert.metrics.base.RunContext(CPU, batch_size=256, seed=3)
    plain = metric.run(clf, data, ctx)
    capped = engine.device_capped(clf, 256)
    for _ in range(3):
        assert_identical(metric.run(capped, data, ctx), plain)
    assert np.isfinite(plain.proportions[0].estimate)


class Recorded:
    """A forward that records the size of each call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.fn(x)


def test_the_attack_views_split_at_the_chosen_size_and_the_gradients_do_not_change():
    """The attack and query views of a classifier with a sizer run a batch in one call until
    the sizer has chosen a size (from the logits' calls), then in pieces of it, inside one
    autograd graph; the input gradients are those of one call, bit for bit (a row depends on
    its own input only). The views' calls never time a size."""
    clf = robust_cert.load_model(small_cnn(), input_shape=(1, 8, 8), device=CPU)
    capped = engine.device_capped(clf, 256)
    recorded = Recorded(capped.forward)
    capped = dataclasses.replace(capped, forward=recorded)
    sizer = capped.batch_sizer
    assert sizer is not None
    x = torch.rand(250, 1, 8, 8)

    def grad(view) -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(view(xr).logsumexp(1).sum(), xr)
        return g

    whole = grad(clf.attack_module())
    torch.testing.assert_close(grad(capped.attack_module()), whole, rtol=0, atol=0)
    assert recorded.calls == [250]  # nothing chosen yet: one call
    assert sizer.timings == {}  # and nothing timed
    # as if chosen from the logits' calls, at 0.1 ms per image: a piece takes 6.4 ms, under
    # PIECE_SECONDS, so the views still run one call (the cost per call would dominate)
    sizer.best, sizer.timings = 64, {64: [1.0, 1e-4, 1e-4]}
    recorded.calls.clear()
    torch.testing.assert_close(grad(capped.attack_module()), whole, rtol=0, atol=0)
    assert recorded.calls == [250]
    sizer.timings = {64: [1.0, 2e-4, 1e-3]}  # 12.8 ms a piece: split
    recorded.calls.clear()
    torch.testing.assert_close(grad(capped.attack_module()), whole, rtol=0, atol=0)
    assert recorded.calls == [64, 64, 64, 58]
    recorded.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(capped.query_module()(x), clf.logits(x), rtol=0, atol=0)
    assert recorded.calls == [64, 64, 64, 58]
    assert sizer.timings == {64: [1.0, 2e-4, 1e-3]}  # the views timed nothing
    assert clf.attack_module()._split is None  # no sizer: one call, as the metric passes it


def test_attacks_through_the_sizer_are_bit_identical(digits_model):
    """robust_accuracy (PGD, APGD-CE) on 40 points in one batch, the gradient passes in
    pieces of 16, gives every per-point result of the passes in one call."""
    data = digits_points(40)
    clf = robust_cert.load_model(digits_model, input_shape=(1, 8, 8), device=CPU)
    metric = RobustAccuracy(RobustAccuracyConfig(eps=[0.05, 0.2], attacks=["pgd", "apgd_ce"],
                                                 steps=5))
    ctx = robust_cert.metrics.base.RunContext(CPU, batch_size=256, seed=3)
    plain = metric.run(clf, data, ctx)
    capped = engine.device_capped(clf, 256)
    assert capped.batch_sizer is not None
    # as if chosen from the logits' calls, at 1 ms per image (16 ms a piece)
    capped.batch_sizer.best, capped.batch_sizer.timings = 16, {16: [1.0, 1e-3, 1e-3]}
    recorded = Recorded(capped.forward)
    capped = dataclasses.replace(capped, forward=recorded)
    assert_identical(metric.run(capped, data, ctx), plain)
    assert max(recorded.calls) == 16  # every pass was split
    assert 0 < plain.proportions[0].k < 40  # some points broken, some not: a real test


def test_a_model_seeded_per_call_gets_a_fixed_split():
    """A declared stochastic model's outputs depend on how a batch is split into calls (each
    call is seeded anew), so the engine caps its calls but lets no timing choose the split."""
    clf = robust_cert.load_model(DropoutOn(nn.Linear(4, 3)), input_shape=(4,), device=CPU)
    seeded = engine.seeded_forwards(clf, seed=0)
    x = torch.ones(100, 4)
    in_one = seeded.logits(x)
    in_two = dataclasses.replace(engine.seeded_forwards(clf, seed=0), max_batch=50).logits(x)
    assert not torch.equal(in_one, in_two)  # why the split must not depend on timings
    capped = engine.device_capped(engine.seeded_forwards(clf, seed=0), 64)
    assert capped.seeded_calls
    assert capped.max_batch == 64
    assert capped.batch_sizer is None
    assert engine.device_capped(clf, 64).batch_sizer is not None
    first = capped.logits(x)  # calls of 64 + 36, whatever the timings
    again = engine.device_capped(engine.seeded_forwards(clf, seed=0), 64)
    torch.testing.assert_close(again.logits(x), first, rtol=0, atol=0)
