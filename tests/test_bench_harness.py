"""bench/harness.py's yardstick: the prices of :class:`Costs`, the counter's timing of the
model's own work, and bench_resnet's ideal from the costs measured before and after a metric
(known answers on hand-made numbers and a small linear model)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import harness  # noqa: E402


def test_costs_from_samples_prices_only_what_ran():
    c = harness.Costs.from_samples({"fwd": (2e-3, 1e-3), "bwd": (3e-3, 2e-3),
                                    "jac": (5e-3, 1e-3)})
    # the Jacobian row is charged at most a backward pass; the HVP was not measured
    assert c.jac == 3e-3
    assert c.cpu_jac == 1e-3
    assert c.jac_measured == 5e-3
    assert math.isnan(c.hvp)
    assert c.ideal(10, 4, 2) == pytest.approx(10 * 2e-3 + 4 * 3e-3 + 2 * 3e-3)
    assert c.ideal(10, 4, 2, cpu=True) == pytest.approx(10 * 1e-3 + 4 * 2e-3 + 2 * 1e-3)
    # work whose cost is unknown makes the ideal unknown, never cheaper
    assert math.isnan(c.ideal(10, 0, 0, 1))


def test_counter_times_forward_and_only_backwards_that_reach_the_model(monkeypatch):
    # the counter wraps torch.autograd.grad and .backward: restored after the test
    monkeypatch.setattr(torch.autograd, "grad", torch.autograd.grad)
    monkeypatch.setattr(torch.autograd, "backward", torch.autograd.backward)
    model = torch.nn.Linear(4, 3)
    counter = harness.ImageCounter(model)
    slow = [0.0]

    def pause(_module, _args):
        time.sleep(slow[0])

    model.register_forward_pre_hook(pause)
    x = torch.rand(5, 4, requires_grad=True)
    slow[0] = 0.02
    out = model(x)
    assert counter.forward == 5
    assert counter.fwd_calls == 1
    assert counter.fwd_seconds >= 0.02
    torch.autograd.grad(out.sum(), x)
    assert counter.bwd == 5
    assert counter.bwd_seconds > 0
    # a backward that does not pass through the model is not its time
    before = counter.bwd_seconds
    z = torch.rand(1000, requires_grad=True)
    torch.autograd.grad((z * z).sum(), z)
    (z * 3).sum().backward()
    assert counter.bwd_seconds == before
    # Tensor.backward through the model is timed too
    model(x).sum().backward()
    assert counter.bwd == 10
    assert counter.bwd_seconds > before
    # inactive: nothing counted, nothing timed
    counter.reset()
    counter.active = False
    torch.autograd.grad(model(x).sum(), x)
    assert counter.totals() == {"forward": 0, "bwd": 0, "jac": 0, "hvp": 0}
    assert counter.model_seconds() == 0.0


def test_sample_costs_measures_the_kinds_asked():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    got = harness.sample_costs(model, (3, 4), 3, ("fwd", "bwd"), batches=(4,), windows=1,
                               seconds=1e-4)
    assert set(got) == {"fwd", "bwd"}
    assert got["fwd"][0] > 0
    assert min(got["bwd"]) >= 0
    with pytest.raises(ValueError, match="unknown kinds"):
        harness.sample_costs(model, (3, 4), 3, ("fwd", "hessian"))


def test_yardstick_prices_each_kind_at_its_lower_side():
    import bench_resnet

    r = {"forward": 100, "bwd": 10, "jac": 0, "hvp": 2,
         "before": {"fwd": (2e-3, 2e-3), "bwd": (1e-3, 1e-3)},
         "after": {"fwd": (1e-3, 1.5e-3), "bwd": (3e-3, 3e-3), "hvp": (8e-3, 8e-3)}}
    y = bench_resnet.yardstick(r)
    # fwd from after, bwd from before, hvp measured after only
    assert y["ideal"] == pytest.approx(100 * 1e-3 + 10 * 1e-3 + 2 * 8e-3)
    assert y["cpu_ideal"] == pytest.approx(100 * 1.5e-3 + 10 * 1e-3 + 2 * 8e-3)
    first = 100 * 2e-3 + 10 * 1e-3 + 2 * 8e-3
    last = 100 * 1e-3 + 10 * 3e-3 + 2 * 8e-3
    assert y["drift"] == pytest.approx(first / last - 1)
    assert y["ideal"] <= min(first, last)


@pytest.mark.parametrize(("one", "pair", "parts", "ok", "judged"), [
    # idle cores (ceiling 2.0): the speed-ups themselves are judged
    ((20.0, 22.0), (10.5, 13.0), (10.0, 11.0), True, True),
    # idle (ceiling 1.905), efficiency 0.92 holds, but the speed-up 1.75x misses 1.8x
    ((20.0, 22.0), (11.4, 13.0), (10.5, 11.0), False, True),
    # idle by the certification's ceiling (2.0): the whole command's 1.375x is judged, and
    # misses 1.5x, though its efficiency (0.875) holds
    ((20.0, 22.0), (10.5, 16.0), (10.0, 14.0), False, True),
    # a contended machine (ceiling 1.6): 1.5x is not judged, the efficiency 0.94 holds
    ((20.0, 22.0), (13.3, 15.5), (12.5, 13.5), True, False),
    # the same machine, sharding that loses 20% to coordination: efficiency 0.8, missed
    ((20.0, 22.0), (15.6, 15.5), (12.5, 13.5), False, False),
])
def test_shard_judges_efficiency_always_and_speed_ups_on_idle_cores(one, pair, parts, ok,
                                                                     judged):
    import bench_shard

    runs = {1: {"seconds": one[0]}, 2: {"seconds": pair[0]},
            bench_shard.PARTS: {"seconds": parts[0]}}
    walls = {1: [one[1], one[1] + 5], 2: [pair[1]], bench_shard.PARTS: [parts[1]]}
    harness.ROWS.clear()
    try:
        assert bench_shard.judge("set", 2, runs, walls) is ok
        rows = {name: (value, met) for name, value, _, met in harness.ROWS}
    finally:
        harness.ROWS.clear()
    ceiling, met = rows["set: machine's ceiling, certification (1 process ÷ 2 independent parts)"]
    assert ceiling.startswith(f"{one[0] / parts[0]:.2f}×")
    speed, met = rows["set: speed-up, certification"]
    assert (met != "") is judged
    assert ("not judged" in speed) is not judged
    efficiency, met = rows["set: sharding's efficiency, certification (speed-up ÷ ceiling)"]
    assert float(efficiency) == pytest.approx(parts[0] / pair[0], abs=0.005)


def test_counter_close_removes_its_hooks_and_gives_autograd_back():
    grad, backward = torch.autograd.grad, torch.autograd.backward
    model = torch.nn.Linear(4, 3)
    counter = harness.ImageCounter(model)
    try:
        assert torch.autograd.grad is not grad
        model(torch.rand(2, 4))
        assert counter.forward == 2
    finally:
        counter.close()
    assert torch.autograd.grad is grad
    assert torch.autograd.backward is backward
    model(torch.rand(5, 4))
    assert counter.forward == 2  # nothing counted after close
    assert not model._forward_hooks
    assert not model._forward_pre_hooks
