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
from robust_cert.models.diagnose import model_failures, model_parts
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
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RobustCertError(f"unknown device {device!r} ({exc}); use cpu, cuda, cuda:N "
                              "or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise RobustCertError(f"device {device!r} is not supported: use cpu, cuda, cuda:N "
                              "or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RobustCertError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RobustCertError(f"device {device!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
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


#: Two forward passes on the same batch count as the same when every logit agrees within
#: this relative tolerance (of max(1, max |logit|)) and every prediction agrees: about 800
#: float32 ulps, room for non-deterministic reduction orders (CUDA atomics), far below the
#: differences a random forward pass (dropout, noise) makes.
REPEAT_RTOL = 1e-4
#: How many evaluation points the model-level checks look at.
PROBE_POINTS = 64


def check_deterministic(model: Classifier, data: EvalSet, batch_size: int) -> dict:
    """Whether the model is random at evaluation time: ``{"state": "passed" | "failed",
    "detail", "max_abs_diff", "rng_consumed"}``.

    It fails when two forward passes on the first (up to 64) evaluation points differ —
    a prediction, or a logit by more than :data:`REPEAT_RTOL` · max(1, max |logit|) — or when
    a forward pass draws from torch's global random generator (CPU, or the model's CUDA
    device), which catches dropout left on and ``torch.randn`` noise even when they happen
    not to move the logits much. Randomness from a generator of the model's own is caught
    only through differing outputs.
    """
    x = data.x[: min(batch_size, PROBE_POINTS)].to(model.device)

    def states():
        out = [torch.get_rng_state()]
        if model.device.type == "cuda":
            out.append(torch.cuda.get_rng_state(model.device))
        return out

    before = states()
    first = model.logits(x)
    consumed = any(not torch.equal(a, b) for a, b in zip(before, states(), strict=True))
    second = model.logits(x)
    diff = float((first.double() - second.double()).abs().max()) if first.numel() else 0.0
    scale = max(1.0, float(first.abs().max())) if first.numel() else 1.0
    differ = bool((first.argmax(1) != second.argmax(1)).any()) or not diff <= REPEAT_RTOL * scale
    why = []
    if differ:
        why.append(f"two forward passes on the same {len(x)} inputs differ (max |Δ logit| = "
                   f"{diff:.3g})")
    if consumed:
        why.append("a forward pass draws from torch's random generator")
    return {"state": "failed" if why else "passed",
            "detail": ("the model is random at evaluation time: " + " and ".join(why)) if why
            else f"two forward passes on the same {len(x)} inputs agree and draw no random "
                 "numbers",
            "max_abs_diff": diff, "rng_consumed": consumed}


def check_outputs(model: Classifier, data: EvalSet, batch_size: int,
                  declared: str = "logits") -> Classifier:
    """The model, checked to return what the policy says it returns (``model.outputs``).

    Outputs whose rows are all non-negative and sum to 1 within float32 rounding on the first
    (up to 64) evaluation points are probabilities (see
    :func:`robust_cert.models.base.probability_rows`). Declared ``logits`` (the default) and
    probabilities found: ModelError naming the fix. Declared ``probabilities``: they must be
    found (else ModelError), and the returned classifier outputs their logarithm, clamped at
    the smallest normal float (:func:`robust_cert.models.base.with_log_probabilities`):
    argmax and ratios are those of the probabilities, margins are log-odds.
    """
    from robust_cert.models.base import probability_rows, with_log_probabilities

    x = data.x[: min(batch_size, PROBE_POINTS)].to(model.device)
    out = model.logits(x)
    found = probability_rows(out)
    sums = out.double().sum(1)
    if declared == "logits" and found:
        raise ModelError(
            f"the model returns probabilities, not logits: on the first {len(x)} evaluation "
            f"points every output row is non-negative and sums to 1 (max |sum - 1| = "
            f"{float((sums - 1).abs().max()):.2g}). Attacks and margins need logits: return "
            "the logits (remove the final softmax), or declare 'model: {outputs: "
            "probabilities}' in the policy to have them converted to log-probabilities")
    if declared == "probabilities" and not found:
        raise ModelError(
            f"the policy declares 'model: {{outputs: probabilities}}', but the model's outputs "
            f"on the first {len(x)} evaluation points are not probabilities (min output "
            f"{float(out.min()):.3g}, row sums in [{float(sums.min()):.4g}, "
            f"{float(sums.max()):.4g}]): remove the declaration if it returns logits")
    return with_log_probabilities(model) if declared == "probabilities" else model


def seeded_forwards(model: Classifier, seed: int) -> Classifier:
    """A copy of ``model`` whose every forward pass (judged and differentiated) runs with
    torch's random generators seeded from (``seed``, call number) and restored afterwards, so
    a stochastic model gives the same outputs in every run with the same seed, policy and
    data, and the generators the metrics draw from are untouched. Each call still draws fresh
    randomness: guarantees are about the random classifier."""
    import dataclasses

    grad = model.gradient_forward
    return dataclasses.replace(
        model, forward=SeededForward(model.forward, seed, model.device, "forward"),
        gradient_forward=(SeededForward(grad, seed, model.device, "gradient_forward")
                          if grad is not None else None))


class SeededForward:
    """``fn`` called under ``torch.random.fork_rng`` with a seed derived from (seed, label,
    call number); see :func:`seeded_forwards`."""

    def __init__(self, fn, seed: int, device: torch.device, label: str):
        self.fn, self.seed, self.device, self.label, self.calls = fn, seed, device, label, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from robust_cert.metrics.base import _derive_seed

        self.calls += 1
        devices = [self.device] if self.device.type == "cuda" else []
        seed = _derive_seed(self.seed, f"{self.label}/{self.calls}")
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if devices:  # this device only: fork_rng restores only the devices it is given
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            return self.fn(x)


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
    # disable=None: tqdm hides itself when stderr is not a terminal (logs, CI, pipes)
    with tqdm(total=total, disable=None if progress else True, unit="pt", dynamic_ncols=True,
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
            with model_failures(metric.name, model_parts(model, gradient_twin),
                                policy.batch_size):
                results[metric.name] = metric.run(model, data, ctx)
    return results
