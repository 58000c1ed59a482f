"""What every benchmark in bench/ shares: timing, the model's measured throughput (the
"ideal" every cost is expressed against), and the result table.

A script imports it as ``from harness import ...``: ``python bench/<script>.py`` puts bench/ on
the import path.
"""

from __future__ import annotations

import resource
import sys
import time
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


def throughput(fn, batch: int, windows: int = 6, seconds: float = 0.25) -> float:
    """Images/s of ``fn`` on ``batch`` images: the best of several short windows, so that
    load from other processes on a shared machine does not inflate the ideal time."""
    fn()  # warm-up
    best = 0.0
    for _ in range(windows):
        t, reps = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            fn()
            reps += 1
        best = max(best, batch * reps / (time.perf_counter() - t))
    return best


def measure_model(model: torch.nn.Module, input_shape=(1, 8, 8),
                  batches=(256, 512, 1024, 2048)) -> tuple[float, float, int]:
    """Best forward and forward-backward (to the input) throughput in images/s over a few
    batch sizes, and the batch size of the best forward throughput."""
    fwd, fb, best_batch = 0.0, 0.0, batches[0]
    for batch in batches:
        x = torch.rand(batch, *input_shape)
        with torch.no_grad():
            f = throughput(lambda x=x: model(x), batch)
        if f > fwd:
            fwd, best_batch = f, batch
        xg = torch.rand(batch, *input_shape, requires_grad=True)
        fb = max(fb, throughput(lambda xg=xg: torch.autograd.grad(model(xg).sum(), xg), batch))
    return fwd, fb, best_batch


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
