"""Float rounding helpers of the bounds: unit roundoffs, γ_n, the strict float32 context, and
the safety factors that cover the float evaluation of the bounds themselves.

Everything here is an upper bound on a rounding effect (standard forward error analysis,
Higham ch. 3): the unit roundoff u of the arithmetic an op's products may run in, γ_n of a sum
of n rounded operations, and a factor for the float evaluation of the error bounds.
"""

from __future__ import annotations

import contextlib
import math

import torch

from robust_cert.bounds.base import NotBoundable

#: Relative safety factor on every operator norm (float64 rounding of SVD, FFT and sums).
NORM_SAFETY = 1.0 + 1e-9
#: Floor of the factor on the error bounds for their own float evaluation; the factor used is
#: the larger of this and :func:`evaluation_safety` of the steps actually walked.
ERROR_BOUND_SAFETY = 1.01
#: Rounded operations per element that the error-bound evaluation of one step adds beyond the
#: op's own sums (magnitudes |ẑ| + 2e + L·r + e_ball, the γ·(…) products, the additions of
#: the local term, the cast of the radius and of the float64 norm, the norm cap).
_BOUND_OPS_PER_STEP = 10

#: u of each ``torch.get_float32_matmul_precision()`` (float32 products on CUDA, and on CPUs
#: whose oneDNN honours it): IEEE float32, TF32 (10-bit mantissa), bfloat16 (7-bit mantissa).
MATMUL_PRECISION_U = {"highest": 2.0 ** -24, "high": 2.0 ** -11, "medium": 2.0 ** -8}


def matmul_precision_u() -> float:
    """u of float32 matrix products under the current ``torch.set_float32_matmul_precision``:
    "highest" 2^-24, "high" (TF32) 2^-11, "medium" (bfloat16) 2^-8; an unknown setting is
    taken as the coarsest (2^-8); cuBLAS's TF32 switch, when on, means at least 2^-11."""
    u = MATMUL_PRECISION_U.get(str(torch.get_float32_matmul_precision()), 2.0 ** -8)
    if torch.backends.cuda.matmul.allow_tf32:
        u = max(u, 2.0 ** -11)
    return u


def unit_roundoff(dtype: torch.dtype, device: torch.device, kind: str = "") -> float:
    """u of the arithmetic the products of ``kind`` ("matmul", "conv") run in: 2^-53 for
    float64, 2^-11 for float16, 2^-8 for bfloat16; for float32 the coarsest of what may run:
    2^-24, the float32 matmul precision (:func:`matmul_precision_u`; cuBLAS, and the im2col
    convolution without cuDNN) and, for convolutions on CUDA, TF32 (2^-11) when cuDNN may use
    it. Elementwise ops ("") are IEEE float32."""
    if dtype == torch.float64:
        return 2.0 ** -53
    if dtype == torch.float16:
        return 2.0 ** -11
    if dtype == torch.bfloat16:
        return 2.0 ** -8
    u = 2.0 ** -24
    if kind in ("matmul", "conv"):
        u = max(u, matmul_precision_u())
    if kind == "conv" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        u = max(u, 2.0 ** -11)
    return u


@contextlib.contextmanager
def strict_float32():
    """Evaluate inside the error model: cuDNN off (no Winograd/FFT convolutions: every output
    is a sum of rounded products), float32 matrix products in IEEE float32 (no TF32/bf16).
    Restores the previous settings on exit."""
    prec = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with torch.backends.cudnn.flags(enabled=False, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(prec)


def evaluation_safety(steps) -> float:
    """Factor covering the float evaluation of the error bounds themselves over ``steps``.

    Each step computes its bound from its inputs' bounds by sums of k non-negative terms
    (k = its fan-in, or its number of inputs, plus :data:`_BOUND_OPS_PER_STEP`) in
    arithmetic of unit roundoff u, so the computed value is at least the exact one times
    (1 − γ_k). The maps are monotone and of the form A·e + b with A, b ≥ 0 (or a minimum of
    such), so relative shortfalls compound at most multiplicatively: the exact bound is at
    most the computed one times ∏ 1/(1 − γ_k) over the steps walked."""
    log_f = 0.0
    for step in steps:
        k = (step.fan_in if step.kind == "affine" else max(1, len(step.inputs)))
        g = gamma(k + _BOUND_OPS_PER_STEP, max(step.u, 2.0 ** -24))
        log_f -= math.log1p(-g)
    return math.exp(log_f) * (1 + 1e-12)


def gamma(n: int, u: float) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of a sum of n rounded operations."""
    nu = n * u
    if nu >= 0.5:
        raise NotBoundable(f"cannot bound the rounding of a sum of {n} terms at u = {u:g}")
    return nu / (1 - nu)
