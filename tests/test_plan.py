"""robust-cert plan: a pilot run counted and extrapolated; the policy's time budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import engine
from robust_cert.cli import main
from robust_cert.plan import plan
from tests.linear_models import binary_linear


def _linear_setup(n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=d), 0.1
    x = rng.uniform(0, 1, (n, d)).astype(np.float32)
    y = (x @ w + b > 0).astype(np.int64)
    model = binary_linear(w, b)
    data = robust_cert.load_data((x, y))
    return model, robust_cert.load_model(model, input_shape=(d,)), data


def test_counts_and_extrapolation_are_exact_where_work_is_per_point():
    model, clf, data = _linear_setup()
    policy = robust_cert.load_policy({
        "name": "p", "batch_size": 16, "metrics": {
            "accuracy": {},
            "robust_accuracy": {"eps": [0.05, 0.1], "attacks": ["fgsm"]},
            "probabilistic_robustness": {"eps": 0.05, "samples": 300}},
        "requirements": [{"metric": "accuracy", "at_least": 0.5}]})
    est = plan(clf, data, policy, pilot_points=4)
    by = {m.metric: m for m in est.metrics}
    acc = by["accuracy"]
    assert (acc.forward_images, acc.gradient_images, acc.scale) == (4, 0, 10.0)
    assert acc.to_dict()["forward_images"] == 40  # one forward image per point
    rob = by["robust_accuracy"]
    assert rob.scale == 10.0  # cost: points × radii × attacks
    # FGSM: one image with an input gradient per point and radius
    assert rob.gradient_images == 4 * 2
    assert rob.to_dict()["gradient_images"] == 80
    prob = by["probabilistic_robustness"]
    assert prob.scale == 1.0  # a fixed number of draws, whatever the points
    assert prob.forward_images >= 300
    assert est.seconds == pytest.approx(sum(m.seconds for m in est.metrics))
    assert est.forward_per_s > 0
    assert est.gradient_per_s > 0
    assert not model._forward_pre_hooks  # the counting hooks are gone
    assert "total" in est.table()


def test_time_budget_refuses_before_anything_runs(monkeypatch):
    model, _, data = _linear_setup()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the suite ran although the estimate was over budget")

    monkeypatch.setattr(engine, "run_suite", must_not_run)
    policy = {"name": "p", "time_budget_s": 1e-9,
              "metrics": {"accuracy": {}, "robust_accuracy": {"eps": [0.1]}},
              "requirements": [{"metric": "accuracy", "at_least": 0.5}]}
    with pytest.raises(robust_cert.PolicyError, match=r"time_budget_s: the suite is estimated "
                                                       r"at .* over the budget"):
        robust_cert.certify(model, data, policy, progress=False)
    # a generous budget runs, and the budget is part of the policy's hash
    monkeypatch.undo()
    policy["time_budget_s"] = 3600
    cert = robust_cert.certify(model, data, policy, progress=False)
    assert cert.body["policy"]["document"]["time_budget_s"] == 3600
    without = dict(policy)
    without.pop("time_budget_s")
    assert robust_cert.load_policy(without).sha256 != robust_cert.load_policy(policy).sha256


def test_plan_command_on_an_onnx_file(tmp_path, capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.rand(2, 1, 8, 8),), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    policy = tmp_path / "p.yaml"
    policy.write_text("name: p\nmetrics:\n  accuracy: {}\n  robust_accuracy: {eps: [0.1]}\n"
                      "requirements: [{metric: accuracy, at_least: 0.5}]\n")
    assert main(["plan", str(policy), "--model", str(path), "--pilot-points", "4"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out
    assert "robust_accuracy                  not applicable: no gradients (onnx)" in out
    assert "359 points on cpu" in out


def test_certify_announces_the_estimate_and_the_bar_counts_estimated_seconds(monkeypatch):
    """``announce`` gets the plan before the suite runs; the bar's total is the estimate."""
    model, _, data = _linear_setup()
    seen, totals = [], []
    real = engine.run_suite

    def spy(*args, **kwargs):
        assert seen, "the estimate is announced before the suite runs"
        totals.append(kwargs["expected_s"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_suite", spy)
    policy = {"name": "p", "batch_size": 16,
              "metrics": {"accuracy": {}, "robust_accuracy": {"eps": [0.1], "attacks": ["fgsm"]}},
              "requirements": [{"metric": "accuracy", "at_least": 0.5}]}
    cert = robust_cert.certify(model, data, policy, progress=False, announce=seen.append)
    assert cert.verdict in ("PASS", "FAIL", "INCONCLUSIVE")
    (estimate,) = seen
    assert [m.metric for m in estimate.metrics] == ["accuracy", "robust_accuracy"]
    assert totals == [{m.metric: m.seconds for m in estimate.metrics}]


def test_plan_on_several_processes_counts_the_busiest_share():
    """40 points in blocks of 16 (accuracy is pointwise: blocks of engine.BLOCK_POINTS at any
    batch size) are 3 blocks of 16, 16 and 8 points: 2 processes → the busiest runs 32 of
    the 40 points; a metric that is not shardable runs whole on rank 0."""
    assert engine.BLOCK_POINTS == 16
    _, clf, data = _linear_setup()
    for batch in (16, 256):
        policy = robust_cert.load_policy({
            "name": "p", "batch_size": batch, "metrics": {"accuracy": {}},
            "requirements": [{"metric": "accuracy", "at_least": 0.5}]})
        one = plan(clf, data, policy, pilot_points=4)
        two = plan(clf, data, policy, pilot_points=4, processes=2)
        assert one.metrics[0].share == 1.0
        assert two.metrics[0].share == pytest.approx(32 / 40)
    assert two.metrics[0].seconds == pytest.approx(
        two.metrics[0].pilot_seconds * two.metrics[0].scale * 32 / 40)
    assert "2 processes" in two.table()
    assert two.to_dict()["processes"] == 2
