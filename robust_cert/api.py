"""The public entry points: load a model, load data, certify."""

from __future__ import annotations

import logging
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from robust_cert import engine, verdict
from robust_cert.certificate import SCHEMA, Certificate, library_versions, result_to_dict
from robust_cert.data import EvalSet, check_fits, load_data
from robust_cert.errors import DataError, ModelError
from robust_cert.metrics.base import MetricResult
from robust_cert.models.base import Classifier
from robust_cert.models.torch import from_module
from robust_cert.models.twin import DEFAULT_TWIN_TOLERANCE, with_gradient_twin
from robust_cert.policy import Policy, load_policy

log = logging.getLogger(__name__)

DECISION_RULE = (
    "Each requirement is an exact one-sided binomial test of 'requirement violated'; "
    "Holm's step-down procedure at alpha = 1 - confidence across all requirements. PASS when "
    "rejected (the one-sided Clopper-Pearson bound at the Holm level clears the threshold), "
    "FAIL when the opposite bound excludes the threshold, else INCONCLUSIVE. The overall "
    "verdict is PASS only if every requirement passes."
)


def load_model(
    model,
    *,
    input_shape: tuple[int, ...] | None = None,
    device: str | torch.device | None = None,
) -> Classifier:
    """A Classifier from an ``nn.Module`` (``input_shape`` required), an ``.onnx`` file path
    (onnxruntime, no gradients) or an MLflow model URI (``models:/name/version``,
    ``models:/name@alias``, ``runs:/…``; MLflow is imported only then). A Classifier is
    returned unchanged."""
    if isinstance(model, Classifier):
        return model
    dev = engine.select_device(device)
    if isinstance(model, nn.Module):
        if input_shape is None:
            raise ModelError("input_shape is needed to wrap an nn.Module")
        return from_module(model, tuple(input_shape), device=dev)
    if isinstance(model, (str, Path)):
        uri = str(model)
        is_uri = uri.startswith(("models:/", "runs:/")) or "://" in uri
        if uri.lower().endswith(".onnx") and not is_uri:
            from robust_cert.models.onnx import from_onnx

            return from_onnx(uri, device=dev, name=Path(uri).stem, input_shape=input_shape)
        if uri.startswith(("models:/", "runs:/", "m-")) or "://" in uri:
            from robust_cert.mlflow_plugin.models import load_mlflow_model

            return load_mlflow_model(uri, device=dev)
        raise ModelError(f"cannot load model {uri!r}: give an nn.Module, an .onnx path "
                         "or a models:/ URI")
    raise ModelError(f"unsupported model of type {type(model).__name__}")


def certify(
    model,
    data,
    policy,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    command: str | None = None,
    gradient_twin=None,
    twin_tolerance: float = DEFAULT_TWIN_TOLERANCE,
) -> Certificate:
    """Run ``policy``'s metric suite on ``model`` and ``data`` and decide every requirement.

    ``model``: an ``nn.Module``, an ``.onnx`` path, a ``models:/`` URI, or a loaded Classifier.
    ``data``: ``"digits"``, an ``.npz`` path, ``(x, y)`` arrays/tensors, or an EvalSet.
    ``policy``: YAML path, dict, or Policy. Returns an unsigned Certificate; nothing is written
    anywhere. The verdict's family-wise error is at most 1 − policy.confidence (see
    :mod:`robust_cert.verdict`).

    ``gradient_twin`` (anything :func:`load_model` accepts) is a differentiable model for a
    model without gradients (ONNX), typically the PyTorch model it was exported from. Before
    anything runs it must predict the same class on every evaluation point with max |Δ logit|
    ≤ ``twin_tolerance`` (default 1e-3), else ModelError names the disagreement. Gradient
    metrics then craft attacks on the twin and judge them on the deployed model; every other
    prediction stays on the model. The certificate's ``model.gradient_twin`` records it. A
    parity metric with ``reference: twin`` compares with it. A differentiable model keeps its
    own gradients; its twin then serves only as that parity reference.
    """
    pol: Policy = load_policy(policy)
    n_threads = engine.configure_threads(threads)
    evalset: EvalSet = load_data(data, input_range=pol.input_range)
    if tuple(evalset.input_range) != tuple(pol.input_range):
        log.info("data input range %s differs from the policy's %s; using the data's",
                 evalset.input_range, pol.input_range)
    try:
        clf = load_model(model, input_shape=evalset.input_shape, device=device)
    except ModelError as exc:
        if not isinstance(model, nn.Module):
            raise
        raise DataError(f"the model does not accept data samples of shape "
                        f"{evalset.input_shape}: {exc}") from exc
    check_fits(evalset, clf.input_shape, clf.num_classes)
    twin, twin_record = None, None
    if gradient_twin is not None:
        try:
            twin = load_model(gradient_twin, input_shape=evalset.input_shape, device=device)
        except ModelError as exc:
            raise ModelError(f"gradient twin: {exc}") from None
        if not clf.differentiable:
            clf, twin_record = with_gradient_twin(clf, twin, evalset.x, tolerance=twin_tolerance,
                                                  batch_size=pol.batch_size)
        else:
            log.info("the model has its own input gradients; the gradient twin serves only as "
                     "a parity reference")
    deterministic = engine.check_deterministic(clf, evalset, pol.batch_size)
    if not deterministic:
        log.warning("the model's outputs differ between two forward passes on the same input: "
                    "it is random at evaluation time, so sampling-based guarantees describe a "
                    "random classifier")
    results = engine.run_suite(clf, evalset, pol, seed=seed, progress=progress,
                               gradient_twin=twin)
    overall, outcomes = verdict.decide(pol, results)
    return _build_certificate(clf, evalset, pol, results, overall, outcomes, seed=seed,
                              threads=n_threads, deterministic=deterministic, command=command,
                              twin=twin_record)


def _build_certificate(clf: Classifier, evalset: EvalSet, pol: Policy,
                       results: dict[str, MetricResult], overall: str, outcomes, *, seed: int,
                       threads: int, deterministic: bool, command: str | None,
                       twin: dict | None = None) -> Certificate:
    body = {
        "schema": SCHEMA,
        "issued_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "verdict": overall,
        "model": {
            "name": clf.name,
            "version": clf.version,
            "uri": clf.uri,
            "format": clf.format,
            "sha256": clf.sha256,
            "num_classes": clf.num_classes,
            "input_shape": list(clf.input_shape),
            "gradients": clf.differentiable,
            "gradient_twin": twin,
            **clf.extra,
        },
        "data": evalset.describe(clf.num_classes),
        "policy": {
            "name": pol.name,
            "version": pol.version,
            "sha256": pol.sha256,
            "confidence": pol.confidence,
            "document": pol.canonical(),
        },
        "environment": {
            **library_versions(),
            "device": str(clf.device),
            "device_name": (torch.cuda.get_device_name(clf.device)
                            if clf.device.type == "cuda" else platform.processor() or "cpu"),
            "threads": threads,
            "platform": platform.platform(),
        },
        "seed": seed,
        "command": command,
        "sanity": {"deterministic_forward": deterministic},
        "decision_rule": DECISION_RULE,
        "results": [result_to_dict(r, pol.confidence) for r in results.values()],
        "requirements": [o.to_dict() for o in outcomes],
    }
    per_point = {f"{name}/{key}": arr for name, res in results.items()
                 for key, arr in res.per_point.items()}
    return Certificate(body=body, per_point=per_point)
