"""Evaluation inputs read on demand: uint8 pixels kept as uint8, map-style datasets read by
blocks.

An :class:`~robust_cert.data.EvalSet`'s ``x`` is either a float32 ``torch.Tensor`` (arrays,
``.npz`` files of floats, tables, the digits: already in memory) or an :class:`Inputs`, which
holds the data in a smaller or lazier form and gives float32 tensors only for the points
asked for:

- :class:`PixelInputs`: uint8 images (an image folder, an ``.npz`` of uint8) held as uint8,
  4× smaller than float32; each read converts the points read, with the declared range
  applied per point exactly as the whole-set conversion would (elementwise, so the float32
  values are bit-for-bit those of converting the whole set at once).
- :class:`DatasetInputs`: a map-style ``torch.utils.data.Dataset`` (a factory's), of which
  only the labels and an 8-byte digest per item are kept; each read calls the dataset for the
  points read, and refuses an item whose digest differs from the one hashed (a dataset whose
  items change between reads: random transforms), so every metric sees the data the
  certificate's hash names.

``x[index]`` (an int, a slice, a 1-D integer tensor/array/list or a boolean mask, then
optionally indices within the points as for a tensor) is a float32 CPU tensor of those
points; ``len``, ``shape`` and ``dtype`` describe the whole set. Memory grows with the points
read, not with the set. :meth:`Inputs.numpy` materialises the whole set as float32:
only the HTML report's per-point charts do that.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from robust_cert.errors import DataError

#: Points converted per step when hashing or scanning an :class:`Inputs` (a few MB of float32
#: for 64×64 RGB images).
SCAN_BLOCK = 256


class Inputs(abc.ABC):
    """Evaluation inputs (N × sample shape) read as float32 on demand (see the module doc).

    Subclasses implement :meth:`_read` (consecutive points) and may override :meth:`_take`
    (arbitrary points)."""

    dtype = torch.float32

    def __init__(self, shape: tuple[int, ...]):
        self.shape = torch.Size(shape)

    def __len__(self) -> int:
        return int(self.shape[0])

    @abc.abstractmethod
    def _read(self, start: int, stop: int) -> np.ndarray:
        """Points ``start`` … ``stop − 1`` as a float32 array."""

    def _take(self, idx: np.ndarray) -> np.ndarray:
        """The points ``idx`` (in that order) as a float32 array."""
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.float32)
        for k, i in enumerate(idx.tolist()):
            out[k] = self._read(i, i + 1)[0]
        return out

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, tuple):  # points first, then indices within the points read
            if not index:
                return self[:]
            points = self[index[0]]
            rest = index[1:]
            if isinstance(index[0], (int, np.integer)):
                return points[rest]
            return points[(slice(None), *rest)]
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} points")
            i %= n
            return torch.from_numpy(self._read(i, i + 1)[0])
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return torch.from_numpy(self._read(start, max(start, stop)))
            index = np.arange(start, stop, step)
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        idx = np.asarray(index)
        if idx.ndim == 0 and idx.dtype.kind in "iu":  # a 0-d integer tensor: one point
            return self[int(idx)]
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"a boolean mask over {n} points has shape {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise IndexError("index the points with an int, a slice, or a 1-D integer array")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"point index out of range for {n} points")
        idx = idx % n if idx.size else idx
        if idx.size and np.all(np.diff(idx) == 1):  # consecutive: one read
            return torch.from_numpy(self._read(int(idx[0]), int(idx[-1]) + 1))
        return torch.from_numpy(self._take(idx))

    def blocks(self, size: int = SCAN_BLOCK) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, float32 points)`` for consecutive blocks of ``size`` points, in order."""
        for start in range(0, len(self), size):
            yield start, self._read(start, min(start + size, len(self)))

    def window(self, start: int, stop: int) -> Inputs:
        """Points ``start`` … ``stop − 1`` as inputs read on demand too (nothing is read
        here): how the engine hands a process's range of points to a metric."""
        return _Window(self, start, stop)

    def numpy(self) -> np.ndarray:
        """The whole set as one float32 array (N × sample shape): memory of the full set."""
        out = np.empty(tuple(self.shape), dtype=np.float32)
        for start, block in self.blocks():
            out[start:start + len(block)] = block
        return out

    # the few tensor methods callers use on a whole set's ``x``
    def is_pinned(self) -> bool:
        """False: points are read into ordinary memory (copied to a GPU synchronously)."""
        return False

    def pin_memory(self) -> Inputs:
        """Itself: blocks are read on demand, there is no whole-set tensor to page-lock."""
        return self

    def detach(self) -> Inputs:
        return self

    def cpu(self) -> Inputs:
        return self

    def scan(self) -> Scan:
        """Every point read once, in order, into a :class:`Scan` (hash, range, NaN/inf)."""
        scan = Scan(tuple(self.shape))
        for _, block in self.blocks():
            scan.add(block)
        return scan

    @property
    def nbytes(self) -> int:
        """Bytes this object holds for the inputs (not counting a dataset's own storage)."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)})"


class Scan:
    """What one pass over a set's float32 inputs, block by block in order, found: the
    SHA-256 state after the header and the inputs' bytes (:meth:`sha256` adds the labels:
    the result is :func:`robust_cert.data.data_sha256` of the whole float32 set, without it
    ever being in memory at once), the smallest and largest value, and the NaN/inf values
    (count, first point holding one)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(v) for v in shape)
        self._hash = hashlib.sha256()
        self._hash.update(f"x{self.shape}|y{(self.shape[0],)}\n".encode())
        self.min, self.max = float("inf"), float("-inf")
        self.nonfinite, self.first_nonfinite, self.points = 0, -1, 0

    def add(self, block: np.ndarray) -> None:
        """The next points (float32, in order)."""
        block = np.ascontiguousarray(block, dtype="<f4")
        bad = ~np.isfinite(block)
        if bad.any():
            if self.nonfinite == 0:
                rows = bad.reshape(len(block), -1).any(axis=1)
                self.first_nonfinite = self.points + int(np.argmax(rows))
            self.nonfinite += int(bad.sum())
        elif block.size:
            self.min = min(self.min, float(block.min()))
            self.max = max(self.max, float(block.max()))
        self.points += len(block)
        self._hash.update(block.tobytes())

    def sha256(self, y: np.ndarray) -> str:
        """SHA-256 of the inputs scanned and the int64 labels ``y``."""
        h = self._hash.copy()
        h.update(np.ascontiguousarray(y, dtype="<i8").tobytes())
        return h.hexdigest()


def scale_pixels(pixels: np.ndarray, input_range: tuple[float, float]) -> np.ndarray:
    """uint8 pixels as float32 in ``input_range``: ``lo + (p / 255) · (hi − lo)``, clipped to
    the range (0 → lo and 255 → hi exactly). Elementwise: converting a block gives the same
    float32 values as converting the whole set."""
    lo, hi = (np.float32(v) for v in input_range)
    x = pixels.astype(np.float32)
    x /= np.float32(255.0)
    if (lo, hi) != (0.0, 1.0):
        x *= hi - lo
        x += lo
        np.clip(x, lo, hi, out=x)
    return x


class PixelInputs(Inputs):
    """uint8 points held as uint8; read as float32 through :func:`scale_pixels` onto
    ``input_range`` (image pixels), or, with ``input_range=None``, as their values
    (``0.0`` … ``255.0``, an ``.npz`` of uint8)."""

    def __init__(self, pixels: np.ndarray, input_range: tuple[float, float] | None):
        if pixels.dtype != np.uint8:
            raise TypeError(f"PixelInputs holds uint8, not {pixels.dtype}")
        super().__init__(tuple(pixels.shape))
        self.pixels = np.ascontiguousarray(pixels)
        self.input_range = (None if input_range is None
                            else (float(input_range[0]), float(input_range[1])))

    def _convert(self, block: np.ndarray) -> np.ndarray:
        if self.input_range is None:
            return block.astype(np.float32)
        return scale_pixels(block, self.input_range)

    def _read(self, start: int, stop: int) -> np.ndarray:
        return self._convert(self.pixels[start:stop])

    def _take(self, idx: np.ndarray) -> np.ndarray:
        return self._convert(self.pixels[idx])

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)


class _Window(Inputs):
    """Consecutive points of another :class:`Inputs` (see :meth:`Inputs.window`)."""

    def __init__(self, base: Inputs, start: int, stop: int):
        n = len(base)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"points {start}..{stop} are out of range for {n} points")
        super().__init__((stop - start, *base.shape[1:]))
        self.base, self.start = base, start

    def _read(self, start: int, stop: int) -> np.ndarray:
        return self.base._read(self.start + start, self.start + stop)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        return self.base._take(idx + self.start)


def item_digest(x: np.ndarray) -> int:
    """An 8-byte BLAKE2b digest of one float32 point (its shape and bytes)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(x.shape).encode())
    h.update(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return int.from_bytes(h.digest(), "little")


class DatasetInputs(Inputs):
    """The inputs of a map-style dataset whose items are ``(x, y)`` pairs, read item by item
    on demand (``read(i)`` gives item ``i``'s inputs as a float32 array, raising DataError
    naming the item). ``digests`` (one :func:`item_digest` per item, from the scan that
    validated and hashed the set) are checked on every read: an item that changed is refused
    naming its index."""

    def __init__(self, read, shape: tuple[int, ...], digests: np.ndarray, label: str,
                 scan: Scan | None = None):
        super().__init__(shape)
        self.read_item, self.digests, self.label = read, digests, label
        self._scan = scan

    def scan(self) -> Scan:
        """The scan made while the dataset was first read (no second pass), else a new one."""
        return self._scan if self._scan is not None else super().scan()

    def _item(self, i: int) -> np.ndarray:
        x = self.read_item(i)
        if x.shape != tuple(self.shape[1:]) or item_digest(x) != int(self.digests[i]):
            raise DataError(f"{self.label}: item {i} differs from when the data was read and "
                            "hashed (random transforms?); the dataset must return the same "
                            "item for the same index")
        return x

    def _read(self, start: int, stop: int) -> np.ndarray:
        return self._take(np.arange(start, stop))

    def _take(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.float32)
        for k, i in enumerate(idx.tolist()):
            out[k] = self._item(i)
        return out

    @property
    def nbytes(self) -> int:
        return int(self.digests.nbytes)


class ArrayView:
    """An :class:`Inputs` seen as a read-only numpy array for code that picks a few points
    (the HTML report's example images): ``shape``, ``ndim``, ``len``, and ``view[index]`` →
    a float32 ``np.ndarray`` of the points indexed, read on demand. ``view[:, None]`` (a
    channel axis before the last two) is a view too; nothing is read until points are."""

    dtype = np.dtype(np.float32)

    def __init__(self, inputs: Inputs, channel_axis: bool = False):
        self.inputs, self.channel_axis = inputs, channel_axis
        shape = tuple(int(v) for v in inputs.shape)
        self.shape = (*shape[:-2], 1, *shape[-2:]) if channel_axis else shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, tuple) and len(index) == 2 and index[1] is None and \
                index[0] == slice(None) and not self.channel_axis:
            return ArrayView(self.inputs, channel_axis=True)
        out = self.inputs[index].numpy()
        return np.expand_dims(out, out.ndim - 2) if self.channel_axis else out


#: What an EvalSet's ``x`` may be.
InputsLike = torch.Tensor | Inputs
