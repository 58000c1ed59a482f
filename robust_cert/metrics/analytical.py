"""Analytical estimators of local robustness to Gaussian noise (Han, Srinivas & Lakkaraju;
Family E): p_σ(x) from a local linear model and a multivariate normal CDF."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator
from scipy import stats as _st
from scipy.stats import qmc

from robust_cert import stats
from robust_cert.data import EvalSet
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    value_list,
)
from robust_cert.metrics.jacobians import logits_and_jacobian, noisy_logits_and_mean_jacobian
from robust_cert.metrics.local_probabilistic import to_device
from robust_cert.models.base import Classifier

Estimator = Literal["taylor", "mmse", "mvs", "mmse_mvs", "softmax"]
RIDGE = 1e-5  # added to the correlation matrix, as in Han et al.


# --------------------------------------------------------------------------- MVN CDF


def mvn_cdf(upper: torch.Tensor, corr: torch.Tensor, points: int = 1024, shifts: int = 8,
            seed: int = 0, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """P(Z ≤ upper) for Z ~ N(0, corr), batched over many integrals at once, on their device.

    ``upper`` (P, k), ``corr`` (P, k, k) positive definite. Genz's separation of variables
    (variables reordered by increasing upper limit, Cholesky factor L) turns each integral into
    an expectation over the unit cube [0, 1]^{k−1}; it is evaluated with ``shifts``
    independently scrambled Sobol sets of ``points / shifts`` points each, shared by all
    integrals. Returns (estimate, standard error over the shifts), both (P,) float64.
    k = 1 is exact: Φ(upper / √corr).
    """
    upper = upper.to(torch.float64)
    corr = corr.to(torch.float64)
    p, k = upper.shape
    if k == 1:
        est = torch.special.ndtr(upper[:, 0] / corr[:, 0, 0].sqrt())
        return est, torch.zeros_like(est)
    per = max(1, points // shifts)
    # scipy >= 1.15 names it rng in its signature (seed still accepted); scipy 1.11 has no rng
    w = np.stack([qmc.Sobol(d=k - 1, scramble=True, seed=seed + s).random(per)  # pyright: ignore[reportCallIssue]
                  for s in range(shifts)])  # (shifts, per, k-1)
    w = to_device(torch.from_numpy(w.reshape(shifts * per, k - 1)), upper.device)
    order = upper.argsort(dim=1)
    b = upper.gather(1, order)
    s_perm = corr.gather(1, order[:, :, None].expand(p, k, k))
    s_perm = s_perm.gather(2, order[:, None, :].expand(p, k, k))
    chol = torch.linalg.cholesky(s_perm)
    tiny = 1e-300
    est = torch.empty(p, dtype=torch.float64, device=upper.device)
    err = torch.empty_like(est)
    for c in range(0, p, chunk):
        L, bb = chol[c:c + chunk], b[c:c + chunk]
        n = L.shape[0]
        e = torch.special.ndtr(bb[:, :1] / L[:, :1, 0]).expand(n, w.shape[0])
        f = e.clone()
        ys = torch.zeros((n, w.shape[0], k - 1), dtype=torch.float64, device=upper.device)
        for i in range(1, k):
            u = (w[None, :, i - 1] * e).clamp(tiny, 1 - 1e-16)
            ys[:, :, i - 1] = torch.special.ndtri(u)
            shift = (ys[:, :, :i] * L[:, None, i, :i]).sum(-1)
            e = torch.special.ndtr((bb[:, i:i + 1] - shift) / L[:, i:i + 1, i])
            f = f * e
        by_shift = f.view(n, shifts, per).mean(2)
        est[c:c + n] = by_shift.mean(1)
        err[c:c + n] = by_shift.std(1) / math.sqrt(shifts) if shifts > 1 else 0.0
    return est, err


def mvn_cdf_scipy(upper: np.ndarray, corr: np.ndarray, seed: int = 0) -> np.ndarray:
    """Reference path: scipy's ``multivariate_normal.cdf`` (Genz), one integral at a time."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(upper))
    for i, (b, s) in enumerate(zip(upper, corr, strict=True)):
        if len(b) == 1:
            out[i] = _st.norm.cdf(b[0] / math.sqrt(s[0, 0]))
        else:
            out[i] = _st.multivariate_normal(mean=np.zeros(len(b)), cov=s).cdf(b, rng=rng)
    return out


# --------------------------------------------------------------------------- estimators


def jacobian_budget(model: Classifier, max_forward_images: int) -> int:
    """Image-backward passes per Jacobian call (class rows × images): ``max_forward_images``,
    or the model's ``max_batch`` (on CPU: the batch size) when smaller."""
    return min(max_forward_images, model.max_batch or max_forward_images)


def margins(logits: torch.Tensor, jac: torch.Tensor, target: torch.Tensor, sigma: float):
    """z_i = g_i / (σ‖∇g_i‖) and the correlation Σ_ij = cos(∇g_i, ∇g_j) + ridge·I, with
    g_i = f_t − f_i over the C − 1 classes i ≠ t (float64)."""
    p, c = logits.shape
    logits, jac = logits.to(torch.float64), jac.to(torch.float64)
    # the classes i ≠ t in increasing order, without a host-device synchronisation
    rest = torch.arange(c - 1, device=logits.device)[None]
    others = rest + (rest >= target[:, None]).long()
    g = logits.gather(1, target[:, None]) - logits.gather(1, others)
    jt = jac[torch.arange(p, device=logits.device), target][:, None]
    grad = jt - jac.gather(1, others[:, :, None].expand(p, c - 1, jac.shape[2]))
    norm = grad.norm(dim=2).clamp_min(1e-30)
    z = g / (sigma * norm)
    unit = grad / norm[:, :, None]
    corr = unit @ unit.transpose(1, 2) + RIDGE * torch.eye(c - 1, dtype=torch.float64,
                                                           device=logits.device)
    return z, corr


def mvs(z: torch.Tensor) -> torch.Tensor:
    """Multivariate-sigmoid approximation of the MVN CDF: 1 / (1 + Σ_i exp(−z_i))."""
    return torch.sigmoid(-torch.logsumexp(-z, dim=1))


def monte_carlo_p(model: Classifier, x: torch.Tensor, target: torch.Tensor, sigma: float,
                  draws: int, generator: torch.Generator, max_forward_images: int = 4096):
    """Counts k of draws where argmax f(x + ε) = t, ε ~ N(0, σ²I), batched over points
    (counted on the model's device, copied back once; numpy int64)."""
    k = torch.zeros(len(x), dtype=torch.long, device=model.device)
    target = to_device(target, model.device)
    block = min(draws, max_forward_images)
    per = max(1, max_forward_images // block)
    for s in range(0, len(x), per):
        xs, ts = x[s:s + per], target[s:s + per]
        done = 0
        while done < draws:
            b = min(block, draws - done)
            noise = torch.randn((len(xs), b, *xs.shape[1:]), generator=generator) * sigma
            pred = model.logits(to_device((xs[:, None] + noise).flatten(0, 1), model.device))
            k[s:s + len(xs)] += (pred.argmax(1).view(len(xs), b) == ts[:, None]).sum(1)
            done += b
    return k.cpu().numpy()


if TYPE_CHECKING:  # the type value_list() builds (a call is no type expression)
    Thresholds = list[float]
else:
    Thresholds = value_list("thresholds", low=0, high=1, low_open=True)


class AnalyticalConfig(MetricConfig):
    """Parameters of :class:`AnalyticalRobustness`."""

    sigma: float = Field(gt=0, description="σ of the Gaussian noise N(0, σ²I)")
    estimators: list[Estimator] = Field(
        default=["taylor", "mmse", "mvs", "softmax"], min_length=1)
    primary: Estimator = Field(default="mmse", validate_default=True,
                               description="the estimator ranked and reported")
    mmse_samples: int = Field(default=16, ge=1, le=100_000, description="noisy copies (mmse, "
                              "softmax), in antithetic pairs: odd counts round up")
    qmc_points: int = Field(default=1024, ge=8, le=1_000_000, description="QMC points per CDF")
    thresholds: Thresholds = Field(default=[0.5, 0.9], min_length=1,
                                    description="τ: proportions of points with p_σ ≥ τ")
    validate_points: int = Field(default=32, ge=0, le=1_000_000,
                                 description="points compared with Monte Carlo (0: none)")
    validate_draws: int = Field(default=2000, ge=1, le=10_000_000)
    confidence: float = Field(default=0.95, gt=0, lt=1,
                              description="for the validation CP intervals and class-mean CIs")
    top_k: int = Field(default=10, ge=0, le=100_000, description="most vulnerable points listed")
    max_forward_images: int = Field(default=4096, ge=1, le=100_000_000,
                                    description="noisy images per step, and image-backward "
                                    "passes (× class rows) per Jacobian call (memory)")

    @field_validator("estimators")
    @classmethod
    def _unique(cls, v):
        return list(dict.fromkeys(v))

    @field_validator("primary")
    @classmethod
    def _primary_is_computed(cls, v, info: ValidationInfo):
        est = info.data.get("estimators")
        if est is not None and v not in est:
            raise ValueError(f"primary {v!r} is not among estimators {est}")
        return v


class AnalyticalRobustness(Metric[AnalyticalConfig]):
    """Estimates of p_σ(x) = P_{ε~N(0,σ²I)}[argmax f(x+ε) = t], t = argmax f(x) (Han et al.).

    With g_i = f_t − f_i (i ≠ t), z_i = g_i/(σ‖∇g_i‖), Σ_ij = cos(∇g_i, ∇g_j) + 1e-5·I:

    - ``taylor``: Φ_{C−1}(z; 0, Σ), the MVN CDF of the local linear model (exact for affine f);
    - ``mmse``: the same with f and ∇f averaged over ``mmse_samples`` noisy copies x ± ε
      (antithetic pairs; an odd count is rounded up to even). The averages are Monte Carlo
      estimates of the smoothed model E[f(x + ε)] and its gradient; with the pairs the mean
      noise is exactly zero, so for an affine f they equal f(x) and ∇f (mmse = taylor, up to
      float rounding) instead of carrying a random error of order σ‖w‖/√n in g;
    - ``mvs`` / ``mmse_mvs``: Φ_{C−1} replaced by 1/(1 + Σ_i exp(−z_i));
    - ``softmax``: the softmax probability of t averaged over the noisy copies.

    Jacobians come from one batched forward and C batched vector-Jacobian products;
    the MVN CDFs of all points are integrated at once on the device by randomized
    quasi-Monte Carlo (Genz separation of variables, scrambled Sobol points;
    :func:`mvn_cdf`), whose standard error is in ``diagnostics.qmc_std_error_max``.

    Guarantee: none — kind "estimate". The estimators are exact only for affine models; their
    error on this model is *measured* on ``validate_points`` points against
    ``validate_draws``-draw Monte Carlo (counts with exact CP intervals at ``confidence``):
    ``diagnostics.validation[estimator]`` holds the MAE, the largest error and how many
    estimates fall inside the CP interval. The proportions (fraction of points with estimated
    p_σ ≥ τ, selector ``{"tau": τ}``) carry CIs over the sampling of points only, not the
    estimator's error: a requirement on them gates on an estimate, so the example policies
    never gate on this metric (use ``local_probabilistic_robustness`` for a tested claim).

    Also reported: the most noise-vulnerable points (lowest p_σ; per_point ``rank``, 0 first)
    and the robustness bias: the mean p_σ per true class with Hoeffding CIs at
    ``confidence`` (distribution-free for values in [0, 1]) and the largest gap between classes.
    ``per_point["validation_hits"]`` holds the Monte Carlo counts of the validated points
    (−1 for the others).

    Sharding (``shardable``): the engine may run it on consecutive blocks of points, in
    several processes. Drawn for the whole set (the same in every block): the scramble of the
    QMC points and the ``validate_points`` validated points. Drawn per block, from generators
    seeded by (seed, σ, the block's first point): the noisy copies of ``mmse`` / ``softmax``
    and the Monte Carlo draws of the block's validated points. :meth:`finalize` computes the
    ranks, most vulnerable points, robustness bias and validation errors from the merged
    per-point arrays, so the result is the same for any number of processes (and ``taylor``
    and ``mvs``, which draw nothing per point, are the same for any blocks).

    Args (policy ``metrics.analytical_robustness``): sigma (required, > 0), estimators
    (taylor, mmse, mvs, softmax), primary (mmse), mmse_samples (16), qmc_points (1024),
    thresholds ([0.5, 0.9]), validate_points (32), validate_draws (2000), confidence (0.95),
    top_k (10), max_forward_images (4096). Needs input gradients, except with only softmax.

    Example::

        res = AnalyticalRobustness(AnalyticalConfig(sigma=0.1)).run(model, data, ctx)
        res.per_point["p_mmse"]; res.diagnostics["validation"]["mmse"]["mae"]
    """

    name = "analytical_robustness"
    description = "estimated P_ε[argmax f(x+ε) = argmax f(x)], ε ~ N(0, σ²I) (Han et al.)"
    Config = AnalyticalConfig

    #: the QMC error is a worst case; ranks, bias and validation are over all points
    merge_rules = {"guarantee": "same", "primary": "same", "qmc_std_error_max": "max",
                   "most_vulnerable": "recompute", "robustness_bias": "recompute",
                   "validation": "recompute"}

    def __init__(self, config: AnalyticalConfig):
        super().__init__(config)
        self.needs_gradients = config.estimators != ["softmax"]

    def selectors(self):
        return [{"tau": t} for t in self.config.thresholds]

    def cost(self, n_points: int) -> int:
        return n_points

    def estimate(self, model: Classifier, x: torch.Tensor, generator: torch.Generator,
                 seed: int = 0) -> tuple[torch.Tensor, dict[str, np.ndarray], float]:
        """(prediction t, {estimator: p_σ estimates}, largest QMC standard error) for a batch."""
        target, out, err = self._estimate(model, x, generator, seed)
        return target.cpu(), {k: v.cpu().numpy() for k, v in out.items()}, float(err)

    def _estimate(self, model: Classifier, x: torch.Tensor, generator: torch.Generator,
                  seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`estimate` with everything left on the model's device (no synchronisation):
        (t, {estimator: float64 estimates}, largest QMC standard error as a 0-d tensor)."""
        cfg = self.config
        want = set(cfg.estimators)
        dev = model.device
        x = to_device(x, dev)
        out: dict[str, torch.Tensor] = {}
        qmc_err = torch.zeros((), dtype=torch.float64, device=dev)
        if want & {"taylor", "mvs"}:
            logits, jac = logits_and_jacobian(
                model.attack_module(), x, jacobian_budget(model, cfg.max_forward_images),
                model.num_classes)
        if not want & {"taylor", "mvs"} or model.gradient_forward is not None:
            logits = model.logits(x)  # t is the deployed model's prediction
        target = logits.argmax(1)
        if want & {"taylor", "mvs"}:
            z, corr = margins(logits, jac, target, cfg.sigma)
            if "taylor" in want:
                p, e = mvn_cdf(z, corr, cfg.qmc_points, seed=seed)
                out["taylor"], qmc_err = p, torch.maximum(qmc_err, e.max())
            if "mvs" in want:
                out["mvs"] = mvs(z)
        if want & {"mmse", "mmse_mvs", "softmax"}:
            # antithetic pairs x ± ε: their mean noise is exactly zero, so the averaged
            # logits and Jacobian of an affine model are its own (mmse = taylor), and the
            # Monte Carlo error of the averages is smaller for smooth models
            half = (cfg.mmse_samples + 1) // 2
            n = 2 * half
            noise = torch.randn((len(x), half, *x.shape[1:]), generator=generator) * cfg.sigma
            noise = to_device(torch.cat([noise, -noise], dim=1), dev)
            if want & {"mmse", "mmse_mvs"}:
                nl, mj = noisy_logits_and_mean_jacobian(
                    model.attack_module(), x, noise,
                    jacobian_budget(model, cfg.max_forward_images), model.num_classes)
                ml = nl.view(len(x), n, -1).mean(1)
                z, corr = margins(ml, mj, target, cfg.sigma)
                if "mmse" in want:
                    p, e = mvn_cdf(z, corr, cfg.qmc_points, seed=seed)
                    out["mmse"], qmc_err = p, torch.maximum(qmc_err, e.max())
                if "mmse_mvs" in want:
                    out["mmse_mvs"] = mvs(z)
            else:
                nl = model.logits((x[:, None] + noise).flatten(0, 1))
            if "softmax" in want:
                sm = nl.view(len(x), n, -1).softmax(2).mean(1)
                out["softmax"] = sm.gather(1, target[:, None])[:, 0].double()
        return target, out, qmc_err

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        m = len(data)
        g = ctx.generator(f"{self.name}/{cfg.sigma!r}")
        # one scramble of the QMC points for the whole set: a point's MVN integral is the same
        # in every block
        qmc_seed = int(torch.randint(2**31 - 1, (1,), generator=ctx.global_generator(
            f"{self.name}/qmc/{cfg.sigma!r}")))
        targets: list[torch.Tensor] = []
        parts: dict[str, list[torch.Tensor]] = {e: [] for e in cfg.estimators}
        errs: list[torch.Tensor] = []
        step = max(1, min(ctx.batch_size, cfg.max_forward_images // max(1, cfg.mmse_samples)))
        for s in range(0, m, step):
            sl = slice(s, min(s + step, m))
            t, out, e = self._estimate(model, data.x[sl], g, seed=qmc_seed)
            targets.append(t)
            for k, v in out.items():
                parts[k].append(v)
            errs.append(e)
            ctx.advance(sl.stop - sl.start)
        # one copy back per block
        target = torch.cat(targets).cpu()
        est = {k: np.clip(torch.cat(v).cpu().numpy(), 0.0, 1.0) for k, v in parts.items()}
        qmc_err = float(torch.stack(errs).max())
        props = [Proportion({"tau": t}, int((est[cfg.primary] >= t).sum()), m)
                 for t in cfg.thresholds]
        per_point = {f"p_{k}": v for k, v in est.items()}
        per_point["prediction"] = target.numpy()
        if cfg.validate_points:
            per_point["validation_hits"] = self._validation_hits(model, data, target, ctx)
        res = self.result(props, per_point=per_point, diagnostics={
            "guarantee": "none: estimates; error measured against Monte Carlo in 'validation'",
            "primary": cfg.primary,
            "qmc_std_error_max": qmc_err,
        })
        return self.finalize(res, model, data, ctx) if ctx.total is None else res

    def _validation_hits(self, model, data, target, ctx) -> np.ndarray:
        """Per point of ``data``: the Monte Carlo count of draws with argmax f(x + ε) = t
        for the points of the validation subset, −1 for the others. The subset is drawn for
        the whole set (the same in every block); the draws come from the block's generator."""
        cfg = self.config
        n_total = ctx.n_total(data)
        n_val = min(cfg.validate_points, n_total)
        chosen = torch.randperm(n_total, generator=ctx.global_generator(
            f"{self.name}/validation-points/{cfg.sigma!r}"))[:n_val].sort().values
        mine = chosen[(chosen >= ctx.offset) & (chosen < ctx.offset + len(data))] - ctx.offset
        hits = np.full(len(data), -1, dtype=np.int64)
        if len(mine):
            hits[mine.numpy()] = monte_carlo_p(
                model, data.x[mine], target[mine], cfg.sigma, cfg.validate_draws,
                ctx.generator(f"{self.name}/validation/{cfg.sigma!r}"), cfg.max_forward_images)
        return hits

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """What depends on all points, from the merged per-point arrays: ranks, the most
        vulnerable points, the robustness bias (class means) and the validation errors."""
        cfg = self.config
        pp = result.per_point
        primary = pp[f"p_{cfg.primary}"]
        m = len(primary)
        order = np.argsort(primary, kind="stable")
        rank = np.empty(m, dtype=np.int64)
        rank[order] = np.arange(m)
        pp["rank"] = rank
        diagnostics = {
            "guarantee": "none: estimates; error measured against Monte Carlo in 'validation'",
            "primary": cfg.primary,
            "qmc_std_error_max": float(result.diagnostics["qmc_std_error_max"]),
            "most_vulnerable": [int(i) for i in order[:cfg.top_k]],
            "robustness_bias": _bias(primary, data.y.numpy(), cfg.confidence),
        }
        if cfg.validate_points:
            diagnostics["validation"] = self._validation(pp)
        result.diagnostics = diagnostics
        return result

    def _validation(self, per_point: dict[str, np.ndarray]) -> dict:
        """Each estimator's error against the Monte Carlo counts (CP intervals)."""
        cfg = self.config
        hits = per_point["validation_hits"]
        idx = np.flatnonzero(hits >= 0)
        k = hits[idx]
        p_mc = k / cfg.validate_draws
        ci = np.array([stats.clopper_pearson(int(a), cfg.validate_draws, cfg.confidence)
                       for a in k]).reshape(-1, 2)
        out: dict = {"points": int(len(idx)), "draws": int(cfg.validate_draws),
                     "indices": [int(i) for i in idx]}
        for name in cfg.estimators:
            sub = per_point[f"p_{name}"][idx]
            err = np.abs(sub - p_mc)
            out[name] = {
                "mae": float(err.mean()),
                "max_abs_error": float(err.max()),
                "inside_cp_interval": int(((sub >= ci[:, 0]) & (sub <= ci[:, 1])).sum()),
            }
        return out


def _bias(p: np.ndarray, y: np.ndarray, confidence: float) -> dict:
    """Per-class mean p_σ with two-sided Hoeffding intervals, and the largest gap."""
    per_class = {}
    alpha = 1 - confidence
    for c in np.unique(y):
        v = p[y == c]
        half = math.sqrt(math.log(2 / alpha) / (2 * len(v)))
        mean = float(v.mean())
        per_class[str(int(c))] = {"n": int(len(v)), "mean": mean,
                                  "ci": [max(0.0, mean - half), min(1.0, mean + half)]}
    means = {c: d["mean"] for c, d in per_class.items()}
    lo, hi = min(means, key=means.__getitem__), max(means, key=means.__getitem__)
    return {"per_class": per_class, "largest_gap": float(means[hi] - means[lo]),
            "least_robust_class": lo, "most_robust_class": hi,
            "ci_method": "Hoeffding (two-sided)"}
