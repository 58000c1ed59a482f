"""The one interface every model format implements: a batched classifier returning logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from robust_cert.errors import ModelError


@dataclass
class Classifier:
    """A classifier under certification.

    ``forward`` maps a float32 batch of shape ``(N, *input_shape)`` on ``device`` to logits
    ``(N, num_classes)``. ``differentiable`` says whether gradient metrics can run on it
    (PyTorch yes, ONNX no); they ask for :meth:`attack_module` and the engine reports them as
    "not applicable" when it is false.

    ``gradient_forward``, when set, is a differentiable twin of ``forward`` (e.g. the PyTorch
    model an ONNX graph was exported from, validated for logit parity by
    :func:`robust_cert.models.twin.with_gradient_twin`): :meth:`attack_module` differentiates
    through it, while :meth:`logits` — every prediction that is judged — stays on ``forward``,
    the deployed artifact. Attacks are then crafted on the twin and judged on the deployed
    model (transfer from the twin), and ``differentiable`` is true.

    ``max_batch``, when set, is the most images one call of ``forward`` gets: :meth:`logits`
    splits a larger batch into consecutive pieces. In eval mode a row's logits do not depend
    on the other rows, so the split changes nothing but float rounding (the kernels a batch
    size selects). The engine sets it to the policy's ``batch_size`` on CPU, where a forward
    pass of 4,096 images runs at less than half the images per second of one of 64 (cache
    sizes), and to the halved batch size after an out-of-memory retry on any device.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    sha256: str
    format: str  # "pytorch-module" | "pytorch-pickle" | "pytorch-pt2" | "onnx"
    differentiable: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    name: str = "model"
    version: str | None = None
    uri: str | None = None
    extra: dict = field(default_factory=dict)
    gradient_forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # input gradients
    max_batch: int | None = None  # images per forward call; None: any batch in one call

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch already on ``self.device``, in forward calls of at most
        ``max_batch`` images; checks each call's output shape."""
        cap = self.max_batch
        if cap is not None and x.shape[0] > cap:
            return torch.cat([self._logits(x[s:s + cap]) for s in range(0, x.shape[0], cap)])
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward(x)
        if not isinstance(out, torch.Tensor) or out.shape != (x.shape[0], self.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(
                f"model output has shape {got}; expected (batch, classes) = "
                f"({x.shape[0]}, {self.num_classes})"
            )
        return out.float()

    def attack_module(self) -> nn.Module:
        """An ``nn.Module`` view for gradient-based attacks (torchattacks): of
        ``gradient_forward`` when set, else of ``forward``.

        The wrapped callable is not registered as a submodule, so ``.eval()`` on the view never
        reaches a torch.export GraphModule (whose ``eval()`` raises). A zero-size parameter pins
        the device, which torchattacks reads from ``next(model.parameters())``.
        """
        if not self.differentiable:
            raise ModelError(f"{self.format} model has no input gradients")
        return _AttackView(self.gradient_forward or self.forward, self.device)

    def query_module(self) -> nn.Module:
        """An ``nn.Module`` view of ``forward`` itself for gradient-free (query) attacks such as
        Square: it needs no input gradients, so any model has one, and its queries reach the
        judged model, never a gradient twin."""
        return _AttackView(self.forward, self.device)


class _AttackView(nn.Module):
    _fn: Callable[[torch.Tensor], torch.Tensor]  # a plain attribute, not a submodule

    def __init__(self, fn, device: torch.device):
        super().__init__()
        object.__setattr__(self, "_fn", fn)
        self._device_anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


def probability_rows(out: torch.Tensor) -> bool:
    """True when every row of ``out`` (batch × classes) is non-negative and sums to 1 within
    float32 rounding: |sum − 1| ≤ 4 · classes · 2⁻²³ (each of the ``classes`` float32 terms
    and the normalisation contribute at most a few units of 2⁻²⁴)."""
    if out.ndim != 2 or out.shape[0] == 0:
        return False
    tol = 4 * out.shape[1] * torch.finfo(torch.float32).eps
    sums = out.double().sum(1)
    return bool((out >= 0).all() and ((sums - 1).abs() <= tol).all())


def with_log_probabilities(model: Classifier) -> Classifier:
    """A copy of ``model`` (which returns probabilities) returning their natural logarithm,
    clamped below at the smallest normal number of the output dtype (log = −87.3 for
    float32), for ``forward`` and ``gradient_forward``; ``extra["outputs"]`` records it."""
    import dataclasses

    grad = model.gradient_forward
    return dataclasses.replace(
        model, forward=_LogOf(model.forward),
        gradient_forward=_LogOf(grad) if grad is not None else None,
        extra={**model.extra, "outputs": "probabilities (converted to log-probabilities)"})


class _LogOf:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.fn(x)
        return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
