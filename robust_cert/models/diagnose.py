"""Turn an exception raised while a metric ran into one line that names what failed.

A user's model may raise on real data (a wrong reshape, a dtype mismatch), or only on large
batches (memory, a hard-coded batch size). The traceback then ends inside one of the model's
layers: :func:`failure_message` finds the innermost layer of the model on the traceback, with
the shape of the input it was given, so the message reads e.g.
``the model raised in layer 'fc' (Linear) on an input of shape (256, 64): RuntimeError: …``.
Nothing is installed on the model (no hooks): the traceback alone is read, after the fact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


def _layer_names(*models) -> dict[int, str]:
    """id(module) -> dotted name, for every submodule of the given nn.Modules."""
    names: dict[int, str] = {}
    for model in models:
        if isinstance(model, nn.Module):
            for name, sub in model.named_modules():
                names.setdefault(id(sub), name or "<top level>")
    return names


def _first_tensor_arg(frame) -> torch.Tensor | None:
    code = frame.f_code
    for var in code.co_varnames[1:code.co_argcount]:  # positional arguments after self
        value = frame.f_locals.get(var)
        if isinstance(value, torch.Tensor):
            return value
    return None


def failing_layer(exc: BaseException, *models) -> str | None:
    """``"layer 'conv2' (Conv2d) on an input of shape (N, C, H, W)"`` for the innermost
    submodule of ``models`` whose ``forward`` is on ``exc``'s traceback, or None."""
    names = _layer_names(*models)
    found = None
    tb = exc.__traceback__
    while tb is not None:
        self_obj = tb.tb_frame.f_locals.get("self")
        if isinstance(self_obj, nn.Module) and id(self_obj) in names:
            found = (self_obj, tb.tb_frame)
        tb = tb.tb_next
    if found is None:
        return None
    module, frame = found
    where = f"layer '{names[id(module)]}' ({type(module).__name__})"
    x = _first_tensor_arg(frame)
    if x is not None:
        where += f" on an input of shape {tuple(x.shape)}"
    return where


def failure_message(metric: str, exc: BaseException, models, batch_size: int) -> str:
    """One line for an unexpected exception raised while ``metric`` ran on ``models``."""
    what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    layer = failing_layer(exc, *models)
    if layer is not None:
        return (f"{metric}: the model raised in {layer}: {what} (batches of up to {batch_size} "
                "points; if it fails only on large batches, lower batch_size in the policy)")
    return (f"{metric} failed: {what} (batches of up to {batch_size} points; run with -v for "
            "the traceback)")


def model_parts(*classifiers) -> tuple:
    """The callables (nn.Modules where PyTorch) behind Classifiers, for :func:`failing_layer`."""
    return tuple(part for clf in classifiers if clf is not None
                 for part in (clf.forward, clf.gradient_forward) if part is not None)


@contextmanager
def model_failures(stage: str, models, batch_size: int) -> Iterator[None]:
    """Re-raise any unexpected exception inside the block as one-line ModelError for
    ``stage`` (a metric's name, or e.g. "determinism check"); robust_cert's own errors and
    KeyboardInterrupt pass unchanged. The traceback is logged at debug level (``-v``)."""
    from robust_cert.errors import ModelError, RobustCertError

    try:
        yield
    except RobustCertError:
        raise
    except Exception as exc:
        log.debug("%s failed", stage, exc_info=True)
        raise ModelError(failure_message(stage, exc, models, batch_size)) from exc


def out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure: torch's OutOfMemoryError (CUDA), or the CPU
    allocator's RuntimeError."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError)
                                    and "can't allocate memory" in str(exc))


def _mib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def does_not_fit(stage: str, exc: BaseException, device: torch.device, *models) -> str:
    """One line for a model that runs out of memory on ``device`` at batch size 1 (or while
    being placed there): the allocation that failed, the model's own size (parameters and
    buffers) and, on CUDA, the memory free on the device."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    size = sum(t.numel() * t.element_size() for m in models if isinstance(m, nn.Module)
               for t in (*m.parameters(), *m.buffers()))
    need = f"; its parameters and buffers alone take {_mib(size)}" if size else ""
    free = ""
    if device.type == "cuda":
        with_free, total = torch.cuda.mem_get_info(device)
        free = f"; {_mib(with_free)} of {_mib(total)} are free on {device}"
    return (f"{stage}: the model does not fit in the memory of {device} even at batch size 1 "
            f"({first}{need}{free}): use a device with more memory, free it from other "
            "processes, or certify on cpu")
