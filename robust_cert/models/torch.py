"""PyTorch models: a live ``nn.Module`` or a torch.export program, wrapped as a Classifier."""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from robust_cert.errors import ModelError
from robust_cert.models.base import Classifier


def state_sha256(module: nn.Module) -> str:
    """SHA-256 over the module's state (parameter and buffer names, dtypes, shapes, bytes).

    Two modules with the same weights hash the same whatever object they live in; retraining
    changes the hash. Tensors are hashed in name order from their CPU, contiguous form.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _eval_mode(module: nn.Module) -> None:
    """Eval mode; torch.export GraphModules refuse ``.eval()`` (and are already in it)."""
    with contextlib.suppress(NotImplementedError):
        module.eval()


def probe_num_classes(forward, input_shape: tuple[int, ...], device: torch.device) -> int:
    """Run two zero inputs through the model and read the number of classes from the output."""
    x = torch.zeros((2, *input_shape), device=device)
    try:
        with torch.no_grad():
            out = forward(x)
    except Exception as exc:  # the model's own error, re-raised with the shape we tried
        raise ModelError(
            f"model failed on an input of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model output has shape {got} for a batch of 2; expected (2, classes)")
    if out.shape[1] < 2:
        raise ModelError(f"model has {out.shape[1]} output; a classifier needs at least 2 logits")
    return int(out.shape[1])


def from_module(
    module: nn.Module,
    input_shape: tuple[int, ...],
    *,
    device: torch.device,
    fmt: str = "pytorch-module",
    sha256: str | None = None,
    name: str = "model",
) -> Classifier:
    """Wrap ``module`` (moved to ``device``, eval mode) as a Classifier.

    ``input_shape`` is the per-sample shape (no batch dimension). ``sha256`` defaults to the
    state hash; loaders from artifacts pass the artifact hash instead.
    """
    if not isinstance(module, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
    try:
        module = module.to(device)
    except NotImplementedError:  # torch.export GraphModule: already placed
        pass
    _eval_mode(module)
    num_classes = probe_num_classes(module, input_shape, device)
    return Classifier(
        forward=module,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        sha256=sha256 or state_sha256(module),
        format=fmt,
        differentiable=True,
        device=device,
        name=name,
    )
