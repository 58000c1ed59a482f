"""Write the evaluation (and training) data of the registry example (docs/deployment.md §3b).

    python examples/registry/make_data.py [--out DIR]     # default: data/ beside this file

- ``digits-eval.npz``: 150 held-out 8x8 digits (x: (150, 1, 8, 8) in [0, 1], y: 0..9), the
  evaluation set of rule 1 (``vision-*``);
- ``credit-train.csv`` (600 rows) and ``credit-eval.csv`` (200 rows): a synthetic credit table,
  four features in [0, 1] and a 0/1 ``label`` column; the evaluation set of rule 2
  (``credit-*``) and what ``register.py`` fits the scorer on.

Deterministic: the same files (and so the same data SHA-256) on every run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FEATURES = ("income", "debt_ratio", "history", "utilisation")


def credit_table(n: int, seed: int):
    """``n`` rows of the synthetic credit table: features (n, 4) in [0, 1], labels (n,)."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.uniform(0.0, 1.0, size=(n, len(FEATURES))), 4)
    score = 1.5 * x[:, 0] - 2.0 * x[:, 1] + 1.0 * x[:, 2] - 0.8 * x[:, 3] \
        + rng.normal(0.0, 0.15, size=n)
    return x, (score > -0.1).astype(np.int64)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    lines = [",".join((*FEATURES, "label"))]
    lines += [",".join(f"{v:.4f}" for v in row) + f",{label}"
              for row, label in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "data", help="folder to write")
    args = parser.parse_args(argv)
    from robust_cert.data import digits_split

    args.out.mkdir(parents=True, exist_ok=True)
    x, y = digits_split("test")
    np.savez(args.out / "digits-eval.npz", x=x[:150], y=y[:150])
    write_csv(args.out / "credit-train.csv", *credit_table(600, seed=1))
    write_csv(args.out / "credit-eval.csv", *credit_table(200, seed=2))
    print(f"wrote digits-eval.npz, credit-train.csv, credit-eval.csv to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
