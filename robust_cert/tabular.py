"""Tabular threat models: per-feature input ranges, ε per feature, immutable features.

A policy's ``features:`` section (:class:`robust_cert.policy.FeatureSpec`) turns the one
isotropic threat model every metric knows — an ε-ball (L∞ or L2) or a noise scale around a
point, clipped to one box ``input_range`` — into a per-feature one:

- **ranges**: feature ``i`` lies in ``[lo_i, hi_i]``, given per feature in the policy or, for
  the features it does not name, the evaluation set's minimum and maximum;
- **scale**: ε (and every noise scale) is in units of each feature's range ``hi_i − lo_i``
  (``range``), of its standard deviation on the evaluation set (``std``), or in data units
  (``none``): a perturbation may move feature ``i`` by ``ε · s_i``;
- **immutable**: features (column names or indices) that no perturbation may change; the
  categorical columns a table source encoded (``categories=``) are immutable too.

It is implemented once, by a change of coordinates, not in each metric. :func:`fit` builds a
:class:`FeatureThreat`; the engine then runs every metric on the *encoded* evaluation set
and the *encoded* model (:meth:`FeatureThreat.encode`, :meth:`FeatureThreat.wrap`):

- a free feature ``i`` is encoded as ``u_i = (x_i − lo_i) / s_i`` and decoded as
  ``x_i = clip(lo_i + s_i · u_i, lo_i, hi_i)``: an isotropic radius ε in ``u`` is the radius
  ``ε · s_i`` in feature ``i``, and the clip makes the per-feature box exact (the set of
  decoded points of a ball is the ball intersected with the box: clipping moves no
  coordinate further from the centre);
- an immutable feature ``j`` is encoded as ``u_j = G · k`` where ``k`` is the index of its
  value among the feature's distinct values on the evaluation set, and decoded as the value
  of index ``round(u_j / G)``. ``G`` is 1024 times the widest free feature's encoded width
  ``W``: any perturbation smaller than ``G / 2 = 512 · W`` in that coordinate decodes to the
  original value exactly. Radii above ``W`` (L∞; ``W·√d`` for L2) are refused before
  anything runs, so every attack and every bounded noise leaves immutable features
  unchanged; Gaussian noise of scale σ ≤ W moves one with probability below
  ``2·Φ(−512) < 10⁻⁵⁰⁰⁰⁰`` per draw. Input gradients of immutable features are zero.

Noise is drawn in every encoded coordinate, and the immutable ones are then decoded back:
uniform L∞ and Gaussian noise (independent coordinates) are exactly that noise on the free
features; uniform noise in an L2 ball is the free features' marginal of the uniform draw
in the ball over all features (at most ε in the free features' L2 norm, not uniform in
their own ball). Attacks reach exactly the ball over the free features (a move in an
immutable coordinate is discarded).

Guarantee: every number a metric reports is about the model on the decoded points, i.e. on
the per-feature threat model above; a decoded point differs from the evaluation point only
in free features, by at most ``ε · s_i`` each (L∞), and lies in the per-feature box. The
round trip of an unperturbed point reproduces its immutable features exactly and each free
feature within 2⁻²³ of the feature's range (float32 rounding of the encoded value).
The certificate's ``data.features`` records the ranges (and where each came from), the
scales, the immutable features and ``G``; ``data.sha256`` stays the hash of the data as read.

Metrics that cannot honour it refuse at validation (:data:`UNSUPPORTED`). The safe radius's
sound Lipschitz lower bound is taken on a PyTorch network's own graph; the decoded model is
no ``nn.Module``, so under a per-feature threat model the safe radius reports its witness
upper bound and CLEVER estimate only, and a policy asking it for certified radii
(``radii``) is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from robust_cert.data import EvalSet
from robust_cert.errors import DataError, PolicyError
from robust_cert.models.base import Classifier, numpy_forward

if TYPE_CHECKING:
    from robust_cert.policy import FeatureSpec, Policy

#: Metric -> why it cannot run under a ``features:`` threat model (refused at validation).
UNSUPPORTED = {
    "corruptions": "image corruptions (blur, noise, contrast ...) act on whole images and "
                   "cannot keep immutable features or per-feature ranges",
}
#: G = GRID · W: the spacing of an immutable feature's encoded values (module docstring).
GRID = 1024.0


def refuse_unsupported(pol: Policy) -> None:
    """PolicyError naming the first metric of ``pol`` that cannot honour its ``features:``
    threat model (nothing when the policy has none)."""
    if pol.features is None:
        return
    for name in pol.metrics:
        if name in UNSUPPORTED:
            raise PolicyError(f"metrics.{name}: cannot honour the policy's features: threat "
                              f"model (per-feature ranges, scales, immutable features): "
                              f"{UNSUPPORTED[name]}; remove the metric or the features section")
        if name == "safe_radius" and getattr(pol.metric(name).config, "radii", None):
            raise PolicyError("metrics.safe_radius.radii: the certified fraction needs a sound "
                              "lower bound on the network's own graph, which the features: "
                              "threat model's decoding hides; remove radii (the witness upper "
                              "bound and the CLEVER estimate still run)")


@dataclass(frozen=True)
class FeatureThreat:
    """A fitted per-feature threat model (see the module docstring). Arrays are float64,
    one entry per feature."""

    names: list[str]
    lo: np.ndarray
    hi: np.ndarray
    range_from: list[str]          # "policy" or "data", per feature
    scale_kind: str                # range | std | none
    scale: np.ndarray              # s_i (1 for immutable features)
    immutable: dict[int, str]      # index -> "policy" | "categorical"
    values: dict[int, np.ndarray] = field(default_factory=dict)  # distinct values, sorted
    grid: float = 0.0              # G
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def width(self) -> float:
        """W: the widest free feature's encoded width ``(hi_i − lo_i) / s_i``."""
        free = [i for i in range(len(self.names)) if i not in self.immutable]
        return float(max((self.hi[i] - self.lo[i]) / self.scale[i] for i in free))

    @property
    def free_count(self) -> int:
        return len(self.names) - len(self.immutable)

    @property
    def box(self) -> tuple[float, float]:
        """The encoded evaluation set's input range: [0, max(W, G · (values − 1)))]."""
        top = self.width
        for v in self.values.values():
            top = max(top, self.grid * (len(v) - 1))
        return 0.0, float(top) if top > 0 else 1.0

    def record(self) -> dict:
        """The certificate's ``data.features``."""
        return {
            "scale": self.scale_kind,
            "grid": self.grid,
            "features": [
                {"name": n, "index": i, "range": [float(self.lo[i]), float(self.hi[i])],
                 "range_from": self.range_from[i],
                 **({"immutable": self.immutable[i]} if i in self.immutable
                    else {"scale": float(self.scale[i])})}
                for i, n in enumerate(self.names)],
        }

    def encode(self, data: EvalSet) -> EvalSet:
        """The evaluation set in encoded coordinates (same name, source, hash, labels)."""
        x = data.x[:].double().reshape(len(data), -1).numpy()
        u = (x - self.lo) / self.scale
        for j, v in self.values.items():
            u[:, j] = self.grid * np.searchsorted(v, x[:, j])
        u32 = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32)).reshape(data.x.shape)
        return dataclasses.replace(data, x=u32, input_range=self.box)

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """Data-space inputs of encoded inputs ``u`` (any float dtype, any device).

        A CPU float32/float64 tensor without gradients is decoded in numpy, with the same
        float64 operations one by one (no torch dispatch per operation: the Square attack
        decodes every query batch); anything else with torch operations."""
        if u.device.type == "cpu" and not u.requires_grad and \
                u.dtype in (torch.float32, torch.float64):
            return torch.from_numpy(self._decode_numpy(u.numpy()).reshape(u.shape))
        lo, hi, s, tables = self._tensors(u.device)
        flat = u.reshape(u.shape[0], -1)
        x = lo + s * flat.double()
        x = torch.maximum(torch.minimum(x, hi), lo)
        if tables is not None:  # every immutable column at once: index, clamp, look up
            cols, table, start, last = tables
            k = torch.round(flat[:, cols].detach().double() / self.grid)
            k = torch.minimum(k.clamp_min(0), last).long() + start
            x[:, cols] = table[k]  # x is new here; the overwritten entries get no gradient
        return x.to(u.dtype).reshape(u.shape)

    def _decode_numpy(self, u: np.ndarray) -> np.ndarray:
        """:meth:`decode` of a float array (N, …) as an array (N, d) of ``u``'s dtype: the
        tensor path's float64 steps (scale and shift, clip to [lo, hi], immutable columns
        rounded half to even to a value index, clamped, looked up), in numpy."""
        flat = u.reshape(u.shape[0], -1)
        x = np.multiply(self.scale, flat.astype(np.float64))
        x = np.add(self.lo, x, out=x)
        x = np.maximum(np.minimum(x, self.hi, out=x), self.lo, out=x)
        tables = self._arrays()
        if tables is not None:
            cols, table, start, last = tables
            k = np.round(flat[:, cols].astype(np.float64) / self.grid)
            k = np.minimum(np.maximum(k, 0.0), last).astype(np.int64) + start
            x[:, cols] = table[k]
        return x.astype(u.dtype, copy=False)

    def _arrays(self):
        """:meth:`_tensors`' tables as numpy arrays (None without immutable features)."""
        if "numpy" not in self._cache:
            tables = None
            if self.values:
                cols = list(self.values)
                sizes = [len(self.values[j]) for j in cols]
                tables = (np.array(cols, dtype=np.int64),
                          np.concatenate([self.values[j] for j in cols]).astype(np.float64),
                          np.cumsum([0] + sizes[:-1]).astype(np.int64),
                          np.array([n - 1 for n in sizes], dtype=np.float64))
            self._cache["numpy"] = tables
        return self._cache["numpy"]

    def _tensors(self, device: torch.device):
        """lo, hi, s and, when there are immutable features (each has its values),
        (their columns, their values one after another, where each column's values start,
        each column's last index) on ``device``, made once per device."""
        key = str(device)
        if key not in self._cache:
            tables = None
            if self.values:
                cols = list(self.values)
                sizes = [len(self.values[j]) for j in cols]
                tables = (
                    torch.tensor(cols, device=device),
                    torch.as_tensor(np.concatenate([self.values[j] for j in cols]),
                                    device=device),
                    torch.tensor(np.cumsum([0] + sizes[:-1]), device=device),
                    torch.tensor([n - 1 for n in sizes], dtype=torch.float64, device=device))
            self._cache[key] = (
                torch.as_tensor(self.lo, device=device),
                torch.as_tensor(self.hi, device=device),
                torch.as_tensor(self.scale, device=device), tables)
        return self._cache[key]

    def wrap(self, model: Classifier) -> Classifier:
        """``model`` on encoded inputs: every forward (judged and differentiated) decodes
        first. Same hash, name, format and record."""
        grad = model.gradient_forward
        return dataclasses.replace(
            model, forward=_Decoded(self, model.forward),
            gradient_forward=_Decoded(self, grad) if grad is not None else None)

    def decode_per_point(self, per_point: dict) -> dict:
        """Per-point arrays that hold inputs (``…/example_adv``) back in data units."""
        out = dict(per_point)
        for key, arr in per_point.items():
            if key.endswith("example_adv") and len(arr):
                out[key] = self.decode(torch.as_tensor(arr)).numpy()
        return out

    def check_radii(self, pol: Policy) -> None:
        """Refuse a radius or noise scale (``eps``, ``sigma``, ``max_radius``,
        ``clever_radius``) larger than W (L∞) or W·√(free features) (L2), in scale units:
        such a ball covers every free feature's whole range, and immutable features are
        exact only for perturbations below 512·W. ``safe_radius`` must give ``max_radius``
        (its default, the input box, is not a radius of this threat model)."""
        w = self.width
        for name in pol.metrics:
            config = pol.metric(name).config
            norms = getattr(config, "norms", None) or [
                str(getattr(config, "norm", None) or getattr(config, "distribution", "linf"))]
            l2 = any("l2" in str(n) for n in norms)
            limit = w * self.free_count ** 0.5 if l2 else w
            if name == "safe_radius" and getattr(config, "max_radius", None) is None:
                raise PolicyError(f"metrics.{name}.max_radius: under features: give the "
                                  f"largest radius to search (at most {limit:.4g} in "
                                  f"features.scale {self.scale_kind} units)")
            for key in ("eps", "sigma", "max_radius", "clever_radius"):
                value = getattr(config, key, None)
                if value is None:
                    continue
                for e in (value if isinstance(value, (list, tuple)) else [value]):
                    if e > limit:
                        raise PolicyError(
                            f"metrics.{name}.{key}: {e:g} is larger than the widest feature "
                            f"allows under features.scale {self.scale_kind} "
                            f"({'L2 diagonal' if l2 else 'L∞ width'} {limit:.4g}): such a "
                            "perturbation covers every input")


class _Decoded:
    def __init__(self, threat: FeatureThreat, fn):
        self.threat, self.fn = threat, fn

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.fn(self.threat.decode(u))

    def numpy_forward(self):
        """The decoding in numpy before the wrapped forward's numpy form, when it has one
        (:func:`robust_cert.models.base.numpy_forward`): what ``self`` gives on a CPU
        float32 tensor without gradients, which :meth:`FeatureThreat.decode` decodes with
        the same numpy steps."""
        inner = numpy_forward(self.fn)
        if inner is None:
            return None
        decode = self.threat._decode_numpy
        return lambda u: inner(decode(u).reshape(u.shape))


def fit(spec: FeatureSpec, data: EvalSet) -> FeatureThreat:
    """The threat model of ``spec`` on ``data`` (inputs of shape (N, d)). PolicyError names a
    column or index the data lacks, a range that is empty, a feature of zero standard
    deviation under ``scale: std``, or a policy where every feature is immutable; DataError
    names the first row and column outside a given range."""
    if len(data.input_shape) != 1:
        raise PolicyError(f"features: a per-feature threat model needs tabular inputs (N, d); "
                          f"the data's samples have shape {data.input_shape}")
    d = data.input_shape[0]
    names = [str(n) for n in data.details.get("features", [])]
    if len(names) != d:
        names = [str(i) for i in range(d)]
    x = data.x[:].double().numpy()

    def index(key, where: str) -> int:
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and key not in names):
            i = int(key)
            if not 0 <= i < d:
                raise PolicyError(f"features.{where}: feature index {i} is outside 0..{d - 1}")
            return i
        if key not in names:
            raise PolicyError(f"features.{where}: {key!r} is not a feature of the data "
                              f"({', '.join(names[:12])}{', …' if d > 12 else ''})")
        return names.index(key)

    lo, hi = x.min(0), x.max(0)
    range_from = ["data"] * d
    for key, (a, b) in spec.ranges.items():
        i = index(key, f"ranges.{key}")
        col = x[:, i]
        bad = np.flatnonzero((col < a) | (col > b))
        if bad.size:
            r = int(bad[0])
            raise DataError(f"{data.source}: feature {names[i]!r} is {col[r]:g} in row {r}, "
                            f"outside its range [{a:g}, {b:g}] (features.ranges)")
        lo[i], hi[i], range_from[i] = a, b, "policy"
    immutable: dict[int, str] = {}
    for key in data.details.get("categories", {}):
        if key in names:
            immutable[names.index(key)] = "categorical"
    for key in spec.immutable:
        immutable[index(key, "immutable")] = "policy"
    if len(immutable) == d:
        raise PolicyError("features.immutable: every feature is immutable, so no perturbation "
                          "is possible")
    if spec.scale == "range":
        scale = hi - lo
    elif spec.scale == "std":
        scale = x.std(0)
        for i in range(d):
            if i not in immutable and scale[i] == 0:
                raise PolicyError(f"features.scale: feature {names[i]!r} has standard deviation "
                                  "0 on the evaluation set, so ε in its units is undefined; "
                                  "mark it immutable or use scale: range")
    else:
        scale = np.ones(d)
    scale = np.where(scale > 0, scale, 1.0)  # a constant free feature: width 0 (it cannot move)
    for j in immutable:
        scale[j] = 1.0
    values = {j: np.unique(x[:, j]) for j in sorted(immutable)}
    threat = FeatureThreat(names=names, lo=lo, hi=hi, range_from=range_from,
                           scale_kind=spec.scale, scale=scale, immutable=immutable,
                           values=values)
    grid = GRID * (threat.width if threat.width > 0 else 1.0)
    return dataclasses.replace(threat, grid=grid)
