"""Tabular models and tables through the CLI on a local MLflow store (``runs:/`` references,
no server): a certification under a per-feature threat model, and bad input refused with one
line naming the file / column / metric, exit 2, nothing written (no report folder, no run).
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from robust_cert.cli import main

COLUMNS = ["age", "income", "debt"]
POLICY = """\
name: credit
features: {scale: std, immutable: [age]}
metrics:
  accuracy: {}
  robust_accuracy: {eps: [0.2], attacks: [square], square_queries: 100}
requirements:
  - {metric: accuracy, at_least: 0.0}
"""


class _Proba(mlflow.pyfunc.PythonModel):
    """A pyfunc whose probabilities are broken in a given way."""

    def __init__(self, how: str):
        self.how = how

    def predict(self, context, model_input, params=None):
        n = len(model_input)
        if self.how == "nan":
            return np.full((n, 2), np.nan)
        return np.full((n, 2), 0.8)  # rows sum to 1.6


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"age": rng.uniform(20, 70, n), "income": rng.uniform(1e4, 1e5, n),
                          "debt": rng.uniform(0, 5e4, n)})
    score = (frame.income - 5e4) / 2e4 - (frame.debt - 2.5e4) / 1e4 + rng.normal(0, 0.5, n)
    frame["y"] = (score > 0).astype(int)
    return frame


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, folder, {name: runs:/ reference}): a LogisticRegression fitted on the
    named columns, and two pyfuncs with broken probabilities, logged in a sqlite store."""
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("tabular-cli")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    train = _frame(200, 0)
    lr = LogisticRegression(max_iter=2000).fit(train[COLUMNS], train.y)
    mlflow.set_tracking_uri(uri)
    experiment = MlflowClient(tracking_uri=uri).create_experiment("tabular")
    example = train[COLUMNS][:2]
    refs = {}
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.sklearn.log_model(lr, name="lr", input_example=example,
                                 pyfunc_predict_fn="predict_proba")
        for how in ("nan", "unnormalised"):
            mlflow.pyfunc.log_model(name=how, python_model=_Proba(how), input_example=example)
        refs = {name: f"runs:/{run.info.run_id}/{name}"
                for name in ("lr", "nan", "unnormalised")}
    mlflow.set_tracking_uri(None)
    (folder / "policy.yaml").write_text(POLICY)
    _frame(60, 1).to_csv(folder / "eval.csv", index=False)
    return uri, folder, refs


def _runs(uri: str) -> int:
    client = MlflowClient(tracking_uri=uri)
    return sum(len(client.search_runs([e.experiment_id]))
               for e in client.search_experiments())


def _certify(store, ref: str, data, out, policy=None, capsys=None) -> tuple[int, str]:
    uri, folder, refs = store
    code = main(["certify", refs.get(ref, ref), "--policy", str(policy or folder / "policy.yaml"),
                 "--data", str(data), "--label", "y", "--tracking-uri", uri, "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err.strip() if capsys is not None else ""
    return code, err


@pytest.mark.parametrize(("case", "model", "phrase"), [
    ("missing", "lr", "column 'income' has 1 missing value(s) (first at line 4)"),
    ("text", "lr", "column 'debt' is not numeric"),
    ("renamed", "lr", "has no column 'debt'"),
    ("reordered", "lr", "reorder the table's columns"),
    ("white-box", "lr", "metrics.robust_accuracy: attack apgd_ce needs input gradients"),
    ("unknown-feature", "lr", "features.immutable: 'sex' is not a feature of the data"),
    ("nan", "nan", "NaN"),
    ("unnormalised", "unnormalised", "do not sum to 1"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(store, tmp_path, capsys, case, model,
                                                      phrase):
    uri, folder, _ = store
    frame = _frame(30, 2)
    policy = folder / "policy.yaml"
    if case == "missing":
        frame = frame.astype({"income": object})
        frame.loc[2, "income"] = None
    elif case == "text":
        frame = frame.astype({"debt": object})
        frame.loc[0, "debt"] = "high"
    elif case == "renamed":
        frame = frame.rename(columns={"debt": "loan"})
    elif case == "reordered":
        frame = frame[["income", "age", "debt", "y"]]
    elif case == "white-box":
        policy = tmp_path / "white.yaml"
        policy.write_text(POLICY.replace("attacks: [square]", "attacks: [apgd_ce, square]"))
    elif case == "unknown-feature":
        policy = tmp_path / "sex.yaml"
        policy.write_text(POLICY.replace("immutable: [age]", "immutable: [sex]"))
    data = tmp_path / "bad.csv"
    frame.to_csv(data, index=False)
    before = _runs(uri)
    code, err = _certify(store, model, data, tmp_path / "out", policy, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert phrase in err, err
    if case in ("missing", "text", "renamed", "reordered"):
        assert "bad.csv" in err  # the file is named
    assert not (tmp_path / "out").exists()
    assert _runs(uri) == before  # nothing recorded


def test_plan_refuses_a_white_box_policy_on_a_black_box_model(store, tmp_path, capsys):
    uri, folder, refs = store
    policy = tmp_path / "white.yaml"
    policy.write_text(POLICY.replace("attacks: [square]", "attacks: [fgsm]"))
    code = main(["plan", str(policy), "--model", refs["lr"], "--data",
                 str(folder / "eval.csv"), "--label", "y", "--tracking-uri", uri])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "metrics.robust_accuracy: attack fgsm needs input gradients" in err
    assert "gradient twin" in err


def test_a_table_certifies_under_its_per_feature_threat_model(store, tmp_path, capsys):
    uri, folder, refs = store
    code, err = _certify(store, "lr", folder / "eval.csv", tmp_path / "out", capsys=capsys)
    assert code in (0, 1), err
    body = json.loads((tmp_path / "out" / "certificate.json").read_text())["certificate"]
    assert body["data"]["kind"] == "csv"
    features = {f["name"]: f for f in body["data"]["features"]["features"]}
    assert features["age"]["immutable"] == "policy"
    frame = _frame(60, 1)
    assert features["income"]["scale"] == pytest.approx(frame.income.std(ddof=0), rel=1e-5)
    assert features["debt"]["range"] == pytest.approx([frame.debt.min(), frame.debt.max()],
                                                      rel=1e-6)
    assert body["model"]["format"] == "sklearn"
    assert body["policy"]["document"]["features"]["immutable"] == ["age"]
