"""The metrics' own overhead on the ResNet-18 of bench_resnet, measured directly:

    .venv/bin/python bench/bench_overhead.py [--only ROW,ROW] [--quick] [--points N]

bench_resnet compares a metric's wall time with an ideal computed from per-image costs measured
in other time windows; on a shared machine those costs drift (about 25% over an hour here), so
its ratios mix the metric's own work with the machine's state. This bench splits a metric's
run itself, in one process and one time window, so nothing drifts between the two sides:

* **model time**: the wall time spent inside the ResNet module's forward calls and inside
  the backward calls that reach its output, as :class:`harness.ImageCounter` (bench_resnet's
  counter) times them (what those calls run beyond the model, a loss's backward, is a few
  operations on (N, 10) logits);
* **own time** = the run's wall time − model time: everything the metric does besides the
  model's passes (noise, attacks' projections and bookkeeping, statistics, copies). Target:
  ≤ :data:`OWN_TARGET` of the run;
* **call sizes**: the model's forward calls by size (images per call, with gradients or
  not): a metric that sends small calls pays more per image than the best batch;
* **batch penalty**: the forward (and forward-backward) calls of the run replayed with their
  own sizes on images of the same shape, against the same images in calls of 32, 64 and 128
  (the best of the three), alternating, CPU time, best of :data:`REPLAY_ROUNDS` rounds each:
  what the call sizes cost beyond the best batch, independent of the metric's own work. A
  run with many calls is replayed on every k-th call (at most :data:`REPLAY_IMAGES` images).
  Beside it, the model's CPU time in the run (the same hooks and timers) against the replay
  at the calls' own sizes, scaled to the replayed share: above 1, the model's passes ran
  slower inside the metric than alone (caches the metric's own work evicts, or load).

Each row runs in a fresh subprocess (as in bench_resnet) on the model and points bench_resnet
trains and draws, with the suite's configurations (``--quick``: its reduced budgets).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_resnet import BATCH, CLASSES, INPUT_SHAPE, QUICK, SUITE, architectures, train_model
from harness import ImageCounter, finish, load_average, row

#: the metric's own time (outside the model's passes) ≤ this share of its run
OWN_TARGET = 0.10
#: the rows measured unless ``--only`` says otherwise: the sampling and attack rows
ROWS = ("robust_accuracy", "probabilistic_robustness", "local_probabilistic_robustness",
        "divergence")
REPLAY_IMAGES = 2000
REPLAY_ROUNDS = 3


def child(spec_path: str) -> None:
    """One row in this process: its run split into model and own time (see the module)."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    import robust_cert
    from robust_cert import engine
    from robust_cert.metrics import REGISTRY
    from robust_cert.metrics.base import RunContext

    model = architectures().ResNet18(num_classes=CLASSES, width=spec["width"])
    model.load_state_dict(torch.load(spec["weights"], weights_only=True))
    model.eval()
    with np.load(spec["data"]) as f:
        data = robust_cert.load_data((f["x"], f["y"]), name="stripes-test")
    clf = engine.device_capped(robust_cert.load_model(model, input_shape=INPUT_SHAPE,
                                                      device="cpu"), BATCH)
    twin = robust_cert.load_model(model, input_shape=INPUT_SHAPE, device="cpu")
    x = data.x[:32].clone().requires_grad_(True)  # warm-up, as bench_resnet's child
    torch.autograd.grad(model(x).sum(), x)
    with torch.no_grad():
        model(data.x[:32])
    cls = REGISTRY[spec["metric"]]
    metric = cls(cls.Config.model_validate(spec["config"]))
    ctx = RunContext(device=torch.device("cpu"), batch_size=BATCH, seed=0, gradient_twin=twin)
    clock = ImageCounter(model)  # times the model's forward and backward calls
    t, c = time.perf_counter(), time.process_time()
    metric.run(clf, data, ctx)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    clock.active = False  # the replay below is not the metric's
    calls = list(clock.calls)
    out = {"wall": wall, "cpu": cpu, "forward_s": clock.fwd_seconds,
           "backward_s": clock.bwd_seconds, "model_cpu_s": clock.model_cpu_seconds,
           "calls": calls, **replay(model, calls)}
    Path(spec["out"]).write_text(json.dumps(out))


def replay(model: torch.nn.Module, calls: list[tuple[int, bool]]) -> dict:
    """CPU seconds of (every k-th of) ``calls`` at their own sizes against the same images at
    the best of 32, 64 and 128 per call, alternating (see the module)."""
    images = sum(n for n, _ in calls)
    k = max(1, -(-images // REPLAY_IMAGES))
    sample = calls[::k]
    pool = torch.rand(max([n for n, _ in sample] + [128]), *INPUT_SHAPE)

    def call(n: int, grad: bool) -> None:
        x = pool[:n]
        if grad:
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(model(xg).sum(), xg)
        else:
            with torch.no_grad():
                model(x)

    totals = collections.Counter()
    for n, grad in sample:
        totals[grad] += n

    def own_sizes() -> None:
        for n, grad in sample:
            call(n, grad)

    def at(size: int) -> None:
        for grad, n in totals.items():
            for s in range(0, n, size):
                call(max(2, min(size, n - s)), grad)

    sides = {"own sizes": own_sizes, **{str(b): (lambda b=b: at(b)) for b in (32, 64, 128)}}
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(REPLAY_ROUNDS):
        for name, fn in sides.items():
            c = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - c)
    top = min((v, b) for b, v in best.items() if b != "own sizes")
    # the replayed share of the run's model work (a grad call is a forward and a backward)
    share = sum(n * (1 + g) for n, g in sample) / max(1, sum(n * (1 + g) for n, g in calls))
    return {"replayed_calls": len(sample), "replay_stride": k, "replay_share": share,
            "replay_own_s": best["own sizes"], "replay_best_s": top[0], "replay_best": top[1]}


def sizes_line(calls: list[tuple[int, bool]]) -> str:
    """Images by call size: the three sizes with most images, with and without gradients."""
    parts = []
    for grad in (False, True):
        by = collections.Counter()
        for n, g in calls:
            if g == grad:
                by[n] += n
        total = sum(by.values())
        if not total:
            continue
        top = ", ".join(f"{n}: {v / total:.0%}" for n, v in by.most_common(3))
        count = sum(1 for _, g in calls if g == grad)
        parts.append(f"{'grad' if grad else 'no-grad'} {total:,} img in {count:,} calls "
                     f"(images by call size: {top})")
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated suite rows")
    parser.add_argument("--quick", action="store_true", help="bench_resnet's --quick budgets")
    parser.add_argument("--points", type=int, default=0, help="points (32; 8 with --quick)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    points = args.points or (8 if args.quick else 32)
    from robust_cert.devices import steady_cpu_allocator

    torch.set_num_threads(1)
    steady_cpu_allocator()
    load0 = load_average()
    model = train_model(args.width, 1000, 2)
    x, y = architectures().stripes(points, seed=1, classes=CLASSES)
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        work = Path(tmp)
        torch.save(model.state_dict(), work / "model.pt")
        np.savez(work / "data.npz", x=x, y=y)
        for name in args.only.split(","):
            cfg = {**SUITE["metrics"][name], **(QUICK.get(name, {}) if args.quick else {})}
            spec = {"metric": name, "config": cfg, "width": args.width,
                    "weights": str(work / "model.pt"), "data": str(work / "data.npz"),
                    "out": str(work / f"{name}.json")}
            (work / "spec.json").write_text(json.dumps(spec))
            proc = subprocess.run([sys.executable, __file__, "--child", str(work / "spec.json")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  check=False)
            target = f"own ≤ {OWN_TARGET:.0%} of the run"
            if proc.returncode != 0:
                print(proc.stdout)
                row(name, f"FAILED (exit {proc.returncode})", target, False)
                continue
            r = json.loads(Path(spec["out"]).read_text())
            model_s = r["forward_s"] + r["backward_s"]
            own = r["wall"] - model_s
            penalty = r["replay_own_s"] / r["replay_best_s"]
            # the model's CPU time in the run against the same calls replayed alone
            inside = r["model_cpu_s"] * r["replay_share"] / r["replay_own_s"]
            row(name, f"{r['wall']:.1f} s (CPU {r['cpu']:.1f} s): model {model_s:.1f} s "
                f"(forward {r['forward_s']:.1f}, backward {r['backward_s']:.1f}), own "
                f"{own:.2f} s = {own / r['wall']:.1%}; {sizes_line(r['calls'])}; call sizes "
                f"cost {penalty:.2f}× batch {r['replay_best']} (replay of every "
                f"{r['replay_stride']}. call, CPU); the model's calls cost {inside:.2f}× in "
                f"the run what they cost replayed alone (CPU)", target,
                own <= OWN_TARGET * r["wall"])
    return finish(f"bench_overhead: ResNet-18 width {args.width}, {points} points"
                  f"{' (--quick budgets)' if args.quick else ''}, 1 thread; load average at the "
                  f"start {load0}, at the end {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
