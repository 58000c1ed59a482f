"""Tabular threat models (policy ``features:``, robust_cert.tabular): per-feature ranges,
ε per feature in range / std / data units, immutable features. Known answers: a binary
LogisticRegression is robust at L∞ exactly where it is correct and its margin survives the
worst corner of the per-feature box ∩ ball; a gradient-boosting model's exact answer comes
from enumerating the cells its thresholds cut the ball into."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import robust_cert
from robust_cert.errors import DataError, PolicyError
from robust_cert.models.blackbox import from_predict
from robust_cert.policy import Policy


def _data(n: int, seed: int):
    """Four features on very different scales (the third is a 3-valued code) and labels of
    a noisy linear rule."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.uniform(-2, 2, n), rng.uniform(0, 400, n), rng.integers(0, 3, n),
                  rng.normal(5, 0.5, n)], axis=1).astype(np.float32)
    z = (x - x.mean(0)) / x.std(0)
    y = (z @ np.array([1.0, -1.0, 1.5, 0.5]) + rng.normal(0, 0.7, n) > 0).astype(np.int64)
    return x, y


def _policy(features: dict, metrics: dict) -> dict:
    return {"name": "tabular", "features": features, "metrics": metrics,
            "requirements": [{"metric": "accuracy", "at_least": 0.0}]}


def _square(eps: float, queries: int = 400) -> dict:
    return {"accuracy": {}, "robust_accuracy": {"eps": [eps], "attacks": ["square"],
                                                "square_queries": queries}}


def _linear_exact(lr, x, y, radius, lo, hi):
    """Robust points of a binary linear model at L∞ under per-feature radii ``radius``
    (0 for immutable features) in the box [lo, hi]: the worst point moves every feature by
    its radius against the margin, clipped to the box (the margin is linear, so the clipped
    corner minimises it over box ∩ ball)."""
    w, b = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
    x = x.astype(np.float64)
    margin = x @ w + b
    toward = -np.sign(margin)[:, None] * np.sign(w)[None, :]
    worst = np.clip(x + toward * radius, lo, hi) @ w + b
    correct = (margin > 0) == (y == 1)
    return correct & ((worst > 0) == (margin > 0)), margin


@pytest.fixture(scope="module")
def fitted():
    from sklearn.linear_model import LogisticRegression

    x, y = _data(360, seed=1)
    lr = LogisticRegression(max_iter=2000).fit(x[:200], y[:200])
    return lr, x[200:], y[200:]


@pytest.mark.parametrize(("features", "eps"), [
    ({"scale": "none", "ranges": {str(i): [-1e4, 1e4] for i in range(4)}}, 0.2),
    ({"scale": "range", "ranges": {"1": [-200, 600]}, "immutable": [2]}, 0.03),
    ({"scale": "std", "immutable": [2]}, 0.25),
])
def test_logistic_regression_square_equals_the_closed_form(fitted, features, eps):
    """Square's robust set equals the closed form point by point. With wide given ranges and
    no scale it is |w·x + b| > ε‖w‖₁; with an immutable feature only the free features'
    weights count; with scale std feature i moves by ε·std_i; ranges from the data clip."""
    lr, x, y = fitted
    cert = robust_cert.certify(lr, (x, y), _policy(features, _square(eps)), progress=False)
    x64 = x.astype(np.float64)
    lo, hi = x64.min(0), x64.max(0)
    for key, (a, b) in features.get("ranges", {}).items():
        lo[int(key)], hi[int(key)] = a, b
    unit = {"none": np.ones(4), "range": hi - lo, "std": x64.std(0)}[features["scale"]]
    radius = eps * unit
    radius[features.get("immutable", [])] = 0.0
    exact, margin = _linear_exact(lr, x, y, radius, lo, hi)
    if features["scale"] == "none":  # the ball stays inside the box: the textbook form
        w = lr.coef_[0]
        correct = (margin > 0) == (y == 1)
        assert (exact == (correct & (np.abs(margin) > eps * np.abs(w).sum()))).all()
    assert 0 < exact.sum() < len(y)  # the radius matters: neither all nor none robust
    square = cert.per_point["robust_accuracy/robust"][:, 0]
    assert (square == exact).all(), np.flatnonzero(square != exact)
    record = cert.body["data"]["features"]
    assert record["scale"] == features["scale"]
    for f in record["features"]:
        i = f["index"]
        assert f["range"] == pytest.approx([lo[i], hi[i]])
        given = str(i) in features.get("ranges", {})
        assert f["range_from"] == ("policy" if given else "data")
        if i in features.get("immutable", []):
            assert f["immutable"] == "policy"
        else:
            assert f["scale"] == pytest.approx(unit[i])


def test_without_the_mask_the_immutable_feature_would_matter(fitted):
    """The mask is not vacuous: the same radius with the code feature free breaks more."""
    lr, x, y = fitted
    free = robust_cert.certify(lr, (x, y), _policy({"scale": "std"}, _square(0.25)),
                               progress=False)
    masked = robust_cert.certify(lr, (x, y), _policy({"scale": "std", "immutable": [2]},
                                                     _square(0.25)), progress=False)
    k_free = free.per_point["robust_accuracy/robust"][:, 0].sum()
    k_masked = masked.per_point["robust_accuracy/robust"][:, 0].sum()
    assert k_free < k_masked


def _tree_cells(model, x, radius, lo, hi):
    """Exact robust points of a tree ensemble at L∞: the prediction is constant on the cells
    the trees' thresholds cut the ball ∩ box into (x ≤ t goes left), and every cell meets
    {a, b} ∪ {thresholds in [a, b]} per feature, so the product of those values visits
    every cell."""
    thresholds: dict[int, set[float]] = {}
    for tree in model.estimators_.ravel():
        t = tree.tree_
        for f, v in zip(t.feature, t.threshold, strict=True):
            if f >= 0:
                thresholds.setdefault(int(f), set()).add(float(v))
    pred = model.predict(x)
    robust = np.zeros(len(x), dtype=bool)
    for p, row in enumerate(x.astype(np.float64)):
        axes = []
        for i, v in enumerate(row):
            a, b = max(v - radius[i], lo[i]), min(v + radius[i], hi[i])
            cut = [t for t in thresholds.get(i, ()) if a <= t <= b]
            axes.append(sorted({a, b, *cut}))
        grid = np.array(list(itertools.product(*axes)), dtype=np.float64)
        robust[p] = (model.predict(grid) == pred[p]).all()
    return robust, pred


def test_gradient_boosting_square_is_an_upper_bound_that_approaches_the_exact_answer():
    """A gradient-boosting model on three features (the third immutable): the exact robust
    set comes from its cells; Square's robust set contains it and misses few points."""
    from sklearn.ensemble import GradientBoostingClassifier

    rng = np.random.default_rng(3)
    x = np.stack([rng.uniform(0, 1, 260), rng.uniform(0, 10, 260),
                  rng.integers(0, 2, 260)], axis=1).astype(np.float32)
    y = ((x[:, 0] - 0.5) + 0.1 * (x[:, 1] - 5) + 0.4 * x[:, 2]
         + rng.normal(0, 0.2, 260) > 0.2).astype(np.int64)
    gb = GradientBoostingClassifier(n_estimators=15, max_depth=2, random_state=0)
    gb.fit(x[:160], y[:160])
    xe, ye = x[160:], y[160:]
    eps = 0.08
    cert = robust_cert.certify(gb, (xe, ye), _policy({"immutable": [2]}, _square(eps, 300)),
                               progress=False)
    x64 = xe.astype(np.float64)
    lo, hi = x64.min(0), x64.max(0)
    radius = eps * (hi - lo)
    radius[2] = 0.0
    robust, pred = _tree_cells(gb, xe, radius, lo, hi)
    exact = robust & (pred == ye)
    square = cert.per_point["robust_accuracy/robust"][:, 0]
    assert 0 < exact.sum() < (pred == ye).sum()
    assert (square >= exact).all()  # an upper bound, point by point
    assert square.sum() - exact.sum() <= 0.1 * len(ye)


def test_immutable_features_never_change_and_ranges_hold_under_noise():
    """Every input any metric hands the model keeps the immutable feature's value of its
    point (a model reading only that feature is never broken), and every free feature stays
    in its range: Square, uniform noise and randomized smoothing alike."""
    x, y = _data(40, seed=5)
    seen: list[np.ndarray] = []

    def predict(rows):
        rows = np.asarray(rows, dtype=np.float64)
        seen.append(rows)
        p1 = (rows[:, 2] >= 1).astype(np.float64) * 0.8 + 0.1
        return np.stack([1 - p1, p1], axis=1)

    clf = from_predict(predict, n_features=4, fmt="sklearn", sha256="0" * 64, name="code")
    y = (x[:, 2] >= 1).astype(np.int64)
    seen.clear()
    metrics = {**_square(0.3, 50), "probabilistic_robustness": {"eps": [0.3], "samples": 50},
               "randomized_smoothing": {"sigma": 0.3, "n0": 20, "n": 100, "radii": [0.1]}}
    cert = robust_cert.certify(clf, (x, y), _policy({"ranges": {"1": [-50, 450]},
                                                     "immutable": [2]}, metrics),
                               progress=False)
    rows = np.concatenate(seen)
    codes = set(np.unique(x[:, 2]).tolist())
    assert set(np.unique(rows[:, 2]).tolist()) <= codes
    lo = np.array([x[:, 0].min(), -50, 0, x[:, 3].min()])
    hi = np.array([x[:, 0].max(), 450, 2, x[:, 3].max()])
    assert (rows >= lo - 1e-4).all()
    assert (rows <= hi + 1e-4).all()
    moved = np.abs(rows[:, [0, 1, 3]] - rows[:, [0, 1, 3]].mean(0)).max(0)
    assert (moved > 0).all()  # the free features were perturbed
    robust = next(r for r in cert.body["results"] if r["metric"] == "robust_accuracy")
    assert robust["values"][0]["k"] == len(y)  # never broken: the code never changes


def test_decode_inverts_encode_and_the_grid_survives_large_perturbations():
    from robust_cert.data import load_data
    from robust_cert.policy import FeatureSpec
    from robust_cert.tabular import fit

    x, y = _data(50, seed=7)
    data = load_data((x, y), input_range=(-1e6, 1e6))
    threat = fit(FeatureSpec(scale="std", immutable=[2, 3]), data)
    u = threat.encode(data).x
    width = torch.as_tensor(threat.hi - threat.lo, dtype=torch.float32)
    error = (threat.decode(u) - data.x).abs()
    assert (error <= width * 2 ** -22 + data.x.abs() * 2 ** -23).all()
    assert torch.equal(threat.decode(u)[:, 2:], data.x[:, 2:])  # immutable: exact
    push = torch.zeros_like(u)
    push[:, 2:] = 500 * threat.width * torch.sign(torch.randn(len(u), 2))
    assert torch.equal(threat.decode(u + push)[:, 2:], data.x[:, 2:])
    assert threat.grid == 1024 * threat.width


def test_refusals_name_the_problem_before_anything_runs(fitted):
    lr, x, y = fitted
    base = _square(0.1)

    def refused(features, metrics=base, data=(x, y), kind=PolicyError):
        with pytest.raises(kind) as err:
            robust_cert.certify(lr, data, _policy(features, metrics), progress=False)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "features.immutable: 'age'" in refused({"immutable": ["age"]})
    assert "feature index 9" in refused({"immutable": [9]})
    msg = refused({"ranges": {"1": [0, 100]}}, kind=DataError)
    assert "feature '1'" in msg
    assert "row" in msg
    assert "features.ranges" in msg
    assert "every feature is immutable" in refused({"immutable": [0, 1, 2, 3]})
    assert "metrics.corruptions" in refused({}, {**base, "corruptions": {}})
    assert "metrics.robust_accuracy.eps" in refused({}, _square(1.5))
    assert "metrics.safe_radius.max_radius" in refused({}, {**base, "safe_radius": {}})
    assert "metrics.safe_radius.radii" in refused(
        {}, {**base, "safe_radius": {"radii": [0.1], "max_radius": 0.5}})
    const = x.copy()
    const[:, 3] = 1.0
    assert "standard deviation 0" in refused({"scale": "std"}, data=(const, y))
    with pytest.raises(PolicyError, match="remove input_range"):
        Policy.from_dict({**_policy({}, base), "input_range": [0, 1]})
    with pytest.raises(PolicyError, match=r"ranges\.1: \[3, 2\] is empty"):
        Policy.from_dict(_policy({"ranges": {1: [3, 2]}}, base))


def test_policy_hash_unchanged_without_features_and_named_columns(tmp_path):
    """A policy without features hashes as before; a CSV's column names select features and
    its categorical (mapped) columns are immutable."""
    plain = {"name": "p", "metrics": {"accuracy": {}},
             "requirements": [{"metric": "accuracy", "at_least": 0.5}]}
    assert "features" not in Policy.from_dict(plain).canonical()
    assert "input_range" in Policy.from_dict(plain).canonical()
    with_features = Policy.from_dict({**plain, "features": {"immutable": ["sex"]}})
    assert "input_range" not in with_features.canonical()
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    n = 80
    age, income = rng.uniform(20, 70, n), rng.uniform(1e4, 1e5, n)
    sex = rng.choice(["f", "m"], n)
    label = ((age - 45) / 10 + (income - 5e4) / 2e4 + rng.normal(0, 0.5, n) > 0).astype(int)
    path = tmp_path / "people.csv"
    lines = ["age,sex,income,y"] + [f"{a},{s},{i},{t}" for a, s, i, t in
                                    zip(age, sex, income, label, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    xs = np.stack([age, (sex == "m").astype(float), income], axis=1)
    lr = LogisticRegression(max_iter=2000).fit(xs, label)
    from robust_cert.sources import DataSpec

    spec = DataSpec(str(path), label="y", categories={"sex": ["f", "m"]})
    cert = robust_cert.certify(lr, spec, _policy({"immutable": ["age"]}, _square(0.05, 100)),
                               progress=False)
    record = {f["name"]: f for f in cert.body["data"]["features"]["features"]}
    assert record["sex"]["immutable"] == "categorical"
    assert record["age"]["immutable"] == "policy"
    assert record["income"]["scale"] == pytest.approx(income.max() - income.min(), rel=1e-6)
    assert cert.body["data"]["kind"] == "csv"
    from robust_cert.report.html import render_html

    html = render_html(cert)
    assert "Per-feature threat model: ε and every noise scale in units of its range" in html
    assert "immutable (categorical)" in html
    assert "2 of 3 features immutable" in html


def test_white_box_attacks_on_a_torch_model_see_the_same_threat_model(fitted):
    """The encoding holds for gradient attacks too: FGSM on a linear torch model (two
    logits) lands on the worst clipped corner, so its robust set is the closed form; the
    input gradient of an immutable feature is zero, so it is never moved."""
    from torch import nn

    lr, x, y = fitted
    net = nn.Linear(4, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(np.stack([np.zeros(4), lr.coef_[0]])))
        net.bias.copy_(torch.tensor([0.0, float(lr.intercept_[0])]))
    model = nn.Sequential(nn.Flatten(), _Float64(net))
    features = {"scale": "std", "immutable": [2]}
    eps = 0.25
    cert = robust_cert.certify(model, (x, y), _policy(features, {
        "accuracy": {}, "robust_accuracy": {"eps": [eps], "attacks": ["fgsm"]}}),
        progress=False)
    x64 = x.astype(np.float64)
    radius = eps * x64.std(0)
    radius[2] = 0.0
    exact, _ = _linear_exact(lr, x, y, radius, x64.min(0), x64.max(0))
    fgsm = cert.per_point["robust_accuracy/robust"][:, 0]
    assert 0 < exact.sum() < len(y)
    assert (fgsm == exact).all(), np.flatnonzero(fgsm != exact)


class _Float64(torch.nn.Module):
    """Runs a float64 module on float32 inputs (exact margins near the boundary)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.double()).float()


def test_the_example_tabular_policy_certifies_a_table(tmp_path):
    """examples/policies/tabular-credit.yaml validates and runs on a table with its columns
    (a smaller suite: the example's query and sample budgets, on 40 rows)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from robust_cert.policy import example_policy, load_policy
    from robust_cert.sources import DataSpec

    pol = load_policy(example_policy("tabular-credit.yaml"))
    assert pol.features is not None
    assert pol.features.immutable == ["age", "sex"]
    rng = np.random.default_rng(4)
    n = 200
    frame_cols = {"age": rng.uniform(20, 70, n), "sex": rng.choice(["f", "m"], n),
                  "income": rng.uniform(1e4, 2e5, n), "debt": rng.uniform(0, 5e4, n)}
    score = (frame_cols["income"] - 1e5) / 5e4 - (frame_cols["debt"] - 2.5e4) / 1e4
    defaulted = (score + rng.normal(0, 0.5, n) < 0).astype(int)
    path = tmp_path / "applicants.csv"
    rows = zip(*frame_cols.values(), defaulted, strict=True)
    path.write_text("age,sex,income,debt,defaulted\n"
                    + "".join(",".join(map(str, r)) + "\n" for r in rows))
    xs = np.stack([frame_cols["age"], frame_cols["sex"] == "m", frame_cols["income"],
                   frame_cols["debt"]], axis=1).astype(np.float64)
    gbm = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(xs[:160],
                                                                         defaulted[:160])
    head = path.read_text().splitlines()
    small = tmp_path / "eval.csv"
    small.write_text("\n".join([head[0], *head[161:]]) + "\n")
    fast = pol.model_copy(update={"metrics": {
        **pol.metrics, "robust_accuracy": {**pol.metrics["robust_accuracy"],
                                           "square_queries": 100}}})
    cert = robust_cert.certify(gbm, DataSpec(str(small), label="defaulted",
                                             categories={"sex": ["f", "m"]}),
                               fast, progress=False)
    record = {f["name"]: f for f in cert.body["data"]["features"]["features"]}
    assert record["income"]["range"] == [0, 1000000]
    assert record["income"]["range_from"] == "policy"
    assert record["sex"]["immutable"] == "policy"  # named by the policy (and categorical)
    assert {r["metric"] for r in cert.body["results"]} == set(pol.metrics)
