"""One process of a sharded certification, for tests/test_distributed.py.

    torchrun --standalone --nproc-per-node N tests/shard_worker.py STATE POLICY OUT [--fail-rank R]

certifies the small CNN whose weights are in STATE (tests/test_distributed.py trains it) on
the first 40 digits test points with POLICY (JSON); rank 0 writes OUT/certificate.json and
OUT/per_point.npz. With ``--fail-rank R`` the model raises in forward on process R, on the
last point only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POINTS = 40


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 64, 10))


class FailsOnRank(nn.Module):
    """Raises on process ``rank`` when a batch holds the input ``marker`` (the last point, in
    the last block: only the metrics' own passes over it see it, not the first checks)."""

    def __init__(self, inner: nn.Module, rank: int, marker: torch.Tensor):
        super().__init__()
        self.inner, self.rank, self.marker = inner, rank, marker

    def forward(self, x):
        if int(os.environ.get("RANK", "0")) == self.rank and \
                (x == self.marker).flatten(1).all(1).any():
            raise RuntimeError(f"injected failure on rank {self.rank}")
        return self.inner(x)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state")
    parser.add_argument("policy")
    parser.add_argument("out")
    parser.add_argument("--fail-rank", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import robust_cert
    from robust_cert.data import digits_split

    model = small_cnn()
    model.load_state_dict(torch.load(args.state))
    x, y = digits_split("test")
    if args.fail_rank is not None:
        model = FailsOnRank(model, args.fail_rank, torch.tensor(x[POINTS - 1]))
    cert = robust_cert.certify(model, (x[:POINTS], y[:POINTS]),
                               json.loads(Path(args.policy).read_text()), seed=7,
                               progress=False, threads=1)
    if cert is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "certificate.json").write_text(json.dumps(cert.body, indent=1, sort_keys=True))
        np.savez(out / "per_point.npz", **cert.per_point)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
