"""Train the registry example's three models and register a new version of each
(docs/deployment.md §3b):

    python examples/registry/register.py --tracking-uri http://127.0.0.1:5000 [--data DIR]
        [--models vision-digits credit-scorer forecast-sales]

- ``vision-digits``: a small digits CNN (PyTorch), certified under rule 1 of routes.yaml;
- ``credit-scorer``: a scikit-learn LogisticRegression fitted on ``credit-train.csv``, logged
  so that its pyfunc predicts class probabilities; certified under rule 2 on ``credit-eval.csv``;
- ``forecast-sales``: a scikit-learn LinearRegression (a regressor: rule 3 exempts it).

Prints ``NAME VERSION`` per registered version. Run make_data.py first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = ("vision-digits", "credit-scorer", "forecast-sales")
EXPERIMENT = "registry-example"


def _read_credit(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    return table[:, :-1], table[:, -1].astype(np.int64)


def register(tracking_uri: str, data: Path, models=MODELS, seed: int = 0) -> dict[str, str]:
    """Log and register one new version of each model in ``models``; {name: version}."""
    import mlflow
    from mlflow.tracking import MlflowClient

    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"register.py: unknown model(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(MODELS)}")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    versions = {}
    with mlflow.start_run(experiment_id=experiment, run_name="registry example models"):
        if "vision-digits" in models:
            from robust_cert.digits_cnn import train_digits_cnn

            cnn = train_digits_cnn(epochs=8, seed=seed)
            info = mlflow.pytorch.log_model(
                cnn, name="vision-digits", serialization_format="pickle",
                input_example=np.zeros((2, 1, 8, 8), np.float32), pip_requirements=["torch"],
                registered_model_name="vision-digits")
            versions["vision-digits"] = str(info.registered_model_version)
        if "credit-scorer" in models:
            from sklearn.linear_model import LogisticRegression

            x, y = _read_credit(data / "credit-train.csv")
            scorer = LogisticRegression(C=10.0, max_iter=500).fit(x, y)
            info = mlflow.sklearn.log_model(scorer, name="credit-scorer", input_example=x[:2],
                                            pyfunc_predict_fn="predict_proba",
                                            pip_requirements=["scikit-learn"],
                                            registered_model_name="credit-scorer")
            versions["credit-scorer"] = str(info.registered_model_version)
        if "forecast-sales" in models:
            from sklearn.linear_model import LinearRegression

            rng = np.random.default_rng(seed)
            weeks = rng.uniform(0.0, 1.0, size=(200, 3))
            sales = weeks @ np.array([120.0, -30.0, 55.0]) + rng.normal(0.0, 5.0, size=200)
            info = mlflow.sklearn.log_model(LinearRegression().fit(weeks, sales),
                                            name="forecast-sales", input_example=weeks[:2],
                                            pip_requirements=["scikit-learn"],
                                            registered_model_name="forecast-sales")
            versions["forecast-sales"] = str(info.registered_model_version)
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="the MLflow server")
    parser.add_argument("--data", type=Path, default=HERE / "data",
                        help="the folder make_data.py wrote (default: data/ beside this file)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if "credit-scorer" in args.models and not (args.data / "credit-train.csv").is_file():
        print(f"register.py: {args.data / 'credit-train.csv'} not found: run make_data.py "
              "first", file=sys.stderr)
        return 2
    for name, version in register(args.tracking_uri, args.data, args.models,
                                  args.seed).items():
        print(name, version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
