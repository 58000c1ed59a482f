"""The one interface every model format implements: a batched classifier returning logits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
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

    ``batch_sizer``, when set (by the engine on CPU), picks the images per forward call of
    :meth:`logits` at or below ``max_batch`` from the CPU time the calls really take
    (:class:`CpuBatchSizer`): on a CPU a batch of 256 can cost more per image than one of 64.
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
    #: chooses the images per call of :meth:`logits` (≤ ``max_batch``); shared by the copies
    #: ``dataclasses.replace`` makes, so what it has measured carries over
    batch_sizer: CpuBatchSizer | None = None
    #: every forward call is seeded anew (``engine.seeded_forwards``: a declared stochastic
    #: model), so the outputs depend on how a batch is split into calls: the engine then gives
    #: it no ``batch_sizer``, whose split depends on timings
    seeded_calls: bool = False

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch already on ``self.device``, in forward calls of at most
        ``max_batch`` images (of the size ``batch_sizer`` picks, when set); checks each call's
        output shape."""
        return self.in_calls(self._logits, x)

    def in_calls(self, fn, x: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` (a function of a batch that is row-wise: each output row depends on its
        input row only, as a model in eval mode) computed in calls of the sizes :meth:`logits`
        uses: at most ``max_batch`` images each, of the size ``batch_sizer`` picks when set.
        Only the split changes, never a row's value."""
        cap = self.max_batch
        if self.batch_sizer is not None and x.shape[0] > 2:
            return self.batch_sizer.run(fn, x, cap)
        if cap is not None and x.shape[0] > cap:
            return torch.cat([fn(x[s:s + cap]) for s in range(0, x.shape[0], cap)])
        return fn(x)

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

        With a ``batch_sizer`` (the engine sets one on CPU) that has chosen the size of
        :meth:`logits`' calls, the view runs a batch in pieces of that size, inside the one
        autograd graph: a gradient pass of an attack's 256 points then works on pieces that
        fit the caches (ResNet-18 at width 16, one thread: 1.9 against 2.4-2.9 ms per image,
        forward and backward). Until it has chosen, and when a piece's forward would take
        less than 10 ms (the small digits CNN, whose passes are dominated by the cost per
        call: :meth:`CpuBatchSizer.run_chosen`), a batch runs in one call. The views' calls
        never time sizes: their backward passes, which the sizer cannot see, would be left
        out. A row and its input gradient depend on that row only, so the split changes no
        value (tests/test_batch_sizer.py compares the gradients and an attack bit for bit).
        """
        if not self.differentiable:
            raise ModelError(f"{self.format} model has no input gradients")
        return _AttackView(self.gradient_forward or self.forward, self.device, self._split())

    def query_module(self) -> nn.Module:
        """An ``nn.Module`` view of ``forward`` itself for gradient-free (query) attacks such as
        Square: it needs no input gradients, so any model has one, and its queries reach the
        judged model, never a gradient twin. Its calls are split as :meth:`attack_module`'s."""
        return _AttackView(self.forward, self.device, self._split())

    def _split(self):
        """How the views run a batch: in pieces of the size ``batch_sizer`` has chosen for
        :meth:`logits`, once it has (else in one call, as the metric passes it)."""
        return self.batch_sizer.run_chosen if self.batch_sizer is not None else None


class CpuBatchSizer:
    """Picks the images per forward call on a CPU from the calls a certification really runs.

    On a CPU the time per image of a forward pass depends on the batch: past the caches'
    size it grows (ResNet-18 at width 16, one thread: 256 images cost about 1.5× per image
    what 64 cost), below some size the per-call overhead dominates, and where the best size
    lies depends on the model and the machine. The sizer tries the candidate sizes 32, 64,
    128, ... (powers of two below ``cap``, then ``cap``) in increasing order on the images of
    the calls it is given — no extra forward pass — each for :data:`CALLS` calls whose first
    is discarded (one-time kernel set-up), and stops at the first size whose best CPU time
    per image is no better than the previous size's; from then on every call is split into
    pieces of the best size. Calls too small for the size being tried run in pieces of the
    best size so far. The pieces of one call never leave a single image alone (a batch of
    one may round differently, see ``engine.NoSingleBatch``).

    What this changes is only how a batch is split: in eval mode a row's logits do not depend
    on the other rows, so the logits are the same for any choice (on CPU, for pieces of at
    least 2 images: tests/test_shard_pointwise.py); the choice depends on the timings, hence
    on the machine's load, and never on the results. Timings are the process's CPU time
    (``time.process_time``: the intra-op threads included), so other processes' load
    inflates them less than wall time.
    """

    #: calls per candidate size: the first is discarded, the best of the others kept
    CALLS = 3
    #: the smallest candidate size
    SMALLEST = 32
    #: :meth:`run_chosen` splits calls only into pieces whose forward takes at least this
    PIECE_SECONDS = 0.01

    def __init__(self, cap: int):
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        sizes, size = [], self.SMALLEST
        while size < cap:
            sizes.append(size)
            size *= 2
        sizes.append(cap)
        self.sizes: list[int] = sizes
        self.timings: dict[int, list[float]] = {}
        #: the size every call is split at, once chosen (None while trying)
        self.best: int | None = sizes[0] if len(sizes) == 1 else None
        self._trying = 0  # index into sizes of the size being tried
        self.clock: Callable[[], float] = time.process_time

    def _size(self, left: int, cap: int | None) -> int:
        """The size of the next piece of a call with ``left`` images still to run: the chosen
        size; while trying, the size being tried when the call has that many images left,
        else the best size so far (the one before it), else all that is left."""
        if self.best is not None:
            size = self.best
        elif left >= self.sizes[self._trying]:
            size = self.sizes[self._trying]
        elif self._trying > 0:
            size = self.sizes[self._trying - 1]
        else:
            size = left
        return size if cap is None else max(1, min(size, cap))

    def _record(self, size: int, seconds_per_image: float) -> None:
        seen = self.timings.setdefault(size, [])
        seen.append(seconds_per_image)
        if len(seen) < self.CALLS:
            return
        if self._trying > 0:
            before = self.sizes[self._trying - 1]
            if self.seconds_per_image(size) >= self.seconds_per_image(before):
                self.best = before
                return
        self._trying += 1
        if self._trying == len(self.sizes):
            self.best = size

    def run_chosen(self, fn: Callable[[torch.Tensor], torch.Tensor],
                   x: torch.Tensor) -> torch.Tensor:
        """``fn`` on ``x`` in pieces of the chosen size (as :meth:`run` splits them) once it
        is chosen and a piece's forward takes at least :data:`PIECE_SECONDS`, else in one
        call; times nothing. This serves calls the sizer cannot time whole, such as gradient
        passes (their backward runs later): the cache effects a size was chosen for apply to
        the backward as well, and the cost each extra call adds (forward and backward, some
        tens of microseconds) is then at most ~1% of the piece's work. Shorter pieces (the
        small digits CNN: under a millisecond) would pay it on every call, for too little."""
        best = self.best
        if best is None or x.shape[0] <= 2 or best * self.seconds_per_image(best) < \
                self.PIECE_SECONDS:
            return fn(x)
        return self.run(fn, x, None)

    def seconds_per_image(self, size: int) -> float:
        """The best CPU time per image measured at ``size`` (0 when not measured)."""
        seen = self.timings.get(size, [])[1:]
        return min(seen) if seen else 0.0

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            cap: int | None) -> torch.Tensor:
        """``fn`` on ``x`` in consecutive pieces of the current size (never one image alone
        unless ``x`` is one image), concatenated."""
        n = x.shape[0]
        outs, start = [], 0
        while start < n:
            size = self._size(n - start, cap)
            k = min(size, n - start)
            if n - start - k == 1 and k > 2:
                k -= 1  # leave 2, not 1, for the last piece
            trying = self.best is None and k == size == self.sizes[self._trying]
            t = self.clock() if trying else 0.0
            outs.append(fn(x[start:start + k]))
            if trying:
                self._record(size, (self.clock() - t) / k)
            start += k
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class _AttackView(nn.Module):
    _fn: Callable[[torch.Tensor], torch.Tensor]  # a plain attribute, not a submodule
    #: ``split(fn, x)``: ``fn`` on ``x`` in the calls it chooses
    #: (``CpuBatchSizer.run_chosen``); None: one call
    _split: Callable | None

    def __init__(self, fn, device: torch.device, split: Callable | None = None):
        super().__init__()
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_split", split)
        self._device_anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._split is not None:
            return self._split(self._fn, x)
        return self._fn(x)

    def numpy_forward(self) -> NumpyForward | None:
        """The wrapped forward's numpy form (:func:`numpy_forward`), on a CPU view only."""
        return numpy_forward(self._fn) if self._device_anchor.device.type == "cpu" else None


#: A forward in numpy: a float32 array (N, …) on the host → its logits, a float array (N, C).
NumpyForward = Callable[[np.ndarray], np.ndarray]


def numpy_forward(fn) -> NumpyForward | None:
    """The numpy form of the forward ``fn``, or None when it has none.

    An object declares one with a method ``numpy_forward()`` returning a callable that maps a
    float32 array ``a`` (N, …) to the same logits as ``fn(torch.from_numpy(a))``, as an
    array, without torch operations (a black-box model's forward, and the wrappers that only
    transform its inputs: the attack views, the per-feature decoding). Anything that does
    not declare it — a wrapper that counts, seeds or splits calls, a PyTorch module — has
    none, so its callers keep the tensor path and the wrapper keeps seeing every call. The
    Square attack's loop on the CPU asks its model once per run (see
    :meth:`robust_cert.metrics.square.FullSquare._numpy_query`)."""
    get: Callable[[], NumpyForward | None] | None = getattr(fn, "numpy_forward", None)
    return get() if callable(get) else None


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
