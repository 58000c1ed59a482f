"""Evaluation data: loading (.npz, arrays, tensors, built-in digits), validation and hashing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robust_cert.errors import DataError

DIGITS = "digits"
#: Fraction of the digits set held out for evaluation; the rest is for training demos.
DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20240601


@dataclass(frozen=True)
class EvalSet:
    """Inputs ``x`` (float32, N × input shape) in ``input_range`` and integer labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor
    name: str
    source: str
    input_range: tuple[float, float] = (0.0, 1.0)
    sha256: str = field(default="")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.y, minlength=num_classes).tolist()

    def describe(self, num_classes: int) -> dict:
        """The certificate's record of the data."""
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "n": len(self),
            "input_shape": list(self.input_shape),
            "input_range": list(self.input_range),
            "class_counts": self.class_counts(num_classes),
        }


def data_sha256(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 over the float32 inputs and int64 labels, including their shapes."""
    h = hashlib.sha256()
    x = np.ascontiguousarray(x, dtype="<f4")
    y = np.ascontiguousarray(y, dtype="<i8")
    h.update(f"x{x.shape}|y{y.shape}\n".encode())
    h.update(x.tobytes())
    h.update(y.tobytes())
    return h.hexdigest()


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits images (1797, 8, 8) and labels, read from the CSV scikit-learn ships
    (what ``sklearn.datasets.load_digits`` reads) without importing scikit-learn: its import
    costs ~80 MB of memory, a sixth of a digits certification's peak. Falls back to
    ``load_digits`` where the file is not found."""
    from importlib.util import find_spec

    spec = find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target  # pyright: ignore[reportAttributeAccessIssue]  (a Bunch: sklearn's inferred type is a tuple too)


def digits_split(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 bundled 8×8 digits, scaled to [0, 1], shape (N, 1, 8, 8).

    A fixed permutation holds out 20% as ``test`` (359 images); ``train`` is the rest.
    """
    if split not in ("test", "train"):
        raise DataError(f"unknown digits split {split!r}; use 'test' or 'train'")
    images, target = _digits()
    x = (images / 16.0).astype(np.float32)[:, None, :, :]
    y = target.astype(np.int64)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(y))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return x[idx], y[idx]


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; an .npz needs 'x' and 'y' "
                    f"(found: {', '.join(f.files) or 'none'})"
                )
            return f["x"], f["y"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc


def load_data(
    data,
    *,
    input_range: tuple[float, float] = (0.0, 1.0),
    name: str | None = None,
) -> EvalSet:
    """Load and validate evaluation data.

    ``data`` is ``"digits"`` (the built-in test split), a path to an ``.npz`` holding ``x`` and
    ``y``, a pair ``(x, y)`` of arrays or tensors, or an :class:`EvalSet` (returned as is).
    Raises :class:`DataError` naming the problem: wrong shapes, non-numeric inputs, NaN or
    infinite values, values outside ``input_range``, non-integer or negative labels.
    """
    if isinstance(data, EvalSet):
        return data
    if isinstance(data, (str, Path)):
        spec = str(data)
        if spec in (DIGITS, f"{DIGITS}:test"):
            x, y = digits_split("test")
            return _build(x, y, name or "digits-test", "sklearn.datasets.load_digits (test split)",
                          (0.0, 1.0))
        if spec == f"{DIGITS}:train":
            x, y = digits_split("train")
            return _build(x, y, name or "digits-train",
                          "sklearn.datasets.load_digits (train split)", (0.0, 1.0))
        path = Path(spec)
        if path.suffix != ".npz":
            raise DataError(f"unsupported data {spec!r}: give 'digits' or a path to an .npz file")
        x, y = _load_npz(path)
        return _build(x, y, name or path.stem, str(path.resolve()), input_range)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)
                for d in data)
        return _build(x, y, name or "arrays", "in-memory arrays", input_range)
    raise DataError(
        f"unsupported data of type {type(data).__name__}: give 'digits', an .npz path, "
        "or a pair (x, y)"
    )


def _build(x, y, name: str, source: str, input_range: tuple[float, float]) -> EvalSet:
    lo, hi = (float(v) for v in input_range)
    if not lo < hi:
        raise DataError(f"input range [{lo}, {hi}] is empty: its lower end must be below its upper")
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype.kind not in "fiu":
        raise DataError(f"inputs x have dtype {x.dtype}; expected a numeric array")
    if x.ndim < 2:
        raise DataError(f"inputs x have shape {x.shape}; expected (N, features...) with N samples")
    if y.ndim != 1:
        raise DataError(f"labels y have shape {y.shape}; expected a 1-D array of N labels")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise DataError("the evaluation set is empty")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError("labels y must be integers (found non-integer or NaN values)")
    elif y.dtype.kind not in "iu":
        raise DataError(f"labels y have dtype {y.dtype}; expected integers")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise DataError(f"labels y contain negative values (min {int(y.min())})")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.argwhere(bad.reshape(x.shape[0], -1).any(axis=1))[0, 0]
        raise DataError(f"inputs x contain {int(bad.sum())} NaN/inf values (first in sample "
                        f"{first})")
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo or xmax > hi:
        raise DataError(
            f"inputs x span [{xmin:.4g}, {xmax:.4g}], outside the declared input range "
            f"[{lo:g}, {hi:g}]; rescale the data or declare its range"
        )
    return EvalSet(
        x=torch.from_numpy(np.ascontiguousarray(x)),
        y=torch.from_numpy(y),
        name=name,
        source=source,
        input_range=(lo, hi),
        sha256=data_sha256(x, y),
    )


def check_fits(evalset: EvalSet, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise DataError unless the data's sample shape and labels fit the model."""
    if tuple(input_shape) != evalset.input_shape:
        raise DataError(
            f"data samples have shape {evalset.input_shape} but the model expects "
            f"{tuple(input_shape)}"
        )
    ymax = int(evalset.y.max())
    if ymax >= num_classes:
        raise DataError(
            f"labels go up to {ymax} but the model has {num_classes} classes (0..{num_classes - 1})"
        )
