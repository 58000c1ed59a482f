"""Maximum safe radius as a per-point sandwich (Xu, Ruan, Huang; Family F).

One algorithm: for each point and norm (L2, L∞, L1), bracket the maximum safe radius (MSR) of a
safety property — the largest ε such that the property holds on the whole ε-ball:

* **lower bound** (sound, in floating point), the larger of two:
  the *Lipschitz radius* min_j (ĥ_j(x) − rounding) / L_j, where the property holds while
  every margin h_j = a_j·f(x) − b_j stays positive, L_j is a true Lipschitz upper bound of
  h_j (op-by-op operator norms along the traced graph, residual additions and pooling
  included: :mod:`robust_cert.bounds`) and "rounding" bounds the float error of the computed
  logits at x and anywhere in the ball (:func:`_certified_radius`); and the *local radius*:
  the largest radius, searched on [Lipschitz radius, witness], at which sound local
  lower bounds of all margins over the ball (CROWN, CROWN-IBP or IBP:
  :func:`robust_cert.bounds.local_radius`, float32 rounding included) stay positive;
* **upper bound** (a witness): the distance of the closest violating input found, by a
  minimal-norm search along the decision boundary (FMN-style, untargeted and towards the
  runner-up classes) and by bisection over ε with a batched projected-gradient search;
  every witness is re-evaluated in float32 inside the input box and really violates the
  property;
* **estimate** (CLEVER-style): h_j(x) / L̂_j with L̂_j the location of a reverse-Weibull fit
  to the maxima of the dual gradient norms over batches of points sampled in a ball (as IBM
  ART's ``clever_u``), capped at the sampling radius.

Known answers for a linear binary model f = (0, w·x + b), g = w·x + b: MSR₂ = |g|/‖w‖₂,
MSR∞ = |g|/‖w‖₁, MSR₁ = |g|/‖w‖∞; the uncertainty radius (top-1 probability ≥ τ) is
(|g| − logit τ)/‖w‖_dual.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from robust_cert.bounds import (
    NORM_SAFETY,
    LipschitzBound,
    NotBoundable,
    lipschitz_bound,
    local_bounds,
    local_radius,
    strict_float32,
)
from robust_cert.bounds.local import local_analysis
from robust_cert.data import EvalSet
from robust_cert.errors import ModelError, PolicyError
from robust_cert.loaders import load_model
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    batches,
    value_list,
)
from robust_cert.models.base import Classifier

__all__ = ["LipschitzBound", "NotBoundable", "SafeRadius", "SafeRadiusConfig",
           "lipschitz_bound", "reverse_weibull_location"]

log = logging.getLogger(__name__)

Norm = Literal["l2", "linf", "l1"]
NORMS = ("l2", "linf", "l1")


if TYPE_CHECKING:  # the type value_list() builds (a call is no type expression)
    Radii = list[float]
else:
    Radii = value_list("radii", low=0)


class SafeRadiusConfig(MetricConfig):
    """Parameters of :class:`SafeRadius` (radii in the data's own units)."""

    property: Literal["adversarial", "uncertainty", "reachability", "invariant"] = "adversarial"
    norms: list[Norm] = Field(default=["l2", "linf"], min_length=1)
    radii: Radii = Field(default_factory=list,
                               description="radii r for the certified fraction (lower > r)")
    tau: float = Field(default=0.5, gt=0, lt=1, description="uncertainty: top-1 prob. ≥ τ")
    kappa: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                description="uncertainty: KL(uniform ‖ p(x)) ≥ κ instead of "
                                "top-1 ≥ τ (the seed's measure)")
    output: int = Field(default=0, ge=0, description="reachability: which logit")
    outputs: list[int] | None = Field(default=None, description="reachability: the outputs "
                                      "whose reachable range is reported (default: all)")
    low: float | None = Field(default=None, description="reachability: lower end of the range")
    high: float | None = Field(default=None, description="reachability: upper end")
    max_radius: float | None = Field(default=None, gt=0,
                                     description="bisection upper end; default: the box")
    bisection_steps: int = Field(default=12, ge=1, le=60)
    attack_steps: int = Field(default=20, ge=1, le=10_000)
    witness_steps: int = Field(default=50, ge=0, le=10_000, description="steps of each "
                               "minimal-norm boundary search of the witness (0: off, "
                               "bisection only)")
    witness_targets: int = Field(default=3, ge=0, le=1000, description="adversarial: besides "
                                 "the untargeted boundary search, one search towards each of "
                                 "the classes ranked 2nd, 3rd, … at x (this many)")
    clever_batches: int = Field(default=10, ge=2, le=10_000)
    clever_samples: int = Field(default=100, ge=1, le=100_000,
                                description="samples per CLEVER batch")
    clever_radius: float = Field(default=2.0, gt=0, description="CLEVER sampling ball radius")
    power_iterations: int = Field(default=100, ge=1, le=100_000)
    estimate_steps: int = Field(default=20, ge=0, le=10_000, description="pattern-search "
                                "iterations of the derivative-free estimate (0: off)")
    estimate_directions: int = Field(default=16, ge=1, le=4096, description="poll "
                                     "directions per iteration (each tried ±)")
    local_bound: Literal["crown", "crown-ibp", "ibp", "off"] = Field(
        default="crown-ibp", description="local bound tried beyond the Lipschitz radius: "
        "crown-ibp (default; digits CNN L∞ median lower/upper 0.30 vs 0.055 Lipschitz-only, "
        "about 1.2× the run time) or crown (tightest: 0.45 L∞ / 0.27 L2, about 10× the run "
        "time), ibp, off")
    alpha_steps: int = Field(default=0, ge=0, le=1000, description="alpha-CROWN with crown "
                             "or crown-ibp: optimisation steps of the relaxations' free "
                             "parameters (ReLU lower slopes, max-pooling weights) per bound "
                             "computation; never looser than without (0: off; digits CNN, "
                             "20 steps: crown L∞ 0.45 → 0.50, L2 0.27 → 0.30, crown-ibp L∞ "
                             "0.30 → 0.34, L2 unchanged, at about 5× and 15× the run time)")
    alpha_intermediate: int = Field(default=0, ge=0, le=1000, description="with crown: "
                                    "alpha-CROWN steps for each intermediate node's bounds "
                                    "too (their own parameters per element; 0: off; costly: "
                                    "see docs/adversarial-suite.md)")
    bound_steps: int = Field(default=12, ge=0, le=60,
                             description="relaxations fitted per point (at most): each a "
                             "bound computation at one trial radius")
    bound_rtol: float = Field(default=0.02, ge=0, lt=1, description="a point's bisection stops "
                              "once its bracket is within this fraction of its upper end")
    max_bound_memory: int = Field(default=1 << 30, ge=1 << 20,
                                  description="memory budget of one local bound (bytes)")
    within_box: bool = Field(default=False, description="certify the ball ∩ the input box "
                             "(tighter; the claim then covers only inputs in the box)")
    oracle: str | None = Field(default=None, min_length=1, description="invariant: the "
                               "reference model O (a model reference: .onnx path, models:/ URI, "
                               "or any reference a registered loader accepts)")

    @field_validator("norms")
    @classmethod
    def _unique(cls, v):
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _range(self):
        if self.property == "invariant" and self.oracle is None:
            raise ValueError("property invariant needs an oracle (oracle: a model reference, "
                             "or --oracle on the CLI): invariance is always with respect to O")
        if self.kappa is not None and self.property != "uncertainty":
            raise ValueError(f"kappa is for property uncertainty, not {self.property}")
        if self.oracle is not None and self.property != "invariant":
            raise ValueError(f"oracle is for property invariant, not {self.property}")
        if self.property == "reachability":
            if self.low is None and self.high is None:
                raise ValueError("reachability needs low and/or high (the allowed output range)")
            if self.low is not None and self.high is not None and not self.low < self.high:
                raise ValueError(f"reachability range [{self.low}, {self.high}] is empty")
        return self


# --------------------------------------------------------------------------- CLEVER


def reverse_weibull_location(maxima: np.ndarray) -> float:
    """Upper end of a reverse-Weibull law fitted to batch maxima of gradient norms (as ART:
    ``weibull_min.fit(-maxima, 1.0, optimizer=fmin)``, location negated).

    Constant maxima (a linear margin) have no spread to fit: their common value is returned.
    When the maxima show no bounded tail the likelihood runs away (shape and location grow
    without limit, ART then returns absurd scores); an end beyond max + 2·range of the maxima
    is treated as such a runaway fit and the largest observed norm is returned instead."""
    import scipy.optimize
    from scipy.stats import weibull_min

    top = float(np.max(maxima))
    if not np.isfinite(top) or np.ptp(maxima) <= 1e-9 * max(top, 1e-30):
        return top
    _, loc, _ = weibull_min.fit(-np.asarray(maxima, dtype=np.float64), 1.0,
                                optimizer=scipy.optimize.fmin)
    loc = -float(loc)  # pyright: ignore[reportArgumentType]  (scipy's fit: inferred | None)
    plausible = np.isfinite(loc) and top <= loc <= top + 2 * float(np.ptp(maxima))
    return loc if plausible else top


def clever_score(maxima: np.ndarray, h: np.ndarray, cap: float) -> float:
    """min(cap, min_j max(h_j, 0) / loc_j) over the margins j of one point, with loc_j =
    :func:`reverse_weibull_location` of ``maxima[j]`` (its batch maxima of ‖∇h_j‖), +inf for a
    margin whose location is not positive — fitting only the margins that can attain it.

    Exactly the value of fitting every margin: loc_j is top_j = max(maxima[j]) or a fit in
    [top_j, top_j + 2·ptp_j], so h_j⁺/loc_j ≥ h_j⁺/(top_j + 2·ptp_j) (IEEE division is
    monotone in the divisor, and the end is computed as :func:`reverse_weibull_location`
    computes it). Margins are visited by increasing lower end and the rest skipped once it
    reaches the running minimum; a top that is not finite and positive is always evaluated.
    The fits (one scipy maximum-likelihood fit each, ~0.08 s) are most of CLEVER's time on
    small models.
    """
    lower = np.empty(len(h))
    for j, row in enumerate(maxima):
        top = float(np.max(row))
        if np.isfinite(top) and top > 0:
            lower[j] = max(float(h[j]), 0.0) / (top + 2 * float(np.ptp(row)))
        else:
            lower[j] = -math.inf
    best = cap
    for j in np.argsort(lower, kind="stable"):
        if lower[j] >= best:
            break
        loc = reverse_weibull_location(maxima[j])
        val = max(float(h[j]), 0.0) / loc if loc > 0 else math.inf
        best = min(best, val)
    return best


def _ball_samples(x: torch.Tensor, count: int, radius: float, norm: str,
                  g: torch.Generator) -> torch.Tensor:
    """``count`` points uniform in the ``norm`` ball of ``radius`` around each x: (P, count, d)."""
    p, d = x.shape
    if norm == "linf":
        delta = (torch.rand((p, count, d), generator=g, dtype=torch.float64) * 2 - 1) * radius
    elif norm == "l1":  # d + 1 exponentials, normalised: uniform in the unit L1 ball
        e = -torch.log1p(-torch.rand((p, count, d + 1), generator=g, dtype=torch.float64))
        signs = torch.randint(0, 2, (p, count, d), generator=g).double() * 2 - 1
        delta = signs * e[..., :d] / e.sum(-1, keepdim=True) * radius
    else:
        dirs = torch.randn((p, count, d), generator=g, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        r = torch.rand((p, count, 1), generator=g, dtype=torch.float64) ** (1.0 / d) * radius
        delta = dirs * r
    return x[:, None, :] + delta.to(x.device, x.dtype)


# --------------------------------------------------------------------------- metric


class SafeRadius(Metric[SafeRadiusConfig]):
    """Per-point sandwich of the maximum safe radius for one safety property, in L2, L∞, L1.

    Properties (``property``):
        adversarial: the predicted label t stays the prediction; margins f_t − f_j (j ≠ t).
        uncertainty: the top-1 probability stays ≥ τ; sufficient margins f_t − f_j − κ with
            κ = log((C−1)τ/(1−τ)) (exact for two classes: κ = logit τ); the witness search
            looks for a point whose top-1 probability is below τ.
        reachability: logit ``output`` stays in [low, high]; margins f_k − low and high − f_k.

    Per point (``per_point``, for each norm n): ``lower@n`` (certified: every input strictly
    inside the ball of that radius satisfies the property, both for the exact network with
    its float32 weights and for its float32 evaluation; never above the exact MSR. Lipschitz
    constants are rigorous upper bounds: exact SVD for Linear layers, a Fourier (circular
    embedding) bound for convolutions, exact L∞ norms; the float error model is that of
    :meth:`LipschitzBound.rounding` — sums of rounded products, not Winograd/FFT kernels: the
    logits of the margins are evaluated with cuDNN off and IEEE float32 products. For a model
    with a gradient twin (ONNX) the lower bound is not applicable: it would be of the twin, not
    of the deployed graph), ``upper@n`` (the distance of
    the closest violation found: the MSR is at most this; inf when none was found within
    ``max_radius``), ``clever@n`` (the CLEVER-style estimate, a number between the two in
    practice but not guaranteed), ``lower_lipschitz@n`` (the Lipschitz radius alone),
    ``lower_local@n`` (the local radius where it certified more, else NaN) and ``bound@n``
    (which bound certified ``lower@n``: "lipschitz", "crown", "crown-ibp" or "ibp").
    ``lower@n`` is the larger of the two radii; both are sound, so is it. ``holds`` marks
    points where the property holds at x (and, for ``adversarial``, the prediction is the
    label).

    Proportions (gateable), kind **certified**: for each norm n and radius r in ``radii``,
    the fraction of points with ``holds`` and ``lower@n > r`` (an exact Clopper–Pearson
    interval over the sampling of points). If the network has a layer the bound cannot handle,
    or the model is certified through a gradient twin, the lower bound is "not applicable"
    (reason in ``diagnostics["lower_bound"]``; witnesses and CLEVER are still reported) and,
    when radii are configured, so is the result. A network with an op without a local bound
    (or above ``max_bound_memory`` for one point) is certified by the Lipschitz radius alone,
    the op named in ``diagnostics["local_bound"]`` ("lipschitz only: …"; else the method).
    ``diagnostics[n]`` also holds ``median_lower_lipschitz``, ``median_ratio`` and
    ``median_ratio_lipschitz`` (median certified lower / witnessed upper, the tightness) and
    ``certified_by`` (points per bound).

    L1 (``l1``): Lipschitz constants with the 1→1 operator norms of the layers (dual ‖·‖∞ of
    the margin rows), local bounds concretised with ‖·‖∞, witnesses by projected steps on the
    largest 5% of the gradient's coordinates with Euclidean projection onto the L1 ball, CLEVER
    samples uniform in the L1 ball.

    Args (policy ``metrics.safe_radius``): property (``adversarial``), norms (``[l2, linf]``;
    also ``l1``),
    radii (``[]``), tau (0.5), output/low/high (reachability), max_radius (the input box:
    hi − lo for L∞, (hi − lo)·√d for L2), witness_steps (50: steps of each minimal-norm
    boundary search), witness_targets (3: adversarial searches towards the runner-up
    classes), bisection_steps (12), attack_steps (20, step 2.5·ε/steps, from δ = 0),
    clever_batches (10), clever_samples (100 per batch),
    clever_radius (2.0, data units), power_iterations (100: the reported power-iteration
    estimate ``l2_lower`` of each convolution, never part of the bound), local_bound
    (``crown``; ``crown-ibp``, ``ibp`` or ``off``), alpha_steps (0: with ``crown`` or
    ``crown-ibp``, the optimisation steps of alpha-CROWN's relaxation parameters in each
    bound computation, :func:`~robust_cert.bounds.local_bounds`), alpha_intermediate (0:
    with ``crown``, alpha-CROWN's steps for the intermediate bounds too), bound_steps (12: trial
    radii of the local bound per point, at most, each one bound computation), bound_rtol
    (0.02: a point's search ends once its bracket is that close),
    max_bound_memory (1 GiB: points are bounded in chunks within it), within_box (false:
    certify the whole ball; true: the ball ∩ the input box, tighter, and then the claim covers
    inputs in the box only). Sampling is seeded from the run.

    Sharding (``shardable``): the engine runs blocks of ``batch_size`` points. The CLEVER
    samples of a batch are drawn from a generator seeded by (run seed, norm, index of the
    batch's first point in the whole set), so a block draws the same in any process and the
    result equals a one-process run with the same batch size; the witness search draws
    nothing (it starts at x, its targets are the point's own ranked classes). The Lipschitz
    bound depends on the network only: it is computed once per process and metric instance
    and reused while the module and its tensors are unchanged
    (see :class:`_BoundCache`). Proportions and per-point arrays merge exactly; :meth:`finalize`
    recomputes the summaries in ``diagnostics`` (``holds``, medians, ``no_witness``,
    ``sandwich_violations``) from the merged ``per_point``. :meth:`run` on the whole set
    (``ctx.total`` None) returns it finalized.

    Example::

        SafeRadius(SafeRadiusConfig(norms=["l2"], radii=[0.1])).run(model, data, ctx)
    """

    name = "safe_radius"
    description = ("P[property holds on the whole ball of radius r] by a sound lower bound on "
                   "the maximum safe radius (Lipschitz, and local CROWN/IBP bounds)")
    Config = SafeRadiusConfig

    #: the bound is of the network alone; medians are over all points (:meth:`finalize`)
    merge_rules = {"property": "same", "lower_bound": "same", "lipschitz": "same",
                   "local_bound": "same", "holds": "sum", "invariance": "same", "oracle": "same",
                   "ranges": "recompute",
                   **{norm: {"median_lower": "recompute", "median_upper": "recompute",
                             "median_clever": "recompute", "no_witness": "sum",
                             "median_estimate": "recompute", "most_vulnerable": "recompute",
                             "sandwich_violations": "sum", "median_lower_lipschitz": "recompute",
                             "median_ratio": "recompute", "median_ratio_lipschitz": "recompute",
                             "certified_by": "recompute"} for norm in NORMS}}

    def __init__(self, config: SafeRadiusConfig):
        super().__init__(config)
        self._bounds = _BoundCache()
        self._oracle_bounds = _BoundCache()
        #: the loaded oracle by (reference, input shape, device): loaded once per instance
        self._oracles: dict[tuple, Classifier] = {}

    # ---- validation (before anything runs)

    def check(self, model: Classifier, data: EvalSet, device: torch.device) -> None:
        """One line (PolicyError / ModelError) for: a reachability output the model lacks, a
        radius in ``radii`` wider than the input box in its norm (such a ball covers every
        input), and for ``invariant`` an oracle that cannot be loaded, has no input gradients
        or has another input shape or number of classes than the model."""
        cfg = self.config
        where = f"metrics.{self.name}"
        if cfg.property == "reachability":
            for k in [cfg.output, *(cfg.outputs or [])]:
                if not 0 <= k < model.num_classes:
                    raise PolicyError(f"{where}: output {k} does not exist: the model has "
                                      f"{model.num_classes} outputs (0..{model.num_classes - 1})")
        c = model.num_classes
        if cfg.property == "uncertainty" and cfg.kappa is None and cfg.tau <= 1 / c:
            raise PolicyError(f"{where}.tau: τ = {cfg.tau:g} is at most 1/{c}: the top-1 "
                              f"probability of {c} classes is always ≥ 1/{c}, so the property "
                              f"always holds; use τ in (1/{c}, 1)")
        lo, hi = data.input_range
        d = int(np.prod(data.input_shape))
        for nm in cfg.norms:
            width = box_diameter(lo, hi, d, nm)
            bad = [r for r in cfg.radii if r > width]
            if bad:
                raise PolicyError(f"{where}.radii: radius {bad[0]:g} is wider than the input "
                                  f"box [{lo:g}, {hi:g}]^{d} in {nm} (diameter {width:.4g}): "
                                  "such a ball covers every input; use radii in data units")
        if cfg.property == "invariant":
            self._oracle(model, data, device)

    def _oracle(self, model: Classifier, data: EvalSet, device: torch.device) -> Classifier:
        """The oracle O, loaded through the model-loader registry (once per instance) and
        checked against the model: same input shape and number of classes, input gradients
        (the witness search differentiates cat(O(x), f(x)))."""
        ref = self.config.oracle
        assert ref is not None  # the config requires it for the invariant kind
        key = (ref, tuple(data.input_shape), str(device))
        if key not in self._oracles:
            try:
                oracle = load_model(ref, input_shape=data.input_shape, device=device)
            except ModelError as exc:
                raise ModelError(f"oracle {ref}: {exc}") from None
            self._oracles[key] = oracle
        oracle = self._oracles[key]
        if (tuple(oracle.input_shape) != tuple(model.input_shape)
                or oracle.num_classes != model.num_classes):
            raise ModelError(f"oracle {ref} has input {tuple(oracle.input_shape)} and "
                             f"{oracle.num_classes} classes; the model has "
                             f"{tuple(model.input_shape)} and {model.num_classes}")
        if not oracle.differentiable:
            raise ModelError(f"oracle {ref} has no input gradients: the invariant kind "
                             "searches for invariant examples by gradients of O and f")
        return oracle

    def selectors(self):
        return [{"norm": n, "radius": r} for n in self.config.norms for r in self.config.radii]

    def cost(self, n_points: int) -> int:
        return n_points * len(self.config.norms)

    # ---- margins h_j = A_j · f - b_j (property holds while all h_j > 0)

    def _margins(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per point: A (P, m, C) and b (P, m)."""
        cfg = self.config
        p, c = logits.shape
        dt = logits.dtype
        if cfg.property == "reachability":
            rows, offs = [], []
            if cfg.low is not None:
                rows.append(F.one_hot(torch.tensor(cfg.output), c).to(dt))
                offs.append(cfg.low)
            if cfg.high is not None:
                rows.append(-F.one_hot(torch.tensor(cfg.output), c).to(dt))
                offs.append(-cfg.high)
            a = torch.stack(rows).to(logits.device).expand(p, -1, -1)
            return a, torch.tensor(offs, dtype=dt, device=logits.device).expand(p, -1)
        t = logits.argmax(1)
        eye = torch.eye(c, dtype=dt, device=logits.device)
        a = eye[t][:, None, :] - eye[None, :, :]  # (P, C, C): row j = e_t - e_j
        keep = ~F.one_hot(t, c).bool()
        a = a[keep].view(p, c - 1, c)
        kappa = 0.0
        if cfg.property == "uncertainty":
            tau = cfg.tau if cfg.kappa is None else kl_top1(cfg.kappa, c)
            kappa = math.log((c - 1) * tau / (1 - tau))
        return a, torch.full((p, c - 1), kappa, dtype=dt, device=logits.device)

    def _violated(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.property == "adversarial":
            return logits.argmax(1) != t
        if cfg.property == "invariant":  # cat(O(x), f(x)): O leaves t while f keeps it
            o, f = logits.chunk(2, dim=1)
            return (o.argmax(1) != t) & (f.argmax(1) == t)
        if cfg.property == "uncertainty":
            if cfg.kappa is not None:
                return kl_uniform(logits.double()) < cfg.kappa
            return torch.softmax(logits.double(), 1).amax(1) < cfg.tau
        f = logits[:, cfg.output]
        bad = torch.zeros_like(f, dtype=torch.bool)
        if cfg.low is not None:
            bad |= f < cfg.low
        if cfg.high is not None:
            bad |= f > cfg.high
        return bad

    def _objective(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the witness search minimises (negative when violated)."""
        cfg = self.config
        if cfg.property == "adversarial":
            other = logits.scatter(1, t[:, None], -torch.inf)
            return logits.gather(1, t[:, None])[:, 0] - other.amax(1)
        if cfg.property == "uncertainty":
            if cfg.kappa is not None:
                return kl_uniform(logits) - cfg.kappa
            return torch.log_softmax(logits, 1).amax(1) - math.log(cfg.tau)
        if cfg.property == "invariant":  # negative once O's margin and f's loss are both < 0
            o, f = logits.chunk(2, dim=1)
            return torch.maximum(_top_margin(o, t), -_top_margin(f, t))
        f = logits[:, cfg.output]
        vals = [f - cfg.low] if cfg.low is not None else []
        if cfg.high is not None:
            vals.append(cfg.high - f)
        return torch.stack(vals).amin(0)

    # ---- run

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        self.check(model, data, ctx.device)
        if cfg.property == "invariant":
            return self._run_invariant(model, data, ctx)
        fn = model.attack_module()
        bound, why = None, ""
        if model.gradient_forward is not None:
            # the twin matches the deployed graph only at the evaluation points (parity): a
            # Lipschitz/rounding bound of the twin says nothing of the graph inside the ball
            why = _TWIN_REASON
        elif isinstance(model.forward, nn.Module):
            bound, why = self._bounds.get(model.forward, data.input_shape, cfg.power_iterations)
        else:
            why = "the model is not a PyTorch module"
        local_why = ""
        if bound is None:
            local_why = "no Lipschitz bound"
        elif cfg.local_bound == "off":
            local_why = "off"
        else:
            try:
                local_analysis(bound).check(cfg.local_bound)
            except NotBoundable as exc:
                local_why = str(exc)
        n = len(data)
        lo_r, hi_r = data.input_range
        d = int(np.prod(data.input_shape))
        # device results kept per batch and copied to the host once; CLEVER's fits are on
        # the host (scipy) anyway
        holds_parts: list[torch.Tensor] = []
        dev_parts: dict[str, list[torch.Tensor]] = {
            f"{k}@{nm}": [] for nm in cfg.norms
            for k in (("lower", "upper", "lower_lipschitz", "lower_local")
                      if bound is not None else ("upper",))}
        clever = {nm: np.full(n, np.nan) for nm in cfg.norms}
        estimate = {nm: np.full(n, np.nan) for nm in cfg.norms}
        range_parts: dict[str, list[torch.Tensor]] = {}
        for sl, x, y in batches(data, ctx.batch_size, ctx.device):
            # the certified margins come from the evaluation the rounding model describes
            # (cuDNN off: no Winograd/FFT kernels; IEEE float32 products, no TF32/bf16)
            with strict_float32():
                logits = model.logits(x)
            t = logits.argmax(1)
            a, b = self._margins(logits.double())
            h = torch.einsum("pmc,pc->pm", a, logits.double()) - b
            ok = ~self._violated(logits, t)
            if cfg.property == "adversarial":
                ok &= t == y
            holds_parts.append(ok)
            first = ctx.offset + sl.start  # the batch's first point in the whole set
            for nm in cfg.norms:
                max_r = cfg.max_radius or box_diameter(lo_r, hi_r, d, nm)
                upper = self._witness(fn, x, t, nm, max_r, (lo_r, hi_r))
                dev_parts[f"upper@{nm}"].append(upper)
                if bound is not None:
                    r_lip = _certified_radius(bound, x, a, h, nm)
                    r_loc = torch.full_like(r_lip, math.nan)
                    if not local_why:
                        try:
                            r_loc = self._local_radius(bound, x, a, b.double(), h, nm, r_lip,
                                                       upper, max_r, (lo_r, hi_r))
                        except NotBoundable as exc:  # e.g. an op setting CROWN refuses
                            local_why = str(exc)
                    dev_parts[f"lower_lipschitz@{nm}"].append(r_lip)
                    dev_parts[f"lower_local@{nm}"].append(r_loc)
                g = ctx.global_generator(f"{self.name}/clever/{nm}/{first}")
                clever[nm][sl] = self.clever(fn, x, nm, g, (lo_r, hi_r))
                if cfg.estimate_steps:
                    g = ctx.global_generator(f"{self.name}/estimate/{nm}/{first}")
                    estimate[nm][sl] = self.pattern_estimate(model.logits, x, nm, g,
                                                             (lo_r, hi_r))
                if cfg.property == "reachability":
                    ranges, local_why = self._reach_ranges(
                        bound, fn, x, logits.double(), nm, (lo_r, hi_r), local_why)
                    for key, v in ranges.items():
                        range_parts.setdefault(key, []).append(v)
                ctx.advance(sl.stop - sl.start)
        holds = (torch.cat(holds_parts).cpu().numpy() if holds_parts
                 else np.zeros(0, dtype=bool))
        out = {}
        for nm in cfg.norms:
            for k in ("upper", "lower_lipschitz", "lower_local"):
                parts = dev_parts.get(f"{k}@{nm}")
                out[f"{k}@{nm}"] = (torch.cat(parts).cpu().numpy() if parts
                                    else np.full(n, np.nan))
            if bound is not None:
                lip, loc = out[f"lower_lipschitz@{nm}"], out[f"lower_local@{nm}"]
                if local_why:  # a later block failed: the whole run falls back
                    loc = np.full(n, np.nan)
                    out[f"lower_local@{nm}"] = loc
                better = np.isfinite(loc) & (loc > lip)
                out[f"lower@{nm}"] = np.where(better, loc, lip)
                out[f"bound@{nm}"] = np.where(better, cfg.local_bound, "lipschitz").astype("<U9")
            else:
                out[f"lower@{nm}"] = np.full(n, np.nan)
                out[f"bound@{nm}"] = np.full(n, "", dtype="<U9")
            out[f"clever@{nm}"] = clever[nm]
            out[f"estimate@{nm}"] = estimate[nm]
        out.update({key: torch.cat(v).cpu().numpy() for key, v in range_parts.items()})
        props = []
        if bound is not None:
            for nm in cfg.norms:
                for r in cfg.radii:
                    k = int((holds & (out[f"lower@{nm}"] > r)).sum())
                    props.append(Proportion({"norm": nm, "radius": r}, k, n))
        diagnostics: dict[str, object] = {
            "property": cfg.property,
            "lower_bound": "not applicable: " + why if bound is None else "ok",
            "local_bound": (cfg.local_bound if not local_why else
                            f"lipschitz only: {local_why}"),
        }
        return self._conclude(bound, why, props, holds, out, diagnostics, model, data, ctx)

    def _conclude(self, bound: LipschitzBound | None, why: str, props: list[Proportion],
                  holds: np.ndarray, out: dict, diagnostics: dict[str, object],
                  model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        """The result of a run: not applicable (``why``) when radii were asked for and no
        Lipschitz bound exists; finalized unless the engine merges shards first."""
        if bound is not None:
            diagnostics["lipschitz"] = {"prefix": bound.prefix, "layers": bound.layers}
        per_point = {"holds": holds, **out}
        if bound is None and self.config.radii:
            res = self.result([], per_point=per_point, diagnostics=diagnostics,
                              status="not_applicable", reason=why)
        else:
            res = self.result(props, per_point=per_point, diagnostics=diagnostics)
        return res if ctx.total is not None else self.finalize(res, model, data, ctx)

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """The summaries over all points, from the merged per-point arrays: the number of
        points where the property holds and, per norm, the medians of the three radii, the
        points without a witness and the sandwich violations (logged)."""
        cfg = self.config
        pp = result.per_point
        holds = pp["holds"].astype(bool)
        diagnostics = {k: result.diagnostics[k] for k in ("property", "lower_bound",
                                                          "invariance", "oracle")
                       if k in result.diagnostics}
        if "local_bound" in result.diagnostics:
            diagnostics["local_bound"] = result.diagnostics["local_bound"]
        diagnostics["holds"] = int(holds.sum())
        if "lipschitz" in result.diagnostics:
            diagnostics["lipschitz"] = result.diagnostics["lipschitz"]
        for nm in cfg.norms:
            lower, upper, clever = (pp[f"{k}@{nm}"] for k in ("lower", "upper", "clever"))
            both = np.isfinite(lower) & np.isfinite(upper)
            diagnostics[nm] = {
                "median_lower": _median(lower[holds]),
                "median_upper": _median(upper[holds]),
                "median_clever": _median(clever[holds]),
                "median_estimate": (_median(pp[f"estimate@{nm}"][holds])
                                    if f"estimate@{nm}" in pp else None),
                "no_witness": int((holds & ~np.isfinite(upper)).sum()),
                # a sound lower bound never exceeds a witness: a count here means a bug or an
                # unsound (e.g. unconverged) Lipschitz constant
                "sandwich_violations": int((lower[both] > upper[both] * (1 + 1e-6) + 1e-9)
                                           .sum()),
            }
            lip = pp.get(f"lower_lipschitz@{nm}")
            if lip is not None:
                pos = holds & np.isfinite(upper) & (upper > 0)
                ratio = np.where(pos, lower / np.where(pos, upper, 1.0), np.nan)
                ratio_lip = np.where(pos, lip / np.where(pos, upper, 1.0), np.nan)
                by = pp[f"bound@{nm}"][holds]
                diagnostics[nm].update({
                    "median_lower_lipschitz": _median(lip[holds]),
                    "median_ratio": _median(ratio),
                    "median_ratio_lipschitz": _median(ratio_lip),
                    "certified_by": {k: int((by == k).sum()) for k in _CERTIFIERS[
                        cfg.property == "invariant"]},
                })
            diagnostics[nm]["most_vulnerable"] = _most_vulnerable(pp, holds, nm)
            if diagnostics[nm]["sandwich_violations"]:
                log.warning("safe_radius: %d points have a lower bound above their witness "
                            "(%s)", diagnostics[nm]["sandwich_violations"], nm)
        ranges = _range_summary(pp)
        if ranges:
            diagnostics["ranges"] = ranges
        result.diagnostics = diagnostics
        return result

    def pattern_estimate(self, forward, x: torch.Tensor, norm: str, g: torch.Generator,
                         box: tuple[float, float]) -> np.ndarray:
        """The seed's derivative-free estimate per point of a batch: min_j h_j(x0)⁺ / L̂_j,
        capped at ``clever_radius``, with L̂_j the largest |h_j(x) − h_j(x0)| / ‖x − x0‖ seen by
        a batched pattern search over the ball of ``clever_radius`` (∩ box) — forward passes
        only (``forward``: the deployed model's logits, so ONNX and black-box models too).

        The search keeps one incumbent per point (start: the best of ``estimate_directions``
        random points of the ball), polls it along ± ``estimate_directions`` random
        directions (unit in ``norm``) at a step that halves after a poll without
        improvement, and maximises the largest ratio over the margins; every point it
        evaluates updates every margin's L̂_j (points within a thousandth of the radius of x0
        are not counted: float noise). An ESTIMATE: a searched maximum can fall short
        of the true local constant, so the value can exceed the true safe radius (as CLEVER);
        it is never reported as certified. Seeded by ``g``."""
        cfg = self.config
        p = x.shape[0]
        k = cfg.estimate_directions
        flat = x.flatten(1)
        d = flat.shape[1]
        rad = cfg.clever_radius
        min_dist = rad * 1e-3
        # IEEE float32 products (no TF32/bf16): the ratios difference nearby logits, whose
        # float noise must stay small
        with torch.no_grad(), strict_float32():
            logits0 = forward(x).double()
            a, b = self._margins(logits0)
            h0 = torch.einsum("pmc,pc->pm", a, logits0) - b

            def ratios(points):  # points (P, K, d) → per point, candidate and margin
                q = points.clamp(*box).to(x.dtype)  # the points the model sees
                lg = forward(q.reshape(p * q.shape[1], *x.shape[1:])).double()
                lg = lg.view(p, q.shape[1], -1)
                h = torch.einsum("pmc,pkc->pkm", a, lg) - b[:, None, :]
                dist = _dist(q.reshape(-1, d), flat.repeat_interleave(q.shape[1], 0), norm)
                dist = dist.view(p, q.shape[1], 1)
                # below a thousandth of the radius, float noise of the logits dominates
                r = torch.where(dist >= min_dist, (h - h0[:, None, :]).abs()
                                / dist.clamp_min(min_dist), torch.zeros_like(h))
                return q.double(), r

            def unit(shape):
                v = torch.randn(shape, generator=g, dtype=torch.float64).to(x.device)
                if norm == "l1":
                    v = v * (torch.rand(shape, generator=g, dtype=torch.float64).to(x.device)
                             < max(_L1_STEP_SHARE, 1.0 / d))
                return v / _norm_of(v, norm)[..., None].clamp_min(1e-30)

            start = flat.double()[:, None, :] + unit((p, k, d)) * rad * torch.rand(
                (p, k, 1), generator=g, dtype=torch.float64).to(x.device)
            q, rt = ratios(start)
            lhat = rt.amax(1)  # (P, m)
            score = rt.amax(2)  # (P, K)
            best = score.argmax(1)
            cur = q[torch.arange(p), best]
            cur_score = score[torch.arange(p), best]
            step = torch.full((p, 1), rad / 4, dtype=torch.float64, device=x.device)
            for _ in range(cfg.estimate_steps):
                dirs = unit((p, k, d))
                cand = cur[:, None, :] + torch.cat([dirs, -dirs], 1) * step[:, :, None]
                delta = cand - flat.double()[:, None, :]  # back into the ball
                norms = _norm_of(delta, norm)[..., None]
                cand = flat.double()[:, None, :] + delta * (rad / norms.clamp_min(1e-30)).clamp(
                    max=1.0)
                q, rt = ratios(cand)
                lhat = torch.maximum(lhat, rt.amax(1))
                score = rt.amax(2)
                i = score.argmax(1)
                top = score[torch.arange(p), i]
                better = top > cur_score
                cur = torch.where(better[:, None], q[torch.arange(p), i], cur)
                cur_score = torch.where(better, top, cur_score)
                step = torch.where(better[:, None], step, (step / 2).clamp_min(min_dist))
            est = torch.where(lhat > 0, h0.clamp_min(0) / lhat.clamp_min(1e-300),
                              torch.full_like(lhat, math.inf)).amin(1).clamp(max=rad)
        return est.cpu().numpy()

    # ---- reachability: the reachable range of each output

    def _reach_ranges(self, bound: LipschitzBound | None, fn: nn.Module, x: torch.Tensor,
                      logits: torch.Tensor, norm: str, box: tuple[float, float],
                      local_why: str) -> tuple[dict[str, torch.Tensor], str]:
        """Per point, output k (``outputs``, default all) and radius r of ``radii``: the
        reachable range of f_k over the ball (∩ the box for the search, and for the bound
        with ``within_box``). ``range_lo@n:r:k`` ≤ min and ``range_hi@n:r:k`` ≥ max (sound,
        for the exact network and its float32 evaluation: the tighter of the Lipschitz
        interval f̂_k(x0) ± (L_k·r + rounding) and the local bound's; NaN without a bound);
        ``range_min@n:r:k`` ≥ min and ``range_max@n:r:k`` ≤ max: the smallest and largest
        values the search found at points of the ball (witnessed: attained). Returns the
        arrays and the local bound's failure reason (an op without one: Lipschitz only)."""
        cfg = self.config
        c = logits.shape[1]
        ks = cfg.outputs if cfg.outputs is not None else list(range(c))
        eye = torch.eye(c, dtype=torch.float64, device=x.device)
        spec = torch.cat([eye[ks], -eye[ks]])[None].expand(x.shape[0], -1, -1)  # (P, 2K, C)
        out: dict[str, torch.Tensor] = {}
        nk = len(ks)
        for r in cfg.radii:
            rr = torch.full((x.shape[0],), float(r), dtype=torch.float64, device=x.device)
            lo = torch.full((x.shape[0], nk), math.nan, dtype=torch.float64, device=x.device)
            hi = lo.clone()
            if bound is not None:
                f0 = logits[:, ks]
                lip = bound.margin_constants(eye[ks], norm).to(x.device)  # (K,)
                ec, eb = bound.rounding(x, rr, "linf" if norm == "linf" else "l2")
                assert eb is not None  # a radius was given
                err = (ec + eb).to(x.device)[:, ks]
                lo, hi = f0 - lip * r - err, f0 + lip * r + err
                if not local_why:
                    try:
                        res = local_bounds(bound, x, rr, norm, spec,
                                           box=box if cfg.within_box else None,
                                           method=cfg.local_bound,
                                           max_memory=cfg.max_bound_memory,
                                           alpha_steps=cfg.alpha_steps,
                                           alpha_intermediate=cfg.alpha_intermediate)
                        lo = torch.maximum(lo, res.lower[:, :nk])
                        hi = torch.minimum(hi, -res.lower[:, nk:])
                    except NotBoundable as exc:
                        local_why = str(exc)
            found_min = self._extreme(fn, x, ks, rr, norm, box, 1.0)
            found_max = -self._extreme(fn, x, ks, rr, norm, box, -1.0)
            for i, k in enumerate(ks):
                tag = f"{norm}:{r:g}:{k}"
                out[f"range_lo@{tag}"] = lo[:, i]
                out[f"range_min@{tag}"] = found_min[:, i]
                out[f"range_max@{tag}"] = found_max[:, i]
                out[f"range_hi@{tag}"] = hi[:, i]
        return out, local_why

    def _extreme(self, fn: nn.Module, x: torch.Tensor, ks: list[int], eps: torch.Tensor,
                 norm: str, box: tuple[float, float], sign: float) -> torch.Tensor:
        """Per point and output k of ``ks``: the smallest sign·f_k found by projected steps
        (``attack_steps``, step 2.5·ε/steps, from δ = 0) over the ball ∩ box, every iterate
        evaluated (float64 of the float32 logits): (P, K). Each value is attained at a point
        of the ball, so it bounds the true minimum from above."""
        cfg = self.config
        shape = (-1,) + (1,) * (x.ndim - 1)
        e = eps.to(x.dtype).view(shape)
        alpha = 2.5 * e / cfg.attack_steps
        cols = []
        for k in ks:
            delta = torch.zeros_like(x)
            best = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
            for _ in range(cfg.attack_steps + 1):
                with torch.enable_grad():
                    dv = delta.clone().requires_grad_(True)
                    v = sign * fn((x + dv).clamp(*box))[:, k]
                    (grad,) = torch.autograd.grad(v.sum(), dv)
                best = torch.minimum(best, v.detach().double())
                delta = _descend(delta, grad, alpha, e, norm)
            cols.append(best)
        return torch.stack(cols, 1)

    # ---- invariant kind (relative to the oracle O)

    def _run_invariant(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        """The invariant kind: t = argmax O(x0); holds where argmax f(x0) = t = y. Per point
        and norm: ``lower@n`` = the larger of the oracle's own certified radius (m = 0:
        inside it O keeps t, ``bound@n`` "oracle") and, when O and f are both single affine
        maps, the joint radius min_j max_m (D_{j,m}(x0) − rounding)/‖(e_t − e_j)ᵀ(W_O −
        m·W_f)‖_dual (:func:`_joint_radius`, "joint"); ``upper@n`` the closest invariant
        example the search on cat(O(x), f(x)) finds (inf: none)."""
        cfg = self.config
        oracle = self._oracle(model, data, ctx.device)
        joint = _Joint(oracle.attack_module(), model.attack_module())
        bound_o, why = self._network_bound(oracle, data, self._oracle_bounds)
        bound_f, _ = self._network_bound(model, data, self._bounds)
        affine = _single_affine(bound_o) and _single_affine(bound_f)
        n = len(data)
        lo_r, hi_r = data.input_range
        d = int(np.prod(data.input_shape))
        holds_parts: list[torch.Tensor] = []
        parts: dict[str, list[torch.Tensor]] = {f"{k}@{nm}": [] for nm in cfg.norms
                                                for k in ("upper", "oracle", "joint")}
        for _sl, x, y in batches(data, ctx.batch_size, ctx.device):
            with strict_float32():
                lf = model.logits(x).double()
                lo = oracle.logits(x).double()
            t = lo.argmax(1)
            holds_parts.append((lf.argmax(1) == t) & (t == y))
            a, _ = self._margins(lo)  # rows e_t − e_j, j ≠ t, with t = argmax O
            h_o = torch.einsum("pmc,pc->pm", a, lo)
            h_f = torch.einsum("pmc,pc->pm", a, lf)
            for nm in cfg.norms:
                width = box_diameter(lo_r, hi_r, d, nm)
                max_r = cfg.max_radius or width
                parts[f"upper@{nm}"].append(self._witness(joint, x, t, nm, max_r, (lo_r, hi_r)))
                nan = torch.full((x.shape[0],), math.nan, dtype=torch.float64, device=x.device)
                floor = _certified_radius(bound_o, x, a, h_o, nm) if bound_o is not None else nan
                parts[f"oracle@{nm}"].append(floor)
                parts[f"joint@{nm}"].append(
                    _joint_radius(bound_o, bound_f, x, a, h_o, h_f, nm, width)
                    if affine and bound_o is not None and bound_f is not None else nan)
                ctx.advance(x.shape[0])
        holds = torch.cat(holds_parts).cpu().numpy() if holds_parts else np.zeros(0, bool)
        out: dict[str, np.ndarray] = {}
        for nm in cfg.norms:
            got = {k: torch.cat(parts[f"{k}@{nm}"]).cpu().numpy() if parts[f"{k}@{nm}"]
                   else np.full(n, np.nan) for k in ("upper", "oracle", "joint")}
            better = got["joint"] > got["oracle"]  # NaN: False
            out[f"upper@{nm}"] = got["upper"]
            out[f"lower@{nm}"] = np.where(better, got["joint"], got["oracle"])
            out[f"lower_lipschitz@{nm}"] = got["oracle"]
            out[f"lower_local@{nm}"] = np.where(better, got["joint"], np.nan)
            out[f"bound@{nm}"] = (np.where(better, "joint", "oracle") if bound_o is not None
                                  else np.full(n, "")).astype("<U9")
            out[f"clever@{nm}"] = np.full(n, np.nan)  # no estimate of the joint constant
            out[f"estimate@{nm}"] = np.full(n, np.nan)
        props = []
        if bound_o is not None:
            for nm in cfg.norms:
                for r in cfg.radii:
                    k = int((holds & (out[f"lower@{nm}"] > r)).sum())
                    props.append(Proportion({"norm": nm, "radius": r}, k, n))
        diagnostics: dict[str, object] = {
            "property": "invariant",
            "invariance": f"invariance with respect to {_model_name(oracle, cfg.oracle)}",
            "oracle": {"reference": cfg.oracle, "name": oracle.name, "sha256": oracle.sha256},
            "lower_bound": "not applicable: " + why if bound_o is None else "ok",
            "local_bound": ("joint: exact constants of the affine O and f" if affine else
                            "oracle only: O and f are not both single affine maps, so the "
                            "joint constant is not available (the oracle's own radius)"),
        }
        return self._conclude(bound_o, why, props, holds, out, diagnostics, model, data, ctx)

    def _network_bound(self, clf: Classifier, data: EvalSet,
                       cache: _BoundCache) -> tuple[LipschitzBound | None, str]:
        """The Lipschitz bound of a classifier's own PyTorch module (none, with the reason,
        for a gradient twin or a model that is not a module)."""
        if clf.gradient_forward is not None:
            return None, _TWIN_REASON
        if not isinstance(clf.forward, nn.Module):
            return None, "the model is not a PyTorch module"
        return cache.get(clf.forward, data.input_shape, self.config.power_iterations)

    def _local_radius(self, bound: LipschitzBound, x: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor, h: torch.Tensor, norm: str, r_lip: torch.Tensor,
                      upper: torch.Tensor, max_r: float,
                      box: tuple[float, float]) -> torch.Tensor:
        """Per point: the largest radius certified by the local bound, searched on [the
        Lipschitz radius, the witness (``max_r`` without one)]; NaN where it certifies no more
        than the Lipschitz radius. Each of at most ``bound_steps`` steps fits the relaxations
        to the ball of a trial radius R (the middle of the bracket) and, with them fixed,
        finds the largest r ≤ R keeping every margin's bound a_j·f − b_j positive
        (:func:`~robust_cert.bounds.local_radius`: sound for the exact network and its
        float32 evaluation on the closed ball, ∩ the input box with ``within_box``): r is
        certified (the bracket's lower end rises to it) and, when r < R, the radii above R
        are given up (relaxations fitted to a larger ball are looser). The trial radii: the
        geometric middle of the bracket, but after a fit that left a point at its Lipschitz
        radius, a probe at that radius / (1 − ``bound_rtol``) (where the local bound cannot
        beat the Lipschitz radius by that much, the point's search ends there). A point's
        search ends once its bracket is within ``bound_rtol`` of its upper end. The rounding
        bound of the logits is computed once at the upper end: it grows with the radius, so
        it covers every step.

        A point none of whose steps can certify anything is not searched (its result, NaN,
        is what the search would return): one with a margin j whose exact value at x itself
        is at most the threshold its bound must beat, |a_j|·E_ball + b_j (E_ball: the
        rounding bound at the upper end, used by every step). Every step's bound of that
        margin is a sound lower bound over a ball containing x, so at most its exact value
        at x, itself at most ĥ_j + |a_j|·E(x) (``h``: the margins of the computed logits,
        E(x) their rounding bound at x); with a relative allowance of 1e-6 for the float64
        arithmetic of this test. (On the ResNet-18 of bench_resnet, E(x) is ~10⁷ against
        margins of ~6: no step there ever certifies a point.)"""
        cfg = self.config
        lo = r_lip.double().clone()
        hi = torch.where(torch.isfinite(upper), upper, torch.full_like(upper, max_r)).double()
        hi = torch.maximum(hi, lo)
        live = hi > lo * (1 + 1e-6)
        if not bool(live.any()) or cfg.bound_steps == 0:
            return torch.full_like(lo, math.nan)
        e_center, e_ball = bound.rounding(x, hi, "linf" if norm == "linf" else "l2")
        assert e_ball is not None  # with a radius: the ball's bound
        live &= ~_uncertifiable(a, b, h, e_center, e_ball)
        box_arg = box if cfg.within_box else None
        for step in range(cfg.bound_steps):
            idx = live.nonzero().squeeze(1)
            if not idx.numel():
                break
            lo_i, hi_i = lo[idx], hi[idx]
            # the geometric middle of the bracket (its ends are often an order of magnitude
            # apart); after a first fit that did not raise a point above its Lipschitz
            # radius, a probe just above it: where the local bound fails there too, the
            # search ends (the bracket is within bound_rtol)
            trial = torch.where(lo_i > 0, (lo_i * hi_i).sqrt(), (lo_i + hi_i) / 2)
            if step > 0 and cfg.bound_rtol > 0:
                probe = (lo_i > 0) & (lo_i <= r_lip[idx])
                trial = torch.where(probe, torch.minimum(lo_i / (1 - cfg.bound_rtol), trial),
                                    trial)
            r = local_radius(bound, x[idx], trial, norm, a[idx].double(), b[idx],
                             box=box_arg, method=cfg.local_bound,
                             max_memory=cfg.max_bound_memory, ball_error=e_ball[idx],
                             alpha_steps=cfg.alpha_steps,
                             alpha_intermediate=cfg.alpha_intermediate)
            lo[idx] = torch.maximum(lo[idx], r)
            hi[idx] = torch.where(r >= trial, hi[idx], trial)
            live[idx] = hi[idx] - lo[idx] > cfg.bound_rtol * hi[idx]
        return torch.where(lo > r_lip, lo, torch.full_like(lo, math.nan))

    def _witness(self, fn: nn.Module, x: torch.Tensor, t: torch.Tensor, norm: str,
                 max_r: float, box: tuple[float, float]) -> torch.Tensor:
        """The distance of the closest violation found per point (float64, on the device), inf
        where none is found within ``max_r``.

        The smaller of two searches, each point for itself: bisection over ε of a batched
        projected-gradient search (per-point ε; a bracket ε = ``max_r``/2^k, k < 6, first),
        and the minimal-norm boundary searches (:meth:`_boundary_search`, ``witness_steps``
        each; for ``adversarial`` one untargeted and one towards each of the
        ``witness_targets`` next-ranked classes at x). The bisection runs as with
        ``witness_steps`` 0, so the witness is never farther than the bisection's alone (the
        boundary search can land on a farther piece of a non-smooth objective, e.g. the
        invariant kind's). Every violation counted is re-evaluated (:meth:`_verified`): its
        point lies in the input box and its float32 logits violate the property. The host
        waits for the device once per search (to pick the points still searched), never per
        attack step."""
        cfg = self.config
        p = x.shape[0]
        best = torch.full((p,), math.inf, dtype=torch.float64, device=x.device)
        lo = torch.zeros(p, dtype=torch.float64, device=x.device)
        hi = torch.full((p,), max_r, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            viol0 = self._violated(fn(x), t)
        best = best.masked_fill(viol0, 0.0)
        # bracket: search at max_r, max_r/2, ... (a large step can jump over a thin violating
        # region, e.g. the uncertainty band around the decision boundary)
        for k in range(_BRACKET_LEVELS):
            idx = (~viol0 & ~torch.isfinite(best)).nonzero().squeeze(1)
            if not idx.numel():
                break
            adv, found = self._search(fn, x[idx], t[idx], torch.full_like(lo[idx], max_r / 2 ** k),
                                      norm, box)
            found = self._verified(fn, x[idx], t[idx], adv, found, box)
            best[idx] = torch.where(found, _dist(adv, x[idx], norm), best[idx])
        active = torch.isfinite(best) & ~viol0
        hi = torch.where(active, best, hi)
        for _ in range(cfg.bisection_steps):
            idx = active.nonzero().squeeze(1)
            if not idx.numel():
                break
            eps = (lo[idx] + hi[idx]) / 2
            adv, found = self._search(fn, x[idx], t[idx], eps, norm, box)
            found = self._verified(fn, x[idx], t[idx], adv, found, box)
            dist = _dist(adv, x[idx], norm)
            best[idx] = torch.where(found, torch.minimum(best[idx], dist), best[idx])
            hi[idx] = torch.where(found, torch.minimum(eps, dist), hi[idx])
            lo[idx] = torch.where(found, lo[idx], eps)
        if cfg.witness_steps:
            targets: list[torch.Tensor | None] = [None]
            if cfg.property == "adversarial" and cfg.witness_targets:
                with torch.no_grad():
                    ranked = fn(x).argsort(1, descending=True)
                targets += [ranked[:, k] for k in range(1, min(1 + cfg.witness_targets,
                                                                ranked.shape[1]))]
            idx = (~viol0).nonzero().squeeze(1)
            for target in targets:
                if not idx.numel():
                    break
                adv, found = self._boundary_search(
                    fn, x[idx], t[idx], norm, box, max_r,
                    None if target is None else target[idx])
                found = self._verified(fn, x[idx], t[idx], adv, found, box)
                dist = _dist(adv, x[idx], norm)
                found &= dist <= max_r
                best[idx] = torch.where(found, torch.minimum(best[idx], dist), best[idx])
        return best

    def _verified(self, fn: nn.Module, x: torch.Tensor, t: torch.Tensor, adv: torch.Tensor,
                  found: torch.Tensor, box: tuple[float, float]) -> torch.Tensor:
        """``found`` where the candidate witness ``adv`` really is one: a point of the input
        box whose float32 logits, evaluated afresh (no gradient, IEEE float32 products),
        violate the property."""
        with torch.no_grad(), strict_float32():
            viol = self._violated(fn(adv), t)
        inside = ((adv >= box[0]) & (adv <= box[1])).flatten(1).all(1)
        return found & viol & inside

    def _boundary_search(self, fn: nn.Module, x: torch.Tensor, t: torch.Tensor, norm: str,
                         box: tuple[float, float], max_r: float,
                         target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A minimal-norm search for the closest violation (after FMN, Pintor et al. 2021):
        per point, normalised gradient steps on the objective (untargeted: the property's
        :meth:`_objective`; with ``target``: the margin f_t − f_target), projected onto a
        ball whose radius ε adapts — while nothing is found, ε = (‖δ‖ + the linear estimate of
        the distance to the boundary: |objective| / dual norm of its gradient)·(1 + γ), just
        across it (a step landing on the boundary itself violates nothing); on a violation ε
        shrinks to min(ε(1 − γ), best distance); after one, ε grows by (1 + γ) while the
        iterate is safe — so the iterate slides along the boundary towards x. Steps
        are a fraction α of ε (the gradient normalised in L2, scaled by √d for L∞), α and γ
        cosine-annealed from 1 to 0.01 and 0.05 to 0.001 over ``witness_steps``; coordinates
        at a face of the box the step would leave carry no gradient. Starts at x, draws
        nothing. Returns the closest violating point seen (each in the box, as evaluated) and
        whether one was seen; :meth:`_witness` re-verifies them."""
        cfg = self.config
        steps = cfg.witness_steps
        shape = (-1,) + (1,) * (x.ndim - 1)
        p = x.shape[0]
        d = x[0].numel()
        delta = torch.zeros_like(x)
        eps = torch.full((p,), math.inf, dtype=x.dtype, device=x.device)
        best = torch.full((p,), math.inf, dtype=torch.float64, device=x.device)
        best_x = x.clone()
        found = torch.zeros(p, dtype=torch.bool, device=x.device)
        scale = math.sqrt(d) if norm == "linf" else 1.0
        for k in range(steps + 1):
            cosine = (1 + math.cos(math.pi * k / steps)) / 2
            alpha = 0.01 + (1.0 - 0.01) * cosine
            gamma = 0.001 + (0.05 - 0.001) * cosine
            with torch.enable_grad():
                dv = delta.clone().requires_grad_(True)
                xa = (x + dv).clamp(*box)
                logits = fn(xa)
                if target is None:
                    obj = self._objective(logits, t)
                else:
                    obj = (logits.gather(1, t[:, None]) - logits.gather(1, target[:, None]))[:, 0]
                (grad,) = torch.autograd.grad(obj.sum(), dv)
            with torch.no_grad():
                xa = xa.detach()
                viol = self._violated(logits.detach(), t)
                dist = _dist(xa, x, norm)
                better = viol & (dist < best)
                best = torch.where(better, dist, best)
                best_x = torch.where(better.view(shape), xa, best_x)
                found |= viol
                if k == steps:
                    break
                # a coordinate at a face of the box that the descent step would leave
                stuck = ((xa <= box[0]) & (grad > 0)) | ((xa >= box[1]) & (grad < 0))
                grad = torch.where(stuck, torch.zeros_like(grad), grad)
                to_boundary = obj.detach().abs() / _dual_norm(grad.flatten(1), norm).clamp_min(
                    1e-12)
                eps = torch.where(viol, torch.minimum(eps * (1 - gamma), best.to(x.dtype)),
                                  (1 + gamma) * torch.where(
                                      found, eps, _norm_of(delta.flatten(1), norm) + to_boundary))
                eps = eps.clamp(max=max_r)
                gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
                delta = delta - (alpha * scale) * eps.view(shape) * grad / gn
                e = eps.view(shape)
                if norm == "linf":
                    delta = torch.maximum(torch.minimum(delta, e), -e)
                elif norm == "l1":
                    delta = _project_l1(delta, e)
                else:
                    dn = delta.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
                    delta = delta * (e / dn).clamp(max=1.0)
                delta = (x + delta).clamp(*box) - x
        return best_x, found

    def _search(self, fn, x, t, eps, norm, box):
        cfg = self.config
        shape = (-1,) + (1,) * (x.ndim - 1)
        e = eps.to(x.dtype).view(shape)
        alpha = 2.5 * e / cfg.attack_steps
        delta = torch.zeros_like(x)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best = x.clone()
        for _ in range(cfg.attack_steps):
            with torch.enable_grad():
                dv = delta.clone().requires_grad_(True)
                xa = (x + dv).clamp(*box)
                logits = fn(xa)
                obj = self._objective(logits, t)
                (grad,) = torch.autograd.grad(obj.sum(), dv)
            viol = self._violated(logits.detach(), t) & ~found
            best = torch.where(viol.view(shape), xa.detach(), best)  # no host sync
            found |= viol
            if norm != "l2" and cfg.property == "invariant":
                # the objective max(O's margin, −f's margin) zig-zags along f's boundary: a
                # sign or coordinate step loses the direction along it, a normalised
                # gradient step keeps it
                gn = grad.flatten(1).abs().amax(1).clamp_min(1e-30).view(shape)
                delta = delta - alpha * grad / gn
                delta = delta.clamp(-e, e) if norm == "linf" else _project_l1(delta, e)
            elif norm == "linf":
                delta = (delta - alpha * grad.sign()).clamp(-e, e)
            elif norm == "l1":
                delta = _project_l1(delta - alpha * _l1_step(grad), e)
            else:
                gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
                delta = delta - alpha * grad / gn
                dn = delta.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
                delta = delta * (e / dn).clamp(max=1.0)
        with torch.no_grad():
            xa = (x + delta).clamp(*box)
            viol = self._violated(fn(xa), t) & ~found
        best = torch.where(viol.view(shape), xa, best)
        found |= viol
        return best, found

    def clever(self, fn: nn.Module, x: torch.Tensor, norm: str, g: torch.Generator,
               box: tuple[float, float]) -> np.ndarray:
        """CLEVER-style estimate per point of a batch: min_j min(h_j(x)/L̂_j, R).

        The ``clever_batches × clever_samples`` samples of a point (of several points at
        once, drawn together per chunk of points) go through batched forward passes and C
        backward passes each (:func:`_input_jacobian`); the C Jacobian rows serve every margin.
        """
        cfg = self.config
        p = x.shape[0]
        with torch.no_grad():
            logits0 = fn(x).double()
        a, b = self._margins(logits0)
        h = torch.einsum("pmc,pc->pm", a, logits0) - b
        count = cfg.clever_batches * cfg.clever_samples
        flat = x.flatten(1)
        # one chunk holds chunk × count samples, each back-propagated once per class: bound
        # that product (memory follows it, not the number of points)
        chunk = max(1, _CLEVER_IMAGES // (count * logits0.shape[1]))
        scores = np.empty(p)
        for s in range(0, p, chunk):
            xs = _ball_samples(flat[s:s + chunk], count, cfg.clever_radius, norm, g)
            q = xs.shape[0]
            xs = xs.clamp(*box).reshape(q * count, *x.shape[1:])
            jac = _input_jacobian(fn, xs).view(-1, q, count, flat.shape[1]).double()
            gm = torch.einsum("pmc,cpkd->pmkd", a[s:s + chunk], jac)  # (q, m, count, d)
            dual = _dual_norm(gm, norm)
            maxima = dual.view(q, dual.shape[1], cfg.clever_batches, cfg.clever_samples)
            maxima = maxima.amax(-1).cpu().numpy()
            hv = h[s:s + chunk].cpu().numpy()
            for i in range(q):
                scores[s + i] = clever_score(maxima[i], hv[i], cfg.clever_radius)
        return scores


class _BoundCache:
    """The Lipschitz bound (or why there is none) of the last network seen, so the blocks of a
    sharded run trace and bound the network once per process, not once per block.

    A bound is reused only for the very same module object whose tensors (parameters,
    buffers, tensor attributes, of every submodule) are the same objects, with the same
    version counters, storage, device, dtype, shape and contents fingerprint (sum and sum of
    absolute values, in float64), and whose submodules are in the same train/eval modes, for
    the same input shape and power iterations; anything else recomputes it. The bound is a
    deterministic function of those, so a block's result never depends on what ran before."""

    def __init__(self):
        self._entry: tuple | None = None

    def get(self, module: nn.Module, input_shape: tuple[int, ...],
            power_iterations: int) -> tuple[LipschitzBound | None, str]:
        tensors, key = _module_state(module)
        key = (key, tuple(input_shape), power_iterations)
        e = self._entry
        if (e is not None and e[0]() is module and e[1] == key and len(e[2]) == len(tensors)
                and all(r() is t for r, t in zip(e[2], tensors, strict=True))):
            return e[3], e[4]
        try:
            bound, why = lipschitz_bound(module, input_shape, power_iterations), ""
        except NotBoundable as exc:
            bound, why = None, str(exc)
        self._entry = (weakref.ref(module), key, [weakref.ref(t) for t in tensors], bound, why)
        return bound, why


def _module_state(module: nn.Module) -> tuple[list[torch.Tensor], tuple]:
    """The tensors of ``module`` and a key of their state (see :class:`_BoundCache`)."""
    tensors, modes = [], []
    for m in module.modules():
        modes.append(m.training)
        found = [*m._parameters.values(), *m._buffers.values(),
                 *(v for v in vars(m).values() if isinstance(v, torch.Tensor))]
        tensors.extend(t for t in found if t is not None)
    meta = tuple((_tensor_attr(t, "_version"), _tensor_attr(t, "data_ptr"), str(t.device),
                  str(t.dtype), tuple(t.shape)) for t in tensors)
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    with torch.no_grad():  # one copy to the host for all tensors
        sums = (torch.stack([torch.stack([t.sum(dtype=torch.float64),
                                          t.abs().sum(dtype=torch.float64)])
                             .to(floats[0].device) for t in floats]).cpu().flatten().tolist()
                if floats else [])
    return tensors, (tuple(modes), meta, tuple(sums))


def _tensor_attr(t: torch.Tensor, name: str):
    """``t._version`` or ``t.data_ptr()``; None where the tensor has none (inference tensors
    keep no version counter): the contents fingerprint still guards the cache."""
    try:
        v = getattr(t, name)
        return v() if callable(v) else v
    except RuntimeError:
        return None


#: The bounds that can certify a point (``bound@n``): other kinds, the invariant kind.
_CERTIFIERS = {False: ("lipschitz", "crown", "crown-ibp", "ibp"), True: ("oracle", "joint")}
_TWIN_REASON = ("the certified lower bound would be of the PyTorch gradient twin, not of the "
                "deployed graph (they are checked for parity only at the evaluation points)")
#: Sample-gradients (samples × classes) of one CLEVER chunk of points: 2,048. The chunks
#: fix the order of the ball samples drawn (per chunk, seeded per batch), not the memory.
_CLEVER_IMAGES = 2048
#: Bytes CLEVER's input Jacobians (:func:`_input_jacobian`) may hold for their backward
#: passes, estimated by the layers' outputs (:func:`_activation_bytes`), times the C rows
#: when they are back-propagated together. 88 MiB. The digits CNN's layers output 14 KiB
#: per image: its 200 samples of a point fit with their 10 rows (27 MiB), one batched
#: backward as before. The ResNet-18 width 16 (3×32×32) outputs 1.35 MiB per image: forward
#: passes of 65 images, each followed by 10 plain backward passes (2.61 ms of CPU per row
#: and image at 64 images, 2.75 at 100, 2.81 at 32; peaks 433, 506 and 368 MB) instead of
#: one batched backward of 200 images (4.07 ms, 1,108 MB).
_JACOBIAN_BYTES = 88 << 20


def _activation_bytes(fn: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes of the outputs of ``fn``'s leaf modules (submodules, and modules held as plain
    attributes, as :meth:`Classifier.attack_module`'s view holds the network) for one image
    (a forward pass without gradients: an estimate of what a pass keeps for its backward, per
    image) and the number of outputs (classes). (Counting the tensors autograd saves, by
    ``torch.autograd.graph.saved_tensors_hooks``, would be exact, but on torch 2.13 a later
    backward batched with ``is_grads_batched`` then leaks ~8 MB a call.)"""
    total = 0

    def count(_module, _args, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    # the leaf modules, also of modules held as plain attributes (an attack view's network)
    leaves, seen, stack = [], set(), [fn]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        inner = [*m.children(), *(v for v in vars(m).values() if isinstance(v, nn.Module))]
        if inner:
            stack.extend(inner)
        else:
            leaves.append(m)
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            classes = fn(x[:1]).shape[1]
    finally:
        for h in hooks:
            h.remove()
    return total, classes


def _input_jacobian(fn: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """The input Jacobian of ``fn`` at each image of ``xs``: (C, images, d) in the logits'
    dtype, row j the gradient of logit j (:func:`_activation_bytes` estimates what a forward
    pass keeps). When all images with their C rows fit :data:`_JACOBIAN_BYTES`: one
    forward pass and one backward batched over the C one-hot rows (``is_grads_batched``).
    Otherwise forward passes of as many images as fit, each followed by C plain backward
    passes of its retained graph (logit j summed over the images: the images do not mix, so
    each gets its own gradient). Both give the same values, bit for bit (tested); on the
    ResNet-18 the second takes 0.6× the CPU time of one batched backward and less memory (a
    vmapped backward materialises all C rows' activation gradients at once)."""
    per_image, c = _activation_bytes(fn, xs)
    n = xs.shape[0]
    if per_image * n * c <= _JACOBIAN_BYTES:
        xb = xs.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = fn(xb)
            eye = torch.eye(c, dtype=logits.dtype, device=logits.device)
            grads = torch.autograd.grad(logits, xb, grad_outputs=eye[:, None, :].expand(c, n, c),
                                        is_grads_batched=True)[0]
        return grads.flatten(2)
    step = max(1, _JACOBIAN_BYTES // max(per_image, 1))
    parts = []
    for s in range(0, n, step):
        xb = xs[s:s + step].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = fn(xb)
            rows = [torch.autograd.grad(logits[:, j].sum(), xb, retain_graph=j < c - 1)[0]
                    for j in range(c)]
        parts.append(torch.stack(rows).flatten(2))
        del logits, rows
    return torch.cat(parts, 1)
_BRACKET_LEVELS = 6
#: Relative shrink of every certified radius: covers the float64 arithmetic of the division.
_RADIUS_SAFETY = 1.0 - 1e-9


def _certified_radius(bound: LipschitzBound, x: torch.Tensor, a: torch.Tensor, h: torch.Tensor,
                      norm: str) -> torch.Tensor:
    """Per point: the largest r (float64) such that every input within ``norm`` distance < r
    of x keeps every margin positive, both for the exact (real-arithmetic) network and for its
    floating-point evaluation.

    With ĥ_j the margins of the computed logits, E(x) and E_r the rounding bounds of the
    logits at x and anywhere in the ball of radius r (:meth:`LipschitzBound.rounding`) and L_j
    the margins' Lipschitz constants: r₀ = min_j ĥ_j / L_j, then
    r = min_j (ĥ_j − |a_j|·E(x) − |a_j|·E_{r₀}) / L_j ≤ r₀. Since E grows with the radius,
    E_r ≤ E_{r₀}, so for ‖δ‖ < r: computed margin at x + δ ≥ h_j(x + δ) − |a_j|·E_r ≥
    h_j(x) − L_j‖δ‖ − |a_j|·E_r > ĥ_j − |a_j|·E(x) − |a_j|·E_{r₀} − L_j·r ≥ 0, and the exact
    radius h_j(x)/L_j ≥ (ĥ_j − |a_j|·E(x))/L_j ≥ r."""
    lip = bound.margin_constants(a, norm).clamp_min(1e-300)
    r0 = (h.clamp_min(0) / lip).amin(1)
    r0 = torch.where(torch.isfinite(r0), r0, torch.zeros_like(r0))
    e_center, e_ball = bound.rounding(x, r0, norm)
    assert e_ball is not None  # a radius was given
    a_abs = a.abs().double()
    slack = (torch.einsum("pmc,pc->pm", a_abs, e_center.to(a_abs.device))
             + torch.einsum("pmc,pc->pm", a_abs, e_ball.to(a_abs.device)))
    r = ((h - slack).clamp_min(0) / lip).amin(1) * _RADIUS_SAFETY
    return torch.minimum(r, r0)


def _uncertifiable(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, e_center: torch.Tensor,
                   e_ball: torch.Tensor) -> torch.Tensor:
    """Per point: some margin j has ĥ_j + |a_j|·E(x) ≤ |a_j|·E_ball + b_j (with a relative
    allowance of 1e-6 for this float64 test), i.e. its exact value at x is at most the
    threshold a local bound of it must beat (see :meth:`SafeRadius._local_radius`)."""
    a_abs = a.abs().double()
    reach = h.double() + torch.einsum("pmc,pc->pm", a_abs, e_center.to(a_abs.device))
    thr = torch.einsum("pmc,pc->pm", a_abs, e_ball.to(a_abs.device)) + b
    return (reach <= thr - 1e-6 * (reach.abs() + thr.abs())).any(1)


def _dist(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (adv - x).flatten(1).double()
    if norm == "l1":
        return d.abs().sum(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def _descend(delta: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor,
             norm: str) -> torch.Tensor:
    """One projected steepest-descent step of size ``alpha`` in ``norm`` (sign step for L∞,
    normalised gradient for L2, largest coordinates for L1), back into the ball of ``eps``."""
    shape = (-1,) + (1,) * (delta.ndim - 1)
    if norm == "linf":
        return (delta - alpha * grad.sign()).clamp(-eps, eps)
    if norm == "l1":
        return _project_l1(delta - alpha * _l1_step(grad), eps)
    gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
    delta = delta - alpha * grad / gn
    dn = delta.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
    return delta * (eps / dn).clamp(max=1.0)


def _norm_of(v: torch.Tensor, norm: str) -> torch.Tensor:
    """The ``norm`` itself over the last dimension (L∞, L2 or L1)."""
    if norm == "linf":
        return v.abs().amax(-1)
    return v.abs().sum(-1) if norm == "l1" else v.norm(dim=-1)


def _dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The dual norm over the last dimension (‖·‖₁ for L∞, ‖·‖₂ for L2, ‖·‖∞ for L1)."""
    if norm == "linf":
        return g.abs().sum(-1)
    return g.abs().amax(-1) if norm == "l1" else g.norm(dim=-1)


def box_diameter(lo: float, hi: float, d: int, norm: str) -> float:
    """The largest ``norm`` distance between two points of the box [lo, hi]^d."""
    return (hi - lo) * {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d)}[norm]


#: Fraction of the coordinates an L1 witness step moves (the largest gradient entries).
_L1_STEP_SHARE = 0.05


def _l1_step(grad: torch.Tensor) -> torch.Tensor:
    """A steepest-descent direction of unit L1 norm, per sample: the sign of the gradient on
    its largest ``_L1_STEP_SHARE`` of coordinates (at least one), spread evenly over them (a
    single coordinate, the L1 steepest direction, when the share rounds to one)."""
    flat = grad.flatten(1)
    k = max(1, int(flat.shape[1] * _L1_STEP_SHARE))
    top = flat.abs().topk(k, dim=1).indices
    step = torch.zeros_like(flat).scatter(1, top, flat.gather(1, top).sign() / k)
    return step.view_as(grad)


def _project_l1(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each sample of ``delta`` onto the L1 ball of radius ``eps``
    (per sample, broadcastable to (batch, 1, ...)): soft-thresholding at the level θ that
    makes the L1 norm eps (Duchi et al. 2008); samples inside the ball are unchanged."""
    flat = delta.flatten(1)
    e = eps.reshape(-1).to(flat.dtype)
    e = e.expand(flat.shape[0]) if e.numel() == 1 else e
    mag = flat.abs()
    s = mag.sort(1, descending=True).values
    cs = s.cumsum(1)
    j = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    rho = ((s - (cs - e[:, None]) / j) > 0).sum(1).clamp_min(1)
    theta = ((cs.gather(1, (rho - 1)[:, None])[:, 0] - e) / rho).clamp_min(0)
    proj = flat.sign() * (mag - theta[:, None]).clamp_min(0)
    inside = mag.sum(1) <= e
    return torch.where(inside[:, None], flat, proj).view_as(delta)


def _median(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


# --------------------------------------------------------------------------- invariant kind


class _Joint(nn.Module):
    """J(x) = cat(O(x), f(x)): the oracle's logits, then the model's."""

    def __init__(self, oracle: nn.Module, model: nn.Module):
        super().__init__()
        self.oracle, self.model = oracle, model

    def forward(self, x):
        return torch.cat([self.oracle(x), self.model(x)], dim=1)


def _top_margin(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """logit t − the largest other logit (negative: t is not the argmax)."""
    other = logits.scatter(1, t[:, None], -torch.inf)
    return logits.gather(1, t[:, None])[:, 0] - other.amax(1)


def _single_affine(bound: LipschitzBound | None) -> bool:
    """The network is one affine map x ↦ W x + b (its bound's head is all of it)."""
    return (bound is not None and bound.head is not None and bound.graph is not None
            and len(bound.graph.steps) == 1)


def _model_name(clf: Classifier, ref) -> str:
    name = f"{clf.name} v{clf.version}" if getattr(clf, "version", None) else clf.name
    return f"{name} ({ref})" if ref and str(ref) != name else name


#: Golden-section steps of the joint radius's search over m (the bracket shrinks 0.618× each).
_GOLDEN_STEPS = 80


def _joint_radius(bound_o: LipschitzBound, bound_f: LipschitzBound, x: torch.Tensor,
                  a: torch.Tensor, h_o: torch.Tensor, h_f: torch.Tensor, norm: str,
                  width: float) -> torch.Tensor:
    """Per point, for affine O(x) = W_O x + c and f(x) = W_f x + b (both single affine maps):
    a certified radius of "no invariant example": min_j max_{m ≥ 0} (D_{j,m}(x0) − slack)/
    ‖(e_t − e_j)ᵀ(W_O − m·W_f)‖_dual with D_{j,m} = h^O_j − m·h^f_j (METRICS.md, Family F).

    Inside that radius every D_{j,m} stays > 0 for the chosen m: an invariant example needs
    h^O_j ≤ 0 and h^f_j ≥ 0 for some j, hence D_{j,m} ≤ 0 for every m ≥ 0. Any m is sound, so
    m is searched: (a − m·s)/‖u − m·w‖ is quasi-concave on [0, a/s] (affine over convex), so a
    golden-section search finds its maximum, with m = 0 and the L2 minimiser of the
    denominator also tried. "slack" bounds the float32 rounding of the logits of O and f at x0
    and in the ball (as :func:`_certified_radius`: first without, then with the rounding of
    the ball of that radius). A radius reaching the box's diameter ``width`` means no input
    of the box is an invariant example: inf (the kind's MSR is over the box)."""
    assert bound_o.head is not None
    assert bound_f.head is not None
    rows_o = a.double() @ bound_o.head.double().to(a.device)  # (P, J, d)
    rows_f = a.double() @ bound_f.head.double().to(a.device)
    a_abs = a.abs().double()
    rn = "linf" if norm == "linf" else "l2"
    cap = width * (1 + 1e-6)

    def slack(bound, radius):
        ec, eb = bound.rounding(x, radius, rn)
        return torch.einsum("pmc,pc->pm", a_abs, (ec + eb).to(a_abs.device))

    def best(s_o, s_f):
        num0 = h_o - s_o
        s = h_f + s_f
        m_max = torch.where((s > 0) & (num0 > 0), num0 / s.clamp_min(1e-300),
                            torch.zeros_like(s))

        def value(m):
            den = _dual_norm(rows_o - m[..., None] * rows_f, norm) * NORM_SAFETY
            num = num0 - m * s
            v = torch.where(den > 0, num / den.clamp_min(1e-300),
                            torch.full_like(num, math.inf))
            return torch.where(num > 0, v, torch.zeros_like(v))

        lo, hi = torch.zeros_like(m_max), m_max.clone()
        phi = (math.sqrt(5) - 1) / 2
        for _ in range(_GOLDEN_STEPS):
            c1, c2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
            left = value(c1) >= value(c2)
            hi = torch.where(left, c2, hi)
            lo = torch.where(left, lo, c1)
        ff = (rows_f * rows_f).sum(-1)
        m_l2 = torch.where(ff > 0, (rows_o * rows_f).sum(-1) / ff.clamp_min(1e-300),
                           torch.zeros_like(ff))
        cands = [torch.zeros_like(m_max), (lo + hi) / 2, torch.minimum(m_l2.clamp_min(0), m_max)]
        return torch.stack([value(m) for m in cands]).amax(0).amin(1)  # max over m, min over j

    e0 = torch.einsum("pmc,pc->pm", a_abs, bound_o.rounding(x)[0].to(a_abs.device))
    f0 = torch.einsum("pmc,pc->pm", a_abs, bound_f.rounding(x)[0].to(a_abs.device))
    r_eval = best(e0, f0).clamp(max=cap)  # without the ball's rounding: an upper end
    r = best(slack(bound_o, r_eval), slack(bound_f, r_eval))
    r = torch.minimum(r, r_eval)
    return torch.where(r >= cap, torch.full_like(r, math.inf), r * _RADIUS_SAFETY)


def _range_summary(pp: dict) -> dict:
    """The reachable ranges over the whole set, from the per-point ``range_*`` arrays: per
    "norm:radius:output", the sound outer range [min of range_lo, max of range_hi], the
    witnessed inner range [min of range_min, max of range_max] (values attained at points
    found), and ``violations``: points whose witnessed value lies outside their sound range
    (a bug if ever non-zero)."""
    out = {}
    for key in sorted(k for k in pp if k.startswith("range_lo@")):
        tag = key.split("@", 1)[1]
        lo, hi = pp[f"range_lo@{tag}"], pp[f"range_hi@{tag}"]
        fmin, fmax = pp[f"range_min@{tag}"], pp[f"range_max@{tag}"]
        tol = 1e-6 * (1 + np.abs(fmin)) if fmin.size else 0.0
        sound = np.isfinite(lo) & np.isfinite(hi)
        bad = sound & ((lo > fmin + tol) | (hi < fmax - tol))
        out[tag] = {
            "outer": ([float(lo[sound].min()), float(hi[sound].max())] if sound.any()
                      else None),
            "found": ([float(fmin.min()), float(fmax.max())] if fmin.size else None),
            "violations": int(bad.sum()),
        }
        if out[tag]["violations"]:
            log.warning("safe_radius: %d points have a reachable value outside their sound "
                        "range (%s)", out[tag]["violations"], tag)
    return out


# --------------------------------------------------------------------------- uncertainty (KL)


def kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ softmax(z)) = −log C − (1/C)·Σ_i log p_i = logsumexp(z) − mean(z) − log C,
    per row (0 at the uniform distribution, growing without limit as any p_i → 0)."""
    c = logits.shape[1]
    return torch.logsumexp(logits, 1) - logits.mean(1) - math.log(c)


def kl_of_top1(pi: float, c: int) -> float:
    """The smallest KL(U ‖ p) over distributions p on C classes whose top probability is
    ≥ π (π ≥ 1/C): −log C − (1/C)·(log π + (C−1)·log((1−π)/(C−1))), attained with the other
    classes equal (KL is convex and symmetric in them, and grows with p_top beyond 1/C)."""
    if pi >= 1.0:
        return math.inf
    return -math.log(c) - (math.log(pi) + (c - 1) * math.log((1 - pi) / (c - 1))) / c


def kl_top1(kappa: float, c: int) -> float:
    """The top-1 probability π with :func:`kl_of_top1` (π, C) = κ: top-1 ≥ π implies
    KL(U ‖ p) ≥ κ, so the margins of "top-1 ≥ π" certify "KL ≥ κ" (exactly equivalent for
    C = 2: π = ½(1 + √(1 − e^{−2κ}))). Bisection in float64 to 1e-15, rounded up (a larger
    π only strengthens the sufficient condition)."""
    if c == 2:
        pi = 0.5 * (1 + math.sqrt(-math.expm1(-2 * kappa)))
        return min(math.nextafter(pi, 1.0), 1.0)
    lo, hi = 1.0 / c, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if kl_of_top1(mid, c) >= kappa:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-15:
            break
    return hi


#: Points listed per norm in ``diagnostics[n]["most_vulnerable"]``.
_VULNERABLE = 5


def _most_vulnerable(pp: dict, holds: np.ndarray, nm: str) -> list[dict]:
    """The points where the property holds with the smallest certified radius (else the
    smallest witness): index, sandwich (lower, upper), the estimates and which bound certified
    the lower one; non-finite values as None (JSON)."""
    idx = np.flatnonzero(holds)
    if not idx.size:
        return []
    lower, upper = pp[f"lower@{nm}"][idx], pp[f"upper@{nm}"][idx]
    key = np.where(np.isfinite(lower), lower, np.where(np.isnan(upper), np.inf, upper))
    rows = []
    for i in idx[np.lexsort((idx, key))][:_VULNERABLE]:
        row: dict[str, object] = {"index": int(i)}
        for k in ("lower", "upper", "clever", "estimate"):
            arr = pp.get(f"{k}@{nm}")
            v = float(arr[i]) if arr is not None else math.nan
            row[k] = v if math.isfinite(v) else (None if math.isnan(v) else "inf")
        by = pp.get(f"bound@{nm}")
        row["bound"] = str(by[i]) if by is not None and str(by[i]) else None
        rows.append(row)
    return rows
