"""Runs a policy's metrics on the best device: batching, threads, seeds, progress."""

from __future__ import annotations

import logging
import os

import torch
from tqdm.auto import tqdm

from robust_cert.data import EvalSet
from robust_cert.errors import ModelError, RobustCertError
from robust_cert.metrics.base import MetricResult, RunContext
from robust_cert.models.base import Classifier
from robust_cert.policy import Policy

log = logging.getLogger(__name__)

#: Default intra-op threads on CPU. On small shared machines more threads can be far slower
#: (contention), and results may differ in the last bits between thread counts, so the
#: default is 1 and the count used is recorded in the certificate.
DEFAULT_THREADS = 1


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA if available, else CPU. An explicit device must exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RobustCertError(f"device {device!r} requested but CUDA is not available here")
    return dev


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (argument, else $ROBUST_CERT_THREADS, else 1)."""
    if threads is None:
        env = os.environ.get("ROBUST_CERT_THREADS", "")
        try:
            threads = int(env) if env else DEFAULT_THREADS
        except ValueError:
            raise RobustCertError(f"ROBUST_CERT_THREADS={env!r} is not an integer") from None
    if threads < 1:
        raise RobustCertError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def check_deterministic(model: Classifier, data: EvalSet, batch_size: int) -> bool:
    """Two forward passes on the first batch agree exactly (a random model would not)."""
    x = data.x[: min(batch_size, 64)].to(model.device)
    return bool(torch.equal(model.logits(x), model.logits(x)))


def run_suite(
    model: Classifier,
    data: EvalSet,
    policy: Policy,
    *,
    seed: int = 0,
    progress: bool = True,
    gradient_twin: Classifier | None = None,
) -> dict[str, MetricResult]:
    """Run every metric of ``policy`` in order; return results keyed by metric name.

    Metrics that need input gradients on a model without them are recorded as not
    applicable, never silently dropped. Each metric draws from generators seeded by
    (seed, metric), so the same seed gives the same results whatever the metric order.
    ``gradient_twin`` reaches metrics as ``ctx.gradient_twin`` (parity's reference ``twin``);
    a metric that needs it when none is given is an error before anything runs.
    """
    metrics = [policy.metric(name) for name in policy.metrics]
    needs = [m.name for m in metrics if m.uses_twin]
    if needs and gradient_twin is None:
        raise ModelError(f"{', '.join(needs)}: reference 'twin' needs a gradient twin, but "
                         "none was given (pass gradient_twin=, or --gradient-twin on the CLI)")
    total = sum(m.cost(len(data)) for m in metrics)
    results: dict[str, MetricResult] = {}
    with tqdm(total=total, disable=not progress, unit="pt", dynamic_ncols=True,
              desc="certify", leave=False) as bar:
        for metric in metrics:
            bar.set_description(metric.name)
            if metric.needs_gradients and not model.differentiable:
                results[metric.name] = metric.result(
                    [], status="not_applicable", reason="no gradients: the model format "
                    f"({model.format}) gives no input gradients")
                bar.update(metric.cost(len(data)))
                continue
            ctx = RunContext(device=model.device, batch_size=policy.batch_size, seed=seed,
                             advance=bar.update, gradient_twin=gradient_twin,
                             confidence=policy.confidence)
            log.info("running %s", metric.name)
            results[metric.name] = metric.run(model, data, ctx)
    return results
