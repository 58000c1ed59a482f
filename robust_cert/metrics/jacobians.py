"""Per-sample input Jacobians of a batch, from one forward pass and C batched
vector-Jacobian products (``torch.autograd.grad(..., is_grads_batched=True)``).

Row c of sample p is ∂f_c(x_p)/∂x_p: exact when the samples of a batch do not interact, as in
eval mode (BatchNorm on its running statistics), which every model under certification is in.
The C products are vmapped by autograd, so one call back-propagates C × P images at once;
callers cap P (``piece``). This is what ``torch.func.jacrev`` of x ↦ Σ_p f(x_p) computes,
without ``torch.func``'s first-use import of ``torch._dynamo`` (~35 MB of memory, ~1.5 s).
"""

from __future__ import annotations

import torch


def _batched_rows(out: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """(C, *wrt.shape): the gradient of Σ_p out[p, c] with respect to ``wrt``, for every c."""
    c = out.shape[1]
    eye = torch.eye(c, dtype=out.dtype, device=out.device)
    (rows,) = torch.autograd.grad(out, wrt, grad_outputs=eye[:, None, :].expand(c, *out.shape),
                                  is_grads_batched=True)
    return rows


def logits_and_jacobian(fn, x: torch.Tensor,
                        piece: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (P, C) and input Jacobians (P, C, d) of a batch (d: the flattened input).

    ``piece`` caps P per call (the batch is cut into consecutive pieces); the result is the
    same up to float rounding.
    """
    x = x.detach()
    if piece is not None and x.shape[0] > piece:
        parts = [logits_and_jacobian(fn, x[s:s + piece]) for s in range(0, x.shape[0], piece)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x = x.requires_grad_(True)
    with torch.enable_grad():
        out = fn(x)
        rows = _batched_rows(out, x)  # (C, P, *shape)
    return out.detach(), rows.detach().flatten(2).transpose(0, 1)


def noisy_logits_and_mean_jacobian(fn, x: torch.Tensor, noise: torch.Tensor,
                                   piece: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (P·n, C) of every noisy copy x_p + noise_pk (``noise``: (P, n, *shape)) and,
    per point, the mean over k of the copies' input Jacobians (P, C, d).

    The mean is the Jacobian of x_p ↦ mean_k f(x_p + noise_pk) (d(x + ε)/dx = I), so it is
    back-propagated directly and the P·n per-copy Jacobians are never stored: memory
    P·C·d for the result instead of P·n·C·d. ``piece`` caps the points per call (each
    call back-propagates C × piece × n images at once); the result is the same up to
    float rounding.
    """
    x = x.detach()
    p, n = noise.shape[:2]
    if piece is not None and p > piece:
        parts = [noisy_logits_and_mean_jacobian(fn, x[s:s + piece], noise[s:s + piece])
                 for s in range(0, p, piece)]
        return torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
    x = x.requires_grad_(True)
    with torch.enable_grad():
        out = fn((x[:, None] + noise).flatten(0, 1))
        rows = _batched_rows(out.view(p, n, -1).mean(1), x)  # (C, P, *shape)
    return out.detach(), rows.detach().flatten(2).transpose(0, 1)
