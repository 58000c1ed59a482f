"""The data-source registry: one place that turns an evaluation-data reference into arrays.

A :class:`Source` says which references it accepts (a predicate, e.g. "a path ending in
``.csv``") and reads one into a :class:`Loaded` record: inputs, labels, a name, where they
came from and what kind of source it was. :func:`robust_cert.data.load_data` asks the
registered sources in order, the first that accepts the reference reads it, and ``load_data``
validates and hashes the result (:func:`robust_cert.data.data_sha256` of the float32 inputs
and int64 labels exactly as the model sees them). The core registers, in this order:

- an :class:`~robust_cert.data.EvalSet` (returned unchanged);
- ``digits`` (``digits:test``, ``digits:train``): scikit-learn's bundled 8×8 digits;
- a path to an ``.npz`` holding ``x`` (N × input shape) and ``y`` (N integer labels);
- a path to a ``.csv`` or ``.parquet`` table (:func:`read_table`);
- a folder of images, one subfolder per class (:func:`read_image_folder`);
- a factory ``package.module:function`` returning a map-style
  ``torch.utils.data.Dataset`` of ``(x, y)`` pairs (:func:`read_factory`);
- a pair ``(x, y)`` of arrays or tensors.

Other packages add sources through the entry-point group ``robust_cert.data_sources`` (see
:mod:`robust_cert.plugins`), read the first time no source registered so far accepts a
reference; robust_cert's MLflow plugin registers ``runs:/RUN_ID/PATH`` (data a run logged as
an artifact, :mod:`robust_cert.mlflow_plugin.datasets`) that way, so this module never imports
MLflow. A reference no source accepts is refused with the list of what
the registered sources accept. In code, :func:`register_source` adds one (first match wins)::

    from robust_cert.sources import Loaded, Source, register_source

    register_source(Source(
        "lake://TABLE", accepts=lambda ref: str(ref).startswith("lake://"),
        load=lambda ref, *, input_range: Loaded(x, y, name="t", source=str(ref), kind="lake")))

Options (``label=``, ``categories=``, ``image_size=``, ``mode=``) reach the source that reads
the reference; a source is given only the options it declares, and an option it does not
declare is refused naming it. :class:`DataSpec` carries a reference with its options through
APIs that take only ``data`` (``robust_cert.certify``, the MLflow plugin's certification).

Every refusal is a :class:`~robust_cert.errors.DataError` of one line naming the file, column,
row, item or class folder at fault; reading writes nothing anywhere.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from robust_cert.errors import DataError, RobustCertError
from robust_cert.plugins import PluginError, load_group

#: The entry-point group of third-party data sources.
ENTRY_POINT_GROUP = "robust_cert.data_sources"

DIGITS = "digits"
#: Fraction of the digits set held out for evaluation; the rest is for training demos.
DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20240601

#: Image files an image folder may hold (lower-case suffixes).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_IMAGE_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class Loaded:
    """What a source read: inputs ``x`` (N × input shape, numeric; or a
    :class:`robust_cert.inputs.Inputs` read on demand: uint8 images, a dataset read by
    blocks), labels ``y`` (N integers), a default ``name``, the ``source`` it came from (a
    resolved path, a factory reference), the ``kind`` of source (``csv``, ``image-folder``,
    ...), the input range the source fixes (None: the caller's, i.e. the policy's) and
    ``details`` the certificate records (a table's feature columns, an image folder's class
    names)."""

    x: Any
    y: Any
    name: str
    source: str
    kind: str
    input_range: tuple[float, float] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    """A data reference with the options its source takes, e.g.
    ``DataSpec("churn.csv", label="churned")``: what ``load_data(ref, **options)`` reads,
    in one value that ``robust_cert.certify`` and the CLI pass on."""

    ref: Any
    options: dict[str, Any]

    def __init__(self, ref, **options):
        object.__setattr__(self, "ref", ref)
        object.__setattr__(self, "options", {k: v for k, v in options.items()
                                             if v is not None})


@dataclass(frozen=True)
class Source:
    """One kind of data reference.

    ``form`` is what it accepts, as a user would write it (``a path to a .csv file``): error
    messages list it. ``accepts(ref)`` must be cheap and must not raise or import heavy
    libraries. ``load(ref, *, input_range, **options)`` returns a :class:`Loaded` (or an
    ``EvalSet``, taken as is) or raises DataError naming the problem; ``input_range`` is the
    declared range of the inputs (the policy's), ``options`` those of ``options`` the user
    gave.
    """

    form: str
    accepts: Callable[[object], bool]
    load: Callable[..., object]
    options: tuple[str, ...] = ()


class SourceRegistry:
    """Sources in registration order; entry points read once, on first need."""

    def __init__(self, group: str = ENTRY_POINT_GROUP):
        self.group = group
        self._sources: list[Source] = []
        self._plugins_read = False

    def register(self, source: Source) -> None:
        if not isinstance(source, Source):
            raise TypeError(f"register a robust_cert.sources.Source, not "
                            f"{type(source).__name__}")
        self._sources.append(source)

    def unregister(self, source: Source) -> None:
        self._sources.remove(source)

    def _read_plugins(self) -> None:
        if self._plugins_read:
            return
        self._plugins_read = True  # once: a broken plugin is reported, not retried
        for name, obj in load_group(self.group):
            found = [obj] if isinstance(obj, Source) else obj
            if not isinstance(found, Iterable) or not all(isinstance(s, Source)
                                                          for s in found):
                raise PluginError(f"plugin {name!r} ({self.group}) gives "
                                  f"{type(obj).__name__}, not Source objects")
            for source in found:
                self.register(source)

    def find(self, ref) -> Source:
        """The first source that accepts ``ref``; DataError listing the accepted forms when
        none does (PluginError when a source plugin fails to import)."""
        for reading_plugins in (False, True):
            if reading_plugins:
                self._read_plugins()
            for source in self._sources:
                if source.accepts(ref):
                    return source
        raise DataError(f"unsupported data {_shown(ref)}: no data source accepts it; give "
                        + ", ".join(self.forms()))

    def forms(self) -> list[str]:
        """What the registered sources accept (entry points included)."""
        self._read_plugins()
        return [source.form for source in self._sources]

    def load(self, ref, *, input_range: tuple[float, float],
             options: Mapping[str, Any] | None = None):
        """``ref`` read by the first source that accepts it (a DataSpec's options joined to
        ``options``); an option that source does not take is refused naming it."""
        opts = dict(options or {})
        if isinstance(ref, DataSpec):
            ref, opts = ref.ref, {**ref.options, **opts}
        source = self.find(ref)
        unknown = sorted(set(opts) - set(source.options))
        if unknown:
            takes = ", ".join(source.options) or "none"
            raise DataError(f"data {_shown(ref)} ({source.form}) takes no option "
                            f"{', '.join(unknown)} (it takes: {takes})")
        try:
            return source.load(ref, input_range=tuple(input_range), **opts)
        except RobustCertError:
            raise
        except Exception as exc:  # a third-party source's own failure: name it and the ref
            raise DataError(f"the data source for {source.form} failed on {_shown(ref)}: "
                            f"{type(exc).__name__}: {exc}") from exc


def _shown(ref) -> str:
    return repr(str(ref)) if isinstance(ref, (str, Path)) else \
        f"an object of type {type(ref).__name__}"


# --------------------------------------------------------------------------- digits, .npz


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


def _is_digits(ref) -> bool:
    return isinstance(ref, str) and (ref == DIGITS or ref.startswith(DIGITS + ":"))


def _load_digits(ref: str, *, input_range) -> Loaded:
    split = ref.partition(":")[2] or "test"
    if split not in ("test", "train"):
        raise DataError(f"unsupported data {ref!r}: the digits splits are 'digits:test' "
                        "(= 'digits') and 'digits:train'")
    x, y = digits_split(split)
    return Loaded(x, y, f"digits-{split}", f"sklearn.datasets.load_digits ({split} split)",
                  "digits", input_range=(0.0, 1.0))


def _has_suffix(*suffixes: str) -> Callable[[object], bool]:
    def accepts(ref) -> bool:
        return isinstance(ref, (str, Path)) and ":/" not in str(ref) and \
            str(ref).lower().endswith(suffixes)
    return accepts


def _existing_file(ref) -> Path:
    path = Path(ref)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def _load_npz(ref, *, input_range) -> Loaded:
    path = _existing_file(ref)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; an .npz needs 'x' and 'y' "
                    f"(found: {', '.join(f.files) or 'none'})"
                )
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    return Loaded(x, y, path.stem, str(path.resolve()), "npz")


# --------------------------------------------------------------------------- tables


def read_table(ref, *, input_range=None, label: str = "label",
               categories: Mapping[str, list] | None = None) -> Loaded:
    """A ``.csv`` or ``.parquet`` table (pandas; pyarrow for Parquet): every column but the
    label is a feature, in file order; the label column is ``label`` unless named.

    A non-numeric column (the label's too) is refused naming it unless ``categories`` maps
    it: ``categories={"colour": ["red", "green"]}`` encodes each value as its index in the
    list (a value the list lacks is refused naming the row). Boolean columns are 0/1.
    Missing values are refused naming the column and the first row (CSV: its line in the
    file, the header being line 1; Parquet: the 0-based row). Labels must be integers ≥ 0.
    Inputs become float32 (integers beyond 2**24 lose precision).
    """
    path = _existing_file(ref)
    kind = "parquet" if path.suffix.lower() == ".parquet" else "csv"
    frame = _read_frame(path, kind)
    categories = dict(categories or {})
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        dup = next(c for c in columns if columns.count(c) > 1)
        raise DataError(f"{path}: column {dup!r} appears twice")
    if len(frame) == 0:
        raise DataError(f"{path}: the table has no rows")
    if label not in columns:
        raise DataError(f"{path}: no label column {label!r} (columns: {', '.join(columns)}); "
                        "name the label column with label= (CLI: --label COLUMN)")
    unknown = sorted(set(categories) - set(columns))
    if unknown:
        raise DataError(f"{path}: categories name column(s) {', '.join(map(repr, unknown))} "
                        "the table does not have")
    features = [c for c in columns if c != label]
    if not features:
        raise DataError(f"{path}: no feature columns besides the label column {label!r}")
    frame.columns = columns

    def where(row: int) -> str:
        return f"line {row + 2}" if kind == "csv" else f"row {row}"

    x = np.empty((len(frame), len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        x[:, j] = _numeric_column(frame[name], path, "column", name, categories.get(name),
                                  where)
    y = _numeric_column(frame[label], path, "label column", label, categories.get(label),
                        where)
    bad = np.flatnonzero((y != np.round(y)) | (y < 0))
    if bad.size:
        shown = _plain(frame[label].iloc[bad[0]])
        raise DataError(f"{path}: label column {label!r} holds {shown!r} at "
                        f"{where(int(bad[0]))}; labels must be integers 0..C-1")
    details: dict[str, Any] = {"features": features, "label": label}
    if categories:
        details["categories"] = {k: list(v) for k, v in categories.items()}
    return Loaded(x, y.astype(np.int64), path.stem, str(path.resolve()), kind,
                  details=details)


def _read_frame(path: Path, kind: str):
    import pandas as pd

    try:
        if kind == "csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"cannot read {path} as {kind.upper() if kind == 'csv' else 'Parquet'}: "
                        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc


def _numeric_column(col, path: Path, what: str, name: str, mapping, where) -> np.ndarray:
    """One column as float64 values: missing values refused, categories encoded, a
    non-numeric column refused naming its first non-numeric value."""
    import pandas as pd
    from pandas.api import types

    missing = np.flatnonzero(col.isna().to_numpy())
    if missing.size:
        raise DataError(f"{path}: {what} {name!r} has {missing.size} missing value(s) (first "
                        f"at {where(int(missing[0]))}); fill or drop them")
    if mapping is not None:
        values = list(mapping)
        if len(set(map(repr, values))) != len(values):
            raise DataError(f"{path}: categories[{name!r}] lists a value twice")
        index = {v: i for i, v in enumerate(values)}
        codes = np.empty(len(col), dtype=np.float64)
        for row, v in enumerate(col.tolist()):
            code = index.get(v)
            if code is None:
                raise DataError(f"{path}: {what} {name!r} holds {_plain(v)!r} at {where(row)}, "
                                f"which categories[{name!r}] does not list")
            codes[row] = code
        return codes
    if types.is_bool_dtype(col.dtype):
        return col.to_numpy(dtype=np.float64)
    if types.is_numeric_dtype(col.dtype):
        return col.to_numpy(dtype=np.float64)
    numbers = cast("pd.Series", pd.to_numeric(col, errors="coerce"))  # of a Series: a Series
    text = np.flatnonzero(numbers.isna().to_numpy())
    first = int(text[0]) if text.size else 0  # else numbers stored as text
    raise DataError(f"{path}: {what} {name!r} is not numeric ({_plain(col.iloc[first])!r} at "
                    f"{where(first)}); map its values to codes with "
                    f"categories={{{name!r}: [...]}}")


def _plain(value):
    """A numpy scalar as the Python value it holds (messages show 1.5, not np.float64(1.5))."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- image folders


def _is_folder(ref) -> bool:
    return isinstance(ref, (str, Path)) and ":/" not in str(ref) and Path(ref).is_dir()


def read_image_folder(ref, *, input_range=(0.0, 1.0), image_size=None,
                      mode: str | None = None) -> Loaded:
    """A folder with one subfolder per class: class names sorted give labels 0..C-1, each
    holding PNG or JPEG files (read in sorted order, via Pillow).

    Images become ``mode`` (``"L"``: 1 channel, ``"RGB"``: 3; default: ``L`` when the first
    image has one band, else ``RGB``) and shape (C, H, W); with ``image_size=(H, W)`` every
    image is resized to it (bilinear), without it every image must have the first one's
    size. Pixel values 0..255 map linearly onto ``input_range`` (0 → its lower end, 255 →
    its upper end). An empty class folder, a file that is not a PNG/JPEG image, or an image
    that fails to decode is refused naming it; hidden files (``.name``) are skipped.
    """
    from PIL import Image

    from robust_cert.inputs import PixelInputs

    root = Path(ref)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: an image folder needs one subfolder per class; found none")
    if mode is not None and mode not in ("L", "RGB"):
        raise DataError(f"image mode {mode!r} is not supported; use 'L' or 'RGB'")
    size = None
    if image_size is not None:
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise DataError(f"image_size {image_size!r} is not a pair (H, W)") from None
        if h < 1 or w < 1:
            raise DataError(f"image_size {image_size!r} must be positive")
        size = (h, w)
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        found = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        for p in found:
            if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{p}: not a PNG or JPEG file (an image folder's class "
                                f"folders hold {', '.join(IMAGE_SUFFIXES)} files only)")
        if not found:
            raise DataError(f"{folder}: class folder {name!r} holds no images")
        files += [(p, label) for p in found]
    x = None
    y = np.empty(len(files), dtype=np.int64)
    for i, (path, label) in enumerate(files):
        try:
            with Image.open(path) as im:
                im.load()
                if im.format not in _IMAGE_FORMATS:
                    raise DataError(f"{path}: a {im.format} image, not PNG or JPEG")
                if mode is None:
                    mode = "L" if len(im.getbands()) == 1 and im.mode != "P" else "RGB"
                img = im.convert(mode)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: cannot decode image: {type(exc).__name__}: "
                            f"{exc}") from exc
        if size is None:
            size = (img.height, img.width)
            first = path
        elif (img.height, img.width) != size:
            if image_size is None:
                raise DataError(f"{path}: image is {img.height}×{img.width} (H×W), not "
                                f"{size[0]}×{size[1]} like {first}; declare image_size=(H, W) "
                                "to resize")
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
        if x is None:
            x = np.empty((len(files), 1 if mode == "L" else 3, *size), dtype=np.uint8)
        x[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        y[i] = label
    # (at least one class, each with an image, checked above: the loop set both)
    assert x is not None
    assert size is not None
    lo, hi = (float(v) for v in input_range)
    # kept as uint8 (4× smaller than float32), scaled per batch when read
    return Loaded(PixelInputs(x, (lo, hi)), y, root.name, str(root.resolve()), "image-folder",
                  details={"classes": classes, "image_size": list(size), "mode": mode})


# --------------------------------------------------------------------------- factories

_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def _is_factory(ref) -> bool:
    return isinstance(ref, str) and bool(_FACTORY.match(ref)) and not Path(ref).exists()


def read_factory(ref: str, *, input_range=None) -> Loaded:
    """``package.module:function``: the function, called without arguments, returns a
    map-style ``torch.utils.data.Dataset`` (``__getitem__`` and ``__len__``) whose items are
    ``(x, y)`` pairs: ``x`` an array or tensor (the same shape for every item, values in the
    declared input range, taken as float32 without scaling), ``y`` an integer label. A factory
    that cannot be imported, raises or returns anything else, and an item that raises or is
    not such a pair, are refused naming the factory (and the item's index).

    The dataset is read by blocks, never held whole: one pass reads every item in order
    (checking it, hashing it, keeping its label and an 8-byte digest), and every later read
    asks the dataset again for the points read (:class:`~robust_cert.inputs.DatasetInputs`),
    refusing an item that no longer matches its digest. Memory grows with the points read
    at once, not with the set (apart from 16 bytes per item)."""
    import importlib

    from torch.utils.data import Dataset, IterableDataset

    from robust_cert.inputs import DatasetInputs, Scan, item_digest

    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DataError(f"data factory {ref!r}: cannot import {module_name}: "
                        f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"data factory {ref!r}: module {module_name} has no function {attr}")
    try:
        dataset = fn()
    except Exception as exc:
        raise DataError(f"data factory {ref!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(dataset, Dataset) or isinstance(dataset, IterableDataset) or \
            not hasattr(dataset, "__len__"):
        raise DataError(f"data factory {ref!r} returned {type(dataset).__name__}, not a "
                        "map-style torch.utils.data.Dataset (with __getitem__ and __len__)")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError(f"data factory {ref!r} returned an empty dataset")
    reader = _FactoryItems(dataset, ref)
    x0, y0 = reader.pair(0)
    shape = (n, *x0.shape)
    y = np.empty(n, dtype=np.int64)
    digests = np.empty(n, dtype=np.uint64)
    scan = Scan(shape)
    block = np.empty((min(n, 256), *x0.shape), dtype=np.float32)
    filled = 0
    for i in range(n):
        xi, y[i] = (x0, y0) if i == 0 else reader.pair(i)
        if xi.shape != x0.shape:
            raise DataError(f"data factory {ref!r}: item {i} has inputs of shape "
                            f"{tuple(xi.shape)}, item 0 {tuple(x0.shape)}")
        block[filled] = xi
        digests[i] = item_digest(block[filled])
        filled += 1
        if filled == len(block) or i == n - 1:
            scan.add(block[:filled])
            filled = 0
    return Loaded(DatasetInputs(reader.inputs, shape, digests, f"data factory {ref!r}", scan),
                  y, attr, ref, "factory")


class _FactoryItems:
    """Reads a factory dataset's items, each checked to be an (x, y) pair of numbers."""

    def __init__(self, dataset, ref: str):
        self.dataset, self.ref = dataset, ref

    def pair(self, i: int) -> tuple[np.ndarray, int]:
        import torch

        ref = self.ref
        try:
            item = self.dataset[i]
        except Exception as exc:
            raise DataError(f"data factory {ref!r}: item {i} raised {type(exc).__name__}: "
                            f"{exc}") from exc
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"data factory {ref!r}: item {i} is {type(item).__name__}, not "
                            "an (x, y) pair")
        xi, yi = item
        xi = xi.detach().cpu().numpy() if isinstance(xi, torch.Tensor) else np.asarray(xi)
        if xi.dtype.kind not in "fiub":
            raise DataError(f"data factory {ref!r}: item {i} has inputs of dtype {xi.dtype}; "
                            "expected numbers")
        return xi.astype(np.float32), _integer_label(yi, ref, i)

    def inputs(self, i: int) -> np.ndarray:
        return self.pair(i)[0]


def _integer_label(value, ref: str, i: int) -> int:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float)) \
            or value != int(value) or value < 0:
        raise DataError(f"data factory {ref!r}: item {i} has label {value!r}; labels must be "
                        "integers 0..C-1")
    return int(value)


# --------------------------------------------------------------------------- arrays, EvalSet


def _is_evalset(ref) -> bool:
    data = sys.modules.get("robust_cert.data")  # not imported: cannot be one
    return data is not None and isinstance(ref, data.EvalSet)


def _load_evalset(ref, *, input_range):
    return ref


def _is_pair(ref) -> bool:
    return isinstance(ref, (tuple, list)) and len(ref) == 2


def _load_pair(ref, *, input_range) -> Loaded:
    torch = sys.modules.get("torch")
    x, y = (d.detach().cpu().numpy() if torch is not None and isinstance(d, torch.Tensor)
            else np.asarray(d) for d in ref)
    return Loaded(x, y, "arrays", "in-memory arrays", "arrays")


#: The registry :func:`robust_cert.data.load_data` uses.
REGISTRY = SourceRegistry()
for _source in (
        Source("an EvalSet", _is_evalset, _load_evalset),
        Source("'digits' (or 'digits:train')", _is_digits, _load_digits),
        Source("a path to an .npz file (x, y)", _has_suffix(".npz"), _load_npz),
        Source("a path to a .csv or .parquet table", _has_suffix(".csv", ".parquet"),
               read_table, options=("label", "categories")),
        Source("a folder of images (one subfolder per class)", _is_folder, read_image_folder,
               options=("image_size", "mode")),
        Source("a factory 'package.module:function' returning a torch Dataset", _is_factory,
               read_factory),
        Source("a pair (x, y) of arrays or tensors", _is_pair, _load_pair)):
    REGISTRY.register(_source)


def register_source(source: Source) -> Source:
    """Add ``source`` to the registry :func:`robust_cert.data.load_data` uses (after those
    already there) and return it (so it can be unregistered with ``REGISTRY.unregister``)."""
    REGISTRY.register(source)
    return source
