"""MLflow evaluator plugin: ``mlflow.models.evaluate(..., model_type="robustness",
evaluators=["robust_cert"], evaluator_config={"robust_cert": {...}})``.

Runs the policy's suite and returns its metrics (estimates and CI ends, plus
``verdict_pass``), so MLflow's own ``MetricThreshold`` /
``mlflow.validate_evaluation_results`` can gate on them; the certificate is logged as an
artifact of the evaluation run. Config keys:

- ``policy`` (required): a policy YAML path or dict;
- ``input_shape`` (required for flattened tabular input of images): per-sample shape, e.g.
  ``[1, 8, 8]`` — MLflow passes data as a DataFrame or 2-D array;
- ``seed`` (default 0), ``device`` (default: CUDA if present, else CPU).

Opt-in only: ``can_evaluate`` is true for ``model_type="robustness"`` alone, since
``evaluators=None`` asks every registered evaluator.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from robust_cert.errors import ModelError, PolicyError
from robust_cert.verdicts import Verdict

MODEL_TYPE = "robustness"


def _evaluator_class():
    from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator

    class RobustCertEvaluator(ModelEvaluator):
        """Certifies the evaluated model against a robust_cert policy."""

        @classmethod
        def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
            return model_type == MODEL_TYPE

        def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None,
                     **kwargs):
            import mlflow

            from robust_cert.api import certify
            from robust_cert.loaders import load_model
            from robust_cert.mlflow_plugin.summary import summary_metrics

            cfg = dict(evaluator_config or {})
            if "policy" not in cfg:
                raise PolicyError("evaluator_config['robust_cert'] needs 'policy' "
                                  "(a YAML path or a dict)")
            if model is None:
                raise ModelError("the robust_cert evaluator needs a model (predictions "
                                 "alone cannot be attacked)")
            x = np.asarray(dataset.features_data, dtype=np.float32)
            y = np.asarray(dataset.labels_data)
            if cfg.get("input_shape"):
                shape = tuple(int(d) for d in cfg["input_shape"])
                if int(np.prod(shape)) != x.shape[1]:
                    raise ModelError(f"input_shape {list(shape)} does not fit rows of "
                                     f"{x.shape[1]} features")
                x = x.reshape((x.shape[0], *shape))
            raw = model.get_raw_model()
            clf = load_model(raw, input_shape=x.shape[1:], device=cfg.get("device"))
            cert = certify(clf, (x, y), cfg["policy"], seed=int(cfg.get("seed", 0)),
                           progress=False)
            assert cert is not None  # one process: the certificate
            metrics = summary_metrics(cert)
            metrics["verdict_pass"] = float(cert.passed)
            for req in cert.requirements:
                metrics[f"requirement_pass.{req['id']}"] = float(req["verdict"] == Verdict.PASS)
            metrics = {_clean(k): v for k, v in metrics.items()}
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "robust_cert_certificate.json"
                path.write_text(json.dumps(cert.to_dict(), indent=1, sort_keys=True))
                mlflow.log_artifact(str(path), run_id=run_id)
            mlflow.log_metrics(metrics, run_id=run_id)
            return EvaluationResult(metrics=metrics, artifacts={}, run_id=run_id)

    return RobustCertEvaluator


def _clean(key: str) -> str:
    """MLflow metric names allow letters, digits, _ - . space / : only."""
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in key)


class _Factory:
    """Entry-point target: MLflow instantiates what the entry point loads with no arguments;
    building the class lazily keeps mlflow out of the import of this module."""

    def __new__(cls):
        return _evaluator_class()()


RobustCertEvaluator = _Factory
