"""PyTorch models: a live ``nn.Module`` or a torch.export program, wrapped as a Classifier."""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from robust_cert.errors import ModelError
from robust_cert.models.base import Classifier


def state_sha256(module: nn.Module) -> str:
    """SHA-256 over the module's state: every entry of its ``state_dict`` (parameters,
    persistent buffers, extra state) and every non-persistent buffer, by name, dtype, shape
    and raw bytes.

    Tensors of every dtype and shape are hashed, including 0-dim ones (BatchNorm's int64
    ``num_batches_tracked``), booleans, bfloat16, complex, quantized (integer representation,
    plus scale and zero point) and sparse ones (dense form). Two modules with the same state
    hash the same whatever object they live in; retraining changes the hash. Tensors are
    hashed in name order from their CPU, contiguous form; the bytes of a tensor that other
    versions already hashed (non-empty, at least 1-dim, dense) are unchanged.
    """
    entries = dict(module.state_dict())
    for name, buf in module.named_buffers():
        entries.setdefault(name, buf)  # non-persistent buffers are not in the state_dict
    h = hashlib.sha256()
    for name, t in sorted(entries.items()):
        if not isinstance(t, torch.Tensor):  # get_extra_state(): any picklable object
            h.update(f"{name}|extra|{t!r}\n".encode())
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (any dtype, any shape, dense or not, any device)."""
    t = t.detach()
    if t.is_sparse or t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        scale = (t.q_per_channel_scales() if t.qscheme() in
                 (torch.per_channel_affine, torch.per_channel_symmetric) else t.q_scale())
        head = repr(torch.as_tensor(scale).tolist()).encode()
        return head + _tensor_bytes(t.int_repr())
    t = t.to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


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
        from robust_cert.models.diagnose import does_not_fit, out_of_memory

        if out_of_memory(exc):
            raise ModelError(does_not_fit("the first forward pass", exc, device,
                                          forward)) from exc
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
    except Exception as exc:
        from robust_cert.models.diagnose import does_not_fit, out_of_memory

        if not out_of_memory(exc):
            raise
        raise ModelError(does_not_fit(f"moving the model to {device}", exc, device,
                                      module)) from exc
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


@contextlib.contextmanager
def preserved_modes(module):
    """Restore the training flag of ``module`` and every submodule on exit (certification
    puts the model in eval mode; the caller's model leaves in the mode it came in), and its
    device when all its parameters and buffers were on one device (certification moves the
    model to the evaluation device). Anything that is not an ``nn.Module`` passes through."""
    if not isinstance(module, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        if len(devices) == 1:
            (device,) = devices
            now = {t.device for t in (*module.parameters(), *module.buffers())}
            if now != devices:
                with contextlib.suppress(NotImplementedError):  # torch.export GraphModule
                    module.to(device)
