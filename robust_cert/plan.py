"""Know the cost before running: a pilot run of every metric on a few points, extrapolated.

:func:`plan` measures the model's own throughput (forward, and forward + input gradient) on a
few batches of the evaluation data, then runs each metric of the policy on the first
``pilot_points`` points while counting the images that go through the model — plain forward
passes and passes that need input gradients — and the wall time. The pilot is scaled by the
metric's own measure of its work, ``cost(n) / cost(pilot_points)`` (points × radii × attacks
for attacks, a fixed number of draws for the global failure rate, ...).

What it promises: an **estimate**, not a bound. Work that depends on the points (a
sequential test stops early on robust points, an attack stops on broken ones) scales with the
pilot's mix of points; a fixed part not in ``cost`` (a validation pass) is over-estimated.
The pilot's own cost is about ``pilot_points / n`` of the run.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from robust_cert.data import EvalSet
from robust_cert.distributed import World
from robust_cert.errors import PolicyError
from robust_cert.metrics.base import RunContext
from robust_cert.models.base import Classifier
from robust_cert.policy import Policy


@dataclass
class MetricCost:
    """One metric's measured pilot and its extrapolation to the whole evaluation set."""

    metric: str
    pilot_points: int
    pilot_seconds: float
    forward_images: int  # in the pilot: images through the model without input gradients
    gradient_images: int  # in the pilot: images through the model with input gradients
    scale: float  # the metric's cost(n_points) / cost(pilot_points)
    status: str = "ok"  # "ok" | "not_applicable"
    reason: str = ""
    #: the busiest process's share of the work: its points / all points for a shardable
    #: metric on several processes, else 1
    share: float = 1.0

    @property
    def seconds(self) -> float:
        """Wall time: the busiest process's share of the extrapolated pilot."""
        return self.pilot_seconds * self.scale * self.share

    def to_dict(self) -> dict:
        return {"metric": self.metric, "status": self.status, "reason": self.reason,
                "pilot_points": self.pilot_points, "pilot_seconds": self.pilot_seconds,
                "forward_images": round(self.forward_images * self.scale),
                "gradient_images": round(self.gradient_images * self.scale),
                "seconds": self.seconds}


@dataclass
class Plan:
    """The estimate for one (model, data, policy, device)."""

    device: str
    points: int
    forward_per_s: float  # images per second, forward only, at the policy's batch size
    gradient_per_s: float | None  # forward + input gradient (None without gradients)
    metrics: list[MetricCost] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None
    processes: int = 1

    @property
    def seconds(self) -> float:
        return sum(m.seconds for m in self.metrics)

    def to_dict(self) -> dict:
        return {"device": self.device, "points": self.points,
                "forward_per_s": self.forward_per_s, "gradient_per_s": self.gradient_per_s,
                "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "peak_device_mb": self.peak_device_mb, "processes": self.processes,
                "metrics": [m.to_dict() for m in self.metrics]}

    def table(self) -> str:
        """The estimate as a table for a terminal."""
        rows = [f"{'metric':<32} {'forward imgs':>13} {'gradient imgs':>14} {'est. time':>10}"]
        for m in self.metrics:
            if m.status != "ok":
                rows.append(f"{m.metric:<32} {'not applicable: ' + m.reason}")
                continue
            rows.append(f"{m.metric:<32} {m.forward_images * m.scale:>13,.0f} "
                        f"{m.gradient_images * m.scale:>14,.0f} {_duration(m.seconds):>10}")
        rows.append(f"{'total':<32} {'':>13} {'':>14} {_duration(self.seconds):>10}")
        grad = (f", forward+gradient {self.gradient_per_s:,.0f} img/s"
                if self.gradient_per_s else "")
        mem = f"peak memory {self.peak_rss_mb:,.0f} MB (process RSS)"
        if self.peak_device_mb is not None:
            mem += f", {self.peak_device_mb:,.0f} MB on {self.device}"
        where = (f"{self.device}" if self.processes == 1 else
                 f"{self.processes} processes (shardable metrics split by blocks; per process: "
                 f"{self.device}")
        rows.append(f"{self.points} points on {where}: forward {self.forward_per_s:,.0f} "
                    f"img/s{grad}; {mem}{')' if self.processes > 1 else ''}. An estimate from "
                    "a pilot run, not a bound.")
        return "\n".join(rows)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _Counter:
    """Counts images through a model: forward pre-hooks on an nn.Module (so the module stays
    itself for metrics that trace it), a wrapping function otherwise. Removed by close()."""

    def __init__(self):
        self.forward = 0
        self.gradient = 0
        self._handles = []

    def _count(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            return
        if torch.is_grad_enabled() and x.requires_grad:
            self.gradient += int(x.shape[0])
        else:
            self.forward += int(x.shape[0])

    def attach(self, fn):
        if fn is None:
            return None
        if isinstance(fn, nn.Module):
            self._handles.append(fn.register_forward_pre_hook(
                lambda _mod, args: self._count(args[0] if args else None)))
            return fn

        def counted(x):
            self._count(x)
            return fn(x)

        return counted

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _throughput(model: Classifier, x: torch.Tensor, batch: int, gradient: bool) -> float:
    """Images per second on up to three batches of ``x`` (after one warm-up batch)."""
    chunks = list(x[: batch * 4].split(batch))
    if not chunks:
        return float("nan")
    view = model.attack_module() if gradient else None

    def step(chunk):
        chunk = chunk.to(model.device)
        if gradient:
            chunk = chunk.clone().requires_grad_(True)
            assert view is not None  # gradient: the attack view
            with torch.enable_grad():
                view(chunk).sum().backward()
        else:
            model.logits(chunk)

    step(chunks[0])  # warm-up: lazy initialisation, allocator, kernels
    timed = chunks[1:] or chunks
    _sync(model.device)
    started = time.perf_counter()
    for chunk in timed:
        step(chunk)
    _sync(model.device)
    elapsed = time.perf_counter() - started
    return sum(len(c) for c in timed) / max(elapsed, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan(model: Classifier, data: EvalSet, policy: Policy, *, seed: int = 0,
         pilot_points: int = 8, gradient_twin: Classifier | None = None,
         processes: int = 1) -> Plan:
    """Estimate each metric's images and time on ``data`` (see the module docstring).

    ``model`` and ``data`` are loaded and checked as :func:`robust_cert.certify` does it;
    the pilot uses the same seeds as a real run. With ``processes`` > 1 (a torchrun launch)
    a shardable metric's time is its busiest process's share of the blocks."""
    if pilot_points < 1:
        raise PolicyError(f"pilot_points must be >= 1, got {pilot_points}")
    n = len(data)
    k = min(pilot_points, n)
    pilot = dataclasses.replace(data, x=data.x[:k], y=data.y[:k])
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    from robust_cert.engine import metric_blocks

    def busiest(metric) -> float:  # the busiest process's share of the points
        blocks = metric_blocks(metric, n, policy.batch_size)
        most = max((sum(len(blocks[b]) for b in World(rank=r, size=processes).share(
            len(blocks))) for r in range(processes)), default=n)
        return most / n if n else 1.0

    probe = data.x[: policy.batch_size * 4]  # the points _throughput times, as float32
    out = Plan(device=str(model.device), points=n, processes=processes,
               forward_per_s=_throughput(model, probe, policy.batch_size, gradient=False),
               gradient_per_s=(_throughput(model, probe, policy.batch_size, gradient=True)
                               if model.differentiable else None))
    for name in policy.metrics:
        metric = policy.metric(name)
        scale = metric.cost(n) / max(metric.cost(k), 1)
        if metric.needs_gradients and not model.differentiable:
            out.metrics.append(MetricCost(name, k, 0.0, 0, 0, scale, "not_applicable",
                                          f"no gradients ({model.format})"))
            continue
        counter = _Counter()
        counted = dataclasses.replace(model, forward=counter.attach(model.forward),
                                      gradient_forward=counter.attach(model.gradient_forward))
        ctx = RunContext(device=model.device, batch_size=policy.batch_size, seed=seed,
                         gradient_twin=gradient_twin, confidence=policy.confidence)
        started = time.perf_counter()
        try:
            res = metric.run(counted, pilot, ctx)
        finally:
            counter.close()
        _sync(model.device)
        elapsed = time.perf_counter() - started
        out.metrics.append(MetricCost(name, k, elapsed, counter.forward, counter.gradient,
                                      scale, res.status, res.reason,
                                      busiest(metric) if metric.shardable else 1.0))
    out.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if model.device.type == "cuda":
        out.peak_device_mb = torch.cuda.max_memory_allocated(model.device) / 2**20
    return out


def check_budget(estimate: Plan, budget_s: float | None, slack: float = 1.0) -> None:
    """PolicyError before anything runs when the estimate exceeds the policy's time budget
    (``time_budget_s``) times ``slack``."""
    if budget_s is None or not math.isfinite(estimate.seconds):
        return
    if estimate.seconds > budget_s * slack:
        worst = max(estimate.metrics, key=lambda m: m.seconds)
        raise PolicyError(
            f"time_budget_s: the suite is estimated at {_duration(estimate.seconds)} on "
            f"{estimate.device} for {estimate.points} points, over the budget of "
            f"{_duration(budget_s)} (largest: {worst.metric}, {_duration(worst.seconds)}); "
            "lower the metric budgets or the points, or raise time_budget_s")
