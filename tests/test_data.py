"""Evaluation data: the built-in digits split, .npz files, validation and hashing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robust_cert import DataError, EvalSet, load_data
from robust_cert.data import check_fits, data_sha256


def _arrays(n: int = 12, d: int = 3, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, d)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int64)
    return x, y


def _error(data, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_data(data, **kw)
    return str(info.value)


# --------------------------------------------------------------------------- digits


def test_digits_shape_range_labels() -> None:
    d = load_data("digits")
    assert isinstance(d, EvalSet)
    assert tuple(d.x.shape) == (359, 1, 8, 8)
    assert d.x.dtype == torch.float32
    assert d.y.dtype == torch.int64
    assert len(d) == 359
    assert d.input_shape == (1, 8, 8)
    assert float(d.x.min()) >= 0.0
    assert float(d.x.max()) <= 1.0
    assert float(d.x.max()) == 1.0  # scaled by 16, so the brightest pixel is exactly 1
    assert sorted(d.y.unique().tolist()) == list(range(10))
    assert d.input_range == (0.0, 1.0)
    assert sum(d.class_counts(10)) == 359
    desc = d.describe(10)
    assert desc["n"] == 359
    assert desc["input_shape"] == [1, 8, 8]
    assert desc["sha256"] == d.sha256


def test_digits_train_and_test_are_disjoint_splits() -> None:
    test, train = load_data("digits:test"), load_data("digits:train")
    assert len(test) + len(train) == 1797
    assert test.sha256 == load_data("digits").sha256
    a = {row.tobytes() for row in test.x.numpy().reshape(len(test), -1)}
    b = {row.tobytes() for row in train.x.numpy().reshape(len(train), -1)}
    # sklearn's digits has a few duplicate images, but the splits are mostly disjoint
    assert len(a & b) < 10


def test_digits_are_scikit_learns_without_importing_it() -> None:
    """The CSV read directly is load_digits' data, and reading it imports no scikit-learn
    (a fresh interpreter: ~80 MB of memory saved in every digits certification)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from robust_cert.data import _digits

    images, target = _digits()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
    code = ("import sys; from robust_cert.data import digits_split; digits_split('test'); "
            "print(any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_digits_sha_stable_and_sensitive() -> None:
    d1, d2 = load_data("digits"), load_data("digits")
    assert d1.sha256 == d2.sha256
    assert len(d1.sha256) == 64
    x, y = d1.x.numpy().copy(), d1.y.numpy().copy()
    assert data_sha256(x, y) == d1.sha256
    x[5, 0, 3, 4] = 0.5 if x[5, 0, 3, 4] != 0.5 else 0.25
    assert data_sha256(x, y) != d1.sha256
    x2, y2 = d1.x.numpy().copy(), d1.y.numpy().copy()
    y2[0] = (y2[0] + 1) % 10
    assert data_sha256(x2, y2) != d1.sha256


def test_sha_includes_shape() -> None:
    x, y = _arrays(n=4, d=6)
    flat = load_data((x, y))
    reshaped = load_data((x.reshape(4, 2, 3), y))
    assert flat.sha256 != reshaped.sha256


def test_arrays_tensors_and_npz_hash_the_same(tmp_path: Path) -> None:
    x, y = _arrays()
    from_arrays = load_data((x, y))
    from_tensors = load_data((torch.from_numpy(x), torch.from_numpy(y)))
    # dtype does not matter: float64 inputs / int32 labels hash like float32 / int64
    from_other_dtypes = load_data((x.astype(np.float64), y.astype(np.int32)))
    path = tmp_path / "eval.npz"
    np.savez(path, x=x, y=y)
    from_npz = load_data(path)
    assert from_arrays.sha256 == from_tensors.sha256 == from_npz.sha256
    assert from_other_dtypes.sha256 == from_arrays.sha256
    assert torch.equal(from_npz.x, from_arrays.x)
    assert torch.equal(from_npz.y, from_arrays.y)
    assert from_npz.name == "eval"
    assert from_npz.source == str(path.resolve())
    assert load_data(str(path)).sha256 == from_arrays.sha256


def test_evalset_returned_unchanged() -> None:
    d = load_data(_arrays())
    assert load_data(d) is d


def test_declared_input_range_is_kept() -> None:
    x, y = _arrays()
    d = load_data((x * 20 - 10, y), input_range=(-10, 10))
    assert d.input_range == (-10.0, 10.0)


def test_integer_valued_float_labels_accepted() -> None:
    x, y = _arrays()
    d = load_data((x, y.astype(np.float64)))
    assert d.y.dtype == torch.int64
    assert d.y.tolist() == y.tolist()


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    msg = _error(path)
    assert "not found" in msg
    assert "absent.npz" in msg


def test_npz_missing_y(tmp_path: Path) -> None:
    x, _ = _arrays()
    path = tmp_path / "only_x.npz"
    np.savez(path, x=x, labels=np.zeros(len(x)))
    msg = _error(path)
    assert "missing" in msg
    assert "y" in msg
    assert "found: labels, x" in msg or "found: x, labels" in msg


def test_unreadable_npz(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip file")
    msg = _error(path)
    assert "garbage.npz" in msg


def test_nan_inputs() -> None:
    x, y = _arrays()
    x[4, 1] = np.nan
    msg = _error((x, y))
    assert "NaN" in msg
    assert "sample 4" in msg


def test_infinite_inputs() -> None:
    x, y = _arrays()
    x[7, 0] = np.inf
    msg = _error((x, y))
    assert "inf" in msg
    assert "sample 7" in msg


def test_values_outside_declared_range() -> None:
    x, y = _arrays()
    x[0, 0], x[1, 1] = -0.5, 2.0
    msg = _error((x, y))
    assert "[-0.5, 2]" in msg  # the span of the data
    assert "[0, 1]" in msg  # the declared range
    msg = _error((x, y), input_range=(0, 1.5))
    assert "[0, 1.5]" in msg
    load_data((x, y), input_range=(-1, 2))  # declaring the true range fixes it


def test_empty_declared_range() -> None:
    x, y = _arrays()
    assert "empty" in _error((x, y), input_range=(1.0, 1.0))


def test_negative_labels() -> None:
    x, y = _arrays()
    y[3] = -2
    msg = _error((x, y))
    assert "negative" in msg
    assert "-2" in msg


def test_non_integer_float_labels() -> None:
    x, y = _arrays()
    msg = _error((x, y + 0.5))
    assert "integer" in msg


def test_nan_float_labels() -> None:
    x, y = _arrays()
    yf = y.astype(np.float64)
    yf[2] = np.nan
    assert "integer" in _error((x, yf))


def test_string_labels() -> None:
    x, _ = _arrays(n=3)
    assert "integers" in _error((x, np.array(["a", "b", "c"])))


def test_non_numeric_inputs() -> None:
    x = np.array([["a", "b"], ["c", "d"]])
    assert "numeric" in _error((x, np.array([0, 1])))


def test_length_mismatch() -> None:
    x, y = _arrays(n=10)
    msg = _error((x, y[:9]))
    assert "10" in msg
    assert "9" in msg


def test_one_dimensional_inputs() -> None:
    x, y = _arrays()
    msg = _error((x[:, 0], y))
    assert "shape" in msg
    assert f"({len(x)},)" in msg


def test_two_dimensional_labels() -> None:
    x, y = _arrays()
    msg = _error((x, y[:, None]))
    assert "1-D" in msg


def test_empty_set() -> None:
    x, y = _arrays()
    assert "empty" in _error((x[:0], y[:0]))


@pytest.mark.parametrize("spec", ["foo.xlsx", "digits:validation", "data.npy"])
def test_unsupported_spec(spec: str) -> None:
    msg = _error(spec)
    assert spec in msg
    assert "unsupported" in msg


def test_unsupported_type() -> None:
    msg = _error(42)
    assert "int" in msg


# --------------------------------------------------------------------------- check_fits


def test_check_fits_accepts_matching_model() -> None:
    d = load_data(_arrays(d=3, classes=3))
    check_fits(d, (3,), 3)
    check_fits(d, (3,), 10)


def test_check_fits_wrong_sample_shape() -> None:
    d = load_data(_arrays(d=6))
    with pytest.raises(DataError) as info:
        check_fits(d, (2, 3), 3)
    msg = str(info.value)
    assert "(6,)" in msg
    assert "(2, 3)" in msg


def test_check_fits_label_out_of_range() -> None:
    d = load_data(_arrays(classes=5))
    with pytest.raises(DataError) as info:
        check_fits(d, (3,), 4)
    msg = str(info.value)
    assert "4" in msg  # the largest label
    assert "0..3" in msg  # the model's classes
