"""Sharding of the parity metric (and the block-simulation helpers the divergence and surrogates
tests share): results on consecutive blocks, merged in order and finalized, are what the whole
run gives, and they do not depend on the order the blocks ran in, on other metrics running in
between, or on which metric instance (process) ran each block."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
import robust_cert.api
from robust_cert import engine
from robust_cert.data import EvalSet, digits_split
from robust_cert.errors import ModelError
from robust_cert.metrics.base import Metric, MetricResult, RunContext
from robust_cert.metrics.parity import Parity, ParityConfig
from robust_cert.models.base import Classifier
from robust_cert.policy import load_policy
from tests.helpers import assert_identical

torch.set_num_threads(1)
CPU = torch.device("cpu")
#: 60 points at batch 16: four blocks of 15
POINTS, BATCH = 60, 16


# --------------------------------------------------------------------------- shared helpers


def digits_points(n: int = POINTS) -> EvalSet:
    x, y = digits_split("test")
    return robust_cert.load_data((x[:n], y[:n]))


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 64, 10)).eval()


def policy_with(metric: str, config: dict, batch_size: int = BATCH):
    """A policy running ``metric`` (and accuracy, which holds the one requirement)."""
    return load_policy({"name": "shard", "version": "1", "batch_size": batch_size,
                        "metrics": {metric: config, "accuracy": {}},
                        "requirements": [{"metric": "accuracy", "at_least": 0.01}]})


def run_in_blocks(metric: Metric, model: Classifier, data: EvalSet, batch_size: int = BATCH, *,
                  seed: int = 0, order=None, between=None, fresh: bool = False,
                  twin: Classifier | None = None) -> MetricResult:
    """What :func:`robust_cert.engine.run_suite` does with a shardable metric, without
    processes: run each block of ``batch_size`` points (in ``order``, default in order) with
    ``ctx.offset``/``ctx.total`` set, calling ``between()`` after each; merge in block order
    and finalize. ``fresh``: each block runs on its own copy of the metric (as each process
    has its own instance)."""
    assert metric.shardable
    n = len(data)
    blocks = engine.batch_blocks(n, batch_size)
    whole = RunContext(device=model.device, batch_size=batch_size, seed=seed,
                       gradient_twin=twin)
    done = {}
    for b in range(len(blocks)) if order is None else order:
        block = blocks[b]
        part = dataclasses.replace(data, x=data.x[block.start:block.stop],
                                   y=data.y[block.start:block.stop])
        runner = type(metric)(metric.config) if fresh else metric
        done[b] = runner.run(model, part, dataclasses.replace(whole, offset=block.start, total=n))
        if between is not None:
            between()
    merged = done[0]
    for b in range(1, len(blocks)):
        merged = merged.merge(done[b])
    return metric.finalize(merged, model, data, whole)


def disturb(model: Classifier, data: EvalSet):
    """Something else to run between two blocks: another metric on other points, and the global
    random generator reseeded and drawn from (what torchattacks would do)."""
    other = Parity(ParityConfig(reference="twin", eps=[0.2]))

    def between():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())) + 1)
        torch.rand(7)
        other.run(model, dataclasses.replace(data, x=data.x[3:11], y=data.y[3:11]),
                  RunContext(CPU, batch_size=3, seed=99, offset=3, total=len(data),
                             gradient_twin=model))
    return between


def assert_world_size_invariant(metric: Metric, model: Classifier, data: EvalSet,
                                engine_result: MetricResult, **kw) -> MetricResult:
    """The engine's result equals the simulated in-order run, and that equals runs with the
    blocks in reverse order, with other work in between, and on fresh instances."""
    n_blocks = len(engine.batch_blocks(len(data), kw.get("batch_size", BATCH)))
    in_order = run_in_blocks(metric, model, data, **kw)
    assert_identical(engine_result, in_order)
    assert_identical(in_order, run_in_blocks(metric, model, data,
                                             order=range(n_blocks - 1, -1, -1), **kw))
    shuffled = [*range(1, n_blocks, 2), *range(0, n_blocks, 2)]
    assert_identical(in_order, run_in_blocks(metric, model, data, order=shuffled,
                                             between=disturb(model, data), **kw))
    assert_identical(in_order, run_in_blocks(metric, model, data, fresh=True,
                                             between=disturb(model, data), **kw))
    return in_order


# --------------------------------------------------------------------------- parity


def _twins(noise: float = 0.05):
    """A small CNN and a copy with slightly different weights (they disagree on a few points)."""
    net = small_cnn(0)
    other = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return (robust_cert.load_model(net, input_shape=(1, 8, 8)),
            robust_cert.load_model(other, input_shape=(1, 8, 8)))


PARITY = {"reference": "twin", "eps": [0.1, 0.3]}


def _expected_parity(model, twin, data, eps, blocks):
    """Agreement and |Δ logit| recomputed independently: the noise of each block drawn from
    that block's generator (seed, label, first point), batch by batch."""
    agree, diff = [], []
    for block in blocks:
        ctx = RunContext(CPU, batch_size=BATCH, seed=0, offset=block.start, total=len(data))
        g = ctx.generator(f"parity/{eps!r}")
        x = data.x[block.start:block.stop]
        if eps:
            x = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0.0, 1.0)
        with torch.no_grad():
            a, b = model.logits(x), twin.logits(x)
        agree.append((a.argmax(1) == b.argmax(1)).numpy())
        diff.append((a - b).abs().amax(1).numpy())
    return np.concatenate(agree), np.concatenate(diff)


def test_parity_in_blocks_matches_the_whole_run_and_the_known_draws() -> None:
    model, twin = _twins()
    data = digits_points()
    res = engine.run_suite(model, data, policy_with("parity", PARITY), progress=False,
                           gradient_twin=twin)["parity"]
    whole = Parity(ParityConfig(**PARITY)).run(
        model, data, RunContext(CPU, batch_size=BATCH, seed=0, gradient_twin=twin))
    blocks = engine.batch_blocks(POINTS, BATCH)
    assert len(blocks) == 4
    # clean agreement is deterministic: the blocked run is the whole run
    for key in ("agree", "max_abs_logit_diff"):
        np.testing.assert_array_equal(res.per_point[key], whole.per_point[key])
    assert res.find({}) == whole.find({})
    assert 0 < res.find({}).k < POINTS  # the twins do disagree somewhere
    assert res.diagnostics["reference"] == whole.diagnostics["reference"]
    # perturbed: block 0 draws what the whole run drew; every block draws from its own seed
    for eps in PARITY["eps"]:
        s = f"@{eps:g}"
        np.testing.assert_array_equal(res.per_point[f"agree{s}"][:BATCH],
                                      whole.per_point[f"agree{s}"][:BATCH])
        agree, diff = _expected_parity(model, twin, data, eps, blocks)
        np.testing.assert_array_equal(res.per_point[f"agree{s}"], agree)
        np.testing.assert_allclose(res.per_point[f"max_abs_logit_diff{s}"], diff, rtol=1e-6)
        prop = res.find({"eps": eps})
        assert (prop.k, prop.n) == (int(agree.sum()), POINTS)
    # a model is its own perfect reference, perturbed or not
    same = engine.run_suite(model, data, policy_with("parity", PARITY), progress=False,
                            gradient_twin=model)["parity"]
    assert all(p.k == p.n == POINTS for p in same.proportions)
    assert same.diagnostics["max_abs_logit_diff"] == {"clean": 0.0, "eps=0.1": 0.0,
                                                      "eps=0.3": 0.0}


def test_parity_finalized_diagnostics_come_from_the_merged_points() -> None:
    model, twin = _twins()
    data = digits_points()
    res = engine.run_suite(model, data, policy_with("parity", PARITY), progress=False,
                           gradient_twin=twin)["parity"]
    pp = res.per_point
    assert res.points() == POINTS
    assert res.diagnostics["max_abs_logit_diff"] == {
        "clean": float(pp["max_abs_logit_diff"].max()),
        "eps=0.1": float(pp["max_abs_logit_diff@0.1"].max()),
        "eps=0.3": float(pp["max_abs_logit_diff@0.3"].max())}
    assert res.diagnostics["max_abs_logit_diff"]["clean"] > 0
    for p in res.proportions:
        s = f"@{p.params['eps']:g}" if p.params else ""
        assert (p.k, p.n) == (int(pp[f"agree{s}"].sum()), POINTS)
    # the reference's identity is the same in every block, so the merge keeps it as is
    assert res.diagnostics["reference"]["sha256"] == twin.sha256


def test_parity_is_the_same_for_any_blocking_order() -> None:
    model, twin = _twins()
    data = digits_points()
    res = engine.run_suite(model, data, policy_with("parity", PARITY), progress=False,
                           gradient_twin=twin)["parity"]
    metric = Parity(ParityConfig(**PARITY))
    assert_world_size_invariant(metric, model, data, res, twin=twin)


def test_parity_loads_a_file_reference_once(monkeypatch) -> None:
    model, twin = _twins()
    data = digits_points()
    loads = []

    def fake_load(reference, *, input_shape=None, device=None):
        loads.append(reference)
        return twin

    import robust_cert.metrics.parity as parity_module

    monkeypatch.setattr(parity_module, "load_model", fake_load)  # the loader registry's
    pol = policy_with("parity", {"reference": "reference.onnx", "eps": [0.1]})
    res = engine.run_suite(model, data, pol, progress=False)["parity"]
    assert loads == ["reference.onnx"]  # four blocks, one load
    by_twin = engine.run_suite(model, data, policy_with("parity", {"reference": "twin",
                                                                   "eps": [0.1]}),
                               progress=False, gradient_twin=twin)["parity"]
    for key, v in res.per_point.items():
        np.testing.assert_array_equal(v, by_twin.per_point[key])


def test_parity_reference_mismatch_is_still_an_error() -> None:
    model, _ = _twins()
    other = robust_cert.load_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
                                   input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="has input"):
        engine.run_suite(model, digits_points(), policy_with("parity", {"reference": "twin"}),
                         progress=False, gradient_twin=other)
