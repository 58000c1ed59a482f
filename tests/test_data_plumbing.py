"""Every data source of the registry, with the CLI's options (label, image size and mode),
through a routes file's ``data:`` and the MLflow evaluator's config."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from robust_cert.data import load_data
from robust_cert.errors import DataError, PolicyError
from robust_cert.routes import RoutesError, describe_route, load_routes
from robust_cert.sources import DataSpec

POLICY = textwrap.dedent("""\
    name: {name}
    {range}
    metrics: {{accuracy: {{}}}}
    requirements: [{{metric: accuracy, at_least: 0.0}}]
    """)


def _table(path, n=30, seed=0):
    rng = np.random.default_rng(seed)
    age, income = rng.uniform(20, 70, n), rng.uniform(1e4, 1e5, n)
    label = (age > 45).astype(int)
    lines = ["age,income,churned"] + [f"{a},{i},{t}" for a, i, t in
                                      zip(age, income, label, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return np.stack([age, income], axis=1), label


def _images(root, size=(6, 5)):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(root / cls / f"{k}.png")


@pytest.fixture
def folder(tmp_path):
    _table(tmp_path / "churn.csv")
    _images(tmp_path / "pets")
    (tmp_path / "tabular.yaml").write_text(POLICY.format(
        name="tabular", range="features: {scale: std}"))
    (tmp_path / "vision.yaml").write_text(POLICY.format(name="vision", range=""))
    return tmp_path


def _routes(folder, rules: str):
    path = folder / "routes.yaml"
    path.write_text("routes:\n" + textwrap.indent(textwrap.dedent(rules), "  "))
    return path


def test_routes_take_every_source_with_the_cli_options(folder):
    table = load_data(DataSpec(str(folder / "churn.csv"), label="churned"),
                      input_range=(-1e9, 1e9))
    images = load_data(DataSpec(str(folder / "pets"), image_size=(4, 4), mode="L"))
    digits = load_data("digits")
    path = _routes(folder, f"""\
        - match: "churn-*"
          policy: tabular.yaml
          data: {{path: churn.csv, label: churned, sha256: "{table.sha256}"}}
        - match: "pets-*"
          policy: vision.yaml
          data: {{path: pets, image_size: [4, 4], image_mode: L, sha256: "{images.sha256}"}}
        - match: "digits-*"
          policy: vision.yaml
          data: {{path: digits, sha256: "{digits.sha256}"}}
        """)
    routes = load_routes(path)  # every pin checked with its options and policy's range
    churn, pets, dig = (routes.route_for(n) for n in ("churn-a", "pets-a", "digits-a"))
    assert isinstance(churn.data_spec, DataSpec)
    assert churn.data_spec.options == {"label": "churned"}
    assert load_data(churn.data_spec, input_range=(-1e9, 1e9)).sha256 == table.sha256
    assert pets.data_spec.options == {"image_size": (4, 4), "mode": "L"}
    assert load_data(pets.data_spec).input_shape == (1, 4, 4)
    assert dig.data == "digits"
    assert dig.data_spec == "digits"
    assert "label=churned" in describe_route(routes, "churn-a")
    # without its options the pin does not hold: the options are part of what is hashed
    bad = _routes(folder, f"""\
        - match: "pets-*"
          policy: vision.yaml
          data: {{path: pets, image_size: [5, 5], sha256: "{images.sha256}"}}
        """)
    with pytest.raises(RoutesError, match="not the pinned"):
        load_routes(bad)


@pytest.mark.parametrize(("data", "message"), [
    ("{path: churn.csv, lable: churned}", "routes.0.data.lable: Extra inputs"),
    ("{path: churn.csv, sha256: '" + "a" * 64 + "'}", "label column 'label'"),
    ("{path: pets, image_mode: CMYK}", "routes.0.data.image_mode"),
])
def test_routes_data_errors_name_the_rule(folder, data, message):
    path = _routes(folder, f"""\
        - match: "x-*"
          policy: tabular.yaml
          data: {data}
        """)
    with pytest.raises(RoutesError) as err:
        load_routes(path)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}:")
    assert "\n" not in str(err.value)


class _Dataset:
    def __init__(self, features, labels):
        self.features_data, self.labels_data = features, labels


class _Model:
    def __init__(self, raw):
        self.raw = raw

    def get_raw_model(self):
        return self.raw


@pytest.fixture
def evaluator(tmp_path, monkeypatch):
    """The evaluator on a local sqlite store (its run receives the certificate)."""
    import mlflow

    from robust_cert.mlflow_plugin.evaluator import RobustCertEvaluator

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.start_run()
    yield RobustCertEvaluator(), run.info.run_id
    mlflow.end_run()


def test_evaluator_reads_a_csv_with_its_label_column(evaluator, tmp_path):
    from sklearn.linear_model import LogisticRegression

    ev, run_id = evaluator
    x, y = _table(tmp_path / "churn.csv", n=40)
    lr = LogisticRegression(max_iter=2000).fit(x, y)
    policy = {"name": "p", "input_range": [0, 1e6], "metrics": {"accuracy": {}},
              "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
    ignored = _Dataset(np.zeros((2, 2)), np.zeros(2))  # MLflow's own data: replaced
    result = ev.evaluate(model_type="robustness", dataset=ignored, run_id=run_id,
                         evaluator_config={"policy": policy, "data": str(tmp_path / "churn.csv"),
                                           "label": "churned"}, model=_Model(lr))
    assert result.metrics["accuracy"] == pytest.approx(lr.score(x, y), abs=1e-6)
    import json

    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=run_id,
                                                artifact_path="robust_cert_certificate.json")
    body = json.loads(Path(local).read_text())["certificate"]
    assert body["data"]["kind"] == "csv"
    assert body["data"]["details"]["label"] == "churned"
    assert body["data"]["n"] == 40


def test_evaluator_refusals(evaluator):
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    ev, run_id = evaluator
    policy = {"name": "p", "input_range": [0, 100], "metrics": {"accuracy": {}},
              "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
    lr = LogisticRegression().fit(np.array([[0.0, 1], [1, 0]]), [0, 1])
    frame = pd.DataFrame({"a": [0.0, 1.0], "colour": ["red", "blue"]})
    with pytest.raises(DataError, match="column 'colour' is not numeric"):
        ev.evaluate(model_type="robustness", dataset=_Dataset(frame, np.array([0, 1])),
                    run_id=run_id, evaluator_config={"policy": policy}, model=_Model(lr))
    with pytest.raises(PolicyError, match="unknown key 'lable'"):
        ev.evaluate(model_type="robustness", dataset=_Dataset(frame, np.array([0, 1])),
                    run_id=run_id, evaluator_config={"policy": policy, "lable": "y"},
                    model=_Model(lr))


@pytest.mark.parametrize("argv", [
    ["certify", "models:/m/1", "--policy", "p.yaml"],
    ["plan", "p.yaml", "--model", "models:/m/1"],
    ["promote", "m", "1"],
    ["serve", "--policy", "p.yaml"],
    ["report", "certificate.json", "--out", "r"],
])
def test_every_command_with_data_takes_the_source_options(argv):
    from robust_cert.cli import _data, build_parser

    args = build_parser().parse_args([*argv, "--data", "pets", "--label", "kind",
                                      "--image-size", "8,8", "--image-mode", "RGB"])
    spec = _data(args)
    assert isinstance(spec, DataSpec)
    assert (spec.ref, spec.options) == ("pets", {"label": "kind", "image_size": (8, 8),
                                                 "mode": "RGB"})
