"""The MLflow evaluator plugin, and MLflow's own threshold gate on its metrics."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.models import MetricThreshold

from robust_cert.data import digits_split
from robust_cert.errors import PolicyError
from tests.conftest import DIGITS_POLICY

pytestmark = pytest.mark.integration


def _evaluate(version: str, server: str, **config):
    mlflow.set_tracking_uri(server)
    mlflow.set_registry_uri(server)
    x, y = digits_split("test")
    with mlflow.start_run(run_name=f"evaluate v{version}"):
        return mlflow.models.evaluate(
            f"models:/digits-cnn/{version}", x.reshape(len(x), -1), targets=y,
            model_type="robustness", evaluators=["robust_cert"],
            evaluator_config={"robust_cert": {"input_shape": [1, 8, 8], **config}})


def test_evaluate_and_validate_with_metric_thresholds(demo):
    server = demo[0]
    weak = _evaluate("1", server, policy=str(DIGITS_POLICY))
    strong = _evaluate("2", server, policy=str(DIGITS_POLICY))
    assert strong.metrics["verdict_pass"] == 1.0
    assert weak.metrics["verdict_pass"] == 0.0
    key = "robust_accuracy.eps_0.1"
    assert strong.metrics[key] > weak.metrics[key]
    assert strong.metrics[f"{key}.ci_lower"] <= strong.metrics[key]
    thresholds = {key: MetricThreshold(threshold=0.7, greater_is_better=True),
                  "verdict_pass": MetricThreshold(threshold=1.0, greater_is_better=True)}
    mlflow.validate_evaluation_results(thresholds, strong)
    with pytest.raises(Exception, match=key):  # ModelValidationFailedException
        mlflow.validate_evaluation_results(thresholds, weak)
    artifacts = mlflow.MlflowClient().list_artifacts(strong.run_id)
    assert "robust_cert_certificate.json" in {a.path for a in artifacts}


def test_only_opted_in_and_needs_a_policy(demo):
    from robust_cert.mlflow_plugin.evaluator import RobustCertEvaluator

    ev = RobustCertEvaluator()
    assert ev.can_evaluate(model_type="robustness", evaluator_config={})
    assert not ev.can_evaluate(model_type="classifier", evaluator_config={})
    with pytest.raises(PolicyError, match="needs 'policy'"):
        _evaluate("2", demo[0])
