"""Peak memory of certifying a large image set, in one command:

    python bench/bench_images.py [--n 20000] [--small 2000] [--source folder|factory|both]
                                 [--code PATH]

Writes ``--n`` RGB 64×64 PNG images (10 class folders of seeded random pixels) into a
temporary image folder; the ``--small`` set is the same folder's first images of each class
(hard links). Then, each in a fresh process on one thread, it certifies a tiny CNN (seeded, a
few thousand weights) on each set with one policy — accuracy + probabilistic robustness
(``uniform_linf`` ε = 0.03, 4,000 draws over the points), batch size 256 — and writes the
certificate and the HTML report as ``robust-cert certify`` does (``write_report`` with the
data), reading the process's high-water mark (``VmHWM``) at the end.

``--source factory`` certifies the same images from a factory ``module:function`` returning
a map-style Dataset that makes image ``i`` from a seed (no files; read by blocks).

Target (issue 22): the peak on ``--n`` images exceeds the peak on ``--small`` images by at
most 1.5× the uint8 size of the ``--n`` images (20,000 × 3 × 64 × 64 bytes = 245.8 MB; as
float32 the set alone would be 983 MB). Exits 1 when missed (or when a run fails).
``--code PATH`` imports robust_cert from another checkout (e.g. an older commit, to compare).
Memory is little affected by other load on the machine; times are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import peak_rss_bytes, print_table, proc_status, row

ROOT = Path(__file__).resolve().parents[1]
SIDE, CLASSES = 64, 10
RATIO = 1.5  # target: peak difference ≤ RATIO × uint8 size of the large set

FACTORY = '''
import numpy as np
import torch
from torch.utils.data import Dataset

SIDE, CLASSES, N = {side}, {classes}, {n}


class Images(Dataset):
    """Image i: seeded random uint8 pixels (seed i), in [0, 1] as float32."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        pixels = np.random.default_rng(i).integers(0, 256, (3, SIDE, SIDE), dtype=np.uint8)
        return torch.from_numpy(pixels.astype(np.float32) / 255), i % CLASSES


def images():
    return Images()
'''


class Targets:
    """The bench's targets: each check is recorded as a table row; ``exit_code`` is 1 when
    any was missed."""

    def __init__(self):
        self.missed: list[str] = []

    def check(self, name: str, value: str, target: str, met: bool) -> None:
        row(name, value, target, met)
        if not met:
            self.missed.append(name)

    def exit_code(self) -> int:
        if self.missed:
            print("missed: " + "; ".join(self.missed), file=sys.stderr)
        return 1 if self.missed else 0


def tiny_cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, CLASSES)).eval()


POLICY = {
    "name": "images-at-scale", "input_range": [0.0, 1.0], "batch_size": 256,
    "metrics": {"accuracy": {},
                "probabilistic_robustness": {"eps": [0.03], "samples": 4000}},
    "requirements": [{"metric": "accuracy", "at_least": 0.0},
                     {"metric": "probabilistic_robustness", "eps": 0.03, "at_most": 1.0}],
}


def child(data: str, out: str, code: str) -> None:
    """Certify the tiny CNN on ``data``, write certificate + report, record the peak."""
    sys.path.insert(0, code)
    import torch

    import robust_cert
    from robust_cert.data import load_data
    from robust_cert.report import write_report

    torch.set_num_threads(1)
    model = tiny_cnn()
    base = proc_status("VmRSS")
    started = time.perf_counter()
    evalset = load_data(data)
    loaded = time.perf_counter() - started
    cert = robust_cert.certify(model, evalset, POLICY, progress=False, threads=1, device="cpu")
    assert cert is not None
    with tempfile.TemporaryDirectory() as tmp:
        write_report(cert, tmp, pdf="off", data=evalset)
    Path(out).write_text(json.dumps({
        "peak": peak_rss_bytes(), "base": base, "load_s": loaded, "n": len(evalset),
        "seconds": time.perf_counter() - started, "verdict": cert.verdict,
        "sha256": evalset.sha256, "x": type(evalset.x).__name__}))


def measure(data: str, code: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, __file__, "--child", data, str(out), code],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": tail[0]}
        return json.loads(out.read_text())


def write_folder(root: Path, n: int, small: int) -> tuple[Path, Path]:
    """The large folder (``n`` images) and the small one (hard links to its first images of
    each class, ``small`` in all)."""
    import numpy as np
    from PIL import Image

    big, little = root / "big", root / "small"
    for c in range(CLASSES):
        (big / f"c{c}").mkdir(parents=True)
        (little / f"c{c}").mkdir(parents=True)
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        path = big / f"c{i % CLASSES}" / f"{i:06d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        if i < small:
            os.link(path, little / f"c{i % CLASSES}" / f"{i:06d}.png")
    return big, little


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--source", choices=("folder", "factory", "both"), default="both")
    parser.add_argument("--code", default=str(ROOT), help="checkout to import robust_cert from")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    code = str(Path(args.code).resolve())
    mb = 2.0 ** 20
    uint8 = args.n * 3 * SIDE * SIDE
    limit = RATIO * uint8
    print(f"{args.n:,} vs {args.small:,} RGB {SIDE}×{SIDE} images: uint8 {uint8 / mb:,.1f} MB "
          f"(float32 {4 * uint8 / mb:,.1f} MB); robust_cert from {code}; load: "
          f"{os.getloadavg()[0]:.2f} (1-min average)", flush=True)
    targets = Targets()
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{code}",
               "ROBUST_CERT_THREADS": "1"}
        sets: list[tuple[str, str, str]] = []
        if args.source in ("folder", "both"):
            t = time.perf_counter()
            big, little = write_folder(work, args.n, args.small)
            print(f"  wrote the image folders in {time.perf_counter() - t:.0f} s", flush=True)
            sets.append(("image folder", str(big), str(little)))
        if args.source in ("factory", "both"):
            for name, n in (("bench_big", args.n), ("bench_small", args.small)):
                (work / f"{name}.py").write_text(FACTORY.format(side=SIDE, classes=CLASSES, n=n))
            sets.append(("factory", "bench_big:images", "bench_small:images"))
        for label, large_ref, small_ref in sets:
            large, small = measure(large_ref, code, env), measure(small_ref, code, env)
            failed = large.get("error") or small.get("error")
            if failed:
                targets.check(f"{label}: certify", f"FAILED: {failed}", "runs", False)
                continue
            for r in (small, large):
                row(f"{label}, {r['n']:,} images: peak RSS",
                    f"{r['peak'] / mb:,.0f} MB (before loading {r['base'] / mb:,.0f} MB; x is "
                    f"{r['x']}; load {r['load_s']:.1f} s, total {r['seconds']:.0f} s, "
                    f"{r['verdict']})")
            extra = large["peak"] - small["peak"]
            targets.check(f"{label}: peak({args.n:,}) - peak({args.small:,})",
                          f"{extra / mb:,.0f} MB = {extra / uint8:.2f}× the uint8 set",
                          f"<= {limit / mb:,.0f} MB ({RATIO:g}×)", extra <= limit)
    print_table()
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
