"""Speed-up of a certification sharded over torchrun processes on CPU, in one command:

    python bench/bench_shard.py [--policy examples/policies/digits.yaml] [--processes 2]

Trains the digits CNN once (a few seconds), then certifies it with the policy (its batch_size,
the block size, set to --batch-size: 32 gives 12 blocks) on the 359 digits test points, first
in 1 process and then in N (``torchrun --standalone --nproc-per-node N``),
each process on one thread. Reported: the certification's own time (from the start of
``certify`` to its certificate, measured in rank 0; process start and imports excluded, as
they are in any long run), the wall time of the whole command, the speed-up and the parallel
efficiency (speed-up ÷ N; target ≥ 0.8 when N cores are free — on a machine whose cores are
busy with other work it is lower, and the table says how many cores were idle at the start).
The two certificates are compared: they must be identical but for the time of issue and the
process count.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(state: str, policy: str, out: str) -> int:
    import torch

    import robust_cert
    from robust_cert.data import digits_split
    from robust_cert.digits_cnn import DigitsCNN

    torch.set_num_threads(1)
    model = DigitsCNN()
    model.load_state_dict(torch.load(state))
    x, y = digits_split("test")
    started = time.perf_counter()
    cert = robust_cert.certify(model, (x, y), policy, progress=False, threads=1)
    seconds = time.perf_counter() - started
    if cert is not None:
        Path(out).write_text(json.dumps({"seconds": seconds, "body": cert.body}))
    return 0


def _idle_cores() -> float:
    """Cores idle over half a second (from /proc/stat), or nan where unavailable."""
    def snap():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)

    try:
        idle0, total0 = snap()
        time.sleep(0.5)
        idle1, total1 = snap()
    except OSError:
        return float("nan")
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default=str(ROOT / "examples" / "policies" / "digits.yaml"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="the policy's batch_size, which is the block size: 32 cuts the "
                             "359 points into 12 blocks (default 32)")
    parser.add_argument("--worker", nargs=3, metavar=("STATE", "POLICY", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    import torch
    from harness import print_table, row

    from robust_cert.digits_cnn import train_digits_cnn

    torch.set_num_threads(1)
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="bench_shard_"))
    policy = yaml.safe_load(Path(args.policy).read_text())
    policy["batch_size"] = args.batch_size
    policy_file = tmp / "policy.json"  # JSON is YAML
    policy_file.write_text(json.dumps(policy))
    state = tmp / "state.pt"
    torch.save(train_digits_cnn(epochs=15, seed=0).state_dict(), state)
    print(f"policy {args.policy} at batch_size {args.batch_size}; {os.cpu_count()} cores, "
          f"{_idle_cores():.1f} idle at start; 1 thread per process")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    runs = {}
    for n in (1, args.processes):
        out = tmp / f"ws{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", str(Path(__file__).resolve()), "--worker",
               str(state), str(policy_file), str(out)]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        runs[n] = {**json.loads(out.read_text()), "wall": wall}
        row(f"{n} process{'es' if n > 1 else ''}: certification", f"{runs[n]['seconds']:.1f} s")
        row(f"{n} process{'es' if n > 1 else ''}: whole command (start, imports)",
            f"{wall:.1f} s")
    n = args.processes
    speedup = runs[1]["seconds"] / runs[n]["seconds"]
    row(f"speed-up on {n} processes (certification)", f"{speedup:.2f}×")
    row(f"parallel efficiency (speed-up / {n})", f"{speedup / n:.2f}", "≥ 0.8 when cores are free",
        speedup / n >= 0.8)

    def strip(body):
        body = json.loads(json.dumps(body))
        body.pop("issued_at")
        body["environment"].pop("processes")
        return body

    same = strip(runs[1]["body"]) == strip(runs[n]["body"])
    row("certificates identical (but issued_at, processes)", "yes" if same else "NO", "yes", same)
    print()
    print_table()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
