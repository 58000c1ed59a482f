"""Runs a policy's metrics on the best device: batching, threads, seeds, progress."""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm.auto import tqdm

from robust_cert.data import EvalSet
from robust_cert.devices import steady_cpu_allocator
from robust_cert.distributed import World
from robust_cert.errors import ModelError, RobustCertError
from robust_cert.inputs import Inputs
from robust_cert.metrics.base import MetricResult, RunContext, balanced_ranges
from robust_cert.models.base import Classifier, CpuBatchSizer
from robust_cert.models.diagnose import (
    does_not_fit,
    model_failures,
    model_parts,
    out_of_memory,
)
from robust_cert.policy import Policy

log = logging.getLogger(__name__)


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
        model, seeded_calls=True,
        forward=SeededForward(model.forward, seed, model.device, "forward"),
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
            torch.default_generator.manual_seed(seed)  # (torch.random's: the same object)
            if devices:  # this device only: fork_rng restores only the devices it is given
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            return self.fn(x)


#: Points per block of a pointwise metric (:attr:`Metric.pointwise`): the unit of sharding,
#: fixed (independent of the batch size and of the number of processes), small so that the
#: blocks spread evenly over the processes. A process runs all the points of its blocks in
#: one call, in full batches; the blocks only decide which process runs which points.
BLOCK_POINTS = 16


def block_size(n: int, batch_size: int, pointwise: bool = False) -> int:
    """Points in the largest block (see :func:`metric_blocks`)."""
    if pointwise:
        return max(1, min(BLOCK_POINTS, n))
    return max((len(b) for b in batch_blocks(n, batch_size)), default=1)


def blocks_of(n: int, block: int) -> list[range]:
    """The consecutive blocks of ``block`` points (the last one shorter)."""
    return [range(s, min(s + block, n)) for s in range(0, n, block)]


def batch_blocks(n: int, batch_size: int) -> list[range]:
    """The blocks of a shardable metric that draws per batch (not pointwise), one batch each:
    as many as batches of ``batch_size`` would be (⌈n / batch_size⌉: a single process makes
    no more calls than at its batch size; on tiny models blocks of 23 instead of 256 digits
    points tripled the CPU time of digits.yaml), of sizes that differ by at most one point,
    the larger first: 359 digits points at 256 are 2 blocks of 180 and 179, not 256 and 103,
    so 2 processes share them evenly."""
    return balanced_ranges(n, batch_size)


def metric_blocks(metric, n: int, batch_size: int) -> list[range]:
    """The consecutive blocks a shardable ``metric`` is sharded by on ``n`` points at
    ``batch_size``: a pointwise metric (:attr:`Metric.pointwise`: draws seeded per point)
    has blocks of :data:`BLOCK_POINTS`, whatever the batch size; any other draws per batch,
    so its blocks are batches (:func:`batch_blocks`). Either way they depend on n and the
    policy only, never on the number of processes: the blocks, their seeds, and so the
    certificate are the same for any number of processes."""
    if metric.pointwise:
        return blocks_of(n, block_size(n, batch_size, True))
    return batch_blocks(n, batch_size)


def runs_of(blocks: list[range], mine: range, pointwise: bool) -> list[range]:
    """The ranges of points one process runs, one ``Metric.run`` call each, for its share
    ``mine`` of ``blocks``: a pointwise metric runs all of them together (one range: a
    share is consecutive blocks), any other one block by block."""
    if not mine:
        return []
    if pointwise:
        return [range(blocks[mine.start].start, blocks[mine.stop - 1].stop)]
    return [blocks[b] for b in mine]


def _free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_with_memory(fn, ctx: RunContext, stage: str, retries: list,
                    models: tuple = ()) -> MetricResult:
    """``fn(ctx)``; on an out-of-memory error, frees the cache, halves ``ctx.batch_size`` and
    tries again, down to batch 1 (each halving appended to ``retries`` as ``{"stage",
    "batch_size"}``; forward passes are capped at the same number of images). At batch 1 the
    error becomes a ModelError: the model (``models``, for its size) does not fit."""
    while True:
        try:
            return fn(ctx)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
            _free_memory(ctx.device)
            if ctx.batch_size <= 1:
                raise ModelError(does_not_fit(stage, exc, ctx.device, *models)) from None
            half = max(1, ctx.batch_size // 2)
            log.warning("%s: out of memory at batch size %d on %s; retrying at %d (%s)",
                        stage, ctx.batch_size, ctx.device, half, first)
            retries.append({"stage": stage, "batch_size": half})
            ctx = dataclasses.replace(ctx, batch_size=half, forward_cap=half)


def run_suite(
    model: Classifier,
    data: EvalSet,
    policy: Policy,
    *,
    seed: int = 0,
    progress: bool = True,
    gradient_twin: Classifier | None = None,
    world: World | None = None,
    expected_s: dict[str, float] | None = None,
) -> dict[str, MetricResult] | None:
    """Run every metric of ``policy`` in order; return results keyed by metric name (on
    the main process; None on the others of a multi-process ``world``).

    Metrics that need input gradients on a model without them are recorded as not
    applicable, never silently dropped. Each metric draws from generators seeded by
    (seed, metric), so the same seed gives the same results whatever the metric order.
    A shardable metric (:attr:`Metric.shardable`) is cut into consecutive blocks of
    :func:`block_size` points, spread over the processes of ``world`` (consecutive shares);
    rank 0 merges the results in order and finalizes, so the result is the same for any
    number of processes. A pointwise metric (:attr:`Metric.pointwise`: draws seeded per
    point) has small fixed blocks (:data:`BLOCK_POINTS`) and each process runs all the
    points of its blocks in one call, in full batches: its result depends neither on the
    number of processes nor on the batch size. Any other shardable metric draws per batch:
    its blocks are batches, run one by one, each seeded by its first point (the result
    depends on the batch size, not on the number of processes). Other metrics run on rank 0
    only.
    An error on any process fails the run on every process (:mod:`robust_cert.distributed`).
    Out of memory, a block is retried at half the batch size (recorded in the result's
    ``diagnostics.memory_retries``); at batch size 1 it is a ModelError.
    ``gradient_twin`` reaches metrics as ``ctx.gradient_twin`` (parity's reference ``twin``);
    a metric that needs it when none is given is an error before anything runs.
    ``expected_s`` (metric name → estimated seconds, from :func:`robust_cert.plan.plan`)
    makes the progress bar count estimated seconds instead of points, so its rate and ETA
    reflect each metric's real cost.
    """
    world = world or World()
    metrics = [policy.metric(name) for name in policy.metrics]
    needs = [m.name for m in metrics if m.uses_twin]
    if needs and gradient_twin is None:
        raise ModelError(f"{', '.join(needs)}: reference 'twin' needs a gradient twin, but "
                         "none was given (pass gradient_twin=, or --gradient-twin on the CLI)")
    n = len(data)

    def runs(m) -> list[range]:  # this process's Metric.run calls of a shardable metric
        blocks = metric_blocks(m, n, policy.batch_size)
        return runs_of(blocks, world.share(len(blocks)), m.pointwise)

    def cost(m) -> int:
        if m.shardable:
            return sum(m.cost(len(r)) for r in runs(m))
        return m.cost(n) if world.main else 0

    if model.device.type == "cuda" and not data.x.is_pinned():  # page-locked: async copies
        data = dataclasses.replace(data, x=data.x.pin_memory())
    model = device_capped(model, policy.batch_size)
    results: dict[str, MetricResult] = {}
    error: BaseException | None = None
    parts = model_parts(model, gradient_twin)

    def weight(m) -> float:  # progress units per unit of the metric's cost
        if expected_s is None:
            return 1.0
        return float(expected_s.get(m.name, 0.0)) / max(cost(m), 1)

    # disable=None: tqdm hides itself when stderr is not a terminal (logs, CI, pipes)
    with tqdm(total=sum(cost(m) * weight(m) for m in metrics),
              disable=None if progress else True, unit="pt" if expected_s is None else "s",
              dynamic_ncols=True, desc="certify", leave=False, position=world.rank,
              bar_format=None if expected_s is None else
              "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} est. s "
              "[{elapsed}<{remaining}]") as bar:
        for metric in metrics:
            w = weight(metric)

            def advance(units, w=w):
                bar.update(units * w)

            bar.set_description(metric.name if world.size == 1
                                else f"[{world.rank}] {metric.name}")
            if metric.needs_gradients and not model.differentiable:
                results[metric.name] = metric.result(
                    [], status="not_applicable", reason="no gradients: the model format "
                    f"({model.format}) gives no input gradients")
                advance(cost(metric))
                continue
            whole = RunContext(device=model.device, batch_size=policy.batch_size, seed=seed,
                               advance=advance, gradient_twin=gradient_twin,
                               confidence=policy.confidence)
            retries: list = []
            log.info("running %s", metric.name)
            if not metric.shardable:
                if world.main and error is None:
                    try:
                        with model_failures(metric.name, parts, policy.batch_size):
                            res = run_with_memory(
                                lambda c, m=metric: m.run(_capped(model, c), data, c),
                                whole, metric.name, retries, parts)
                        results[metric.name] = _note_retries(res, retries)
                    except Exception as exc:  # sent to the others at the next exchange
                        error = exc
                        if world.size == 1:
                            raise
                continue
            local = []
            runner = _pointwise(model) if metric.pointwise else model
            if error is None:
                try:
                    for block in runs(metric):
                        part = _subset(data, block)
                        # after an out-of-memory retry, later blocks start at the batch
                        # size that fitted
                        ctx = dataclasses.replace(
                            whole, offset=block.start, total=n,
                            batch_size=retries[-1]["batch_size"] if retries
                            else whole.batch_size,
                            forward_cap=retries[-1]["batch_size"] if retries else None)
                        with model_failures(metric.name, parts, policy.batch_size):
                            local.append(run_with_memory(
                                lambda c, m=metric, p=part, r=runner: m.run(_capped(r, c), p, c),
                                ctx,
                                f"{metric.name} (points {block.start}-{block.stop - 1})",
                                retries, parts))
                except Exception as exc:
                    error = exc
                    if world.size == 1:
                        raise
            gathered = world.exchange((local, retries), error)
            if world.main:
                shards = [r for part, _ in gathered for r in part]
                if not shards:
                    raise RobustCertError(f"{metric.name}: no evaluation points")
                merged = shards[0]
                for r in shards[1:]:
                    merged = merged.merge(r)
                with model_failures(metric.name, parts, policy.batch_size):
                    merged = metric.finalize(merged, model, data, whole)
                results[metric.name] = _note_retries(
                    merged, [x for _, rs in gathered for x in rs])
        world.exchange(None, error)  # a failure of rank 0's last metrics reaches everyone
    return results if world.main else None


#: The smallest forward cap on CPU: a small ``batch_size`` (chosen to spread a small set over
#: processes) must not cut the probabilistic families' passes into tiny calls.
CPU_MIN_FORWARD = 64


def device_capped(model: Classifier, batch_size: int) -> Classifier:
    """``model`` with forward passes of at most max(``batch_size``, 64) images on CPU (unless
    it has its own ``max_batch``); unchanged on other devices. The probabilistic families
    gather up to max_forward_images (4,096) noisy images per pass, a size for GPUs: on CPU
    such a pass runs at under half the throughput of a batch-sized one (ResNet-18 at width
    16: 240 vs 567 img/s), for the same logits. Below that cap a
    :class:`~robust_cert.models.base.CpuBatchSizer` picks the size of the calls from their
    measured CPU time per image (a batch of 256 can cost 1.5× per image what 64 cost).
    On CPU it also sets glibc's malloc thresholds to their steady state
    (:func:`~robust_cert.devices.steady_cpu_allocator`), so that the passes do not give their
    memory back to the system and fault it in again page by page.

    A model whose forward passes are seeded per call (:func:`seeded_forwards`: a declared
    stochastic model) gets the cap but no sizer: its outputs depend on how a batch is split
    into calls, and a split chosen from timings would make them depend on the machine's
    load."""
    if model.device.type == "cpu":
        steady_cpu_allocator()
    if model.device.type == "cpu" and model.max_batch is None:
        cap = max(batch_size, CPU_MIN_FORWARD)
        return dataclasses.replace(model, max_batch=cap, batch_sizer=None
                                   if model.seeded_calls else CpuBatchSizer(cap))
    return model


def _capped(model: Classifier, ctx: RunContext) -> Classifier:
    """``model`` with forward passes of at most ``ctx.forward_cap`` images (set by an
    out-of-memory retry: the probabilistic families' passes of up to max_forward_images
    images are then split too, so halving frees memory whichever metric ran out)."""
    cap = ctx.forward_cap
    if cap is None or (model.max_batch is not None and model.max_batch <= cap):
        return model
    return dataclasses.replace(model, max_batch=cap)


class NoSingleBatch:
    """``fn`` on a batch of 1 run as a batch of 2 (the input twice, first row kept): many
    kernels take another path for a single row (a matrix-vector product instead of a
    matrix product) and round differently in the last bit, so without this a point's logits
    would depend on whether a process's range of points left it alone in its last batch.
    At 2 and more the outputs for a point do not depend on the others on the models tested
    (tests/test_shard_pointwise.py). When 2 images run out of memory, the single one runs
    alone (so "does not fit at batch size 1" still means 1 image)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            return self.fn(x)
        try:
            return self.fn(torch.cat([x, x]))[:1]
        except Exception as exc:
            if not out_of_memory(exc):
                raise
        return self.fn(x)


def _pointwise(model: Classifier) -> Classifier:
    """``model`` as a pointwise metric runs it: no forward pass of a single image
    (:class:`NoSingleBatch`)."""
    return dataclasses.replace(model, forward=NoSingleBatch(model.forward))


def _subset(data: EvalSet, block: range) -> EvalSet:
    """The points of ``block``, as an EvalSet sharing the whole set's storage."""
    x = (data.x.window(block.start, block.stop) if isinstance(data.x, Inputs)
         else data.x[block.start:block.stop])
    return dataclasses.replace(data, x=x, y=data.y[block.start:block.stop])


def _note_retries(result: MetricResult, retries: list) -> MetricResult:
    if retries:
        result.diagnostics["memory_retries"] = retries
    return result
