"""Known answers of the risk kinds beyond the adversarial one (Family F): the invariant kind
relative to an oracle (closed forms of METRICS.md), and validation of the kinds' inputs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert.errors import ModelError, PolicyError
from robust_cert.loaders import REGISTRY, Loader
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.safe_radius import SafeRadius, SafeRadiusConfig
from tests.linear_models import binary_linear

CPU = torch.device("cpu")
WIDE = (-50.0, 50.0)
#: models the test loader serves under "test-oracle:NAME"
ORACLES: dict[str, nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def _oracle_loader():
    from robust_cert.models.torch import from_module

    loader = Loader("test-oracle:NAME", lambda ref: str(ref).startswith("test-oracle:"),
                    lambda ref, *, input_shape, device: from_module(
                        ORACLES[str(ref).split(":", 1)[1]], input_shape, device=device))
    REGISTRY.register(loader)
    yield
    REGISTRY.unregister(loader)


def _run(model, x, y, input_range=WIDE, **cfg):
    data = robust_cert.load_data((np.asarray(x, np.float32), np.asarray(y)),
                                 input_range=input_range)
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    return SafeRadius(SafeRadiusConfig(**cfg)).run(clf, data,
                                                   RunContext(CPU, batch_size=32, seed=0))


def _closed_form(u, a, w, s, norm):
    """sup_{m ≥ 0, m·s < a} (a − m·s)/‖u − m·w‖_q (METRICS.md), independently: the L2 closed
    form, and for L∞/L1 a dense grid over m plus the breakpoints of the piecewise-linear
    dual norm."""
    u, w = np.asarray(u, float), np.asarray(w, float)
    if norm == "l2":
        A, B, C = u @ u, u @ w, w @ w
        if a * B <= s * A:
            return a / math.sqrt(A)
        den = A * C - B * B
        return math.inf if den <= 0 else math.sqrt((a * a * C - 2 * a * s * B + s * s * A) / den)
    q = 1 if norm == "linf" else np.inf
    # breakpoints: a coordinate crosses zero (L∞: ‖·‖₁) or two tie in magnitude (L1: ‖·‖∞)
    brk = [ui / wi for ui, wi in zip(u, w, strict=True) if wi]
    brk += [(u[i] + sg * u[k]) / (w[i] + sg * w[k]) for i in range(len(u))
            for k in range(len(u)) for sg in (1, -1) if i < k and w[i] + sg * w[k]]
    ms = np.concatenate([np.linspace(0, a / s, 200001)[:-1],
                         [m for m in brk if 0 <= m < a / s]])
    den = np.linalg.norm(u[None] - ms[:, None] * w[None], ord=q, axis=1)
    val = np.where(den > 0, (a - ms * s) / np.where(den > 0, den, 1), np.inf)
    return float(val.max())


@pytest.mark.parametrize(("norm", "expected", "floor"), [
    ("l2", math.sqrt(2.5), 1 / math.sqrt(2)), ("linf", 1.5, 0.5), ("l1", None, 1.0)])
def test_invariant_worked_case(norm, expected, floor) -> None:
    """u = (1, 1), c = 0, w = (2, 1), b = −1, x0 = (.5, .5): MSR₂ = √2.5, MSR∞ = 1.5 (the
    nearest invariant example is (1, −1)); the oracle-only floor is 1/√2 and 0.5."""
    ORACLES["u"] = binary_linear(np.array([1.0, 1.0]), 0.0)
    model = binary_linear(np.array([2.0, 1.0]), -1.0)
    if expected is None:
        expected = _closed_form([1, 1], 1.0, [2, 1], 0.5, norm)
    res = _run(model, [[0.5, 0.5]], [1], property="invariant", oracle="test-oracle:u",
               norms=[norm], radii=[0.1], attack_steps=200, bisection_steps=30)
    pp = res.per_point
    assert pp["holds"].tolist() == [True]
    lower, upper = pp[f"lower@{norm}"][0], pp[f"upper@{norm}"][0]
    assert lower <= expected * (1 + 1e-9)
    assert lower == pytest.approx(expected, rel=1e-5)
    assert pp[f"lower_lipschitz@{norm}"][0] == pytest.approx(floor, rel=1e-5)
    assert pp[f"lower_lipschitz@{norm}"][0] <= floor
    assert pp[f"bound@{norm}"][0] == "joint"
    assert expected * (1 - 1e-6) <= upper <= expected * 1.05
    assert res.diagnostics["invariance"].startswith("invariance with respect to")
    assert res.diagnostics[norm]["sandwich_violations"] == 0
    assert res.diagnostics[norm]["certified_by"] == {"oracle": 0, "joint": 1}


def test_invariant_closed_form_on_random_affine_pairs() -> None:
    """Random affine binary pairs against the closed form (L2 exact, L∞ by breakpoints)."""
    rng = np.random.default_rng(4)
    for _ in range(6):
        u, w = rng.normal(size=3), rng.normal(size=3)
        x0 = rng.normal(size=3) * 0.3
        g_o, g_f = u @ x0, w @ x0
        if g_o * g_f <= 0:
            w = -w
            g_f = -g_f
        ORACLES["r"] = binary_linear(u, 0.0)
        x32 = x0.astype(np.float32)
        label = int(g_o > 0)
        for norm in ("l2", "linf"):
            uf = np.float32(u).astype(float)
            wf = np.float32(w).astype(float)
            a = abs(uf @ x32.astype(float))
            s = abs(wf @ x32.astype(float))
            sign = 1 if label == 1 else -1
            expected = _closed_form(sign * uf, a, sign * wf, s, norm)
            res = _run(binary_linear(w, 0.0), [x32], [label], property="invariant",
                       oracle="test-oracle:r", norms=[norm], attack_steps=5,
                       bisection_steps=2)
            lower = res.per_point[f"lower@{norm}"][0]
            assert lower <= expected * (1 + 1e-7)
            assert lower == pytest.approx(expected, rel=1e-4)


def test_invariant_infinite_and_disagreeing_cases() -> None:
    """w = (2, 2), b = −1.5 (D = h^O − ½h^f is constant 0.75): no invariant example in the
    box, MSR = ∞; where f ≠ O at x0 the property does not hold."""
    ORACLES["u"] = binary_linear(np.array([1.0, 1.0]), 0.0)
    res = _run(binary_linear(np.array([2.0, 2.0]), -1.5), [[0.5, 0.5]], [1],
               property="invariant", oracle="test-oracle:u", norms=["l2", "linf"],
               attack_steps=50, bisection_steps=5)
    for nm in ("l2", "linf"):
        assert res.per_point[f"lower@{nm}"][0] == math.inf
        assert res.per_point[f"upper@{nm}"][0] == math.inf
    # f predicts class 0 at x0 while O predicts 1: holds is False
    res = _run(binary_linear(np.array([2.0, 1.0]), -2.0), [[0.5, 0.5]], [1],
               property="invariant", oracle="test-oracle:u", norms=["l2"], radii=[0.1],
               attack_steps=5, bisection_steps=2)
    assert res.per_point["holds"].tolist() == [False]
    assert res.proportions[0].k == 0


def test_invariant_on_a_network_falls_back_to_the_oracle_floor() -> None:
    """A ReLU network f: no joint constant; the lower bound is the oracle's own radius and
    never exceeds the closest invariant example found."""
    torch.manual_seed(0)
    ORACLES["u"] = binary_linear(np.array([1.0, 1.0]), 0.0)
    f = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    x = np.random.default_rng(0).uniform(-1, 1, size=(30, 2)).astype(np.float32)
    y = (x.sum(1) > 0).astype(np.int64)
    res = _run(f, x, y, property="invariant", oracle="test-oracle:u", norms=["l2", "l1"],
               attack_steps=30, bisection_steps=8)
    for nm, dual in (("l2", math.sqrt(2)), ("l1", 1.0)):
        lower, upper = res.per_point[f"lower@{nm}"], res.per_point[f"upper@{nm}"]
        floor = np.abs(x.astype(float).sum(1)) / dual
        assert (lower <= floor * (1 + 1e-9)).all()
        np.testing.assert_allclose(lower, floor, rtol=1e-5, atol=1e-6)
        both = np.isfinite(upper)
        assert (lower[both] <= upper[both] * (1 + 1e-6)).all()
        assert set(res.per_point[f"bound@{nm}"]) == {"oracle"}
    assert "oracle only" in res.diagnostics["local_bound"]


def test_bad_input_is_one_line_before_anything_runs() -> None:
    ORACLES["three"] = nn.Linear(2, 3)
    ORACLES["wide"] = nn.Linear(3, 2)
    model = binary_linear(np.array([2.0, 1.0]), -1.0)
    with pytest.raises(ModelError, match=r"oracle test-oracle:three has input \(2,\) and 3 "
                       r"classes; the model has \(2,\) and 2"):
        _run(model, [[0.5, 0.5]], [1], property="invariant", oracle="test-oracle:three")
    with pytest.raises(ModelError, match="oracle test-oracle:wide"):
        _run(model, [[0.5, 0.5]], [1], property="invariant", oracle="test-oracle:wide")
    with pytest.raises(ValueError, match="property invariant needs an oracle"):
        SafeRadiusConfig(property="invariant")
    with pytest.raises(ValueError, match="oracle is for property invariant"):
        SafeRadiusConfig(oracle="x.onnx")
    with pytest.raises(PolicyError, match=r"output 5 does not exist: the model has 2 outputs"):
        _run(model, [[0.5, 0.5]], [1], property="reachability", output=5, low=0.0)
    with pytest.raises(PolicyError, match=r"radius 3 is wider than the input box"):
        _run(model, [[0.5, 0.5]], [1], input_range=(0.0, 1.0), norms=["linf"], radii=[3.0])


def _invariant_policy(**extra) -> dict:
    return {"name": "inv", "input_range": [-50.0, 50.0],
            "metrics": {"safe_radius": {"property": "invariant", "norms": ["l2"],
                                        "radii": [0.5], "attack_steps": 20,
                                        "bisection_steps": 4, **extra}},
            "requirements": [{"metric": "safe_radius", "norm": "l2", "radius": 0.5,
                              "at_least": 0.5}]}


def test_certify_refuses_a_mismatched_oracle_before_anything_runs(monkeypatch) -> None:
    """The API checks every metric before the first forward pass: an oracle with another
    class count is one ModelError line (CLI exit 2), and no metric has run."""
    from robust_cert.metrics import safe_radius as sr

    ORACLES["three"] = nn.Linear(2, 3)
    ran = []
    monkeypatch.setattr(sr.SafeRadius, "_run_invariant", lambda *a: ran.append(1))
    x = np.array([[0.5, 0.5]] * 4, np.float32)
    with pytest.raises(ModelError, match="oracle test-oracle:three has input"):
        robust_cert.certify(binary_linear(np.array([2.0, 1.0]), -1.0), (x, np.ones(4, int)),
                            _invariant_policy(oracle="test-oracle:three"), progress=False)
    assert not ran


def test_with_oracle_sets_the_invariant_metrics_oracle() -> None:
    from robust_cert.policy import with_oracle

    pol = with_oracle(_invariant_policy(oracle="test-oracle:u"), "test-oracle:v")
    assert pol.metric("safe_radius").config.oracle == "test-oracle:v"
    with pytest.raises(PolicyError, match="--oracle test-oracle:v: the policy has no metric "
                       "with property invariant"):
        with_oracle({"name": "a", "metrics": {"accuracy": {}}, "requirements": [
            {"metric": "accuracy", "at_least": 0.5}]}, "test-oracle:v")


def test_invariant_certificate_reports_invariance_with_respect_to_the_oracle() -> None:
    ORACLES["u"] = binary_linear(np.array([1.0, 1.0]), 0.0)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.5, 2, size=(12, 2)).astype(np.float32)
    cert = robust_cert.certify(binary_linear(np.array([2.0, 1.0]), -1.0),
                               (x, np.ones(12, int)), _invariant_policy(oracle="test-oracle:u"),
                               progress=False)
    assert cert is not None
    res = next(r for r in cert.body["results"] if r["metric"] == "safe_radius")
    assert res["diagnostics"]["invariance"].startswith("invariance with respect to")
    assert res["diagnostics"]["oracle"]["reference"] == "test-oracle:u"
    lower = cert.per_point["safe_radius/lower@l2"]
    assert (cert.per_point["safe_radius/bound@l2"] == "joint").all()
    assert (lower > 0.5).all()


@pytest.mark.parametrize(("norm", "dual"), [("l2", 2), ("linf", 1), ("l1", np.inf)])
def test_reachable_range_of_a_linear_model(norm, dual) -> None:
    """f = W x + b: the range of f_k over the ball is W_k·x0 + b_k ± r‖W_k‖_dual, attained;
    the sound outer range contains it within the rounding slack and the search attains it."""
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    x = np.random.default_rng(2).uniform(-1, 1, size=(10, 4)).astype(np.float32)
    r = 0.3
    res = _run(lin, x, np.zeros(10, int), property="reachability", output=1, low=-100.0,
               norms=[norm], radii=[r], outputs=[0, 2], attack_steps=30, bisection_steps=2,
               clever_samples=2, clever_batches=2)
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    f0 = x.astype(float) @ w.T + b
    q = {"l2": 2, "linf": 1, "l1": np.inf}[norm]
    for k in (0, 2):
        half = r * np.linalg.norm(w[k], ord=q)
        tag = f"{norm}:{r:g}:{k}"
        pp = res.per_point
        lo, hi = pp[f"range_lo@{tag}"], pp[f"range_hi@{tag}"]
        fmin, fmax = pp[f"range_min@{tag}"], pp[f"range_max@{tag}"]
        assert (lo <= f0[:, k] - half + 1e-9).all()
        assert (hi >= f0[:, k] + half - 1e-9).all()
        np.testing.assert_allclose(lo, f0[:, k] - half, atol=1e-5)
        np.testing.assert_allclose(hi, f0[:, k] + half, atol=1e-5)
        np.testing.assert_allclose(fmin, f0[:, k] - half, atol=1e-4)
        np.testing.assert_allclose(fmax, f0[:, k] + half, atol=1e-4)
        summary = res.diagnostics["ranges"][tag]
        assert summary["violations"] == 0
        assert summary["outer"][0] <= summary["found"][0]
    assert not any(key.endswith(":1") for key in res.per_point if key.startswith("range_"))


def test_reachable_range_is_clipped_by_the_box_in_the_search() -> None:
    """x0 at the box's edge: the witnessed range stays inside the box's image; with
    within_box the sound range is clipped too (f = x1 on [0, 1]²: range [0, r] at x0 = 0)."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.bias.zero_()
    res = _run(model, [[0.0, 0.5]], [0], input_range=(0.0, 1.0), property="reachability",
               output=0, low=-1.0, norms=["linf"], radii=[0.25], outputs=[0],
               within_box=True, local_bound="ibp", attack_steps=20, bisection_steps=2,
               clever_samples=2, clever_batches=2)
    pp = res.per_point
    assert pp["range_min@linf:0.25:0"][0] == pytest.approx(0.0, abs=1e-7)
    assert pp["range_max@linf:0.25:0"][0] == pytest.approx(0.25, abs=1e-6)
    assert pp["range_lo@linf:0.25:0"][0] == pytest.approx(0.0, abs=1e-6)
    assert pp["range_hi@linf:0.25:0"][0] == pytest.approx(0.25, abs=1e-6)


def test_kl_measure_and_its_top1_threshold() -> None:
    """KL(U‖p) = −log C − (1/C)Σ log p_i; the top-1 threshold of KL ≥ κ: closed form for C = 2,
    and for C = 3 the minimum of KL over a dense grid of the simplex with p_top ≥ π."""
    from robust_cert.metrics.safe_radius import kl_of_top1, kl_top1, kl_uniform

    z = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(z, 1)
    want = -math.log(3) - torch.log(p).mean(1)
    torch.testing.assert_close(kl_uniform(z), want)
    for kappa in (0.05, 0.5, 2.0):
        tau = 0.5 * (1 + math.sqrt(1 - math.exp(-2 * kappa)))
        assert kl_top1(kappa, 2) == pytest.approx(tau, rel=1e-14)
        assert kl_top1(kappa, 2) >= tau
    for pi in (0.4, 0.6, 0.9):
        # every p with top p_1 ≥ π: p_1 on a grid from π, p_2 a share of the rest
        p1, share = np.meshgrid(np.linspace(pi, 1 - 1e-6, 801), np.linspace(0, 1, 1001)[1:-1])
        p2, p3 = (1 - p1) * share, (1 - p1) * (1 - share)
        kl = -math.log(3) - (np.log(p1) + np.log(p2) + np.log(p3)) / 3
        grid_min = kl[(p1 >= p2) & (p1 >= p3)].min()
        assert kl_of_top1(pi, 3) == pytest.approx(grid_min, abs=1e-9)
        assert kl_of_top1(pi, 3) <= grid_min + 1e-12
    kappa = 0.7
    assert kl_of_top1(kl_top1(kappa, 3), 3) == pytest.approx(kappa, abs=1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_kl_uncertainty_radius_equals_top1_at_the_matching_tau_for_two_classes(norm) -> None:
    """C = 2: KL ≥ κ ⇔ top-1 ≥ τ = ½(1 + √(1 − e^{−2κ})), so the radius is
    (|g| − logit τ)/‖w‖_dual (known answer) for both, and the KL property holds where it does."""
    w = np.array([1.0, -2.0, 0.5, 1.5])
    rng = np.random.default_rng(5)
    x = rng.uniform(-2, 2, size=(30, 4)).astype(np.float32)
    g = x.astype(float) @ w + 0.3
    y = (g > 0).astype(int)
    kappa = 0.3
    tau = 0.5 * (1 + math.sqrt(1 - math.exp(-2 * kappa)))
    res = _run(binary_linear(w, 0.3), x, y, property="uncertainty", kappa=kappa, norms=[norm],
               clever_samples=5, clever_batches=3, bisection_steps=20, max_radius=5.0)
    logit = math.log(tau / (1 - tau))
    dual = {"l2": np.linalg.norm(w), "linf": np.abs(w).sum()}[norm]
    expected = (np.abs(g) - logit) / dual
    mask = expected > 1e-3
    lower, upper = res.per_point[f"lower@{norm}"], res.per_point[f"upper@{norm}"]
    assert (lower[mask] <= expected[mask] * (1 + 1e-9)).all()
    np.testing.assert_allclose(lower[mask], expected[mask], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upper[mask], expected[mask], rtol=3e-3, atol=1e-3)
    np.testing.assert_array_equal(res.per_point["holds"][mask | (expected < -1e-3)],
                                  (expected >= 0)[mask | (expected < -1e-3)])


def test_kl_uncertainty_on_three_classes_is_a_sandwich_and_bad_values_are_refused() -> None:
    torch.manual_seed(6)
    lin = nn.Linear(4, 3)
    x = np.random.default_rng(6).uniform(-3, 3, size=(40, 4)).astype(np.float32)
    res = _run(lin, x, np.zeros(40, int), property="uncertainty", kappa=0.2, norms=["l2"],
               clever_samples=5, clever_batches=3, bisection_steps=12, attack_steps=30)
    from robust_cert.metrics.safe_radius import kl_uniform

    with torch.no_grad():
        kl = kl_uniform(lin(torch.from_numpy(x)).double()).numpy()
    np.testing.assert_array_equal(res.per_point["holds"], kl >= 0.2)
    assert res.diagnostics["l2"]["sandwich_violations"] == 0
    assert (res.per_point["lower@l2"][kl < 0.2] == 0).all()
    assert (res.per_point["lower@l2"][kl >= 0.25] > 0).any()
    for bad in (0.0, math.inf, -1.0):
        with pytest.raises(ValueError, match="kappa"):
            SafeRadiusConfig(property="uncertainty", kappa=bad)
    with pytest.raises(ValueError, match="kappa is for property uncertainty"):
        SafeRadiusConfig(kappa=0.5)
    with pytest.raises(PolicyError, match=r"τ = 0.3 is at most 1/3"):
        _run(lin, x[:2], [0, 0], property="uncertainty", tau=0.3)


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_derivative_free_estimate_on_a_linear_model(norm) -> None:
    """h = ±(w·x + b): every ratio |Δh|/‖δ‖ is at most ‖w‖_dual, so the estimate is never below
    the true radius |g|/‖w‖_dual, and the pattern search gets close to it; seeded; forward
    passes only (the estimate runs under no_grad on the model's logits)."""
    w = np.array([1.0, -2.0, 0.5, 1.5])
    x = np.random.default_rng(7).uniform(-2, 2, size=(20, 4)).astype(np.float32)
    g = x.astype(float) @ w + 0.3
    kw: dict[str, Any] = dict(norms=[norm], clever_samples=2, clever_batches=2, bisection_steps=2,
              attack_steps=2, clever_radius=20.0, estimate_steps=40, estimate_directions=32)
    res = _run(binary_linear(w, 0.3), x, (g > 0).astype(int), **kw)
    dual = {"l2": np.linalg.norm(w), "linf": np.abs(w).sum(), "l1": np.abs(w).max()}[norm]
    exact = np.abs(g) / dual
    est = res.per_point[f"estimate@{norm}"]
    assert (est >= exact * (1 - 1e-4)).all()  # up to the float32 noise of the logits
    np.testing.assert_allclose(est, exact, rtol=0.1)
    again = _run(binary_linear(w, 0.3), x, (g > 0).astype(int), **kw)
    np.testing.assert_array_equal(again.per_point[f"estimate@{norm}"], est)
    assert res.diagnostics[norm]["median_estimate"] is not None


def test_report_and_mlflow_show_ranges_sandwich_and_certifiers() -> None:
    """A reachability certificate: the report draws the sandwich (L1 included) and the
    reachable ranges (the latter also from the JSON alone); MLflow gets the medians, the
    certifying bounds and the ranges; the diagnostics list the most vulnerable points."""
    from robust_cert.certificate import Certificate
    from robust_cert.mlflow_plugin.summary import sandwich_metrics
    from robust_cert.report.charts import ChartInputs, charts_for
    from robust_cert.report.html import render_html

    lin = binary_linear(np.array([1.0, -2.0]), 0.2)
    x = np.random.default_rng(8).uniform(-1, 1, size=(16, 2)).astype(np.float32)
    pol = {"name": "reach", "input_range": [-5.0, 5.0],
           "metrics": {"safe_radius": {"property": "reachability", "output": 1, "low": -4.0,
                                       "high": 4.0, "norms": ["l2", "l1"], "radii": [0.1],
                                       "attack_steps": 10, "bisection_steps": 4,
                                       "clever_samples": 4, "clever_batches": 2}},
           "requirements": [{"metric": "safe_radius", "norm": "l1", "radius": 0.1,
                             "at_least": 0.5}]}
    cert = robust_cert.certify(lin, (x, np.zeros(16, int)), pol, progress=False)
    assert cert is not None
    ids = [c.id for c in charts_for("safe_radius", ChartInputs(cert.body, cert.per_point))]
    assert ids == ["chart-safe-radius-l2", "chart-safe-radius-l1",
                   "chart-safe-radius-ranges-l2", "chart-safe-radius-ranges-l1"]
    again = Certificate.from_json(cert.to_json())
    html = render_html(again)
    assert 'id="chart-safe-radius-ranges-l1"' in html
    assert 'id="chart-safe-radius-l1"' not in html  # the sandwich needs the per-point arrays
    res = next(r for r in cert.body["results"] if r["metric"] == "safe_radius")
    vulnerable = res["diagnostics"]["l1"]["most_vulnerable"]
    assert 0 < len(vulnerable) <= 5
    lows = [v["lower"] for v in vulnerable]
    assert lows == sorted(lows)
    assert vulnerable[0]["bound"] in ("lipschitz", "crown-ibp")
    m = sandwich_metrics(cert)
    assert m["safe_radius.reachability.l1.sandwich_violations"] == 0
    assert "safe_radius.reachability.l2.median_lower" in m
    # output 0 is the constant 0 logit: its range is [0, 0] exactly
    assert m["safe_radius.reach.l1.r0.1.o0.found_lo"] == 0.0
    assert m["safe_radius.reach.l1.r0.1.o1.outer_lo"] <= m["safe_radius.reach.l1.r0.1.o1.found_lo"]
    assert all(k.replace(".", "").replace("_", "").replace("-", "").isalnum() for k in m)


def test_cli_oracle_without_an_invariant_metric_is_one_line_exit_2(tmp_path, capsys) -> None:
    import yaml

    from robust_cert.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "a", "metrics": {"accuracy": {}}, "requirements": [
        {"metric": "accuracy", "at_least": 0.5}]}))
    assert main(["plan", str(path), "--model", str(tmp_path / "m.onnx"),
                 "--oracle", "test-oracle:u"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--oracle test-oracle:u: the policy has no metric with property invariant" in err
