"""Known-answer tests of the attack suite (Family B) on linear models with hand-set weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert.errors import ModelError, PolicyError
from robust_cert.metrics.adversarial import ATTACKS, RobustAccuracy, RobustAccuracyConfig
from robust_cert.metrics.base import RunContext

CPU = torch.device("cpu")
WIDE = (-10.0, 10.0)
W2 = np.array([1.0, -2.0, 0.5, 1.5])  # binary: ||w||_1 = 5, ||w||_2 = sqrt(7.5)
B2 = 0.3


def _ctx(seed: int = 0) -> RunContext:
    return RunContext(device=CPU, batch_size=64, seed=seed)


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        lin.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return lin


def _binary():
    return _linear(np.stack([np.zeros(4), W2]), np.array([0.0, B2]))


def _points(n: int, seed: int, d: int = 4):
    rng = np.random.default_rng(seed)
    return rng.uniform(-3, 3, size=(n, d)).astype(np.float32)


def _run(model, x, y, eps, attacks, norm="linf", seed=0, input_range=WIDE, **cfg):
    data = robust_cert.load_data((x, y), input_range=input_range)
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    metric = RobustAccuracy(RobustAccuracyConfig(eps=eps, attacks=attacks, norm=norm, **cfg))
    return metric.run(clf, data, _ctx(seed))


def _multiclass_margin_radius(x, y, weight, bias, dual: str):
    """Exact radius of a linear multiclass model (no box): min_j g_j / ||w_y - w_j||_dual."""
    logits = x.astype(np.float64) @ weight.T + bias
    out = np.full(len(x), np.inf)
    for j in range(weight.shape[0]):
        diff = weight[y] - weight[j]
        g = logits[np.arange(len(x)), y] - logits[:, j]
        nrm = np.abs(diff).sum(1) if dual == "l1" else np.linalg.norm(diff, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(nrm > 0, g / np.where(nrm > 0, nrm, 1), np.inf)
        out = np.minimum(out, r)
    return out  # negative where misclassified


@pytest.mark.parametrize(("attack", "norm"), [
    ("pgd", "l2"), ("apgd_ce", "linf"), ("apgd_ce", "l2"), ("fab", "linf"), ("square", "linf"),
])
def test_attack_matches_closed_form_on_a_binary_linear_model(attack, norm) -> None:
    x = _points(120, seed=1)
    g = x.astype(np.float64) @ W2 + B2
    y = (g > 0).astype(np.int64)
    dual = np.abs(W2).sum() if norm == "linf" else np.linalg.norm(W2)
    eps = 0.3
    res = _run(_binary(), x, y, [0.0, eps], [attack], norm=norm, steps=20,
               square_queries=300)
    robust = res.per_point["robust"][:, 1]
    radius = np.abs(g) / dual
    assert not (~robust & (radius > eps + 1e-4)).any()  # sound: provably robust stays robust
    clear = radius < eps * 0.9
    assert clear.sum() > 5
    assert not robust[clear].any()  # the attack finds the easy adversarial examples
    assert res.per_point["robust"][:, 0].all()
    assert res.diagnostics["sanity"]["in_range_and_ball"] == "passed"
    assert res.diagnostics["sanity"]["eps0_equals_clean"] == "passed"  # tabular: a view
    assert res.diagnostics[f"max_{norm}_excess"] <= 1e-5


def test_autoattack_runs_on_four_classes_and_is_sound() -> None:
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(4, 6))
    bias = rng.normal(size=4) * 0.1
    x = _points(60, seed=3, d=6)
    y = (x @ weight.T + bias).argmax(1)
    eps = 0.15
    res = _run(_linear(weight, bias), x, y, [eps], ["autoattack"], steps=10)
    radius = _multiclass_margin_radius(x, y, weight, bias, "l1")
    robust = res.per_point["robust"][:, 0]
    assert not (~robust & (radius > eps + 1e-4)).any()
    assert not robust[radius < 0.9 * eps].any()
    assert "fallback" not in res.diagnostics
    assert res.diagnostics["attack_order"] == ["autoattack"]


def test_autoattack_falls_back_below_four_classes() -> None:
    x = _points(40, seed=4)
    y = (x @ W2 + B2 > 0).astype(np.int64)
    res = _run(_binary(), x, y, [0.2], ["autoattack"], square_queries=100)
    assert "apgd_ce + square" in res.diagnostics["fallback"]
    assert res.diagnostics["attack_order"] == ["apgd_ce", "square"]
    radius = np.abs(x @ W2 + B2) / np.abs(W2).sum()
    robust = res.per_point["robust"][:, 0]
    assert not (~robust & (radius > 0.2 + 1e-4)).any()
    assert not robust[radius < 0.18].any()


def test_apgd_t_refuses_too_few_classes() -> None:
    x = _points(10, seed=5)
    y = (x @ W2 + B2 > 0).astype(np.int64)
    with pytest.raises(ModelError, match="at least 4 classes"):
        _run(_binary(), x, y, [0.1], ["apgd_t"])


def test_square_l2_refuses_inputs_smaller_than_five_pixels() -> None:
    x = _points(10, seed=10)
    y = (x @ W2 + B2 > 0).astype(np.int64)
    for attack in ("square", "autoattack"):
        with pytest.raises(ModelError, match="at least 5×5 pixels"):
            _run(_binary(), x, y, [0.1], [attack], norm="l2")
    res = _run(_binary(), x, y, [0.1], ["fab"], norm="l2")  # FAB L2 is fine on rows
    assert res.status == "ok"


def test_bad_attack_configs_are_policy_errors() -> None:
    with pytest.raises(ValueError, match="valid attacks: fgsm, pgd, apgd_ce"):
        RobustAccuracyConfig(eps=[0.1], attacks=["cw"])
    with pytest.raises(ValueError, match="does not support norm 'l2'"):
        RobustAccuracyConfig(eps=[0.1], attacks=["fgsm"], norm="l2")
    with pytest.raises(ValueError, match="ε must be >= 0"):
        RobustAccuracyConfig(eps=[-0.1])
    assert RobustAccuracyConfig(eps=0.1, attacks=["APGD-CE"]).attacks == ["apgd_ce"]
    assert RobustAccuracyConfig(eps=0.1).attacks == ["fgsm", "pgd"]
    assert RobustAccuracyConfig(eps=0.1, norm="l2").attacks == ["pgd"]
    pol = {"name": "t", "metrics": {"robust_accuracy": {"eps": [0.1], "attacks": ["nope"]}},
           "requirements": [{"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.5}]}
    with pytest.raises(PolicyError, match="unknown attack 'nope'; valid attacks"):
        robust_cert.load_policy(pol)
    assert set(ATTACKS) >= {"fgsm", "pgd", "apgd_ce", "apgd_t", "fab", "square", "autoattack"}


class _Quantised(nn.Module):
    """A linear model behind a rounding layer: zero input gradients almost everywhere."""

    def __init__(self):
        super().__init__()
        self.lin = _binary()

    def forward(self, x):
        return self.lin(torch.round(x * 2) / 2)


def test_gradient_masking_is_flagged() -> None:
    x = _points(80, seed=6)
    y = (_Quantised()(torch.from_numpy(x)).argmax(1)).numpy()
    res = _run(_Quantised(), x, y, [0.6], ["pgd", "square"], square_queries=200,
               random_start=False)
    sanity = res.diagnostics["sanity"]
    assert sanity["gradients_nonzero"] == "failed"
    assert res.diagnostics["zero_gradient_points"] == 80
    assert res.diagnostics["square_only_breaks"] > 0
    assert sanity["square_not_better"] == "failed"
    assert res.diagnostics["broken_by_attack"]["pgd"] == [0]
    # a healthy model raises no flag
    ok = _run(_binary(), x, (x @ W2 + B2 > 0).astype(np.int64), [0.3], ["pgd", "square"],
              square_queries=100)
    assert set(ok.diagnostics["sanity"].values()) == {"passed"}


def test_square_order_and_images() -> None:
    """Square runs after the white-box attacks whatever the configured order; image input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, size=(30, 1, 6, 6)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    res = _run(model, x, y, [0.0, 0.1], ["square", "pgd", "fab"], input_range=(0.0, 1.0),
               square_queries=50)
    assert res.diagnostics["attack_order"] == ["pgd", "fab", "square"]
    assert res.find({"eps": 0.0}).k == 30
    assert res.diagnostics["sanity"]["in_range_and_ball"] == "passed"
    again = _run(model, x, y, [0.0, 0.1], ["square", "pgd", "fab"], input_range=(0.0, 1.0),
                 square_queries=50)
    np.testing.assert_array_equal(res.per_point["robust"], again.per_point["robust"])


def test_example_policy_runs_end_to_end_on_digits(digits_model) -> None:
    """examples/policies/digits-adversarial.yaml (budgets shrunk, 40 points): every metric of
    issue 7 runs in one certification, the certificate JSON is canonical (finite numbers)
    and every requirement is decided from its proportion."""
    from pathlib import Path

    import yaml

    from robust_cert.certificate import canonical_json
    from robust_cert.data import digits_split

    path = Path(__file__).resolve().parents[1] / "examples" / "policies" / \
        "digits-adversarial.yaml"
    raw = yaml.safe_load(path.read_text())
    m = raw["metrics"]
    m["robust_accuracy"].update(eps=[0.0, 0.1], square_queries=50)
    m["corruptions"]["severities"] = [5]
    m["safe_radius"].update(clever_samples=5, bisection_steps=4)
    m["divergence"].update(eps=[0.1], steps=5)
    x, y = digits_split("test")
    data = robust_cert.load_data((x[:40], y[:40]))
    cert = robust_cert.certify(digits_model, data, raw, progress=False)
    canonical_json(cert.body)
    kinds = {r["metric"]: (r["kind"], r["status"]) for r in cert.body["results"]}
    assert kinds == {
        "accuracy": ("statistical", "ok"), "robust_accuracy": ("empirical", "ok"),
        "calibration": ("statistical", "ok"), "corruptions": ("statistical", "ok"),
        "safe_radius": ("certified", "ok"), "divergence": ("empirical", "ok"),
        "surrogates": ("estimate", "ok")}
    assert all(o["k"] is not None for o in cert.body["requirements"])
    rob = next(r for r in cert.body["results"] if r["metric"] == "robust_accuracy")
    # the attacked view is the model itself: nothing to compare, and the check says so
    assert rob["diagnostics"]["sanity"]["eps0_equals_clean"] == "not_run"
    assert rob["diagnostics"]["attack_order"] == ["apgd_ce", "apgd_t", "fab", "square"]
    assert "safe_radius/lower@l2" in cert.per_point
    # the demo CNN is bounded (no "not applicable"): the safe-radius requirement is decided
    sr = next(r for r in cert.body["results"] if r["metric"] == "safe_radius")
    assert sr["diagnostics"]["lower_bound"] == "ok"


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "apgd_ce"])
def test_exact_worst_case_with_the_box_constraint(attack) -> None:
    """Linear binary model on [0, 1]^4: the worst L∞ perturbation moves every coordinate by
    min(ε, room to the box edge) against the margin; robust iff that still keeps the sign."""
    rng = np.random.default_rng(8)
    x = rng.choice([0.0, 0.03, 0.5, 0.97, 1.0], size=(300, 4)) + rng.uniform(-0.02, 0.02,
                                                                               (300, 4))
    x = np.clip(x, 0, 1).astype(np.float32)
    w, b = np.array([1.0, -1.0, 2.0, -0.5]), -0.6
    lin = _linear(np.stack([np.zeros(4), w]), np.array([0.0, b]))
    g = x.astype(np.float64) @ w + b
    y = (g > 0).astype(np.int64)
    eps = 0.1
    # move against the margin: down where sign(g)·w_i > 0, up otherwise
    down = np.sign(g)[:, None] * w[None, :] > 0
    room = np.where(down, x, 1 - x)
    worst = np.abs(g) - (np.abs(w)[None, :] * np.minimum(eps, room)).sum(1)
    keep = np.abs(worst) > 1e-3  # no near-ties
    res = _run(lin, x[keep], y[keep], [eps], [attack], input_range=(0.0, 1.0), steps=20)
    expected = worst[keep] > 0
    assert 0 < expected.sum() < keep.sum()
    np.testing.assert_array_equal(res.per_point["robust"][:, 0], expected)
    unclipped = np.abs(g[keep]) > eps * np.abs(w).sum()
    assert (expected & ~unclipped).any()  # the box matters for some points


def test_eps0_flag_catches_an_attacked_view_that_differs_from_the_judged_model() -> None:
    """With a gradient twin that disagrees with the deployed model, ε = 0 through the attacked
    view no longer reproduces clean predictions: the flag says so."""
    import dataclasses

    x = _points(50, seed=9)
    y = (x @ W2 + B2 > 0).astype(np.int64)
    data = robust_cert.load_data((x, y), input_range=WIDE)
    clf = robust_cert.load_model(_binary(), input_shape=(4,))
    flipped = _linear(np.stack([W2, np.zeros(4)]), np.array([B2, 0.0]))  # opposite labels
    twin = dataclasses.replace(clf, gradient_forward=flipped)
    metric = RobustAccuracy(RobustAccuracyConfig(eps=[0.0, 0.1], attacks=["fgsm"]))
    res = metric.run(twin, data, _ctx())
    assert res.diagnostics["sanity"]["eps0_equals_clean"] == "failed"
    assert res.diagnostics["attack_source"].startswith("transfer from the PyTorch twin")
    ok = metric.run(clf, data, _ctx())
    assert ok.diagnostics["sanity"]["eps0_equals_clean"] == "passed"


# --------------------------------------------------------------------------- Square coverage


class _ReadsPixels(nn.Module):
    """Binary linear model reading only the flattened input positions ``idx``."""

    def __init__(self, w: np.ndarray, b: float, idx: list[int]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float32), requires_grad=False)
        self.b, self.idx = b, idx

    def forward(self, x):
        g = (x.flatten(1)[:, self.idx] * self.w).sum(1) + self.b
        return torch.stack([torch.zeros_like(g), g], 1)


def _exact_box_worst(x: np.ndarray, w: np.ndarray, b: float, idx, eps: float):
    """Exact L∞ worst case on [0, 1]: every read pixel moves by min(ε, room) against g."""
    xs = x.reshape(len(x), -1)[:, idx].astype(np.float64)
    g = xs @ w + b
    down = np.sign(g)[:, None] * w[None, :] > 0
    room = np.where(down, xs, 1 - xs)
    return g, np.abs(g) - (np.abs(w)[None, :] * np.minimum(eps, room)).sum(1)


@pytest.mark.parametrize(("shape", "idx", "n"), [
    ((1, 8, 8), [8 * i + 7 for i in range(8)], 300),  # only the last column of 8×8 images
    ((1, 8, 8), list(range(56, 64)), 300),  # only the last row
    ((1, 1, 30), list(range(30)), 500),  # a tabular row as one image row
    ((30, 1, 1), list(range(30)), 500),  # a tabular row as 30 one-pixel channels
])
def test_square_searches_every_position(shape, idx, n) -> None:
    """Square finds the exact robust accuracy of a linear model that reads only the last
    row / column (upstream torchattacks never places a window there: 243/300 "robust" against
    an exact 181/300), or a tabular row in either image layout (upstream 303 or 343 of 500
    against an exact 291). Points within 1e-3 of the worst-case boundary are left out. 1,000
    queries: at 500, one of 299 points 0.012 past the boundary was missed with one batching
    of the draws (seeds follow the batch starts)."""
    rng = np.random.default_rng(11)
    x = rng.uniform(0, 1, size=(n, *shape)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, size=len(idx))
    b = -float(np.median(x.reshape(n, -1)[:, idx] @ w))
    eps = 0.1
    g, worst = _exact_box_worst(x, w, b, idx, eps)
    keep = np.abs(worst) > 1e-3
    y = (g > 0).astype(np.int64)
    res = _run(_ReadsPixels(w, b, idx), x[keep], y[keep], [eps], ["square"],
               input_range=(0.0, 1.0), square_queries=1000)
    expected = worst[keep] > 0
    assert 0 < expected.sum() < keep.sum()
    np.testing.assert_array_equal(res.per_point["robust"][:, 0], expected)


def test_full_square_positions_are_uniform_over_every_valid_start() -> None:
    from robust_cert.metrics.square import FullSquare

    atk = FullSquare(_binary(), eps=0.1)
    torch.manual_seed(0)
    draws = torch.cat([atk.random_int(0, 5) for _ in range(3000)])
    counts = torch.bincount(draws, minlength=6)
    assert counts.numel() == 6  # 0 … 5 inclusive, nothing else
    assert counts.min() > 3000 / 6 * 0.8  # roughly uniform (expected 500 each, sd ~ 20)
    assert int(atk.random_int(0, -3)) == 0  # a window larger than the image starts at 0


def test_autoattack_uses_the_full_square() -> None:
    import torchattacks

    from robust_cert.metrics.square import FullSquare, full_square_inside

    aa = full_square_inside(torchattacks.AutoAttack(_binary(), eps=0.1, n_classes=4, seed=0))
    kinds = [type(a) for a in aa._autoattack.attacks]
    assert FullSquare in kinds
    assert torchattacks.Square not in kinds
    sq = next(a for a in aa._autoattack.attacks if isinstance(a, FullSquare))
    assert sq.n_queries == 5000  # upstream's budget kept


def test_examples_keep_the_first_points_broken_at_the_smallest_eps() -> None:
    """``_keep_examples`` (one copy from the device per call) keeps, of every point offered,
    the MAX_EXAMPLES with the smallest (ε index, point) at the ε index each was first broken
    at, with the adversarial row and prediction of that call; ``_may_keep`` only skips calls
    that cannot change them."""
    from robust_cert.metrics.adversarial import MAX_EXAMPLES, _keep_examples, _may_keep

    rng = np.random.default_rng(12)
    for _ in range(30):
        n, n_eps = 40, 3
        examples, first = [], np.full(n, -1, dtype=np.int64)
        offered: dict[int, tuple[int, float, int]] = {}  # point -> (j, row value, pred)
        for j in range(n_eps):
            for start in range(0, n, 16):  # batches
                index = start + np.flatnonzero(rng.random(min(16, n - start)) < 0.6)
                broken = rng.random(len(index)) < 0.3
                adv = torch.tensor(rng.normal(size=(len(index), 2)), dtype=torch.float32)
                pred = torch.tensor(rng.integers(0, 5, size=len(index)))
                for i in np.flatnonzero(broken):
                    offered.setdefault(int(index[i]), (j, float(adv[i, 0]), int(pred[i])))
                if _may_keep(examples, j):
                    _keep_examples(examples, first, index, j, broken, adv, pred)
        want = sorted((j, p) for p, (j, _, _) in offered.items())[:MAX_EXAMPLES]
        assert sorted(e[:2] for e in examples) == want
        for _, p, row, pr in examples:
            assert (row[0], pr) == pytest.approx(offered[p][1:])
            assert row.dtype == np.float32
