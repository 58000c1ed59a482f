"""Issue 12, sections 1 and 5: sanity checks decide, and nothing model-specific crashes.

Known answers: a digits CNN behind a rounding layer (zero input gradient everywhere) passes
examples/policies/digits.yaml's robust-accuracy requirement on the old code; it must be
INCONCLUSIVE for gradient masking. A model random at evaluation time, a model returning
probabilities and a model with BatchNorm each have a test of their own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from scipy import stats as st
from torch import nn
from torch.nn import functional as F

import robust_cert
from robust_cert import engine, verdict
from robust_cert.data import load_data
from robust_cert.errors import ModelError, PolicyError
from robust_cert.metrics.adversarial import (
    MIN_SQUARE_QUERIES,
    SQUARE_MCNEMAR_LEVEL,
    RobustAccuracy,
    RobustAccuracyConfig,
)
from robust_cert.metrics.base import MetricResult, Proportion, RunContext
from robust_cert.models.base import probability_rows
from robust_cert.models.torch import state_sha256
from robust_cert.policy import load_policy
from robust_cert.report.html import render_html

DIGITS_POLICY = Path(__file__).resolve().parents[1] / "examples" / "policies" / "digits.yaml"
ROBUST_REQ = "robust_accuracy[eps=0.1]"


class Rounded(nn.Module):
    """``net(round(8 x) / 8)``: the same predictions on a grid, zero input gradient."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 8) / 8)


def _digits(n: int | None = None):
    d = load_data("digits")
    n = len(d) if n is None else n
    return d.x[:n].numpy(), d.y[:n].numpy()


def _cover(cert) -> str:
    html = render_html(cert)
    start = html.index('id="cover"')
    return html[start:html.index("</header>", start)]


def _outcome(cert, rid: str) -> dict:
    return next(r for r in cert.requirements if r["id"] == rid)


def _check(cert, name: str) -> dict:
    return next(c for c in cert.body["sanity"]["checks"] if c["check"] == name)


def _digits_policy(**extra) -> dict:
    """examples/policies/digits.yaml with the attacks it had when issue 12 was filed (FGSM +
    10-step PGD, no gradient-free attack), so the known answer does not move with the
    example's attack list."""
    pol = yaml.safe_load(DIGITS_POLICY.read_text())
    pol["metrics"]["robust_accuracy"] = {"eps": [0.05, 0.1], "attacks": ["fgsm", "pgd"],
                                         "steps": 10}
    return {**pol, **extra}


# --------------------------------------------------------------------------- gradient masking


def test_gradient_masking_makes_robust_accuracy_inconclusive(digits_model) -> None:
    """Known answer (issue 12 §1): the rounded digits CNN got PASS on robust_accuracy@0.1
    under digits.yaml with FGSM + PGD (0.969 here); now INCONCLUSIVE, the reason naming
    gradient masking, in the outcome, the certificate's sanity record and on the report
    cover."""
    cert = robust_cert.certify(Rounded(digits_model), "digits", _digits_policy(),
                               progress=False)
    out = _outcome(cert, ROBUST_REQ)
    assert out["estimate"] > 0.9  # what the blind attacks report
    assert out["verdict"] == verdict.INCONCLUSIVE
    assert "gradient masking" in out["reason"]
    assert "gradients_nonzero" in out["reason"]
    assert cert.verdict != verdict.PASS
    rec = _check(cert, "gradients_nonzero")
    assert rec["state"] == "failed"
    assert rec["action"] == "inconclusive"
    assert rec["made_inconclusive"] == [ROBUST_REQ]
    # the check that did not run says so (it used to say true)
    assert _check(cert, "square_not_better")["state"] == "not_run"
    assert _outcome(cert, "accuracy")["verdict"] == verdict.PASS  # not undermined
    cover = _cover(cert)
    assert "gradients_nonzero" in cover
    assert "gradient masking" in cover
    assert ROBUST_REQ in cover
    # control: the same network without the rounding layer, attacks not blind, FAILs it
    # (the masking turned that FAIL into the old PASS)
    plain = robust_cert.certify(digits_model, "digits", _digits_policy(), progress=False)
    assert _outcome(plain, ROBUST_REQ)["verdict"] == verdict.FAIL
    assert _check(plain, "gradients_nonzero")["state"] == "passed"


def test_a_waiver_is_explicit_recorded_and_printed(digits_model) -> None:
    reason = "rounding is part of the deployed preprocessing; reviewed by the safety board"
    pol = _digits_policy(waive=[{"check": "gradients_nonzero", "reason": reason}])
    cert = robust_cert.certify(Rounded(digits_model), "digits", pol, progress=False)
    assert _outcome(cert, ROBUST_REQ)["verdict"] == verdict.PASS
    rec = _check(cert, "gradients_nonzero")
    assert rec["state"] == "failed"
    assert rec["action"] == "waived"
    assert rec["waiver"] == reason
    assert cert.body["sanity"]["waived"] == [{"check": "gradients_nonzero", "reason": reason}]
    cover = _cover(cert)
    assert "Waived by the policy" in cover
    assert reason in cover
    # a waiver needs a reason and a known check
    with pytest.raises(PolicyError, match="waive.0.reason"):
        load_policy(_digits_policy(waive=[{"check": "gradients_nonzero"}]))
    with pytest.raises(PolicyError, match="waive.0: a waiver needs a reason"):
        load_policy(_digits_policy(waive=[{"check": "gradients_nonzero", "reason": "  "}]))
    with pytest.raises(PolicyError, match="unknown sanity check 'gradient'"):
        load_policy(_digits_policy(waive=[{"check": "gradient", "reason": "x"}]))


def test_policies_without_the_new_fields_keep_their_hash() -> None:
    pol = load_policy(_digits_policy())
    doc = pol.canonical()
    assert "model" not in doc
    assert "waive" not in doc
    declared = load_policy(_digits_policy(model={"stochastic": True}))
    assert declared.canonical()["model"] == {"stochastic": True, "outputs": "logits"}
    assert declared.sha256 != pol.sha256


def _masked_policy(queries: int) -> dict:
    return {"name": "t", "metrics": {"robust_accuracy": {
        "eps": [0.1], "attacks": ["fgsm", "pgd", "square"], "square_queries": queries}},
        "requirements": [{"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.05}]}


def test_adequate_square_compensates_and_an_inadequate_one_does_not(digits_model) -> None:
    """With Square of at least MIN_SQUARE_QUERIES queries in the worst case, the masked
    model's verdict comes from the data (Square breaks what PGD cannot); with fewer queries
    the failed checks make it INCONCLUSIVE."""
    data = _digits(80)
    cert = robust_cert.certify(Rounded(digits_model), data, _masked_policy(MIN_SQUARE_QUERIES),
                               progress=False)
    (res,) = [r for r in cert.results if r["metric"] == "robust_accuracy"]
    assert res["diagnostics"]["broken_by_attack"]["square"][0] > 0
    out = _outcome(cert, ROBUST_REQ)
    assert out["verdict"] == verdict.PASS  # 0.05 is low: decided by the data, Square included
    for name in ("gradients_nonzero", "square_not_better"):
        rec = _check(cert, name)
        assert rec["state"] == "failed"
        assert rec["action"] == "compensated"
        assert f"Square with {MIN_SQUARE_QUERIES} queries" in rec["compensated_by"]
    assert "compensated by Square" in _cover(cert)

    weak = robust_cert.certify(Rounded(digits_model), data,
                               _masked_policy(MIN_SQUARE_QUERIES // 5), progress=False)
    out = _outcome(weak, ROBUST_REQ)
    assert out["verdict"] == verdict.INCONCLUSIVE
    assert "gradient masking" in out["reason"]
    assert _check(weak, "square_not_better")["action"] == "inconclusive"


# --------------------------------------------------------------------------- three states, McNemar


def _ctx() -> RunContext:
    return RunContext(device=torch.device("cpu"), batch_size=128, seed=0)


def _run(model, x, y, **cfg) -> MetricResult:
    clf = robust_cert.load_model(model, input_shape=x.shape[1:])
    data = robust_cert.load_data((x, y))
    return RobustAccuracy(RobustAccuracyConfig(**cfg)).run(clf, data, _ctx())


def test_checks_that_did_not_run_say_so(digits_model) -> None:
    x, y = _digits(30)
    only_white = _run(digits_model, x, y, eps=[0.1], attacks=["pgd"]).diagnostics["sanity"]
    assert only_white["square_not_better"] == "not_run"
    assert only_white["gradients_nonzero"] == "passed"
    assert only_white["eps0_equals_clean"] == "not_run"  # the view is the model itself
    assert only_white["in_range_and_ball"] == "passed"
    only_square = _run(digits_model, x, y, eps=[0.1], attacks=["square"],
                       square_queries=20).diagnostics["sanity"]
    assert only_square["gradients_nonzero"] == "not_run"
    assert only_square["square_not_better"] == "not_run"
    nothing = _run(digits_model, x, y, eps=[0.0], attacks=["pgd", "square"]).diagnostics
    assert nothing["sanity"] == {"eps0_equals_clean": "not_run", "in_range_and_ball": "not_run",
                                 "gradients_nonzero": "not_run",
                                 "square_not_better": "not_run"}
    assert nothing["square_vs_white_box"] == []
    assert set(verdict.check_state(v) for v in nothing["sanity"].values()) == {"not_run"}


def test_square_not_better_is_a_paired_mcnemar_test(digits_model) -> None:
    """An ordinary CNN on which Square breaks a few points PGD missed: the old fixed limit
    (1% of the attacked points) fires on these counts, the one-sided exact McNemar test
    against the white-box worst case does not; the rounded model fires it."""
    x, y = _digits(200)
    res = _run(digits_model, x, y, eps=[0.1], attacks=["fgsm", "pgd", "square"],
               square_queries=MIN_SQUARE_QUERIES)
    (cmp,) = res.diagnostics["square_vs_white_box"]
    b, c = cmp["white_box_only"], cmp["square_only"]
    attacked = int((digits_model(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    assert c > 0.01 * attacked  # the old rule would have fired here
    assert cmp["p_value"] == pytest.approx(
        st.binomtest(c, b + c, 0.5, alternative="greater").pvalue, rel=1e-9)
    assert cmp["p_value"] > SQUARE_MCNEMAR_LEVEL
    assert res.diagnostics["sanity"]["square_not_better"] == "passed"
    assert res.diagnostics["square_only_breaks"] == c == res.diagnostics["broken_by_attack"][
        "square"][0]
    # per-point worst case: robust = survived both; Square's extra breaks are in it
    assert res.proportions[0].k == attacked - sum(
        v[0] for v in res.diagnostics["broken_by_attack"].values())

    masked = _run(Rounded(digits_model), x[:60], y[:60], eps=[0.1], attacks=["pgd", "square"],
                  square_queries=200)
    (cmp,) = masked.diagnostics["square_vs_white_box"]
    assert cmp["square_only"] > cmp["white_box_only"]
    assert cmp["p_value"] <= SQUARE_MCNEMAR_LEVEL
    assert masked.diagnostics["sanity"]["square_not_better"] == "failed"
    assert "McNemar" in masked.diagnostics["sanity_findings"]["square_not_better"]["detail"]


# --------------------------------------------------------------------------- verdict rules


def _result(k: int, n: int, findings: dict) -> MetricResult:
    return MetricResult("robust_accuracy", "empirical", "robust accuracy", True, "", {},
                        [Proportion({"eps": 0.1}, k, n)],
                        diagnostics={"sanity": {c: "failed" for c in findings},
                                     "sanity_findings": findings})


def test_a_failed_check_does_not_weaken_a_fail_of_an_upper_bound() -> None:
    """Robust accuracy under attack is an upper bound: gradient masking can only inflate it,
    so a FAIL stands (with the check in its reason) and a PASS becomes INCONCLUSIVE."""
    pol = load_policy({"name": "t", "metrics": {"robust_accuracy": {"eps": [0.1]}},
                       "requirements": [{"metric": "robust_accuracy", "eps": 0.1,
                                         "at_least": 0.5}]})
    finding = {"gradients_nonzero": {"detail": "gradient masking suspected",
                                     "undermines": [{"eps": 0.1}], "compensated_by": None}}
    for k, before, after in ((10, verdict.FAIL, verdict.FAIL),
                             (95, verdict.PASS, verdict.INCONCLUSIVE)):
        results = {"robust_accuracy": _result(k, 100, finding)}
        overall, outcomes = verdict.decide(pol, results)
        assert outcomes[0].verdict == before
        overall, outcomes, records = verdict.apply_sanity(pol, results, outcomes)
        assert outcomes[0].verdict == after == overall
        assert "gradients_nonzero" in outcomes[0].reason
        assert records[0]["action"] == ("inconclusive" if after != before else "none")


# --------------------------------------------------------------------------- random models


class DropoutOn(nn.Module):
    """Dropout that stays on in eval mode (as a careless forward writes it)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(F.dropout(x, 0.3, training=True))


RANDOM_POLICY = {"name": "t", "metrics": {"accuracy": {},
                                          "robust_accuracy": {"eps": [0.05], "attacks": ["fgsm"]}},
                 "requirements": [{"metric": "accuracy", "at_least": 0.2},
                                  {"metric": "robust_accuracy", "eps": 0.05, "at_least": 0.1}]}


def _counts(cert) -> list[int]:
    return [v["k"] for r in cert.results for v in r["values"]]


def test_undeclared_randomness_makes_every_requirement_inconclusive(digits_model) -> None:
    data = _digits(100)
    runs = [robust_cert.certify(DropoutOn(digits_model), data, RANDOM_POLICY, seed=0,
                                progress=False) for _ in range(2)]
    for cert in runs:
        assert cert.body["sanity"]["deterministic_forward"] == "failed"
        assert cert.verdict == verdict.INCONCLUSIVE
        for r in cert.requirements:
            assert r["verdict"] == verdict.INCONCLUSIVE
            assert "random at evaluation time" in r["reason"]
        assert "random at evaluation time" in _cover(cert)
    # the estimates themselves would have cleared the thresholds (PASS before)
    assert all(r["estimate"] > r["threshold"] + 0.2 for r in runs[0].requirements)
    det = robust_cert.certify(digits_model, data, RANDOM_POLICY, seed=0, progress=False)
    assert det.body["sanity"]["deterministic_forward"] == "passed"
    assert det.verdict == verdict.PASS


def test_declared_stochastic_model_reproduces_and_says_so(digits_model) -> None:
    data = _digits(100)
    pol = {**RANDOM_POLICY, "model": {"stochastic": True}}
    a, b = (robust_cert.certify(DropoutOn(digits_model), data, pol, seed=0, progress=False)
            for _ in range(2))
    assert _counts(a) == _counts(b)
    for key, arr in a.per_point.items():
        np.testing.assert_array_equal(arr, b.per_point[key], err_msg=key)
    assert a.verdict == verdict.PASS  # decided by the data
    assert "random classifier" in a.body["sanity"]["guarantee_for"]
    assert a.body["sanity"]["deterministic_forward"] == "failed"  # recorded, declared
    assert "random classifier" in _cover(a)
    c = robust_cert.certify(DropoutOn(digits_model), data, pol, seed=1, progress=False)
    assert _counts(c) != _counts(a) or not np.array_equal(
        c.per_point["robust_accuracy/robust"], a.per_point["robust_accuracy/robust"])


def test_seeded_forwards_draw_fresh_randomness_and_leave_the_global_generator() -> None:
    model = DropoutOn(nn.Linear(4, 3))
    clf = robust_cert.load_model(model, input_shape=(4,))
    x = torch.ones(5, 4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    seeded = engine.seeded_forwards(clf, seed=7)
    first, second = seeded.logits(x), seeded.logits(x)
    assert not torch.equal(first, second)  # each call draws anew
    assert torch.equal(torch.get_rng_state(), state)
    again = engine.seeded_forwards(clf, seed=7)
    assert torch.equal(again.logits(x), first)
    assert torch.equal(again.logits(x), second)


def test_rng_consumption_is_caught_even_when_outputs_barely_move() -> None:
    class Tiny(nn.Module):
        def forward(self, x):
            return torch.stack([x.sum(1), -x.sum(1)], 1) + 1e-9 * torch.randn(len(x), 2)

    data = robust_cert.load_data((np.ones((8, 3), np.float32), np.zeros(8, np.int64)))
    got = engine.check_deterministic(robust_cert.load_model(Tiny(), input_shape=(3,)), data, 8)
    assert got["state"] == "failed"
    assert got["rng_consumed"]


# --------------------------------------------------------------------------- probabilities


def test_probabilities_are_refused_unless_declared(digits_model) -> None:
    data = _digits(60)
    probs = nn.Sequential(digits_model, nn.Softmax(dim=1))
    pol = {"name": "t", "metrics": {"accuracy": {}},
           "requirements": [{"metric": "accuracy", "at_least": 0.5}]}
    with pytest.raises(ModelError, match="returns probabilities, not logits.*outputs: "
                                         "probabilities"):
        robust_cert.certify(probs, data, pol, progress=False)
    declared = {**pol, "model": {"outputs": "probabilities"}}
    cert = robust_cert.certify(probs, data, declared, progress=False)
    plain = robust_cert.certify(digits_model, data, pol, progress=False)
    assert _counts(cert) == _counts(plain)
    assert cert.body["model"]["outputs"] == "probabilities (converted to log-probabilities)"
    with pytest.raises(ModelError, match="declares 'model: {outputs: probabilities}'"):
        robust_cert.certify(digits_model, data, declared, progress=False)


def test_probability_rows_tolerance_is_float32_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    for k in (2, 10, 1000):
        logits = torch.randn(64, k, generator=g) * 10
        assert probability_rows(torch.softmax(logits, 1))
        assert not probability_rows(logits)
    p = torch.softmax(torch.randn(8, 10, generator=g), 1)
    assert not probability_rows(p * (1 + 1e-3))  # sums to 1.001: not a rounding error
    assert not probability_rows(torch.full((4, 2), 0.5).index_put_((torch.tensor([0]),
                                                                     torch.tensor([0])),
                                                                    torch.tensor(-0.1)))


# --------------------------------------------------------------------------- model structure


class Messy(nn.Module):
    """BatchNorm, Dropout, functional ops and a residual connection."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(6 * 4 * 4, 10)
        self.register_buffer("calls", torch.tensor(0), persistent=False)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = h + F.relu(self.bn2(self.conv2(h)))  # residual
        h = F.max_pool2d(h, 2)
        return self.head(self.drop(torch.flatten(h, 1)))


@pytest.mark.parametrize("train_mode", [True, False])
def test_batchnorm_model_certifies_and_is_left_unchanged(train_mode: bool) -> None:
    torch.manual_seed(0)
    model = Messy()
    x, y = _digits(40)
    with torch.no_grad():  # non-trivial running statistics, num_batches_tracked = 3
        for _ in range(3):
            model.train()(torch.from_numpy(x))
    model.train(train_mode)
    model.drop.eval()  # a mixed mode must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pol = {"name": "t", "metrics": {"accuracy": {}, "robust_accuracy": {
        "eps": [0.05], "attacks": ["fgsm", "pgd", "square"], "square_queries": 20}},
        "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
    cert = robust_cert.certify(model, (x, y), pol, progress=False)
    assert cert.body["sanity"]["deterministic_forward"] == "passed"  # eval mode inside
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), k
    assert int(after["bn.num_batches_tracked"]) == 3
    assert all(p.grad is None for p in model.parameters())
    assert cert.body["model"]["sha256"] == state_sha256(model)


def test_state_hash_covers_every_dtype_and_shape() -> None:
    torch.manual_seed(0)
    model = Messy()
    model.register_buffer("flag", torch.tensor(True))
    model.register_buffer("bf16", torch.ones(3, dtype=torch.bfloat16))
    model.register_buffer("cplx", torch.ones(2, dtype=torch.complex64))
    model.register_buffer("empty", torch.zeros(0, 4))
    h = state_sha256(model)
    assert h == state_sha256(copy.deepcopy(model))
    for change in (lambda m: m.bn.num_batches_tracked.add_(1),  # 0-dim int64
                   lambda m: m.flag.logical_not_(),
                   lambda m: m.bf16.mul_(2),
                   lambda m: m.calls.add_(1),  # non-persistent buffer
                   lambda m: m.bn.running_mean.add_(1e-3)):
        other = copy.deepcopy(model)
        change(other)
        assert state_sha256(other) != h


# --------------------------------------------------------------------------- CLI


def test_cli_prints_reasons_and_failed_checks(capsys) -> None:
    from robust_cert.cli import _print_certification

    cert = SimpleNamespace(verdict="INCONCLUSIVE", requirements=[
        {"verdict": "INCONCLUSIVE", "id": ROBUST_REQ, "estimate": 0.97, "direction": "at_least",
         "threshold": 0.7, "reason": "sanity check gradients_nonzero failed: gradient masking"}],
        body={"sanity": {"checks": [{"check": "gradients_nonzero", "state": "failed",
                                     "action": "inconclusive"},
                                    {"check": "square_not_better", "state": "not_run"}]}})
    _print_certification("m", SimpleNamespace(certificate=cert, report_path="r",
                                              certificate_path="c", run_id="x"))
    out = capsys.readouterr().out
    assert "gradient masking" in out
    assert "sanity check gradients_nonzero FAILED" in out
    assert "square_not_better" not in out
