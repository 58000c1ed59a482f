"""What every benchmark in bench/ shares: timing, the model's measured costs per image and
the counts of what a metric runs through it (the "ideal" every cost is expressed against),
and the result table.

A script imports it as ``from harness import ...``: ``python bench/<script>.py`` puts bench/ on
the import path.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CPU = torch.device("cpu")
ROWS: list[tuple[str, str, str, str]] = []


def row(name: str, value: str, target: str = "", met: bool | None = None) -> None:
    """Record one line of the result table (and print it as it is measured)."""
    ROWS.append((name, value, target, "" if met is None else ("yes" if met else "NO")))
    print(f"  {name}: {value}", flush=True)


def print_table() -> None:
    header = ("measure", "value", "target", "met")
    widths = [max(len(r[i]) for r in [header, *ROWS]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *ROWS]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def targets() -> list[tuple[str, str, str, bool]]:
    """The rows that carry a target: (measure, value, target, met)."""
    return [(n, v, t, m == "yes") for n, v, t, m in ROWS if m]


def finish(note: str = "") -> int:
    """Print the table, then PASS/MISS for every row that carries a target, and return the exit
    status: 1 when any target is missed (or none was measured), else 0. Every bench ends with
    ``sys.exit(finish())``, so ``make bench`` stops at the first bench that misses a target."""
    if note:
        print(f"\n{note}\n")
    print_table()
    rows = targets()
    print()
    for name, value, target, met in rows:
        print(f"{'PASS' if met else 'MISS'}  {name}: {value} (target {target})")
    missed = sum(not met for *_, met in rows)
    script = Path(sys.argv[0]).name
    if not rows:
        print(f"{script}: no target was measured")
        return 1
    print(f"{script}: {len(rows) - missed} of {len(rows)} targets met"
          + (f", {missed} MISSED" if missed else ""), flush=True)
    return 1 if missed else 0


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (``/proc/loadavg``): other processes on the machine
    inflate every absolute time, hardly the ratios measured in the same run."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def timed(fn):
    """(fn(), seconds it took)."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def best_of(fn, reps: int = 3):
    """(fn(), the fastest of ``reps`` runs in seconds)."""
    best, out = float("inf"), None
    for _ in range(reps):
        out, t = timed(fn)
        best = min(best, t)
    return out, best


def per_image(fn, batch: int, windows: int = 4, seconds: float = 0.25) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per image of ``fn`` on ``batch`` images: each the best of
    several short windows, so that load from other processes does not inflate the ideal."""
    fn()  # warm-up
    wall = cpu = float("inf")
    for _ in range(windows):
        t, c, reps = time.perf_counter(), time.process_time(), 0
        while True:  # at least one call per window, however short the window
            fn()
            reps += 1
            if time.perf_counter() - t >= seconds:
                break
        wall = min(wall, (time.perf_counter() - t) / (batch * reps))
        cpu = min(cpu, (time.process_time() - c) / (batch * reps))
    return wall, cpu


#: the kinds of work a :class:`Costs` prices, in the order of :meth:`Costs.ideal`'s arguments
KINDS = ("fwd", "bwd", "jac", "hvp")


@dataclass
class Costs:
    """Measured cost per image (seconds of wall time; ``cpu_*``: CPU seconds) of what a metric
    runs through the model, each the best over a few batch sizes:

    * ``fwd``: a forward pass without gradients;
    * ``bwd``: one backward pass to the input = (forward with gradients + backward) − ``fwd``;
    * ``jac``: one row of a batched C-row Jacobian (one forward with gradients, then C rows of
      vector-Jacobian products with ``is_grads_batched``) = (its time − ``fwd``) ÷ C, but at
      most ``bwd``: C plain backward passes would give the same rows;
    * ``hvp``: one Hessian-vector product to the input beyond its forward (a backward with
      ``create_graph`` and the double backward through it) = its time − ``fwd``.

    The ideal time of a metric is forward images × ``fwd`` + backward passes × ``bwd`` + Jacobian
    rows × ``jac`` + HVPs × ``hvp``: what the model alone costs for what the metric really runs.
    A kind that was not measured is NaN (:meth:`from_samples`); a term whose count is 0 is left
    out, so the ideal is NaN only when the metric ran work whose cost is unknown.
    """

    fwd: float
    bwd: float
    jac: float
    hvp: float
    cpu_fwd: float
    cpu_bwd: float
    cpu_jac: float
    cpu_hvp: float
    best_batch: int
    jac_measured: float  # the batched Jacobian row before the cap at ``bwd``

    def ideal(self, forward: float, bwd: float = 0, jac: float = 0, hvp: float = 0,
              cpu: bool = False) -> float:
        prices = ((self.cpu_fwd, self.cpu_bwd, self.cpu_jac, self.cpu_hvp) if cpu else
                  (self.fwd, self.bwd, self.jac, self.hvp))
        return sum((n * c for n, c in zip((forward, bwd, jac, hvp), prices, strict=True) if n),
                   0.0)

    @classmethod
    def from_samples(cls, samples: dict[str, tuple[float, float]]) -> Costs:
        """The costs of :func:`sample_costs`'s (wall, CPU) seconds per image by kind (a missing
        kind is NaN); the Jacobian row is charged at most a backward pass, as in
        :func:`measure_costs`."""
        nan = (math.nan, math.nan)
        f, b, j, h = (samples.get(k, nan) for k in KINDS)

        def cap(jac: float, bwd: float) -> float:
            return jac if math.isnan(bwd) else min(jac, bwd)

        return cls(fwd=f[0], bwd=b[0], jac=cap(j[0], b[0]), hvp=h[0], cpu_fwd=f[1],
                   cpu_bwd=b[1], cpu_jac=cap(j[1], b[1]), cpu_hvp=h[1], best_batch=0,
                   jac_measured=j[0])


def _passes(model: torch.nn.Module, input_shape, classes: int, batch: int) -> dict:
    """The passes whose costs :class:`Costs` holds, on ``batch`` random images: name → (the
    pass, the images per call it is charged for): ``fwd`` (no gradients), ``fb`` (forward with
    gradients + backward to the input), ``jac`` (a batched ``classes``-row Jacobian of
    batch ÷ classes images: as many backward rows as the batch) and ``hvp``."""
    x = torch.rand(batch, *input_shape)
    xg = x.clone().requires_grad_(True)
    images = max(1, batch // classes)
    xj = xg[:images].detach().clone().requires_grad_(True)
    eye = torch.eye(classes)[:, None, :].expand(classes, images, classes)
    v = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            model(x)

    def fb():
        torch.autograd.grad(model(xg).sum(), xg)

    def jac():
        torch.autograd.grad(model(xj), xj, grad_outputs=eye, is_grads_batched=True)

    def hvp():
        (g,) = torch.autograd.grad(model(xg).logsumexp(1).sum(), xg, create_graph=True)
        torch.autograd.grad(g, xg, grad_outputs=v)

    return {"fwd": (fwd, batch), "fb": (fb, batch), "jac": (jac, images), "hvp": (hvp, batch)}


def measure_costs(model: torch.nn.Module, input_shape, classes: int,
                  batches=(32, 64, 128, 256)) -> Costs:
    """:class:`Costs` of ``model`` measured now (the best per image over ``batches``)."""
    best: dict[str, tuple[float, float]] = {}
    best_batch = batches[0]

    def keep(name, wall_cpu):
        if name not in best or wall_cpu[0] < best[name][0]:
            best[name] = wall_cpu
            return True
        return False

    for batch in batches:
        passes = _passes(model, input_shape, classes, batch)
        if keep("fwd", per_image(passes["fwd"][0], batch)):
            best_batch = batch
        keep("fb", per_image(passes["fb"][0], batch))
        keep("jac", per_image(*passes["jac"], windows=3))
        keep("hvp", per_image(*passes["hvp"], windows=3))
    (f, cf), (fb_, cfb), (j, cj), (h, ch) = best["fwd"], best["fb"], best["jac"], best["hvp"]
    bwd, cpu_bwd = max(fb_ - f, 0.0), max(cfb - cf, 0.0)
    jac_row, cpu_jac = max(j - f, 0.0) / classes, max(cj - cf, 0.0) / classes
    return Costs(fwd=f, bwd=bwd, jac=min(jac_row, bwd), hvp=max(h - f, 0.0), cpu_fwd=cf,
                 cpu_bwd=cpu_bwd, cpu_jac=min(cpu_jac, cpu_bwd), cpu_hvp=max(ch - cf, 0.0),
                 best_batch=best_batch, jac_measured=jac_row)


def lower_costs(before: dict, after: dict) -> dict[str, tuple[float, float]]:
    """Per kind of :func:`sample_costs`' results, the lower (wall, CPU) of the costs measured
    before and after a metric (each side's best windows: the fastest the model ran around
    it, so an ideal priced with them is never higher than either side's). Kinds measured
    after only are kept as they are."""
    return {k: (min(a[0], before.get(k, a)[0]), min(a[1], before.get(k, a)[1]))
            for k, a in after.items()}


def sample_costs(model: torch.nn.Module, input_shape, classes: int, kinds,
                 batches=(32, 64, 128, 256), windows: int = 2,
                 seconds: float = 0.1) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds per image of each kind in ``kinds`` (of :data:`KINDS`, priced as in
    :class:`Costs`: ``bwd`` = forward-backward − forward, ``jac`` = (batched Jacobian −
    forward) ÷ ``classes``, uncapped, ``hvp`` = its time − forward), each the best of
    ``windows`` short windows at each of ``batches``; ``fwd`` is always measured, the others
    are differences from it. Fewer, shorter windows than :func:`measure_costs`: it is meant to
    be run right before and right after a metric, in the metric's own process, and only for
    the kinds the metric's counts need."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds of work {sorted(unknown)}: expected some of {KINDS}")
    wanted = ["fwd"] + [{"bwd": "fb"}.get(k, k) for k in KINDS[1:] if k in kinds]
    best: dict[str, tuple[float, float]] = {}
    for batch in batches:
        passes = _passes(model, input_shape, classes, batch)
        for name in wanted:
            wall, cpu = per_image(*passes[name], windows=windows, seconds=seconds)
            prev = best.get(name, (wall, cpu))
            best[name] = (min(wall, prev[0]), min(cpu, prev[1]))
    f, cf = best["fwd"]
    out = {"fwd": (f, cf)}
    if "fb" in best:
        out["bwd"] = (max(best["fb"][0] - f, 0.0), max(best["fb"][1] - cf, 0.0))
    if "jac" in best:
        out["jac"] = (max(best["jac"][0] - f, 0.0) / classes,
                      max(best["jac"][1] - cf, 0.0) / classes)
    if "hvp" in best:
        out["hvp"] = (max(best["hvp"][0] - f, 0.0), max(best["hvp"][1] - cf, 0.0))
    return out


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``: now, ``VmHWM``: peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_rss_bytes() -> int:
    """The process's peak RSS. ``ru_maxrss`` where it is the process's own; on Linux a child
    started by fork + exec inherits its parent's ``ru_maxrss`` (the signal struct survives
    exec), so this reads ``VmHWM``, the high-water mark of the process's own memory map."""
    try:
        return proc_status("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its RSS now (Linux ≥ 4.0: ``5`` written to
    ``/proc/self/clear_refs``); False where that is not possible, and the peak then still
    counts what ran before."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        proc_status("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def trim_heap() -> bool:
    """Give the heap's free memory back to the system (glibc's ``malloc_trim(0)``), so that
    the RSS read next does not hold what a finished measurement freed; False without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


class ImageCounter:
    """Counts what a metric really runs through ``module`` (hooks on the module itself, so it
    stays the same object for metrics that trace it):

    * ``forward``: rows of every forward pass, with gradients or without;
    * ``bwd``: rows of plain vector-Jacobian products reaching the output (one backward pass of
      one image each: a ``torch.autograd.grad`` / ``backward`` of a batch counts its rows);
    * ``jac``: rows of batched vector-Jacobian products (``is_grads_batched`` or vmapped): a
      C-row Jacobian of P images counts P·C here and P in ``forward``;
    * ``hvp``: rows of backward passes that build a graph (``create_graph=True``), i.e. the first
      half of a Hessian-vector product; the second half (the double backward, which reaches the
      output again where the loss is not linear in the logits) is part of the measured HVP
      cost and not counted again.

    It also times the model's own work inside the metric (wall seconds):

    * ``fwd_seconds``: every forward call of the module, from its pre-hook to its hook
      (``fwd_calls`` of them: ``forward / fwd_calls`` is the mean batch it ran at);
    * ``bwd_seconds``: every ``torch.autograd.grad`` / ``torch.autograd.backward`` call (and so
      ``Tensor.backward``) during which a backward pass reached the module's output: the
      whole call, so it includes the loss's own backward on the logits and whatever the call
      back-propagates beyond the model's input (a few element-wise operations in the metrics
      of this suite). A module that is called by code holding its own reference to the
      original ``torch.autograd.grad`` is not timed there.

    ``model_cpu_seconds`` is the CPU time of the same calls, and ``calls`` lists every forward
    call as (images, with gradients) in order.

    ``fwd_seconds + bwd_seconds`` is the model's time inside the metric, the metric's wall time
    minus it the metric's own work: a diagnostic of overhead that does not depend on the
    per-image costs measured elsewhere. While ``active`` is False nothing is counted or timed
    (a bench measuring the costs on the same module).
    """

    def __init__(self, module: torch.nn.Module):
        self.forward = 0
        self.bwd = 0
        self.jac = 0
        self.hvp = 0
        self.fwd_seconds = 0.0
        self.bwd_seconds = 0.0
        self.fwd_calls = 0
        self.model_cpu_seconds = 0.0
        self.calls: list[tuple[int, bool]] = []
        self.active = True
        self.legacy_batch = 1  # the batch of an is_grads_batched backward in progress
        self._handles = [module.register_forward_pre_hook(self._pre),
                         module.register_forward_hook(self._post)]
        self._pending = 0
        self._started = self._cpu_started = 0.0
        self._reached = 0  # backward passes that reached the output so far
        self._patch_batched_grad()

    @staticmethod
    def _physical_rows(t: torch.Tensor) -> int:
        """Rows of ``t`` with every functorch (vmap, grad) level unwrapped."""
        import torch._C._functorch as ft

        inner = t
        while ft.is_functorch_wrapped_tensor(inner):
            inner = ft.get_unwrapped(inner)
        per_row = max(1, math.prod(t.shape[1:]))
        return inner.numel() // per_row

    def _pre(self, _module, args) -> None:
        if not self.active:
            return
        self._pending = self._physical_rows(args[0])
        self._started, self._cpu_started = time.perf_counter(), time.process_time()

    def _post(self, _module, _args, out) -> None:
        if not self.active:
            return
        self.fwd_seconds += time.perf_counter() - self._started
        self.model_cpu_seconds += time.process_time() - self._cpu_started
        self.fwd_calls += 1
        self.forward += self._pending
        grad = torch.is_grad_enabled() and out.requires_grad
        self.calls.append((self._pending, bool(grad)))
        if not grad:
            return
        rows = self._pending
        in_hvp = [False]

        def hook(grad):
            import torch._C._functorch as ft

            if not self.active:
                return
            self._reached += 1
            if torch.is_grad_enabled():  # create_graph=True: a Hessian-vector product
                self.hvp += rows
                in_hvp[0] = True
            elif in_hvp[0]:  # its double backward passing through the output again
                pass
            elif ft.is_legacy_batchedtensor(grad) or ft.is_functorch_wrapped_tensor(grad):
                self.jac += self._physical_rows(grad) * (
                    self.legacy_batch if ft.is_legacy_batchedtensor(grad) else 1)
            else:
                self.bwd += rows

        out.register_hook(hook)

    def _timed_backward(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` (a backward call), its time added to ``bwd_seconds`` when a
        backward pass reached the module's output during it (calls within it not again)."""
        if not self.active or self._in_backward:
            return fn(*args, **kwargs)
        self._in_backward = True
        reached, started, cpu = self._reached, time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            if self._reached != reached and self.active:
                self.bwd_seconds += time.perf_counter() - started
                self.model_cpu_seconds += time.process_time() - cpu
            self._in_backward = False

    _in_backward = False

    def _patch_batched_grad(self) -> None:
        """``torch.autograd.grad(..., is_grads_batched=True)`` vmaps its backward with the
        legacy batching rule, whose tensors hide their batch: remember it while it runs. Both
        ``torch.autograd.grad`` and ``torch.autograd.backward`` are timed
        (:meth:`_timed_backward`)."""
        grad, backward = torch.autograd.grad, torch.autograd.backward

        def counted_grad(*args, **kwargs):
            if not kwargs.get("is_grads_batched"):
                return self._timed_backward(grad, *args, **kwargs)
            go = kwargs.get("grad_outputs", args[2] if len(args) > 2 else None)
            go = go[0] if isinstance(go, (list, tuple)) else go
            self.legacy_batch = int(go.shape[0])
            try:
                return self._timed_backward(grad, *args, **kwargs)
            finally:
                self.legacy_batch = 1

        def timed_backward(*args, **kwargs):
            return self._timed_backward(backward, *args, **kwargs)

        torch.autograd.grad = counted_grad
        torch.autograd.backward = timed_backward
        self._restore = (grad, backward, counted_grad, timed_backward)

    def close(self) -> None:
        """Stop counting for good: the module's hooks removed, ``torch.autograd.grad`` and
        ``backward`` given back (where nothing has replaced this counter's since), so that
        what runs next is timed without the counter's own cost."""
        for handle in self._handles:
            handle.remove()
        grad, backward, mine_grad, mine_backward = self._restore
        if torch.autograd.grad is mine_grad:
            torch.autograd.grad = grad
        if torch.autograd.backward is mine_backward:
            torch.autograd.backward = backward
        self.active = False

    def reset(self) -> None:
        self.forward = self.bwd = self.jac = self.hvp = 0
        self.fwd_seconds = self.bwd_seconds = 0.0
        self.fwd_calls = 0
        self.model_cpu_seconds = 0.0
        self.calls = []

    def model_seconds(self) -> float:
        """The module's time inside what ran since the last :meth:`reset` (see the class)."""
        return self.fwd_seconds + self.bwd_seconds

    def totals(self) -> dict[str, int]:
        return {"forward": self.forward, "bwd": self.bwd, "jac": self.jac, "hvp": self.hvp}
