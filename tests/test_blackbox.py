"""Black-box classifiers (scikit-learn, XGBoost, LightGBM, pyfunc-style ``predict``): known
answers for the metrics that need only outputs, the output checks, and the refusal of
white-box metrics before anything runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import robust_cert
from robust_cert.errors import DataError, ModelError, PolicyError
from robust_cert.loaders import load_model
from robust_cert.models.blackbox import from_estimator, from_predict

LO, HI = -3.0, 3.0


def _tabular(n: int, d: int, seed: int, classes: int = 2):
    """Points in [-2, 2]^d (inside the range [-3, 3] by more than any ε used here, so the
    ε-ball never meets the box) and labels of a noisy linear rule."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, classes))
    score = x @ w + rng.normal(scale=0.5, size=(n, classes))
    return x, score.argmax(1).astype(np.int64)


def _policy(metrics: dict, **extra) -> dict:
    return {"name": "blackbox", "input_range": [LO, HI], "metrics": metrics,
            "requirements": [{"metric": "accuracy", "at_least": 0.0}], **extra}


def test_logistic_regression_square_is_exact_on_separated_points():
    """A binary LogisticRegression at L∞ ε is robust exactly where it is correct and
    |w·x + b| > ε‖w‖₁ (the ball stays inside the box). Square's robust set contains that set
    (it can only miss attacks) and equals it on points not within 5% of the boundary."""
    from sklearn.linear_model import LogisticRegression

    x, y = _tabular(240, 5, seed=1)
    lr = LogisticRegression().fit(x[:120], y[:120])
    xe, ye = x[120:], y[120:]
    eps = 0.3
    cert = robust_cert.certify(lr, (xe, ye), _policy({
        "accuracy": {},
        "robust_accuracy": {"eps": [eps], "attacks": ["square"], "square_queries": 300}}),
        progress=False)
    w, b = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
    margin = xe.astype(np.float64) @ w + b
    correct = (margin > 0) == (ye == 1)
    budget = eps * np.abs(w).sum()
    exact = correct & (np.abs(margin) > budget)
    square = cert.per_point["robust_accuracy/robust"][:, 0]
    assert cert.body["model"]["format"] == "sklearn"
    assert cert.body["model"]["gradients"] is False
    acc = next(r for r in cert.body["results"] if r["metric"] == "accuracy")
    assert acc["values"][0]["k"] == round(lr.score(xe, ye) * len(ye))
    assert (square >= exact).all()  # an upper bound, point by point
    separated = np.abs(np.abs(margin) - budget) > 0.05 * budget
    assert separated.sum() > 100
    assert np.array_equal(square[separated], exact[separated])
    assert 0 < exact.sum() < correct.sum()  # the test is not trivial


def _stump_margin(gb, x: np.ndarray) -> np.ndarray:
    return gb.decision_function(x.astype(np.float64))


def test_gradient_boosting_stumps_square_and_noise_against_exact_worst_case():
    """An additive model (gradient-boosted stumps, binary): the decision function is
    Σ_j h_j(x_j), so the exact worst case over the L∞ ball is Σ_j min h_j on each interval
    (checked at the interval's ends and at every threshold inside it). Square (which searches
    the ball's vertices) gives an upper bound: it contains the exact robust set and equals
    the best-vertex robust set; a noise failure can only fall on a point that is not exactly
    robust."""
    from sklearn.ensemble import GradientBoostingClassifier

    x, y = _tabular(300, 3, seed=2)
    gb = GradientBoostingClassifier(max_depth=1, n_estimators=40, random_state=0)
    gb.fit(x[:150], y[:150])
    xe, ye = x[150:], y[150:]
    eps = 0.4
    cert = robust_cert.certify(gb, (xe, ye), _policy({
        "accuracy": {},
        "robust_accuracy": {"eps": [eps], "attacks": ["square"], "square_queries": 300},
        "probabilistic_robustness": {"eps": [eps], "samples": 600}}), progress=False)
    sign = np.where(ye == 1, 1.0, -1.0)
    thresholds = {j: np.unique([t.tree_.threshold[0] for t in gb.estimators_[:, 0]
                                if t.tree_.feature[0] == j]) for j in range(3)}
    base = _stump_margin(gb, xe) * sign
    worst = base.copy()
    for j in range(3):  # additive: each feature's worst change adds up
        lo_j, hi_j = xe[:, j] - eps, xe[:, j] + eps
        best = np.zeros(len(xe))
        for i in range(len(xe)):
            cands = [lo_j[i], hi_j[i]]
            for t in thresholds[j]:
                if lo_j[i] <= t <= hi_j[i]:
                    cands += [t, np.nextafter(t, np.inf)]  # both sides of x_j <= t
            rows = np.repeat(xe[i:i + 1].astype(np.float64), len(cands), 0)
            rows[:, j] = cands
            best[i] = min(0.0, (_stump_margin(gb, rows) * sign[i]).min() - base[i])
        worst += best
    exact = worst > 0
    vertices = np.array(list(itertools.product([-eps, eps], repeat=3)))
    vertex_worst = np.array([(_stump_margin(gb, xe[i] + vertices) * sign[i]).min()
                             for i in range(len(xe))])
    correct = base > 0
    vertex_robust = correct & (vertex_worst > 0)
    square = cert.per_point["robust_accuracy/robust"][:, 0]
    assert (square >= exact).all()
    assert np.array_equal(square, vertex_robust)
    assert 0 < exact.sum() < correct.sum()
    failed = cert.per_point[f"probabilistic_robustness/failed@{eps:g}"]
    index = cert.per_point[f"probabilistic_robustness/index@{eps:g}"]
    assert failed.any()
    assert not exact[index[failed]].any()  # exactly robust points never fail under noise


def test_boosters_native_and_sklearn_api_match_their_probabilities():
    xgb = pytest.importorskip("xgboost")
    lgb = pytest.importorskip("lightgbm")
    x, y = _tabular(300, 4, seed=3, classes=3)
    xb, yb = x, (y == 0).astype(np.int64)
    models = {
        "xgb-sklearn": xgb.XGBClassifier(n_estimators=10, max_depth=2, n_jobs=1).fit(x, y),
        "lgb-sklearn": lgb.LGBMClassifier(n_estimators=10, verbose=-1, n_jobs=1).fit(x, y),
        "xgb-native": xgb.train({"objective": "multi:softprob", "num_class": 3, "nthread": 1},
                                xgb.DMatrix(x, y), 10),
        "xgb-binary": xgb.train({"objective": "binary:logistic", "nthread": 1},
                                xgb.DMatrix(xb, yb), 10),
        "lgb-native": lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1,
                                 "num_threads": 1}, lgb.Dataset(x, y), 10),
        "lgb-binary": lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1},
                                lgb.Dataset(xb, yb), 10),
    }
    for key, est in models.items():
        clf = load_model(est)
        assert clf.format == key.split("-")[0].replace("xgb", "xgboost").replace(
            "lgb", "lightgbm"), key
        assert clf.input_shape == (4,)
        assert not clf.differentiable
        if key.endswith("binary"):
            p1 = est.predict(xgb.DMatrix(xb)) if key.startswith("xgb") else est.predict(xb)
            want = np.stack([1 - p1, p1], 1)
        elif key.endswith("native"):
            want = est.predict(xgb.DMatrix(x)) if key.startswith("xgb") else est.predict(x)
        else:
            want = est.predict_proba(x)
        got = clf.logits(torch.from_numpy(x)).exp().numpy()
        assert clf.num_classes == want.shape[1], key
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
    cert = robust_cert.certify(models["lgb-sklearn"], (x, y), _policy({
        "accuracy": {}, "robust_accuracy": {"eps": [0.2], "attacks": ["square"],
                                            "square_queries": 50}}), progress=False)
    acc = next(r for r in cert.body["results"] if r["metric"] == "accuracy")
    assert acc["values"][0]["estimate"] == pytest.approx(models["lgb-sklearn"].score(x, y))
    assert cert.body["model"]["format"] == "lightgbm"


def test_booster_without_probabilities_is_refused():
    xgb = pytest.importorskip("xgboost")
    x, y = _tabular(100, 3, seed=4, classes=3)
    booster = xgb.train({"objective": "multi:softmax", "num_class": 3}, xgb.DMatrix(x, y), 2)
    with pytest.raises(ModelError, match=r"objective 'multi:softmax' gives no class prob"):
        load_model(booster)


def test_image_shaped_data_and_output_only_metrics_run():
    """A model fitted on flattened 8×8 digits takes the (1, 8, 8) images: every metric that
    needs only outputs runs on it (corruptions need image-shaped inputs)."""
    from sklearn.linear_model import LogisticRegression

    from robust_cert.data import load_data

    data = load_data("digits")
    x, y = data.x.numpy()[:60], data.y.numpy()[:60]
    lr = LogisticRegression(max_iter=300).fit(x.reshape(60, -1), y)
    metrics = {
        "accuracy": {},
        "robust_accuracy": {"eps": [0.05], "attacks": ["square"], "square_queries": 20},
        "probabilistic_robustness": {"eps": [0.05], "samples": 120},
        "local_probabilistic_robustness": {"eps": 0.05},
        "rare_event_probability": {"sigma": 0.05, "particles": 20, "mcmc_steps": 2,
                                   "max_levels": 5, "runs": 2, "points": 4},
        "randomized_smoothing": {"sigma": 0.25, "n0": 10, "n": 60, "radii": [0.0, 0.1]},
        "corruptions": {"corruptions": ["gaussian_noise", "contrast"], "severities": [1]},
        "calibration": {},
        "analytical_robustness": {"sigma": 0.05, "estimators": ["softmax"],
                                  "primary": "softmax"},
    }
    cert = robust_cert.certify(lr, (x, y), {**_policy(metrics), "input_range": [0, 1]},
                               progress=False)
    assert cert.body["model"]["input_shape"] == [1, 8, 8]
    status = {r["metric"]: r.get("status", "ok") for r in cert.body["results"]}
    assert set(status) == set(metrics)
    assert all(s == "ok" for s in status.values()), status


def _counting(predict):
    calls = []

    def wrapped(x):
        calls.append(len(x))
        return predict(x)

    return wrapped, calls


@pytest.mark.parametrize(("metric", "config", "named"), [
    ("robust_accuracy", {"eps": [0.1], "attacks": ["apgd_ce", "square"]},
     "attack apgd_ce needs input gradients"),
    ("safe_radius", {"radii": [0.1]}, "this metric needs input gradients"),
    ("analytical_robustness", {"sigma": 0.1}, "estimators taylor, mmse"),
    ("divergence", {"eps": [0.1]}, "this metric needs input gradients"),
])
def test_white_box_metrics_are_refused_before_anything_runs(metric, config, named):
    from sklearn.linear_model import LogisticRegression

    x, y = _tabular(80, 4, seed=5)
    lr = LogisticRegression().fit(x, y)
    predict, calls = _counting(lr.predict_proba)
    clf = from_predict(predict, n_features=4, fmt="sklearn", sha256="0" * 64, name="lr")
    calls.clear()  # the loader's probe
    with pytest.raises(PolicyError) as err:
        robust_cert.certify(clf, (x, y), _policy({"accuracy": {}, metric: config}),
                            progress=False)
    message = str(err.value)
    assert message.startswith(f"metrics.{metric}: {named}")
    assert "sklearn model lr" in message
    assert "gradient twin" in message
    assert "ONNX export" in message
    if metric == "robust_accuracy":
        assert "attacks: [square]" in message
    assert "\n" not in message
    assert calls == []  # refused at validation: the model was never asked


def test_probability_checks_name_the_problem():
    x = np.zeros((4, 3), dtype=np.float32)
    cases = [
        (lambda a: np.zeros(len(a), dtype=np.int64), "one value per row (labels?)"),
        (lambda a: np.ones((len(a), 2)), "do not sum to 1"),
        (lambda a: np.full((len(a), 2), np.nan), "NaN or infinite"),
        (lambda a: np.tile([1.5, -0.5], (len(a), 1)), "negative values"),
        (lambda a: np.array(["a"] * len(a)), "(labels?)"),
    ]
    for predict, phrase in cases:
        with pytest.raises(ModelError, match=phrase.replace("(", r"\(").replace("?", r"\?")
                           .replace(")", r"\)")) as err:
            from_predict(predict, n_features=3, fmt="pyfunc", sha256="0" * 64, name="m")
        assert "pyfunc_predict_fn=\"predict_proba\"" in str(err.value) or \
            "NaN" in str(err.value)
    ok = from_predict(lambda a: np.tile([0.25, 0.75], (len(a), 1)), n_features=3,
                      fmt="pyfunc", sha256="0" * 64)
    out = ok.logits(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), np.log([[0.25, 0.75]] * 4), rtol=1e-6)
    zero = from_predict(lambda a: np.tile([0.0, 1.0], (len(a), 1)), n_features=3,
                        fmt="pyfunc", sha256="0" * 64)
    assert float(zero.logits(torch.from_numpy(x))[0, 0]) == pytest.approx(-87.336, abs=1e-3)


def test_estimator_facts_are_checked():
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.svm import SVC

    x, y = _tabular(60, 3, seed=6)
    with pytest.raises(ModelError, match="no predict_proba"):
        from_estimator(SVC().fit(x, y))
    with pytest.raises(ModelError, match="no model loader accepts"):
        load_model(LinearRegression().fit(x, y))  # no predict_proba: not a classifier
    shifted = LogisticRegression().fit(x, y + 1)
    with pytest.raises(ModelError, match=r"classes are \[1, 2\].*labels 0\.\.1"):
        from_estimator(shifted)
    lr = LogisticRegression().fit(x, y)
    with pytest.raises(DataError, match=r"shape \(4,\) \(4 values\) but LogisticRegression "
                                        r"takes 3 features"):
        from_estimator(lr, input_shape=(4,))
    a = from_estimator(lr)
    assert a.sha256 == from_estimator(lr).sha256
    assert len(a.sha256) == 64
    assert a.extra["estimator"].endswith("LogisticRegression")


def test_dataframe_models_get_their_columns_and_missing_columns_are_named():
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    x, y = _tabular(80, 3, seed=7)
    frame = pd.DataFrame(x, columns=["age", "income", "debt"])
    lr = LogisticRegression().fit(frame, y)
    clf = from_estimator(lr)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # no "X does not have feature names"
        got = clf.logits(torch.from_numpy(x)).exp().numpy()
    np.testing.assert_allclose(got, lr.predict_proba(frame.astype(np.float64)),
                               rtol=1e-6)
    with pytest.raises(DataError, match=r"takes 3 input columns but the data has 2 features "
                                        r"per sample: no data for column\(s\) 'debt'"):
        from_estimator(lr, input_shape=(2,))


class _ThreadRecorder:
    """Records, at each predict_proba, the largest thread count of the process's OpenMP
    runtimes (threadpoolctl), around a fitted LogisticRegression."""

    def __init__(self, est):
        self.est, self.classes_, self.n_features_in_ = est, est.classes_, est.n_features_in_
        self.seen: list[int] = []

    def fit(self, x, y):  # an estimator's interface; the model is fitted already
        return self

    def predict_proba(self, rows):
        from threadpoolctl import threadpool_info

        self.seen.append(max(i["num_threads"] for i in threadpool_info()
                             if i["user_api"] == "openmp"))
        return self.est.predict_proba(rows)


def test_black_box_model_computes_on_the_certifications_threads():
    """During a certification with threads=1 every OpenMP runtime of the process (the
    estimator's own pool included) is limited to 1 thread at every query after the load,
    whatever it was before; after it, the limits the caller had are back (but torch's, which
    certify sets)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info, threadpool_limits

    x, y = _tabular(80, 4, seed=2)
    model = _ThreadRecorder(LogisticRegression().fit(x[:40], y[:40]))
    def others():  # the OpenMP runtimes but torch's (certify sets torch's, as it always did)
        return {i["filepath"]: i["num_threads"] for i in threadpool_info()
                if i["user_api"] == "openmp" and "torch" not in i["filepath"]}

    with threadpool_limits(limits=3, user_api="openmp"):
        before = others()
        assert before
        assert set(before.values()) == {3}
        robust_cert.certify(model, (x[40:], y[40:]), _policy({"accuracy": {}}), threads=1,
                            progress=False)
        after = others()
    # the first call is the load's probe (two rows), before the model's format is known
    assert len(model.seen) > 2
    assert set(model.seen[1:]) == {1}
    assert after == before
