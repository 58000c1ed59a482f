"""Evaluation data: loading through the data-source registry (:mod:`robust_cert.sources`),
validation and hashing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from robust_cert import sources
from robust_cert.errors import DataError
from robust_cert.inputs import Inputs, InputsLike, PixelInputs

# the built-in digits live with the sources that read them; imported from here too
from robust_cert.sources import DIGITS as DIGITS
from robust_cert.sources import DIGITS_TEST_FRACTION as DIGITS_TEST_FRACTION
from robust_cert.sources import _digits as _digits
from robust_cert.sources import digits_split as digits_split


@dataclass(frozen=True)
class EvalSet:
    """Inputs ``x`` (N × input shape, read as float32) in ``input_range`` and integer labels
    ``y``; ``kind`` is the source that read them (``digits``, ``npz``, ``csv``, ``parquet``,
    ``image-folder``, ``factory``, ``arrays``, or a plugin's), ``details`` what it recorded
    (a table's feature columns, an image folder's classes).

    ``x`` is a float32 tensor, or an :class:`~robust_cert.inputs.Inputs` that gives float32
    tensors for the points asked for (``x[start:stop]``, ``x[indices]``): uint8 images kept
    as uint8, a factory's dataset read by blocks (:mod:`robust_cert.inputs`). Either way
    ``x[...]`` gives the same float32 values, and ``sha256`` hashes them."""

    x: InputsLike
    y: torch.Tensor
    name: str
    source: str
    input_range: tuple[float, float] = (0.0, 1.0)
    sha256: str = field(default="")
    kind: str = "arrays"
    details: dict = field(default_factory=dict, hash=False, compare=False)

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
            "kind": self.kind,
            **({"details": self.details} if self.details else {}),
        }


def data_sha256(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 over the float32 inputs and int64 labels, including their shapes: of
    ``"x{x.shape}|y{y.shape}\\n"``, then x's little-endian float32 bytes (C order), then y's
    little-endian int64 bytes. An :class:`~robust_cert.inputs.Inputs` is hashed the same way
    block by block in order (:class:`~robust_cert.inputs.Scan`): the same digest, without
    the whole float32 set in memory."""
    h = hashlib.sha256()
    x = np.ascontiguousarray(x, dtype="<f4")
    y = np.ascontiguousarray(y, dtype="<i8")
    h.update(f"x{x.shape}|y{y.shape}\n".encode())
    h.update(x.tobytes())
    h.update(y.tobytes())
    return h.hexdigest()


def load_data(
    data,
    *,
    input_range: tuple[float, float] = (0.0, 1.0),
    name: str | None = None,
    **options,
) -> EvalSet:
    """Load and validate evaluation data.

    ``data`` is any reference a registered data source accepts (:mod:`robust_cert.sources`):
    ``"digits"`` (the built-in test split; ``"digits:train"``), a path to an ``.npz`` holding
    ``x`` and ``y``, a ``.csv`` or ``.parquet`` table, a folder of images with one subfolder
    per class, a factory ``"package.module:function"`` returning a map-style torch
    ``Dataset``, a pair ``(x, y)`` of arrays or tensors, a
    :class:`~robust_cert.sources.DataSpec` (a reference with its options), or an
    :class:`EvalSet` (returned as is). ``options`` go to the source that reads ``data``
    (tables: ``label``, ``categories``; image folders: ``image_size``, ``mode``); one it does
    not take is refused. ``input_range`` is the inputs' declared range (image pixels are
    scaled onto it); the digits are always in [0, 1].

    Raises :class:`DataError` naming the problem: the file, column, row or item a source
    cannot read, wrong shapes, non-numeric inputs, NaN or infinite values, values outside
    ``input_range``, non-integer or negative labels. The EvalSet's ``sha256`` is
    :func:`data_sha256` of its float32 inputs and int64 labels, exactly as the model sees
    them; its ``kind`` names the source that read it. Image folders (and uint8 arrays of
    3 or more dimensions) stay uint8 in memory and a factory's dataset is read by blocks
    (:mod:`robust_cert.inputs`): the float32 values and the hash are the same as if the
    whole set had been converted at once.
    """
    loaded = sources.REGISTRY.load(data, input_range=input_range,
                                   options={k: v for k, v in options.items() if v is not None})
    if isinstance(loaded, EvalSet):
        return loaded
    if not isinstance(loaded, sources.Loaded):
        raise DataError(f"the data source for {sources.REGISTRY.find(data).form} returned "
                        f"{type(loaded).__name__}, not a robust_cert.sources.Loaded")
    return _build(loaded.x, loaded.y, name or loaded.name, loaded.source,
                  loaded.input_range or input_range, kind=loaded.kind, details=loaded.details)


def loaded_sha256(loaded: sources.Loaded, input_range: tuple[float, float]) -> str:
    """The ``sha256`` :func:`load_data` gives what a source read (validated the same way)."""
    return _build(loaded.x, loaded.y, loaded.name, loaded.source,
                  loaded.input_range or input_range).sha256


def _build(x, y, name: str, source: str, input_range: tuple[float, float], *,
           kind: str = "arrays", details: dict | None = None) -> EvalSet:
    lo, hi = (float(v) for v in input_range)
    if not lo < hi:
        raise DataError(f"input range [{lo}, {hi}] is empty: its lower end must be below its upper")
    y = np.asarray(y)
    if not isinstance(x, Inputs):
        x = np.asarray(x)
        if x.dtype == np.uint8 and x.ndim >= 3:  # images: kept as uint8, float32 per batch
            x = PixelInputs(x, None)
    if isinstance(x, Inputs):
        return _build_inputs(x, y, name, source, (lo, hi), kind=kind, details=details)
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
    y = _labels(y)
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
        kind=kind,
        details=dict(details or {}),
    )


def _labels(y: np.ndarray) -> np.ndarray:
    """``y`` (1-D, checked by the caller) as int64 labels ≥ 0, or DataError."""
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError("labels y must be integers (found non-integer or NaN values)")
    elif y.dtype.kind not in "iu":
        raise DataError(f"labels y have dtype {y.dtype}; expected integers")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise DataError(f"labels y contain negative values (min {int(y.min())})")
    return y


def _build_inputs(x: Inputs, y: np.ndarray, name: str, source: str,
                  input_range: tuple[float, float], *, kind: str,
                  details: dict | None) -> EvalSet:
    """:func:`_build` for inputs read on demand: the same checks and the same hash, from one
    pass over the points block by block (:meth:`Inputs.scan`)."""
    lo, hi = input_range
    if len(x.shape) < 2:
        raise DataError(f"inputs x have shape {tuple(x.shape)}; expected (N, features...) "
                        "with N samples")
    if y.ndim != 1:
        raise DataError(f"labels y have shape {y.shape}; expected a 1-D array of N labels")
    if len(x) != y.shape[0]:
        raise DataError(f"x has {len(x)} samples but y has {y.shape[0]} labels")
    if len(x) == 0:
        raise DataError("the evaluation set is empty")
    y = _labels(y)
    scan = x.scan()
    if scan.nonfinite:
        raise DataError(f"inputs x contain {scan.nonfinite} NaN/inf values (first in sample "
                        f"{scan.first_nonfinite})")
    if scan.min < lo or scan.max > hi:
        raise DataError(
            f"inputs x span [{scan.min:.4g}, {scan.max:.4g}], outside the declared input "
            f"range [{lo:g}, {hi:g}]; rescale the data or declare its range"
        )
    return EvalSet(x=x, y=torch.from_numpy(y), name=name, source=source, input_range=(lo, hi),
                   sha256=scan.sha256(y), kind=kind, details=dict(details or {}))


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
