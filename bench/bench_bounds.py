"""Tightness, soundness and cost of the certified safe radius (issue 23), in one command:

    .venv/bin/python bench/bench_bounds.py [--model digits|resnet18] [--points N]
        [--mode crown|crown-ibp|ibp] [--alpha-steps N] [--alpha-intermediate N]
        [--threads 1] [--whole-ball] [--norms l2,linf]

``--model digits`` (default): the digits CNN (``robust_cert.digits_cnn.train_digits_cnn``, a
few seconds), the first ``--points`` (120) digits test points. ``--model resnet18``: the
CIFAR-style ResNet-18 of ``tests/architectures.py`` at ``--width`` (16), trained for a few
seconds on its generated stripes (as ``bench/bench_resnet.py``), ``--points`` (8) test
images. ``safe_radius`` (adversarial property, L2 and L∞, the default witness search) runs
twice on the same points: local bound off ("before": the global Lipschitz bound alone) and
``--mode`` ("after": max(Lipschitz, local); with ``--alpha-steps`` N > 0, alpha-CROWN's
relaxation, N optimisation steps per bound computation; default: the metric's
``alpha_steps``; with ``--alpha-intermediate`` N > 0 and crown, the intermediate bounds by
alpha-CROWN too, N steps each), certifying the ball ∩ the input box
(``within_box``: the witnesses are searched there too; ``--whole-ball`` certifies the whole
ball). Reported per norm, over the points where the property holds:

* the median of certified lower / witnessed upper (the tightness), before and after;
  targets (issue 23): ≥ 0.4 on the digits CNN, ≥ 0.2 on the ResNet-18, after;
* sandwich violations (a certified radius above a witness; target 0) and the points each
  bound certified;
* flips inside certified balls (target 0): float32 inputs within 0.999 × the certified radius
  (in the input box) whose prediction differs — the ends of a PGD search on the margin from
  inside the ball, their one-ulp neighbours and random points of the ball, as
  ``tests/test_safe_radius_float.py`` probes;
* the cost of the local bound, timed inside the run (every call of
  :func:`robust_cert.bounds.local_radius` by the metric: one relaxation fitted per point and
  trial radius), against one forward and one backward pass to the input of the same points
  (batch of all of them, best of 5, same process): per point and radius step (target ≤ 3×,
  issue 23) and per point for the whole search (all its steps); the steps per point;
* what bounds that cost from below: the C − 1 margin rows of each point are back-substituted
  through the network in float64, so one step costs at least C − 1 float64 backward passes
  (timed as one forward-backward of the points repeated C − 1 times, in float64; and in
  float32, what a float32 evaluation of the bound could reach);
* the peak of the bound's estimated memory per point, against ``max_bound_memory``.

Exits 1 when a target is missed (tightness, sandwich, flips or cost), 0 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import CPU, print_table, row

import robust_cert
from robust_cert.bounds import lipschitz_bound
from robust_cert.bounds.local import local_analysis
from robust_cert.metrics import safe_radius as sr
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.safe_radius import SafeRadius, SafeRadiusConfig

TARGET_RATIO = {"digits": 0.4, "resnet18": 0.2}
TARGET_COST = 3.0


def digits(points: int):
    from robust_cert.data import digits_split
    from robust_cert.digits_cnn import train_digits_cnn
    model = train_digits_cnn()
    x, y = digits_split("test")
    return model, x[:points], y[:points]


def resnet18(points: int, width: int):
    spec = importlib.util.spec_from_file_location(
        "architectures", Path(__file__).resolve().parents[1] / "tests" / "architectures.py")
    assert spec is not None
    assert spec.loader is not None
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    x, y = arch.stripes(2048, seed=0, classes=10)
    torch.manual_seed(0)
    model = arch.ResNet18(num_classes=10, width=width)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    torch.optim.swa_utils.update_bn(xt.split(256), model)
    xe, ye = arch.stripes(points, seed=1, classes=10)
    return model.eval(), xe, ye


class Timer:
    """Wraps the metric's calls of ``local_radius``: total seconds and point-steps."""

    def __init__(self):
        self.seconds, self.point_steps = 0.0, 0
        self.inner = sr.local_radius

    def __call__(self, bound, x, *args, **kwargs):
        t = time.perf_counter()
        out = self.inner(bound, x, *args, **kwargs)
        self.seconds += time.perf_counter() - t
        self.point_steps += x.shape[0]
        return out


def flips(model, x: np.ndarray, t: np.ndarray, lower: np.ndarray, norm: str,
          box: tuple[float, float] | None) -> tuple[int, int]:
    """(inputs checked, inputs flipped): float32 probes within 0.999·lower of x (∩ the box)."""
    if not len(x):
        return 0, 0
    x64 = x.astype(np.float64)
    r = torch.from_numpy(lower * 0.999).view(-1, *[1] * (x.ndim - 1))
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    delta = torch.zeros_like(xt, requires_grad=True)
    ends = []
    for _ in range(40):  # PGD on the margin of the predicted class, inside the ball
        logits = model(xt + delta)
        other = logits.scatter(1, tt[:, None], -torch.inf).amax(1)
        margin = logits.gather(1, tt[:, None])[:, 0] - other
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            rf = r.float()
            if norm == "linf":
                delta -= 0.05 * rf * grad.sign()
                delta.copy_(torch.maximum(torch.minimum(delta, rf), -rf))
            else:
                gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(rf)
                delta -= 0.1 * rf * grad / gn
                dn = delta.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(rf)
                delta *= (rf / dn).clamp(max=1)
            if box is not None:
                delta.copy_((xt + delta).clamp(*box) - xt)
        ends.append((xt + delta).detach().numpy())
    rng = np.random.default_rng(2)
    cands = list(ends[-5:])
    for c in ends[-3:]:
        for _ in range(3):
            cands.append(np.nextafter(c, c + rng.integers(-1, 2, size=c.shape).astype(
                np.float32)))
    for _ in range(20):
        if norm == "linf":
            d = rng.uniform(-1, 1, size=x.shape)
        else:
            d = rng.normal(size=x.shape)
            d /= np.linalg.norm(d.reshape(len(x), -1), axis=1).reshape(-1, *[1] * (x.ndim - 1))
        cands.append((x64 + 0.999 * lower.reshape(-1, *[1] * (x.ndim - 1)) * d)
                     .astype(np.float32))
    checked = flipped = 0
    for c in cands:
        if box is not None:
            c = np.clip(c, *box).astype(np.float32)
        dd = (c.astype(np.float64) - x64).reshape(len(x), -1)
        dist = np.abs(dd).max(1) if norm == "linf" else np.linalg.norm(dd, axis=1)
        ok = dist <= lower
        with torch.no_grad():
            pred = model(torch.from_numpy(np.ascontiguousarray(c))).argmax(1).numpy()
        checked += int(ok.sum())
        flipped += int((ok & (pred != t)).sum())
    return checked, flipped


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", choices=("digits", "resnet18"), default="digits")
    ap.add_argument("--points", type=int, default=None, help="default 120 (digits), 8 (resnet)")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 width")
    ap.add_argument("--mode", choices=("crown", "crown-ibp", "ibp"), default="crown")
    ap.add_argument("--alpha-steps", type=int, default=None,
                    help="alpha-CROWN steps of the local bound (default: the metric's)")
    ap.add_argument("--alpha-intermediate", type=int, default=None,
                    help="alpha-CROWN steps of crown's intermediate bounds (default: the "
                         "metric's)")
    ap.add_argument("--norms", default="l2,linf", help="comma-separated: l2, linf")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--whole-ball", action="store_true",
                    help="certify the whole ball (default: the ball ∩ the input box, where "
                         "the witnesses are searched)")
    args = ap.parse_args()
    norms = [nm for nm in args.norms.split(",") if nm]
    if not norms or any(nm not in ("l2", "linf") for nm in norms):
        ap.error(f"--norms: l2 and/or linf, got {args.norms!r}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.model == "digits":
        model, x_np, y_np = digits(args.points or 120)
    else:
        model, x_np, y_np = resnet18(args.points or 8, args.width)
    model.eval()
    data = robust_cert.load_data((x_np, y_np), input_range=(0.0, 1.0))
    clf = robust_cert.load_model(model, input_shape=data.input_shape)
    load = os.getloadavg()[0]
    print(f"{args.model}: trained in {time.perf_counter() - t0:.1f} s; {len(y_np)} points, "
          f"{args.threads} thread(s), load average {load:.1f} on {os.cpu_count()} cores",
          flush=True)
    results, timer = {}, Timer()
    sr.local_radius = timer
    try:
        for mode in ("off", args.mode):
            extra = {} if args.alpha_steps is None else {"alpha_steps": args.alpha_steps}
            if args.alpha_intermediate is not None:
                extra["alpha_intermediate"] = args.alpha_intermediate
            cfg = SafeRadiusConfig(norms=norms, local_bound=mode,
                                   within_box=not args.whole_ball, clever_batches=2,
                                   clever_samples=1, **extra)
            t = time.perf_counter()
            results[mode] = SafeRadius(cfg).run(clf, data,
                                                RunContext(CPU, batch_size=len(y_np), seed=0))
            row(f"safe_radius run, local bound {mode}", f"{time.perf_counter() - t:.1f} s")
    finally:
        sr.local_radius = timer.inner
    res = results[args.mode]
    alpha = (SafeRadiusConfig().alpha_steps if args.alpha_steps is None
             else args.alpha_steps)
    inter = (SafeRadiusConfig().alpha_intermediate if args.alpha_intermediate is None
             else args.alpha_intermediate)
    row("local bound", f"{res.diagnostics['local_bound']}, alpha_steps {alpha}, "
        f"alpha_intermediate {inter}")
    x = torch.from_numpy(x_np)
    xg = x.clone().requires_grad_(True)
    fb = min(_timed(lambda: torch.autograd.grad(model(xg).sum(), xg)) for _ in range(5))
    fb_point = fb / len(x)
    # what bounds the cost from below: the C − 1 margin rows of every point back-substituted
    # through the network in float64 cost at least C − 1 float64 backward passes (the same
    # points repeated C − 1 times, one forward-backward, best of 5)
    m64 = copy.deepcopy(model).double()
    rows = int(model(x[:1]).shape[1]) - 1
    xr = x.double().repeat(rows, *[1] * (x.ndim - 1)).requires_grad_(True)
    floor = min(_timed(lambda: torch.autograd.grad(m64(xr).sum(), xr)) for _ in range(5))
    xr32 = x.repeat(rows, *[1] * (x.ndim - 1)).requires_grad_(True)  # the same in float32
    floor32 = min(_timed(lambda: torch.autograd.grad(model(xr32).sum(), xr32))
                  for _ in range(5))
    ok = True
    target = TARGET_RATIO[args.model]
    box = None if args.whole_ball else (0.0, 1.0)
    pp = res.per_point
    holds = pp["holds"].astype(bool)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    for nm in norms:
        before, after = results["off"].diagnostics[nm], res.diagnostics[nm]
        r0, r1 = before["median_ratio"], after["median_ratio"]
        row(f"{nm}: median lower/upper, before (Lipschitz)", _f(r0))
        met = r1 is not None and r1 >= target
        ok &= met
        row(f"{nm}: median lower/upper, after (max(Lipschitz, {args.mode}))", _f(r1),
            f">= {target}", met)
        row(f"{nm}: median lower, before -> after",
            f"{_f(before['median_lower'], 4)} -> {_f(after['median_lower'], 4)}")
        row(f"{nm}: median upper (witness)", _f(after["median_upper"], 4))
        viol = after["sandwich_violations"] + before["sandwich_violations"]
        ok &= viol == 0
        row(f"{nm}: sandwich violations", str(viol), "0", viol == 0)
        row(f"{nm}: points certified by", ", ".join(f"{k} {v}" for k, v in
                                                    after["certified_by"].items() if v))
        lower = pp[f"lower@{nm}"]
        sel = holds & np.isfinite(lower) & (lower > 0)
        checked, flipped = flips(model, x_np[sel], pred[sel], lower[sel], nm, box)
        ok &= flipped == 0
        row(f"{nm}: flips inside certified balls", f"{flipped} of {checked} probes", "0",
            flipped == 0)
    steps = timer.point_steps / max(1, len(x))
    per_step = timer.seconds / max(1, timer.point_steps) / fb_point
    per_point = timer.seconds / len(x) / fb_point
    row("local bound steps per point and norm", f"{steps / len(norms):.1f}")
    met = per_step <= TARGET_COST
    ok &= met
    row(f"{args.mode} cost per point and radius step", f"{per_step:.0f}x forward+backward",
        f"<= {TARGET_COST}x", met)
    row(f"{args.mode} cost per point (both norms, whole search)",
        f"{per_point:.0f}x forward+backward")
    row("forward+backward per point", f"{fb_point * 1e6:.0f} us (batch {len(x)})")
    row(f"floor: {rows} float64 forward+backward per point (the margin rows)",
        f"{floor / len(x) / fb_point:.1f}x forward+backward")
    row(f"(the same {rows} passes in float32)",
        f"{floor32 / len(x) / fb_point:.1f}x forward+backward")
    bound = lipschitz_bound(model, data.input_shape)
    est = local_analysis(bound).bytes_per_point(args.mode, 9, alpha,
                                                alpha_intermediate=inter)
    row(f"estimated {args.mode} memory per point", f"{est / 2**20:.1f} MiB",
        f"chunks within max_bound_memory {SafeRadiusConfig().max_bound_memory / 2**20:.0f} MiB")
    row("load average at the end", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print()
    print_table()
    return 0 if ok else 1


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


if __name__ == "__main__":
    sys.exit(main())
