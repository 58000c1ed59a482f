"""Robust accuracy under adversarial attacks (Family B), per-point worst case over the attacks.

One algorithm: run every configured torchattacks attack on the points that are still
classified correctly, for each ε, and count the points that survive all of them. Sanity checks
in the style of AutoAttack are recorded with the result (see :class:`RobustAccuracy`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from robust_cert import stats
from robust_cert.data import EvalSet
from robust_cert.errors import ModelError
from robust_cert.metrics.base import (
    MAX_EXAMPLES,
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    _derive_seed,
    batches,
    value_list,
)
from robust_cert.models.base import Classifier, numpy_forward

log = logging.getLogger(__name__)

#: Attack name -> the norms it supports. White-box attacks need input gradients; ``square``
#: only queries the model's outputs (black box).
ATTACKS: dict[str, tuple[str, ...]] = {
    "fgsm": ("linf",),
    "pgd": ("linf", "l2"),
    "apgd_ce": ("linf", "l2"),
    "apgd_t": ("linf", "l2"),
    "fab": ("linf", "l2"),
    "square": ("linf", "l2"),
    "autoattack": ("linf", "l2"),
}
BLACK_BOX = ("square",)
#: Attacks built on a targeted DLR loss over the 3rd and 4th largest logits need 4 classes.
MIN_CLASSES = {"apgd_t": 4, "autoattack": 4}
#: What replaces AutoAttack-standard on a model with fewer than 4 classes.
AUTOATTACK_FALLBACK = ("apgd_ce", "square")
#: Points whose input gradient is exactly zero above this fraction fail ``gradients_nonzero``.
ZERO_GRADIENT_LIMIT = 0.05
#: Level of the one-sided exact McNemar test behind ``square_not_better``: the check fails when
#: Square breaks significantly more of the clean-correct points than the white-box attacks'
#: worst case (Bonferroni across the ε > 0 it is tested at). Under "Square is no stronger than
#: the white-box attacks" the check fails with probability at most this level.
SQUARE_MCNEMAR_LEVEL = 0.01
#: An "adequate" gradient-free attack: Square with at least this many queries per point (the
#: project's default budget; AutoAttack-standard's Square uses 5,000). When such a Square ran
#: on every point the white-box attacks missed, the worst case already includes a
#: gradient-free attack, so a failed gradient-masking check does not undermine the result.
#: This is a convention, not a guarantee: Square is a random search and may miss too.
MIN_SQUARE_QUERIES = 1000
#: AutoAttack-standard's Square budget in torchattacks (``n_queries=5000``).
AUTOATTACK_SQUARE_QUERIES = 5000
#: Sanity-check states.
PASSED, FAILED, NOT_RUN = "passed", "failed", "not_run"
#: How a result crafted on a gradient twin (and judged on the deployed model) is labelled.
TRANSFER = ("transfer from the PyTorch twin: attacks crafted on the twin's gradients, "
            "judged on the deployed model")


if TYPE_CHECKING:  # the type value_list() builds (a call is no type expression)
    Radii = list[float]
else:
    Radii = value_list("ε", low=0)


class RobustAccuracyConfig(MetricConfig):
    """Parameters of :class:`RobustAccuracy` (ε in the data's own units)."""

    eps: Radii = Field(min_length=1, description="radii; 0 is allowed (sanity check)")
    attacks: list[str] = Field(default=["fgsm", "pgd"], min_length=1)
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(default=10, ge=1, le=10_000, description="PGD/APGD/FAB iterations")
    step_size: float | None = Field(default=None, gt=0, description="PGD step; 2.5·ε/steps")
    random_start: bool = True
    square_queries: int = Field(default=1000, ge=1, le=100_000,
                                description="query budget of the Square attack")

    @model_validator(mode="before")
    @classmethod
    def _default_attacks(cls, data):
        """Without ``attacks``: FGSM + PGD for L∞, PGD for L2 (FGSM is L∞ only)."""
        if isinstance(data, dict) and data.get("attacks") is None:
            data = {**data, "attacks": ["pgd"] if data.get("norm") == "l2" else ["fgsm", "pgd"]}
        return data

    @field_validator("attacks", mode="before")
    @classmethod
    def _known_attacks(cls, v):
        if isinstance(v, str):
            v = [v]
        out = []
        for a in v:
            name = str(a).strip().lower().replace("-", "_")
            if name not in ATTACKS:
                raise ValueError(f"unknown attack {a!r}; valid attacks: {', '.join(ATTACKS)}")
            if name not in out:
                out.append(name)
        return out

    @model_validator(mode="after")
    def _norm_supported(self):
        for a in self.attacks:
            if self.norm not in ATTACKS[a]:
                raise ValueError(f"attack {a!r} does not support norm {self.norm!r} "
                                 f"(it supports: {', '.join(ATTACKS[a])})")
        return self


class _UnitRangeView(nn.Module):
    """Presents a model on inputs in [lo, hi] of shape ``shape`` as one on [0, 1] images.

    torchattacks wants NCHW input in [0, 1]; inputs of any other rank (tabular (N, d) rows)
    are presented as (N, 1, 1, d + 1) and reshaped back before the model sees them. The extra
    last column is ignored by the model: torchattacks' Square never places a window on the
    last column (``random_int(0, w - s)`` excludes its upper end), so without it the last
    feature of a row could never be searched.
    """

    def __init__(self, inner: nn.Module, lo: float, hi: float, shape: tuple[int, ...]):
        super().__init__()
        self.inner, self.lo, self.scale, self.shape = inner, lo, hi - lo, tuple(shape)
        #: When a list, the gradient of the next backward pass through the view (the attack's
        #: first gradient, at its starting point) is appended to it: a free gradient probe.
        self.probe: list[torch.Tensor] | None = None

    def to_attack(self, x: torch.Tensor) -> torch.Tensor:
        u = x if self.lo == 0.0 and self.scale == 1.0 else (x - self.lo) / self.scale
        if u.ndim == 4:
            return u
        flat = u.reshape(u.shape[0], 1, 1, -1)
        return torch.cat([flat, torch.zeros_like(flat[..., :1])], dim=-1)

    def to_data(self, u: torch.Tensor) -> torch.Tensor:
        if u.device.type == "cpu" and u.dtype == torch.float32 and not u.requires_grad:
            return torch.from_numpy(self._to_data_numpy(u.numpy()))
        if len(self.shape) != 3:
            u = u[..., :-1].reshape(u.shape[0], *self.shape)
        if self.lo == 0.0 and self.scale == 1.0:
            return u
        return self.lo + self.scale * u

    def _to_data_numpy(self, u: np.ndarray) -> np.ndarray:
        """:meth:`to_data` of a float32 array, in numpy: the same float32 values (``lo`` and
        ``scale`` are rounded to float32 and applied by one multiplication and one addition,
        as torch's CPU kernels apply a Python scalar), without torch's per-operation dispatch,
        which in the Square attack's loop is paid at every query."""
        if len(self.shape) != 3:
            u = u[..., :-1].reshape(u.shape[0], *self.shape)
        if self.lo == 0.0 and self.scale == 1.0:
            return np.ascontiguousarray(u)
        out = np.multiply(u, np.float32(self.scale))
        return np.add(out, np.float32(self.lo), out=out)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.probe is not None and u.requires_grad:
            probe, self.probe = self.probe, None
            u.register_hook(lambda grad: probe.append(grad.detach()))
        return self.inner(self.to_data(u))

    def numpy_forward(self):
        """:meth:`to_data`'s numpy arithmetic before the inner model's numpy form, when it
        has one (:func:`robust_cert.models.base.numpy_forward`): on a float32 array, what
        ``self`` gives on the same array as a CPU tensor without gradients."""
        inner = numpy_forward(self.inner)
        if inner is None:
            return None
        to_data = self._to_data_numpy
        return lambda u: inner(to_data(u))


def _norms(d: torch.Tensor, norm: str) -> torch.Tensor:
    flat = d.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def _project(adv: torch.Tensor, u: torch.Tensor, eps01: float, norm: str) -> torch.Tensor:
    """Project ``adv`` onto the ε-ball around ``u`` and the unit box (soundness guard)."""
    d = adv - u
    if norm == "linf":
        d = d.clamp(-eps01, eps01)
    else:
        n = _norms(d, "l2").clamp_min(1e-30)
        d = d * (eps01 / n).clamp(max=1.0).view(-1, *([1] * (d.ndim - 1)))
    return (u + d).clamp(0.0, 1.0)


class RobustAccuracy(Metric[RobustAccuracyConfig]):
    """Robust accuracy at each ε: the fraction of points classified correctly at x and under
    every configured attack within the ε-ball (L∞ or L2, clipped to the input range).

    Kind: empirical. An attack that fails to find an adversarial example proves nothing, so
    this is an **upper bound** on the true robust accuracy; its Clopper–Pearson interval covers
    the sampling of test points only, not the attack's misses. The values over ε are the
    robustness curve.

    On a model without gradients that has a validated gradient twin (an ONNX graph and its
    PyTorch source, see :func:`robust_cert.models.twin.with_gradient_twin`), the attacks are
    crafted on the twin and judged on the deployed model: transfer from the PyTorch twin. The
    result's description and ``diagnostics["attack_source"]`` say so; it is still an upper
    bound.

    Per point: ``robust`` (points × ε). For reports, the first ``MAX_EXAMPLES`` (8) points
    broken at the smallest ε (ties: lowest index) keep the adversarial input that broke them
    there and the model's prediction on it: ``example_index``, ``example_eps``,
    ``example_adv`` (k × input shape, float32), ``example_pred``.

    Args (policy ``metrics.robust_accuracy``):
        eps: list of radii in data units, e.g. ``[0.05, 0.1]``.
        attacks: any of ``fgsm`` (L∞ only), ``pgd`` (L∞ or L2), ``apgd_ce``, ``apgd_t``,
            ``fab``, ``square`` (black box), ``autoattack`` (AutoAttack-standard: APGD-CE,
            APGD-T, FAB-T, Square); default ``[fgsm, pgd]`` (``[pgd]`` for L2). A point
            counts as robust only if it survives all of them (per-point worst case).
            White-box attacks run first and Square last, so the points Square alone breaks
            are visible.
        norm: ``linf`` (default) or ``l2``; an attack without that norm is a policy error.
        steps: PGD/APGD/FAB iterations (default 10). step_size: PGD step (default 2.5·ε/steps).
        random_start: PGD starts uniformly in the ball (default true).
        square_queries: Square's query budget (default 1,000).

    Fallbacks: ``apgd_t`` needs at least 4 classes (an error otherwise). ``autoattack`` on a
    model with fewer than 4 classes runs APGD-CE + Square instead; ``diagnostics["fallback"]``
    records it. Tabular inputs (N, d) are presented to the attacks as (N, 1, 1, d + 1) images
    (one ignored padding column, see :class:`_UnitRangeView`). Square and AutoAttack in L2
    need images of at least 5×5 pixels (an error otherwise, e.g. for tabular inputs).

    Sanity checks (``diagnostics["sanity"]``: each ``"passed"``, ``"failed"`` or
    ``"not_run"``; a check that did not run never reads as passed):

    - ``eps0_equals_clean``: the attacked view of the model reproduces its clean predictions.
      Run when the view differs from the judged model (a gradient twin, a rescaled input
      range, reshaped tabular input); not run when the view is the model itself.
    - ``in_range_and_ball``: every attack returned inputs in the input range and the ε-ball.
      Points outside are projected back before they are judged, so a failure is recorded but
      undermines nothing.
    - ``gradients_nonzero``: at most 5% of the points the first white-box attack starts from
      have an exactly zero input gradient (read from the attack's own first gradient, at no
      extra cost). Not run without a white-box attack.
    - ``square_not_better``: an exact one-sided McNemar test, at each ε > 0, of the per-point
      outcomes of the white-box attacks' worst case against Square on every clean-correct
      point (``diagnostics["square_vs_white_box"]``: points only the white-box attacks broke,
      points only Square broke, p-value). It fails when Square is significantly better at
      level :data:`SQUARE_MCNEMAR_LEVEL` (Bonferroni across ε): gradient masking suspected.
      Not run unless both Square and a white-box attack are configured; then Square attacks
      every clean-correct point, not only those the white-box attacks missed.

    A failed ``eps0_equals_clean``, ``gradients_nonzero`` or ``square_not_better`` means the
    attacks may be blind, so the upper bound may be far above the truth: it is listed in
    ``diagnostics["sanity_findings"]`` with the requirements it undermines (every ε > 0), and
    :func:`robust_cert.verdict.apply_sanity` makes their PASS verdicts INCONCLUSIVE unless
    the policy waives the check. The two gradient-masking checks are compensated (recorded
    in the finding's ``compensated_by``, verdict unchanged) when an adequate gradient-free
    attack is already in the worst case: Square with at least :data:`MIN_SQUARE_QUERIES`
    queries, alone or inside AutoAttack-standard (5,000 queries). Whether the model is random
    at evaluation time is checked once per certification (``certificate.sanity``).

    Sharding (:attr:`shardable`): the engine runs it on blocks of one batch each. What
    is drawn per block: each attack call on a batch of points (PGD's random start, the seeds
    of APGD, APGD-T, FAB, Square and AutoAttack) is seeded from (seed, attack, ε, index of
    the batch's first point in the whole set), so a block draws exactly what a run on the
    whole set with the same batch size draws for those points; nothing is drawn for the
    whole set. Counts, per-point outcomes, worst excesses and examples merge;
    :meth:`finalize` recomputes the McNemar p-values from the merged counts, every sanity
    state, the findings, and logs the fallback and failed checks once
    (``diagnostics["clean_correct_points"]``, ``["view_mismatch_points"]`` and
    ``["attacked_inputs"]`` are the counts it needs).

    Example::

        RobustAccuracy(RobustAccuracyConfig(eps=[0.1], attacks=["pgd", "square"]))\\
            .run(model, data, ctx)
    """

    name = "robust_accuracy"
    description = "P[f(x') = y for every attack's x' with ||x' - x|| <= ε] (upper bound)"
    Config = RobustAccuracyConfig

    #: counts add and worst excesses take the max; the McNemar p-values and every state that
    #: follows from the merged counts are recomputed by :meth:`finalize`
    merge_rules = {
        "broken_by_attack": "sum",  # attack -> counts per ε
        "max_linf_excess": "max",
        "max_l2_excess": "max",
        "range_violations": "sum",
        "attack_order": "same",
        "norm": "same",
        "zero_gradient_points": "sum",
        "gradient_points_probed": "sum",
        "square_only_breaks": "sum",
        "square_vs_white_box": {"eps": "same", "white_box_only": "sum", "square_only": "sum",
                                "p_value": "recompute"},
        "clean_correct_points": "sum",
        "view_mismatch_points": "sum",
        "attacked_inputs": "sum",
        "fallback": "same",
        "sanity": "recompute",
        "sanity_findings": "recompute",
        "eps0_equals_clean": "recompute",
        "attack_source": "same",
    }

    def __init__(self, config: RobustAccuracyConfig):
        super().__init__(config)
        #: only the black-box attack (Square) needs no input gradients: such a configuration
        #: runs on any model, ONNX and scikit-learn-style models included, by queries alone
        self.needs_gradients = any(a not in BLACK_BOX for a in config.attacks)

    def selectors(self):
        return [{"eps": e} for e in self.config.eps]

    def cost(self, n_points: int) -> int:
        return n_points * len(self.config.eps) * len(self.config.attacks)

    def plan(self, num_classes: int) -> tuple[list[str], str | None]:
        """The attacks to run in order (white box first, Square last) and the fallback note."""
        attacks, note = [], None
        for a in self.config.attacks:
            if a == "autoattack" and num_classes < MIN_CLASSES[a]:
                note = (f"AutoAttack-standard needs at least 4 classes (targeted DLR loss); "
                        f"the model has {num_classes}: ran {' + '.join(AUTOATTACK_FALLBACK)} "
                        "instead")
                attacks += [b for b in AUTOATTACK_FALLBACK if b not in attacks]
            elif a in MIN_CLASSES and num_classes < MIN_CLASSES[a]:
                raise ModelError(f"attack {a} needs at least {MIN_CLASSES[a]} classes; the model "
                                 f"has {num_classes}")
            elif a not in attacks:
                attacks.append(a)
        attacks.sort(key=lambda a: a in BLACK_BOX)
        return attacks, note

    def _attack(self, name: str, view: nn.Module, eps01: float, seed: int, num_classes: int):
        import torchattacks

        from robust_cert.metrics.square import FullSquare, full_square_inside

        cfg = self.config
        tnorm = "Linf" if cfg.norm == "linf" else "L2"
        if name == "fgsm":
            return torchattacks.FGSM(view, eps=eps01)
        if name == "pgd":
            step = (cfg.step_size / self._scale) if cfg.step_size else 2.5 * eps01 / cfg.steps
            cls = torchattacks.PGD if cfg.norm == "linf" else torchattacks.PGDL2
            return cls(view, eps=eps01, alpha=step, steps=cfg.steps,
                       random_start=cfg.random_start)
        if name == "apgd_ce":
            return torchattacks.APGD(view, norm=tnorm, eps=eps01, steps=cfg.steps, seed=seed,
                                     loss="ce")
        if name == "apgd_t":
            return torchattacks.APGDT(view, norm=tnorm, eps=eps01, steps=cfg.steps, seed=seed,
                                      n_classes=num_classes)
        if name == "fab":
            return torchattacks.FAB(view, norm=tnorm, eps=eps01, steps=cfg.steps, seed=seed,
                                    n_classes=num_classes, multi_targeted=True)  # FAB-T
        if name == "square":
            return FullSquare(view, norm=tnorm, eps=eps01, seed=seed,
                              n_queries=cfg.square_queries)
        return full_square_inside(torchattacks.AutoAttack(
            view, norm=tnorm, eps=eps01, version="standard", n_classes=num_classes, seed=seed))

    def gradient_free(self, attacks: list[str]) -> str | None:
        """The adequate gradient-free attack in the worst case (see
        :data:`MIN_SQUARE_QUERIES`), described; None when there is none."""
        q = self.config.square_queries
        if "square" in attacks and q >= MIN_SQUARE_QUERIES:
            return (f"Square with {q} queries per point (adequate: at least "
                    f"{MIN_SQUARE_QUERIES}) in the worst case")
        if "autoattack" in attacks:
            return (f"Square inside AutoAttack-standard ({AUTOATTACK_SQUARE_QUERIES} queries per "
                    f"point; adequate: at least {MIN_SQUARE_QUERIES}) in the worst case")
        return None

    def _findings(self, sanity: dict, attacks: list[str], zero_grad: int, probed: int,
                  view_mismatch: int, comparison: list[dict], out_of_bounds: int = 0) -> dict:
        """The failed checks that undermine results: check -> detail, the proportions they
        undermine (every ε > 0, as requirement parameters), and what compensates (or None)."""
        undermines = [{"eps": e} for e in self.config.eps if e > 0]
        free = self.gradient_free(attacks)
        out = {}
        if sanity["eps0_equals_clean"] == FAILED:
            out["eps0_equals_clean"] = {
                "detail": f"the attacked view of the model disagrees with its clean "
                          f"predictions on {view_mismatch} points, so every attack searched "
                          "a different model",
                "undermines": undermines, "compensated_by": None}
        if sanity["in_range_and_ball"] == FAILED:
            out["in_range_and_ball"] = {
                "detail": f"an attack returned {out_of_bounds} inputs outside the input range or "
                          "the ε-ball; they were projected back before being judged, so every "
                          "judged input is within the threat model",
                "undermines": [], "compensated_by": None}
        if sanity["gradients_nonzero"] == FAILED:
            out["gradients_nonzero"] = {
                "detail": f"gradient masking suspected: {zero_grad} of {probed} points have an "
                          f"exactly zero input gradient (limit {ZERO_GRADIENT_LIMIT:.0%}), so "
                          "gradient attacks are blind there",
                "undermines": undermines, "compensated_by": free}
        if sanity["square_not_better"] == FAILED:
            worst = min(comparison, key=lambda c: c["p_value"])
            out["square_not_better"] = {
                "detail": f"gradient masking suspected: at ε = {worst['eps']:g} the black-box "
                          f"Square attack broke {worst['square_only']} points the white-box "
                          f"attacks missed against {worst['white_box_only']} the other way "
                          f"(one-sided exact McNemar p = {worst['p_value']:.2g}, level "
                          f"{SQUARE_MCNEMAR_LEVEL:g}/{len(comparison)})",
                "undermines": undermines, "compensated_by": free}
        return out

    def _attack_seed(self, ctx: RunContext, attack: str, eps: float, start: int) -> int:
        """The seed of one attack call: (seed, attack, ε, index of the batch's first point in
        the whole evaluation set). A batch draws the same numbers in a run on the whole set
        and in the engine's block that holds it (blocks are batches of the same size): the
        global index already places the block, so the plain label is used (as
        :meth:`RunContext.global_generator` does) rather than :meth:`RunContext.derive`,
        which would add the block's offset a second time."""
        return _derive_seed(ctx.seed, f"{self.name}/{attack}/{eps!r}/{start}")

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        attacks, fallback = self.plan(model.num_classes)
        lo, hi = data.input_range
        self._scale = hi - lo
        # a model without gradients is attacked by queries alone (Square; white-box attacks
        # make needs_gradients true, and the engine does not run them on such a model)
        inner = model.attack_module() if model.differentiable else model.query_module()
        view = _UnitRangeView(inner, lo, hi, data.input_shape)
        small = [a for a in attacks if a in ("square", "autoattack")]
        if cfg.norm == "l2" and small:
            h, w = view.to_attack(data.x[:1]).shape[-2:]
            if min(h, w) < 5:
                raise ModelError(f"{small[0]} with norm l2 needs images of at least 5×5 pixels "
                                 f"(torchattacks' Square L2 tiles the image in fifths); the "
                                 f"inputs are presented as {h}×{w}: use norm linf or other "
                                 "attacks")
        n, n_eps, dev = len(data), len(cfg.eps), ctx.device
        # per-point outcomes and counters stay on the device; one copy at the end
        robust_t = torch.zeros((n, n_eps), dtype=torch.bool, device=dev)
        broken_t = torch.zeros((len(attacks), n_eps), dtype=torch.int64, device=dev)
        white_t = torch.zeros(n_eps, dtype=torch.int64, device=dev)  # only white-box broke
        square_t = torch.zeros(n_eps, dtype=torch.int64, device=dev)  # only Square broke
        # clean-correct points, view mismatches, zero-gradient points, out-of-bounds outputs
        counts_t = torch.zeros(4, dtype=torch.int64, device=dev)
        excess_t = torch.zeros((), dtype=torch.float64, device=dev)
        probed, attacked_pairs = 0, 0  # sizes known on the host
        # paired design: Square attacks every clean-correct point when white-box attacks run
        # too, so the two worst cases can be compared point by point (McNemar)
        paired = "square" in attacks and any(a not in BLACK_BOX for a in attacks)
        # the adversarial inputs of the first MAX_EXAMPLES points broken at the smallest ε
        first_broken = np.full(n, -1, dtype=np.int64)
        examples: list[tuple[int, int, np.ndarray, int]] = []
        identical = _view_is_model(model, data)
        for sl, x, y in batches(data, ctx.batch_size, dev):
            u = view.to_attack(x)
            clean_ok = model.logits(x).argmax(1) == y
            counts_t[0] += clean_ok.sum()
            if not identical:
                with torch.no_grad():
                    counts_t[1] += (view(u).argmax(1) == y).ne(clean_ok).sum()
            first_white_box = True
            for j, eps in enumerate(cfg.eps):
                alive = clean_ok.clone()
                eps01 = eps / self._scale
                for ai, a in enumerate(attacks):
                    whole = paired and a == "square"
                    idx = (clean_ok if whole else alive).nonzero().squeeze(1)  # one sync
                    if not (idx.numel() and eps > 0):
                        continue
                    attacked_pairs += idx.numel()
                    seed = self._attack_seed(ctx, a, eps, ctx.offset + sl.start)
                    torch.manual_seed(seed)  # for attacks that draw from the global generator
                    atk = self._attack(a, view, eps01, seed % 2**31, model.num_classes)
                    ui = u[idx]
                    grads: list[torch.Tensor] = []
                    if first_white_box and a not in BLACK_BOX:
                        view.probe, first_white_box = grads, False
                    adv = atk(ui, y[idx]).detach()
                    view.probe = None
                    if grads and grads[0].shape[0] == idx.numel():
                        counts_t[2] += (grads[0].flatten(1).abs().amax(1) == 0).sum()
                        probed += idx.numel()
                    excess = _norms(adv - ui, cfg.norm) - eps01
                    outside = (adv < 0).flatten(1).any(1) | (adv > 1).flatten(1).any(1)
                    counts_t[3] += (outside | (excess > 1e-6)).sum()
                    excess_t = torch.maximum(excess_t, excess.max().double())
                    adv = _project(adv, ui, eps01, cfg.norm)
                    adv_x = view.to_data(adv)
                    pred = model.logits(adv_x).argmax(1)
                    still = pred == y[idx]
                    if whole:  # alive[idx] is False where a white-box attack broke it
                        was = alive[idx]
                        white_t[j] += (~was & still).sum()
                        square_t[j] += (was & ~still).sum()
                        still = still & was
                    broken_t[ai, j] += (alive[idx] & ~still).sum()
                    if _may_keep(examples, j):
                        _keep_examples(examples, first_broken, sl.start + idx.cpu().numpy(), j,
                                       (~still).cpu().numpy(), adv_x, pred)
                    alive[idx] = still
                ctx.advance((sl.stop - sl.start) * len(cfg.attacks))  # as cost() counts
                robust_t[sl, j] = alive
        robust = robust_t.cpu().numpy()
        n_clean, view_mismatch, zero_grad, out_of_bounds = counts_t.tolist()
        broken = broken_t.tolist()
        white_only, square_only = white_t.tolist(), square_t.tolist()
        props = [Proportion({"eps": e}, int(robust[:, j].sum()), n) for j, e in enumerate(cfg.eps)]
        comparison = [{"eps": e, "white_box_only": white_only[j], "square_only": square_only[j],
                       "p_value": 1.0}
                      for j, e in enumerate(cfg.eps) if e > 0] if paired else []
        diagnostics = {
            "broken_by_attack": {a: broken[i] for i, a in enumerate(attacks)},
            f"max_{cfg.norm}_excess": max(0.0, float(excess_t) * self._scale),
            "range_violations": out_of_bounds,
            "attack_order": attacks,
            "norm": cfg.norm,
            "zero_gradient_points": zero_grad,
            "gradient_points_probed": probed,
            "square_only_breaks": sum(square_only) if paired else 0,
            "square_vs_white_box": comparison,
            "clean_correct_points": n_clean,
            "view_mismatch_points": view_mismatch,
            "attacked_inputs": attacked_pairs,
        }
        if fallback:
            diagnostics["fallback"] = fallback
        self._conclude(diagnostics, n, identical)
        transfer = model.gradient_forward is not None
        diagnostics["attack_source"] = TRANSFER if transfer else "white-box on the model"
        examples.sort(key=lambda e: e[:2])
        per_point = {
            "robust": robust,
            "example_index": np.array([e[1] for e in examples], dtype=np.int64),
            "example_adv": np.array([e[2] for e in examples], dtype=np.float32).reshape(
                len(examples), *data.input_shape),
            "example_pred": np.array([e[3] for e in examples], dtype=np.int64),
            "example_eps": np.array([cfg.eps[e[0]] for e in examples], dtype=np.float64),
        }
        res = self.result(props, per_point=per_point, diagnostics=diagnostics)
        if transfer:
            res.description = f"{self.description}; {TRANSFER}"
        return res

    def _conclude(self, diagnostics: dict, points: int, identical: bool) -> None:
        """Set what follows from the counts in ``diagnostics`` (of one block, or merged):
        the McNemar p-values of ``square_vs_white_box``, the ``sanity`` states, the
        ``sanity_findings`` and the legacy ``eps0_equals_clean``."""
        comparison = diagnostics["square_vs_white_box"]
        for c in comparison:
            b, s = c["white_box_only"], c["square_only"]
            c["p_value"] = stats.binom_test_pvalue(s, b + s, 0.5, "greater") if b + s else 1.0
        zero_grad, probed = diagnostics["zero_gradient_points"], diagnostics[
            "gradient_points_probed"]
        view_mismatch, out_of_bounds = (diagnostics["view_mismatch_points"],
                                        diagnostics["range_violations"])
        sanity = {
            "eps0_equals_clean": _state(not identical and points > 0, view_mismatch == 0),
            "in_range_and_ball": _state(diagnostics["attacked_inputs"] > 0, out_of_bounds == 0),
            "gradients_nonzero": _state(probed > 0, zero_grad <= ZERO_GRADIENT_LIMIT * probed),
            "square_not_better": _state(
                bool(comparison) and diagnostics["clean_correct_points"] > 0,
                all(c["p_value"] > SQUARE_MCNEMAR_LEVEL / len(comparison) for c in comparison)),
        }
        diagnostics["sanity"] = sanity
        diagnostics["sanity_findings"] = self._findings(
            sanity, diagnostics["attack_order"], zero_grad, probed, view_mismatch, comparison,
            out_of_bounds)
        if self.config.eps[0] == 0:
            diagnostics["eps0_equals_clean"] = sanity["eps0_equals_clean"]

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """Recompute from the merged counts what is not a sum of the blocks': the McNemar
        p-values, every sanity state and the findings; then log the fallback and the failed
        checks (once). Counts, worst excesses, per-point outcomes and examples merge as they
        are."""
        self._conclude(result.diagnostics, len(result.per_point["robust"]),
                       _view_is_model(model, data))
        if "fallback" in result.diagnostics:
            log.warning("robust_accuracy: %s", result.diagnostics["fallback"])
        _warn(result.diagnostics["sanity_findings"])
        return result


def _view_is_model(model: Classifier, data: EvalSet) -> bool:
    """True when the attacked view is the judged model itself (no gradient twin, inputs in
    [0, 1], images): ``eps0_equals_clean`` has nothing to compare."""
    return (model.gradient_forward is None and tuple(data.input_range) == (0.0, 1.0)
            and len(data.input_shape) == 3)


def _may_keep(examples: list, j: int) -> bool:
    """False when no point first broken at ε index j can become an example: MAX_EXAMPLES
    are kept already, all broken at a smaller ε (then neither can any at a larger one)."""
    return len(examples) < MAX_EXAMPLES or max(e[0] for e in examples) >= j


def _keep_examples(examples: list, first_broken: np.ndarray, index: np.ndarray, j: int,
                   broken: np.ndarray, adv_x: torch.Tensor, pred: torch.Tensor) -> None:
    """Record the adversarial input and prediction of the points first broken at ε index j;
    ``examples`` keeps (j, point, input, prediction) of the MAX_EXAMPLES points broken at the
    smallest ε (ties: lowest index). Only the rows kept are copied from the device, at once."""
    rows = np.flatnonzero(broken)
    rows = rows[first_broken[index[rows]] < 0]
    if not rows.size:
        return
    first_broken[index[rows]] = j
    # the MAX_EXAMPLES smallest (ε index, point) keys of the kept examples and the new rows
    keys = sorted([(e[0], e[1], -1) for e in examples]
                  + [(j, int(index[r]), int(r)) for r in rows])[:MAX_EXAMPLES]
    new = [r for _, _, r in keys if r >= 0]
    examples[:] = [e for e in examples if (e[0], e[1], -1) in keys]
    if new:
        sel = torch.as_tensor(new, device=adv_x.device)
        advs = adv_x[sel].detach().float().cpu().numpy()
        preds = pred[sel].cpu().tolist()
        examples += [(j, int(index[r]), a, p) for r, a, p in zip(new, advs, preds, strict=True)]


def _state(ran: bool, ok: bool) -> str:
    """The three-state outcome of a sanity check."""
    return NOT_RUN if not ran else PASSED if ok else FAILED


def _warn(findings: dict) -> None:
    for check, f in findings.items():
        log.warning("robust_accuracy: sanity check %s failed: %s%s", check, f["detail"],
                    f"; compensated by {f['compensated_by']}" if f["compensated_by"] else "")
