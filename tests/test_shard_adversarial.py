"""Issue 14: robust_accuracy sharded into blocks (torchrun) gives the certificate of one
process.

The engine runs the metric on blocks of ``batch_size`` points with ``ctx.offset``, merges the
blocks in order and finalizes. Each attack call is seeded by the global index of its batch's
first point, so a block draws what a run on the whole set with the same batch size draws:
the blocked result is compared with that run exactly, with known answers on linear models,
and with the summaries recomputed from the merged per-point arrays and counts. Ranks are
simulated without processes, as the engine runs them.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from scipy import stats as st
from torch import nn

import robust_cert
from robust_cert import engine
from robust_cert.data import EvalSet
from robust_cert.distributed import World
from robust_cert.metrics.accuracy import Accuracy, AccuracyConfig
from robust_cert.metrics.adversarial import (
    MAX_EXAMPLES,
    SQUARE_MCNEMAR_LEVEL,
    ZERO_GRADIENT_LIMIT,
    RobustAccuracy,
    RobustAccuracyConfig,
)
from robust_cert.metrics.base import MetricResult, RunContext
from tests.helpers import assert_identical as _assert_same
from tests.linear_models import binary_linear

torch.set_num_threads(1)

CPU = torch.device("cpu")
WIDE = (-10.0, 10.0)
W2 = np.array([1.0, -2.0, 0.5, 1.5])
B2 = 0.3
BATCH = 16


def _binary() -> nn.Linear:
    return binary_linear(W2, B2)


class _HalfRounded(nn.Module):
    """The binary linear model, behind a rounding layer where x0 <= 0: zero input gradient
    on those points only (gradient masking in some blocks and not in others)."""

    def __init__(self):
        super().__init__()
        self.lin = _binary()

    def forward(self, x):
        return self.lin(torch.where(x[:, :1] > 0, x, torch.round(x * 2) / 2))


def _policy(**robust) -> robust_cert.policy.Policy:
    return robust_cert.load_policy({
        "name": "shard", "batch_size": BATCH, "metrics": {"robust_accuracy": robust},
        "requirements": [{"metric": "robust_accuracy", "eps": max(robust["eps"]),
                          "at_least": 0.0}]})


def _ctx(batch_size: int = BATCH) -> RunContext:
    return RunContext(device=CPU, batch_size=batch_size, seed=0)


def _blocked(metric, model, data: EvalSet, *, order=None, between=None,
             world_size: int | None = None) -> MetricResult:
    """What the engine does with a shardable metric, without processes: run each block with
    its offset (in ``order``, or by simulated ranks of ``world_size``, each with a metric
    instance of its own, the last rank first), merge in block order, finalize."""
    n = len(data)
    blocks = engine.batch_blocks(n, BATCH)
    whole = _ctx()
    runs = {}

    def one(m, b):
        if between is not None:
            between()
        block = blocks[b]
        ctx = dataclasses.replace(whole, offset=block.start, total=n)
        runs[b] = m.run(model, engine._subset(data, block), ctx)

    if world_size is None:
        for b in (range(len(blocks)) if order is None else order):
            one(metric, b)
    else:
        for rank in reversed(range(world_size)):
            fresh = type(metric)(metric.config)
            for b in World(rank=rank, size=world_size).share(len(blocks)):
                one(fresh, b)
    assert sorted(runs) == list(range(len(blocks)))
    merged = runs[0]
    for b in range(1, len(blocks)):
        merged = merged.merge(runs[b])
    return metric.finalize(merged, model, data, whole)


def _examples_from_robust(res: MetricResult, clean_ok: np.ndarray, eps: list[float]):
    """(ε, index) of the MAX_EXAMPLES clean-correct points broken at the smallest ε (ties:
    lowest index), from the merged per-point outcomes."""
    robust = res.per_point["robust"]
    keys = [(int(np.argmin(robust[i])), i) for i in np.flatnonzero(clean_ok)
            if not robust[i].all()]
    keys.sort()
    return ([eps[j] for j, _ in keys[:MAX_EXAMPLES]], [i for _, i in keys[:MAX_EXAMPLES]])


# --------------------------------------------------------------------------- known answers


def test_blocked_run_gives_the_exact_worst_case_and_the_whole_run() -> None:
    """Linear binary model on [0, 1]^4: the exact L∞ worst case with the box (as in
    test_attacks), through the real engine on 5 blocks of at most 16 points; the result is
    the run on the whole set with the same batch size, bit for bit, and its summaries are
    those of the merged per-point arrays."""
    rng = np.random.default_rng(8)
    x = rng.choice([0.0, 0.03, 0.5, 0.97, 1.0], size=(90, 4)) + rng.uniform(-0.02, 0.02,
                                                                              (90, 4))
    x = np.clip(x, 0, 1).astype(np.float32)
    w, b = np.array([1.0, -1.0, 2.0, -0.5]), -0.6
    g = x.astype(np.float64) @ w + b
    down = np.sign(g)[:, None] * w[None, :] > 0
    room = np.where(down, x, 1 - x)
    eps = 0.1
    worst = np.abs(g) - (np.abs(w)[None, :] * np.minimum(eps, room)).sum(1)
    keep = np.abs(worst) > 1e-3
    x, y, expected = x[keep][:75], (g[keep][:75] > 0).astype(np.int64), worst[keep][:75] > 0
    assert len(x) == 75
    assert 0 < expected.sum() < 75
    data = robust_cert.load_data((x, y), input_range=(0.0, 1.0))
    clf = robust_cert.load_model(binary_linear(w, b),
                                 input_shape=(4,))
    pol = _policy(eps=[0.0, eps], attacks=["fgsm", "pgd"], steps=20)
    assert len(engine.batch_blocks(len(data), pol.batch_size)) == 5
    res = engine.run_suite(clf, data, pol, progress=False)["robust_accuracy"]

    robust = res.per_point["robust"]
    np.testing.assert_array_equal(robust[:, 1], expected)  # known answer, exactly
    assert robust[:, 0].all()
    # (a) the run on the whole set, same batch size
    _assert_same(res, pol.metric("robust_accuracy").run(clf, data, _ctx()))
    # (b) summaries of the merged arrays and counts
    assert [(p.k, p.n) for p in res.proportions] == [(int(robust[:, j].sum()), 75)
                                                     for j in range(2)]
    d = res.diagnostics
    assert sum(d["broken_by_attack"]["fgsm"]) + sum(d["broken_by_attack"]["pgd"]) == \
        int((~expected).sum())
    assert d["clean_correct_points"] == 75
    assert d["attacked_inputs"] == 75 + (75 - d["broken_by_attack"]["fgsm"][1])  # FGSM, PGD
    assert d["sanity"] == {"eps0_equals_clean": "passed", "in_range_and_ball": "passed",
                           "gradients_nonzero": "passed", "square_not_better": "not_run"}
    assert d["eps0_equals_clean"] == "passed"
    assert d["sanity_findings"] == {}
    assert d["attack_order"] == ["fgsm", "pgd"]
    assert d["norm"] == "linf"
    ex_eps, ex_index = _examples_from_robust(res, np.ones(75, bool), [0.0, eps])
    assert len(ex_index) == MAX_EXAMPLES
    np.testing.assert_array_equal(res.per_point["example_index"], ex_index)
    np.testing.assert_array_equal(res.per_point["example_eps"], ex_eps)
    adv = res.per_point["example_adv"]
    assert np.abs(adv - x[ex_index]).max() <= eps + 1e-6
    assert ((adv @ w + b > 0) != y[ex_index]).all()
    np.testing.assert_array_equal(res.per_point["example_pred"], (adv @ w + b > 0))


def _masked_data(n: int = 64) -> tuple[EvalSet, np.ndarray]:
    """Points of the binary model, those with x0 > 0 (unmasked) in the first block."""
    rng = np.random.default_rng(6)
    x = rng.uniform(-3, 3, size=(4 * n, 4)).astype(np.float32)
    pos, neg = x[x[:, 0] > 0][:BATCH], x[x[:, 0] <= 0][:n - BATCH]
    x = np.concatenate([pos, neg])
    with torch.no_grad():
        y = _HalfRounded()(torch.from_numpy(x)).argmax(1).numpy()
    return robust_cert.load_data((x, y), input_range=WIDE), x


MASKED = {"eps": [0.0, 0.3, 0.6], "attacks": ["pgd", "square"], "square_queries": 200,
          "random_start": False}


def test_finalize_recomputes_mcnemar_and_sanity_from_merged_counts(caplog) -> None:
    """Gradient masking in every block but the first: the blocks' sanity states differ, so
    the plain merge cannot give them (they are declared ``recompute``: it keeps the first
    block's); finalize recomputes the McNemar test of the merged counts, every state and the
    findings, and warns once (not once a block)."""
    data, x = _masked_data()
    clf = robust_cert.load_model(_HalfRounded(), input_shape=(4,))
    pol = _policy(**MASKED)
    metric = pol.metric("robust_accuracy")
    with caplog.at_level(logging.WARNING, logger="robust_cert.metrics.adversarial"):
        res = engine.run_suite(clf, data, pol, progress=False)["robust_accuracy"]
    warned = [r.getMessage() for r in caplog.records
              if r.name == "robust_cert.metrics.adversarial"]
    assert sorted(m.split(" failed:")[0] for m in warned) == [
        "robust_accuracy: sanity check gradients_nonzero",
        "robust_accuracy: sanity check square_not_better"]

    d = res.diagnostics
    # the first block alone passes the gradient check, the others fail it
    blocks = engine.batch_blocks(len(data), BATCH)
    runs = [metric.run(clf, engine._subset(data, bl),
                       dataclasses.replace(_ctx(), offset=bl.start, total=len(data)))
            for bl in blocks]
    assert runs[0].diagnostics["sanity"]["gradients_nonzero"] == "passed"
    assert runs[1].diagnostics["sanity"]["gradients_nonzero"] == "failed"
    raw = runs[0]
    for r in runs[1:]:
        raw = raw.merge(r)
    assert raw.diagnostics["sanity"] == runs[0].diagnostics["sanity"]  # merge can't
    # (b) recomputed from the merged counts
    zero, probed = d["zero_gradient_points"], d["gradient_points_probed"]
    assert zero == sum(r.diagnostics["zero_gradient_points"] for r in runs)
    assert probed == sum(r.diagnostics["gradient_points_probed"] for r in runs)
    assert d["sanity"]["gradients_nonzero"] == ("failed" if zero > ZERO_GRADIENT_LIMIT * probed
                                                 else "passed") == "failed"
    comparison = d["square_vs_white_box"]
    assert [c["eps"] for c in comparison] == [0.3, 0.6]
    for j, c in enumerate(comparison):
        b = sum(r.diagnostics["square_vs_white_box"][j]["white_box_only"] for r in runs)
        s = sum(r.diagnostics["square_vs_white_box"][j]["square_only"] for r in runs)
        assert (c["white_box_only"], c["square_only"]) == (b, s)
        assert c["p_value"] == pytest.approx(
            st.binomtest(s, b + s, 0.5, alternative="greater").pvalue if b + s else 1.0,
            rel=1e-9)
    assert d["square_only_breaks"] == sum(c["square_only"] for c in comparison) == sum(
        d["broken_by_attack"]["square"])
    assert d["sanity"]["square_not_better"] == "failed"
    assert min(c["p_value"] for c in comparison) <= SQUARE_MCNEMAR_LEVEL / 2
    assert d["sanity"]["eps0_equals_clean"] == d["eps0_equals_clean"] == "passed"
    assert d["view_mismatch_points"] == 0
    assert d["clean_correct_points"] == len(data)
    assert d["sanity"]["in_range_and_ball"] == "passed"
    assert d["range_violations"] == 0
    assert set(d["sanity_findings"]) == {"gradients_nonzero", "square_not_better"}
    assert f"{zero} of {probed} points" in d["sanity_findings"]["gradients_nonzero"]["detail"]
    assert d["sanity_findings"]["gradients_nonzero"]["undermines"] == [{"eps": 0.3},
                                                                       {"eps": 0.6}]
    assert d["max_linf_excess"] == max(r.diagnostics["max_linf_excess"] for r in runs)
    robust = res.per_point["robust"]
    assert [p.k for p in res.proportions] == robust.sum(0).tolist()
    assert robust[:, 0].all()
    # (a) the run on the whole set with the same batch size
    _assert_same(res, metric.run(clf, data, _ctx()))
    # the examples survive the merge: the first points broken, their own adversarial inputs
    ex_eps, ex_index = _examples_from_robust(res, np.ones(len(data), bool), MASKED["eps"])
    np.testing.assert_array_equal(res.per_point["example_index"], ex_index)
    np.testing.assert_array_equal(res.per_point["example_eps"], ex_eps)
    adv = res.per_point["example_adv"]
    assert (np.abs(adv - x[ex_index]).max(1) <= np.array(ex_eps) + 1e-5).all()
    with torch.no_grad():
        pred = _HalfRounded()(torch.from_numpy(adv)).argmax(1).numpy()
    np.testing.assert_array_equal(res.per_point["example_pred"], pred)
    assert (pred != data.y.numpy()[ex_index]).all()


def test_fallback_is_recorded_and_warned_once(caplog) -> None:
    """AutoAttack on two classes falls back in every block: one note, one warning; the
    attacks stay sound (known answer: the linear radius)."""
    rng = np.random.default_rng(4)
    x = rng.uniform(-3, 3, size=(40, 4)).astype(np.float32)
    y = (x @ W2 + B2 > 0).astype(np.int64)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(_binary(), input_shape=(4,))
    pol = _policy(eps=[0.2], attacks=["autoattack"], square_queries=50)
    with caplog.at_level(logging.WARNING, logger="robust_cert.metrics.adversarial"):
        res = engine.run_suite(clf, data, pol, progress=False)["robust_accuracy"]
    fallback = [r for r in caplog.records if "AutoAttack-standard needs" in r.getMessage()]
    assert len(fallback) == 1
    assert "apgd_ce + square" in res.diagnostics["fallback"]
    assert res.diagnostics["attack_order"] == ["apgd_ce", "square"]
    radius = np.abs(x @ W2 + B2) / np.abs(W2).sum()
    robust = res.per_point["robust"][:, 0]
    assert not (~robust & (radius > 0.2 + 1e-4)).any()
    assert not robust[radius < 0.18].any()
    _assert_same(res, pol.metric("robust_accuracy").run(clf, data, _ctx()))


# --------------------------------------------------------------------------- world size


def test_result_does_not_depend_on_block_order_ranks_or_what_ran_between() -> None:
    """Blocks run in order, in reverse, by 2 or 3 simulated ranks (each with a metric of its
    own, the last rank first), or with other metrics and global random draws in between:
    the same result, bit for bit, and the engine's."""
    data, _ = _masked_data(56)  # 4 blocks, the last one shorter
    clf = robust_cert.load_model(_HalfRounded(), input_shape=(4,))
    cfg = {**MASKED, "random_start": True, "square_queries": 60}
    metric = RobustAccuracy(RobustAccuracyConfig(**cfg))
    reference = _blocked(metric, clf, data)
    assert reference.proportions[1].k < len(data)  # the attacks break something

    other = RobustAccuracy(RobustAccuracyConfig(eps=[0.5], attacks=["pgd", "apgd_ce"]))
    accuracy = Accuracy(AccuracyConfig())
    rng = np.random.default_rng(0)

    def interfere():
        torch.manual_seed(int(rng.integers(1 << 30)))
        torch.rand(7)
        part = engine._subset(data, range(3, 3 + int(rng.integers(1, 20))))
        other.run(clf, part, dataclasses.replace(_ctx(), offset=3, total=len(data)))
        accuracy.run(clf, part, _ctx(5))

    _assert_same(_blocked(metric, clf, data, order=[3, 2, 1, 0]), reference)
    _assert_same(_blocked(metric, clf, data, order=[2, 0, 3, 1], between=interfere),
                 reference)
    for size in (2, 3, 5):
        _assert_same(_blocked(metric, clf, data, world_size=size), reference)
    pol = _policy(**cfg)
    _assert_same(engine.run_suite(clf, data, pol, progress=False)["robust_accuracy"],
                 reference)
    # the blocks are seeded by where they are: a block moved elsewhere draws differently
    blocks = engine.batch_blocks(len(data), BATCH)
    part = engine._subset(data, blocks[1])
    at = {off: metric.run(clf, part, dataclasses.replace(_ctx(), offset=off, total=len(data)))
          for off in (blocks[1].start, 0)}
    assert not np.array_equal(at[0].per_point["example_adv"],
                              at[blocks[1].start].per_point["example_adv"])


def test_digits_cnn_blocks_merge_examples_and_counts(digits_model) -> None:
    """60 digits images, 4 blocks of 15: APGD-CE + Square through the engine equals the run
    on the whole set; the examples kept after the merge are the first broken points of the
    whole, with their own adversarial images."""
    d = robust_cert.load_data("digits")
    x, y = d.x[:60].numpy(), d.y[:60].numpy()
    data = robust_cert.load_data((x, y))
    clf = robust_cert.load_model(digits_model, input_shape=(1, 8, 8))
    eps = [0.05, 0.1, 0.2]
    pol = _policy(eps=eps, attacks=["apgd_ce", "square"], steps=5, square_queries=30)
    res = engine.run_suite(clf, data, pol, progress=False)["robust_accuracy"]
    _assert_same(res, pol.metric("robust_accuracy").run(clf, data, _ctx()))
    with torch.no_grad():
        clean_ok = digits_model(torch.from_numpy(x)).argmax(1).numpy() == y
    robust = res.per_point["robust"]
    assert not (robust & ~clean_ok[:, None]).any()
    dg = res.diagnostics
    assert dg["clean_correct_points"] == int(clean_ok.sum())
    assert dg["sanity"]["eps0_equals_clean"] == "not_run"  # the view is the model itself
    for j in range(3):
        broken = sum(v[j] for v in dg["broken_by_attack"].values())
        assert res.proportions[j].k == int(clean_ok.sum()) - broken == int(robust[:, j].sum())
    ex_eps, ex_index = _examples_from_robust(res, clean_ok, eps)
    assert len(ex_index) == MAX_EXAMPLES
    assert max(ex_index) >= BATCH  # the whole's examples come from several blocks
    np.testing.assert_array_equal(res.per_point["example_index"], ex_index)
    np.testing.assert_array_equal(res.per_point["example_eps"], ex_eps)
    adv = res.per_point["example_adv"]
    assert adv.shape == (MAX_EXAMPLES, 1, 8, 8)
    assert adv.dtype == np.float32
    assert (np.abs(adv - x[ex_index]).reshape(MAX_EXAMPLES, -1).max(1)
            <= np.array(ex_eps) + 1e-5).all()
    with torch.no_grad():
        pred = digits_model(torch.from_numpy(adv)).argmax(1).numpy()
    np.testing.assert_array_equal(res.per_point["example_pred"], pred)
    assert (pred != y[ex_index]).all()
