"""Per-sample input Jacobians of a batch, from one forward pass and batched vector-Jacobian
products (``torch.autograd.grad(..., is_grads_batched=True)``).

Row c of sample p is ∂f_c(x_p)/∂x_p: exact when the samples of a batch do not interact, as in
eval mode (BatchNorm on its running statistics), which every model under certification is in.
The class rows' products are vmapped by autograd, so a call back-propagates (class rows) ×
(images) at once; ``budget`` bounds that product: at most ``budget`` image-backward passes per
autograd call (points, noisy copies and class rows are split to fit; the result is the same
up to float rounding). This is what ``torch.func.jacrev`` of x ↦ Σ_p f(x_p) computes, without
``torch.func``'s first-use import of ``torch._dynamo`` (~35 MB of memory, ~1.5 s).
A class whose output does not depend on the input has a zero Jacobian row.

On a CPU (``batched`` False, the default for inputs on the CPU) the class rows are C plain
backward passes through the one forward graph instead: the vmapped product runs the same
kernels on a C-times larger batch, past the caches, and costs more per row (ResNet-18 at
width 16, one thread: about 1.35× per row, forward included); the rows are the same, bit
for bit on the models tested (tests/test_analytical.py). The pieces are those of the vmapped
product (the same forward passes, so the same logits), each of whose C rows is then one
plain backward pass: ``budget`` still bounds class rows × images per forward graph.
"""

from __future__ import annotations

import torch


def split(budget: int | None, classes: int, images: int) -> tuple[int | None, int]:
    """(class rows per call, images per call) such that their product is at most ``budget``,
    for ``classes`` rows and ``images`` images in all; budget None: (None = every row,
    every image) in one call."""
    if budget is None:
        return None, images
    rows = max(1, min(classes, budget))
    return rows, max(1, min(images, budget // rows))


def _rows(out: torch.Tensor, wrt: torch.Tensor, per_call: int,
          batched: bool = True) -> torch.Tensor:
    """(C, *wrt.shape): the gradient of Σ_p out[p, c] with respect to ``wrt``, for every class
    c, ``per_call`` classes per backward call (the graph is kept between calls); not
    ``batched``: one plain backward pass per class."""
    c = out.shape[1]
    if not out.requires_grad:  # the output does not depend on anything differentiable
        return torch.zeros((c, *wrt.shape), dtype=wrt.dtype, device=wrt.device)
    eye = torch.eye(c, dtype=out.dtype, device=out.device)
    if not batched:
        rows = []
        for k in range(c):
            (g,) = torch.autograd.grad(out, wrt, grad_outputs=eye[k].expand(out.shape)
                                       .contiguous(), allow_unused=True, retain_graph=k + 1 < c)
            rows.append(torch.zeros_like(wrt) if g is None else g)
        return torch.stack(rows)
    parts = []
    for s in range(0, c, per_call):
        k = min(per_call, c - s)
        grad_outputs = eye[s:s + k, None, :].expand(k, *out.shape)
        (g,) = torch.autograd.grad(out, wrt, grad_outputs=grad_outputs, is_grads_batched=True,
                                   allow_unused=True, retain_graph=s + k < c)
        parts.append(g if g is not None else
                     torch.zeros((k, *wrt.shape), dtype=wrt.dtype, device=wrt.device))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def logits_and_jacobian(fn, x: torch.Tensor, budget: int | None = None,
                        classes: int | None = None,
                        batched: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (P, C) and input Jacobians (P, C, d) of a batch (d: the flattened input), with at
    most ``budget`` image-backward passes per autograd call (``classes``: C, needed to plan
    the split when a budget is given); ``batched`` (default: unless ``x`` is on the CPU):
    vmapped class rows, else plain backward passes."""
    x = x.detach()
    batched = x.device.type != "cpu" if batched is None else batched
    rows, piece = split(budget, classes or 1, x.shape[0])
    if x.shape[0] > piece:
        parts = [logits_and_jacobian(fn, x[s:s + piece], budget, classes, batched)
                 for s in range(0, x.shape[0], piece)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x = x.requires_grad_(True)
    with torch.enable_grad():
        out = fn(x)
        jac = _rows(out, x, rows or out.shape[1], batched)  # (C, P, *shape)
    return out.detach(), jac.detach().flatten(2).transpose(0, 1)


def noisy_logits_and_mean_jacobian(fn, x: torch.Tensor, noise: torch.Tensor,
                                   budget: int | None = None, classes: int | None = None,
                                   batched: bool | None = None,
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (P·n, C) of every noisy copy x_p + noise_pk (``noise``: (P, n, *shape)), in that
    order, and per point the mean over k of the copies' input Jacobians (P, C, d).

    The mean is the Jacobian of x_p ↦ (1/n) Σ_k f(x_p + noise_pk) (d(x + ε)/dx = I), so it is
    back-propagated directly and the P·n per-copy Jacobians are never stored: memory P·C·d
    for the result instead of P·n·C·d. At most ``budget`` image-backward passes per autograd
    call: points are split, and when one point's n copies times the class rows exceed the
    budget, its copies are split too and their Jacobians summed. ``batched`` as in
    :func:`logits_and_jacobian`.
    """
    x = x.detach()
    batched = x.device.type != "cpu" if batched is None else batched
    p, n = noise.shape[:2]
    rows, images = split(budget, classes or 1, p * n)
    if images >= n:
        points, copies = images // n, n
    else:
        points, copies = 1, images
    if points < p:
        parts = [noisy_logits_and_mean_jacobian(fn, x[s:s + points], noise[s:s + points],
                                                budget, classes, batched)
                 for s in range(0, p, points)]
        return torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
    logits, total = [], None
    x = x.requires_grad_(True)
    for s in range(0, n, copies):
        chunk = noise[:, s:s + copies]
        k = chunk.shape[1]
        with torch.enable_grad():
            out = fn((x[:, None] + chunk).flatten(0, 1))
            # the chunk's share of the mean: Σ_{k in chunk} f(x + ε_k) / n
            share = out.view(p, k, -1).sum(1) / n
            jac = _rows(share, x, rows or out.shape[1], batched)  # (C, P, *shape)
        logits.append(out.detach().view(p, k, -1))
        total = jac.detach() if total is None else total + jac.detach()
    out = torch.cat(logits, dim=1).flatten(0, 1)
    assert total is not None  # n >= 1 copies: the loop ran
    return out, total.flatten(2).transpose(0, 1)
