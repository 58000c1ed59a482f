"""Black-box models registered in a real MLflow server, certified from the CLI: a
scikit-learn LogisticRegression (sklearn flavor), a white-box policy refused before anything
is written, and a pyfunc returning labels refused with how to log a probability model."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robust_cert.cli import main

pytestmark = pytest.mark.integration

POLICY = """\
name: blackbox
input_range: [0.0, 1.0]
metrics:
  accuracy: {}
  robust_accuracy: {eps: [0.05], attacks: [square], square_queries: 50}
  probabilistic_robustness: {eps: 0.05, samples: 200}
requirements:
  - {metric: accuracy, at_least: 0.8}
"""


class _Labels(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return np.zeros(len(model_input), dtype=np.int64)


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """(url, data path): version 1 of sk-digits (LogisticRegression on the 64 pixels) and of
    labels-pyfunc (a pyfunc whose predict returns labels), and the digits split as an .npz."""
    from sklearn.linear_model import LogisticRegression

    from robust_cert.data import load_data

    url = mlflow_server.url
    data = load_data("digits")
    x, y = data.x.numpy()[:120], data.y.numpy()[:120]
    path = tmp_path_factory.mktemp("bb") / "digits.npz"
    np.savez(path, x=x.reshape(len(x), -1), y=y)
    lr = LogisticRegression(max_iter=300).fit(x.reshape(len(x), -1), y)
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    experiment = MlflowClient(tracking_uri=url).create_experiment("blackbox")
    example = x[:2].reshape(2, -1).astype(np.float64)
    with mlflow.start_run(experiment_id=experiment):
        mlflow.sklearn.log_model(lr, name="m", input_example=example,
                                 registered_model_name="sk-digits",
                                 pyfunc_predict_fn="predict_proba")
        mlflow.pyfunc.log_model(name="p", python_model=_Labels(), input_example=example,
                                registered_model_name="labels-pyfunc")
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    return url, path


def _certify(url, ref, policy, data, out) -> int:
    return main(["certify", ref, "--policy", str(policy), "--data", str(data),
                 "--tracking-uri", url, "--out", str(out), "--no-progress"])


def _runs(url) -> int:
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("blackbox")
    return len(client.search_runs([exp.experiment_id]))


def test_sklearn_version_certifies_and_white_box_policy_is_refused(registered, tmp_path,
                                                                   capsys):
    url, data = registered
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    code = _certify(url, "models:/sk-digits/1", policy, data, tmp_path / "ok")
    assert code in (0, 1), capsys.readouterr().err
    body = json.loads((tmp_path / "ok" / "certificate.json").read_text())["certificate"]
    model = body["model"]
    assert (model["format"], model["gradients"], model["flavor"]) == ("sklearn", False,
                                                                     "sklearn")
    assert model["input_shape"] == [64]
    assert model["num_classes"] == 10
    assert len(model["sha256"]) == 64
    statuses = {r["metric"]: r["status"] for r in body["results"]}
    assert statuses == dict.fromkeys(("accuracy", "robust_accuracy",
                                      "probabilistic_robustness"), "ok")
    capsys.readouterr()
    white = tmp_path / "white.yaml"
    white.write_text(POLICY.replace("attacks: [square]", "attacks: [apgd_ce, square]"))
    before = _runs(url)
    code = _certify(url, "models:/sk-digits/1", white, data, tmp_path / "refused")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "metrics.robust_accuracy: attack apgd_ce needs input gradients" in err
    assert "sklearn model sk-digits v1" in err
    assert "attacks: [square]" in err
    assert not (tmp_path / "refused").exists()
    assert _runs(url) == before  # no certification run was created


def test_pyfunc_returning_labels_is_refused_with_how_to_log(registered, tmp_path, capsys):
    url, data = registered
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    before = _runs(url)
    code = _certify(url, "models:/labels-pyfunc/1", policy, data, tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "one value per row (labels?)" in err
    assert 'pyfunc_predict_fn="predict_proba"' in err
    assert not (tmp_path / "out").exists()
    assert _runs(url) == before
