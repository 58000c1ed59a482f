"""Peak memory of a certification with a policy (default digits-adversarial.yaml), in one command:

    python bench/bench_memory.py [--policy examples/policies/digits-adversarial.yaml] [--per-metric]

The digits CNN is trained once (``train_digits_cnn``, a few seconds) and its weights saved.
Then, in a fresh process (the measure is the process's own high-water mark, ``VmHWM``), as a
certification runs: import robust_cert, load the model's weights and the 359 digits test
points, record the resident memory (the baseline: what any certification of this model holds
before its first metric), certify with the policy on one thread and read the peak. (Training
in the same process would add ~100 MB of its own that a certification never pays.)
Targets: digits-adversarial.yaml under 500 MB peak RSS (issue 14; its first version: 2.1 GB),
and at most 200 MB above the same command with an accuracy-only policy (issue 24: the
policy's metrics, not the imports, model and data they share), measured in the same run.

``--per-metric`` also runs each metric of the policy alone, each in its own fresh process, and
prints its increment over the baseline: where the memory goes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import finish, load_average, peak_rss_bytes, proc_status, row

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 500.0
#: the policy's peak above the same command with its accuracy metric alone (issue 24)
ABOVE_ACCURACY_MB = 200.0


def child(policy_path: str, only: str, out: str, state: str) -> None:
    """Certify the digits CNN (weights ``state``) with the policy (or only its metric
    ``only``); write the measures to ``out``."""
    import torch
    import yaml

    import robust_cert
    from robust_cert.data import digits_split
    from robust_cert.digits_cnn import DigitsCNN
    from robust_cert.policy import load_policy

    torch.set_num_threads(1)
    raw = yaml.safe_load(Path(policy_path).read_text())
    if only:  # the metric alone, with its requirements (accuracy's stand in if it has none)
        reqs = [r for r in raw["requirements"] if r["metric"] == only]
        raw["metrics"] = {only: raw["metrics"][only]}
        if not reqs:
            raw["metrics"]["accuracy"] = {}
            reqs = [{"metric": "accuracy", "at_least": 0.0}]
        raw["requirements"] = reqs
    policy = load_policy(raw)
    model = DigitsCNN()
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    x, y = digits_split("test")
    base, base_peak = proc_status("VmRSS"), peak_rss_bytes()
    started = time.perf_counter()
    cert = robust_cert.certify(model, (x, y), policy, progress=False, threads=1)
    Path(out).write_text(json.dumps({
        "peak": peak_rss_bytes(), "base": base, "base_peak": base_peak,
        "seconds": time.perf_counter() - started, "verdict": cert.verdict}))


def measure(policy: Path, state: Path, only: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, __file__, "--child", str(policy), only, str(out),
                               str(state)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": tail[0]}
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path,
                        default=ROOT / "examples" / "policies" / "digits-adversarial.yaml")
    parser.add_argument("--per-metric", action="store_true",
                        help="also run each metric alone in a fresh process")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    import torch

    from robust_cert.digits_cnn import train_digits_cnn

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    state = work / "digits_cnn.pt"
    torch.save(train_digits_cnn(epochs=5, seed=0).state_dict(), state)
    mb = 2.0 ** 20
    whole = measure(args.policy, state)
    if "error" in whole:
        row(f"{args.policy.name}: peak RSS", f"FAILED: {whole['error']}",
            f"< {TARGET_MB:g} MB", False)
    else:
        peak, base = whole["peak"] / mb, whole["base"] / mb
        row("baseline: imports, model, data", f"{base:,.0f} MB (peak so far "
            f"{whole['base_peak'] / mb:,.0f} MB)")
        row(f"{args.policy.name}: peak RSS", f"{peak:,.0f} MB (+{peak - base:,.0f} MB over the "
            f"baseline; {whole['seconds']:.0f} s, {whole['verdict']})",
            f"< {TARGET_MB:g} MB", peak < TARGET_MB)
        acc = measure(args.policy, state, "accuracy")
        if "error" in acc:
            row("the same command, accuracy only", f"FAILED: {acc['error']}",
                f"≤ {ABOVE_ACCURACY_MB:g} MB below", False)
        else:
            above = peak - acc["peak"] / mb
            row("the same command, accuracy only", f"{acc['peak'] / mb:,.0f} MB")
            row(f"{args.policy.name} above accuracy only", f"+{above:,.0f} MB",
                f"≤ {ABOVE_ACCURACY_MB:g} MB", above <= ABOVE_ACCURACY_MB)
    if args.per_metric:
        import yaml

        names = list(yaml.safe_load(args.policy.read_text())["metrics"])
        for name in names:
            r = measure(args.policy, state, name)
            if "error" in r:
                row(f"  {name} alone", f"FAILED: {r['error']}")
                continue
            row(f"  {name} alone", f"peak {r['peak'] / mb:,.0f} MB, "
                f"+{(r['peak'] - r['base']) / mb:,.0f} MB; {r['seconds']:.0f} s")
    return finish(f"bench_memory: load average at the end {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
