"""MLflow evaluator plugin: ``mlflow.models.evaluate(..., model_type="robustness",
evaluators=["robust_cert"], evaluator_config={"robust_cert": {...}})``.

Runs the policy's suite and returns its metrics (estimates and CI ends, plus
``verdict_pass``), so MLflow's own ``MetricThreshold`` /
``mlflow.validate_evaluation_results`` can gate on them; the certificate is logged as an
artifact of the evaluation run. Config keys:

- ``policy`` (required): a policy YAML path or dict;
- ``input_shape`` (required for flattened tabular input of images): per-sample shape, e.g.
  ``[1, 8, 8]`` — MLflow passes data as a DataFrame or 2-D array;
- ``seed`` (default 0), ``device`` (default: CUDA if present, else CPU);
- ``data`` (optional): evaluation data from any data source robust_cert reads, as ``--data``
  takes it — a ``.csv``/``.parquet`` table, an image folder, an ``.npz``, ``digits``,
  ``runs:/RUN_ID/PATH``, a factory ``package.module:function`` — with the CLI's options
  ``label`` (a table's label column), ``image_size`` (``[H, W]``) and ``image_mode`` (``L`` or
  ``RGB``). It replaces the ``data`` given to ``mlflow.models.evaluate`` (which MLflow
  requires, and which holds only tables): the certificate hashes and records this source.
  Without it the MLflow dataset is certified: its feature columns in order, numeric only
  (a non-numeric column is refused naming it).

Any other key is refused naming it.

Opt-in only: ``can_evaluate`` is true for ``model_type="robustness"`` alone, since
``evaluators=None`` asks every registered evaluator.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from robust_cert.errors import ModelError, PolicyError
from robust_cert.verdicts import Verdict

MODEL_TYPE = "robustness"
#: The keys of ``evaluator_config["robust_cert"]``.
CONFIG_KEYS = ("policy", "input_shape", "seed", "device", "data", "label", "image_size",
               "image_mode")


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
            unknown = sorted(set(cfg) - set(CONFIG_KEYS))
            if unknown:
                raise PolicyError(f"evaluator_config['robust_cert']: unknown key "
                                  f"{unknown[0]!r}; known: {', '.join(CONFIG_KEYS)}")
            data = _data(cfg, dataset)
            raw = model.get_raw_model()
            clf = load_model(raw, input_shape=data.input_shape, device=cfg.get("device"))
            cert = certify(clf, data, cfg["policy"], seed=int(cfg.get("seed", 0)),
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


def _data(cfg: dict, dataset):
    """The evaluation set: ``cfg["data"]`` read by its data source with the CLI's options,
    or the MLflow dataset's features and labels (numeric columns only); loaded under the
    policy's input range, and reshaped to ``cfg["input_shape"]`` when given."""
    from robust_cert.data import EvalSet, data_sha256, load_data
    from robust_cert.errors import DataError
    from robust_cert.policy import load_policy
    from robust_cert.sources import DataSpec

    pol = load_policy(cfg["policy"])
    if cfg.get("data") is not None:
        size = cfg.get("image_size")
        if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2):
            raise DataError(f"evaluator_config['robust_cert']['image_size'] {size!r}: give "
                            "[H, W], e.g. [64, 64]")
        spec = DataSpec(str(cfg["data"]), label=cfg.get("label"),
                        image_size=tuple(int(v) for v in size) if size else None,
                        mode=cfg.get("image_mode"))
        data: EvalSet = load_data(spec if spec.options else spec.ref,
                                  input_range=pol.data_range)
    else:
        features = dataset.features_data
        columns = [str(c) for c in getattr(features, "columns", [])]
        for name in columns:
            kind = features[name].dtype.kind
            if kind not in "biuf":
                raise DataError(f"the evaluation dataset's column {name!r} is not numeric "
                                f"(dtype {features[name].dtype}); encode it, or pass the "
                                "table as evaluator_config data with its source's options")
        x = np.asarray(features, dtype=np.float32)
        y = np.asarray(dataset.labels_data)
        data = load_data((x, y), input_range=pol.data_range)
        if columns:
            data = dataclasses.replace(data, details={"features": columns})
    if cfg.get("input_shape"):
        shape = tuple(int(d) for d in cfg["input_shape"])
        flat = int(np.prod(data.input_shape))
        if int(np.prod(shape)) != flat:
            raise ModelError(f"input_shape {list(shape)} does not fit rows of {flat} features")
        x = data.x[:].reshape((len(data), *shape))
        data = dataclasses.replace(data, x=x, sha256=data_sha256(x.numpy(), data.y.numpy()))
    return data


def _clean(key: str) -> str:
    """MLflow metric names allow letters, digits, _ - . space / : only."""
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in key)


class _Factory:
    """Entry-point target: MLflow instantiates what the entry point loads with no arguments;
    building the class lazily keeps mlflow out of the import of this module."""

    def __new__(cls):
        return _evaluator_class()()


RobustCertEvaluator = _Factory
