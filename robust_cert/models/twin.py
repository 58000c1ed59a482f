"""A gradient-capable twin for a model without input gradients (an ONNX graph).

onnxruntime gives no input gradients, so gradient metrics (white-box attacks) cannot run on an
exported graph. The same version's PyTorch model can stand in for the gradients — but only
after it is shown to compute the same function: on every evaluation point both models predict
the same class and no logit differs by more than a tolerance. A twin that differs is refused
with the disagreement named, never silently used.

With an accepted twin, attacks are crafted on the twin's gradients and every prediction is
judged on the deployed model (transfer from the twin); see :class:`Classifier`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from robust_cert.errors import ModelError
from robust_cert.inputs import InputsLike
from robust_cert.models.base import Classifier

#: Default largest |Δ logit| allowed between a model and its gradient twin on the evaluation
#: data (float32 ONNX exports of a PyTorch model typically differ by ~1e-6).
DEFAULT_TWIN_TOLERANCE = 1e-3


def with_gradient_twin(
    model: Classifier,
    twin: Classifier,
    x: InputsLike,
    *,
    tolerance: float = DEFAULT_TWIN_TOLERANCE,
    batch_size: int = 256,
) -> tuple[Classifier, dict]:
    """``model`` with attacks differentiated through ``twin``, after a parity check on ``x``.

    Args:
        model: the deployed classifier (its ``forward`` keeps judging every prediction).
        twin: a differentiable classifier with the same input shape and classes.
        x: the evaluation inputs (a CPU tensor ``(N, *input_shape)``, or an EvalSet's
            :class:`~robust_cert.inputs.Inputs`, read batch by batch).
        tolerance: largest allowed max |Δ logit| over ``x`` (default 1e-3).
        batch_size: rows per forward pass.

    Returns ``(classifier, record)``: a copy of ``model`` with ``gradient_forward`` set and
    ``differentiable`` true, and the certificate's record of the twin — ``format``, ``sha256``,
    ``uri``, ``max_abs_logit_diff``, ``agreement`` (``"k/n"``) and ``tolerance``.

    Raises ModelError when the twin has no gradients, does not fit the model, or disagrees:
    any point predicted differently, or max |Δ logit| above ``tolerance``.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ModelError(f"twin_tolerance must be a finite number >= 0, got {tolerance}")
    label = twin_label(twin)
    if not twin.differentiable:
        raise ModelError(f"gradient twin {label} ({twin.format}) has no input gradients itself")
    if twin.input_shape != model.input_shape or twin.num_classes != model.num_classes:
        raise ModelError(
            f"gradient twin {label} has input {twin.input_shape} and {twin.num_classes} "
            f"classes; the model has {model.input_shape} and {model.num_classes}")
    agree, max_diff = 0, 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        a = model.logits(xb.to(model.device)).cpu()
        b = twin.logits(xb.to(twin.device)).cpu()
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        diff = (a - b).abs()
        max_diff = max(max_diff, float("inf") if diff.isnan().any() else float(diff.max()))
    n = len(x)
    if agree < n or not max_diff <= tolerance:
        raise ModelError(
            f"gradient twin {label} does not match the model on the evaluation data: "
            f"{n - agree} of {n} points predict another class, max |Δ logit| {max_diff:.3g} "
            f"(tolerance {tolerance:g}); refusing to craft attacks on it")
    record = {
        "format": twin.format,
        "sha256": twin.sha256,
        "uri": twin.uri,
        "max_abs_logit_diff": max_diff,
        "agreement": f"{agree}/{n}",
        "tolerance": tolerance,
    }
    grad = _OnDevice(twin.forward, twin.device)
    return dataclasses.replace(model, differentiable=True, gradient_forward=grad), record


def twin_label(twin: Classifier) -> str:
    """How messages name a twin: its URI, else its name and hash prefix."""
    return twin.uri or f"{twin.name} (sha256 {twin.sha256[:12]})"


class _OnDevice:
    """Runs ``fn`` on ``device`` and returns to the caller's device (gradients flow through)."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device = fn, device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x.to(self.device)).to(x.device)
