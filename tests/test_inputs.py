"""Inputs read on demand (robust_cert.inputs): uint8 images kept as uint8, factory datasets
read by blocks. Known answer: today's path — the whole set converted to float32 at once and
given as arrays — gives bit-for-bit the same float32 values, data hash and certificate."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import robust_cert
from robust_cert.data import data_sha256, load_data
from robust_cert.errors import DataError
from robust_cert.inputs import DatasetInputs, Inputs, PixelInputs, scale_pixels

RANGE = (-1.0, 1.0)


def _pixels(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 5, 4), dtype=np.uint8), np.arange(n) % 3


def _folder(root, pixels, labels):
    for i, (p, c) in enumerate(zip(pixels, labels, strict=True)):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(p.transpose(1, 2, 0)).save(root / f"class{c}" / f"{i:03d}.png")
    # the folder's order: by class, then by file name
    order = np.argsort(labels, kind="stable")
    return pixels[order], labels[order]


def test_pixel_inputs_index_like_the_float32_tensor():
    pixels, _ = _pixels()
    x = PixelInputs(pixels, RANGE)
    whole = torch.from_numpy(scale_pixels(pixels, RANGE))  # today's whole-set conversion
    assert x.shape == whole.shape
    assert len(x) == 30
    assert x.dtype == torch.float32
    assert x.nbytes == pixels.nbytes == whole.numel()  # a quarter of float32
    for index in (3, -1, slice(4, 9), slice(None), slice(1, 20, 3), slice(8, 2),
                  torch.tensor([5, 1, 5, 29]), np.array([2, 3, 4]), [0, 7],
                  torch.arange(30) % 2 == 0, (2, 1, 0), (slice(0, 3), 0, 1, 2),
                  torch.tensor([], dtype=torch.int64), torch.tensor(4), np.int64(-2)):
        got = x[index]
        want = whole[index]
        assert got.dtype == torch.float32
        assert torch.equal(got, want), index
    np.testing.assert_array_equal(x.numpy(), whole.numpy())
    assert x.pin_memory() is x
    assert not x.is_pinned()
    with pytest.raises(IndexError):
        x[30]
    with pytest.raises(IndexError):
        x[torch.tensor([0, 30])]
    raw = PixelInputs(pixels, None)  # an .npz of uint8: the values themselves
    assert torch.equal(raw[2:4], torch.from_numpy(pixels[2:4].astype(np.float32)))


def test_scan_hash_is_data_sha256_of_the_whole_set():
    pixels, y = _pixels(n=600)  # several scan blocks
    x = PixelInputs(pixels, RANGE)
    assert x.scan().sha256(y) == data_sha256(scale_pixels(pixels, RANGE), y)


def test_image_folder_stays_uint8_and_matches_the_float32_path(tmp_path):
    pixels, labels = _folder(tmp_path / "imgs", *_pixels())
    d = load_data(tmp_path / "imgs", input_range=RANGE)
    assert isinstance(d.x, PixelInputs)
    assert d.x.pixels.dtype == np.uint8
    today = load_data((scale_pixels(pixels, RANGE), labels), input_range=RANGE)
    assert isinstance(today.x, torch.Tensor)
    assert d.sha256 == today.sha256 == data_sha256(today.x.numpy(), labels)
    assert torch.equal(d.x[:], today.x)


def _certify(data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(60, 3))
    policy = {
        "name": "lazy", "input_range": list(RANGE), "batch_size": 8,
        "metrics": {
            "accuracy": {},
            "probabilistic_robustness": {"eps": [0.05, 0.2], "samples": 90},
            # max_forward_images bounds the points its noisy copies are formed for at once
            "local_probabilistic_robustness": {"eps": 0.2, "p0": 0.2, "p1": 0.05,
                                               "max_draws": 200, "max_forward_images": 8},
            "robust_accuracy": {"eps": [0.1], "attacks": ["pgd"], "steps": 3},
        },
        "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
    cert = robust_cert.certify(model, data, policy, progress=False, device="cpu")
    assert cert is not None
    return cert


def _same_certificates(a, b):
    assert a.body["data"]["sha256"] == b.body["data"]["sha256"]
    for key in ("results", "requirements", "verdict", "sanity"):
        assert a.body[key] == b.body[key], key
    assert a.per_point
    assert a.per_point.keys() == b.per_point.keys()
    for k in a.per_point:
        np.testing.assert_array_equal(a.per_point[k], b.per_point[k], err_msg=k)


def test_certificate_of_an_image_folder_is_bit_equal_to_the_float32_path(tmp_path):
    pixels, labels = _folder(tmp_path / "imgs", *_pixels())
    lazy = _certify(str(tmp_path / "imgs"))
    today = _certify((scale_pixels(pixels, RANGE), labels))
    assert lazy.body["data"]["kind"] == "image-folder"
    _same_certificates(lazy, today)


FACTORY = '''
import numpy as np
import torch
from torch.utils.data import Dataset

PIXELS = np.random.default_rng(0).integers(0, 256, (30, 3, 5, 4), dtype=np.uint8)
READS = []

class Images(Dataset):
    def __len__(self):
        return len(PIXELS)
    def __getitem__(self, i):
        READS.append(i)
        return torch.from_numpy(PIXELS[i].astype(np.float32) / 255 * 2 - 1), i % 3

def images():
    return Images()

class Noisy(Images):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 0.01 * torch.rand(x.shape) * (len(READS) > 30), y

def noisy():
    return Noisy()
'''


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "lazy_factories.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import lazy_factories  # type: ignore[import-not-found]

    yield lazy_factories
    sys.modules.pop("lazy_factories", None)


def test_factory_is_read_by_blocks_and_matches_the_float32_path(factory, monkeypatch):
    d = load_data("lazy_factories:images", input_range=RANGE)
    assert isinstance(d.x, DatasetInputs)
    assert list(range(30)) == factory.READS  # one pass: checked, hashed, labels kept
    whole = np.stack([factory.Images()[i][0].numpy() for i in range(30)])
    assert d.sha256 == data_sha256(whole, np.arange(30) % 3)
    assert torch.equal(d.x[4:9], torch.from_numpy(whole[4:9]))
    largest = []
    read = DatasetInputs._take

    def spy(self, idx):
        largest.append(len(idx))
        return read(self, idx)

    monkeypatch.setattr(DatasetInputs, "_take", spy)
    monkeypatch.setattr(Inputs, "numpy", lambda self: pytest.fail("materialised whole"))
    lazy = _certify("lazy_factories:images")
    assert largest
    assert max(largest) <= 8  # never more than a batch (or max_forward_images) at once
    _same_certificates(lazy, _certify((whole, np.arange(30) % 3)))


def test_factory_item_that_changes_after_hashing_is_refused(factory):
    d = load_data("lazy_factories:noisy", input_range=RANGE)
    with pytest.raises(DataError, match=r"data factory 'lazy_factories:noisy': item 3 "
                       r"differs from when the data was read and hashed"):
        d.x[3:5]


def test_factory_out_of_range_and_nan_items_are_refused(tmp_path, monkeypatch):
    (tmp_path / "bad_items.py").write_text(
        "import numpy as np\nfrom torch.utils.data import Dataset\n"
        "class D(Dataset):\n"
        "    def __init__(self, v): self.v = v\n"
        "    def __len__(self): return 300\n"
        "    def __getitem__(self, i): return np.full(2, self.v if i == 260 else 0.5), 0\n"
        "def big(): return D(2.0)\n"
        "def nan(): return D(float('nan'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(DataError, match=r"^inputs x span \[0.5, 2\], outside the "
                           r"declared input range \[0, 1\]"):
            load_data("bad_items:big")
        with pytest.raises(DataError, match=r"^inputs x contain 2 NaN/inf values \(first "
                           r"in sample 260\)"):
            load_data("bad_items:nan")
    finally:
        sys.modules.pop("bad_items", None)


def test_report_example_images_read_only_the_points_shown(tmp_path, monkeypatch):
    from robust_cert.report.charts import ChartInputs, vulnerable_examples
    from robust_cert.report.html import _chart_inputs

    pixels, labels = _folder(tmp_path / "imgs", *_pixels())
    cert = _certify(str(tmp_path / "imgs"))
    data = load_data(tmp_path / "imgs", input_range=RANGE)
    monkeypatch.setattr(Inputs, "numpy", lambda self: pytest.fail("materialised whole"))
    lazy = vulnerable_examples(_chart_inputs(cert, data))
    today = vulnerable_examples(ChartInputs(cert.body, dict(cert.per_point),
                                            scale_pixels(pixels, RANGE), labels))
    assert lazy is not None
    assert today is not None
    assert lazy.svg == today.svg


BAD_FACTORIES = '''
from torch.utils.data import Dataset

class Flaky(Dataset):
    def __len__(self):
        return 3
    def __getitem__(self, i):
        if i == 2:
            raise OSError("object store timed out")
        return [0.5, 0.5], 0

def flaky():
    return Flaky()

def raises():
    raise RuntimeError("no credentials")

def a_dict():
    return {"x": [1.0], "y": [0]}
'''


def test_bad_data_through_the_cli_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch,
                                                                      capsys):
    from robust_cert.cli import main

    (tmp_path / "bad_factories.py").write_text(BAD_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "imgs", *_pixels(n=6))
    broken = tmp_path / "imgs" / "class1" / "001.png"
    broken.write_bytes(b"\x89PNG truncated")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    policy = tmp_path / "p.yaml"
    policy.write_text("name: p\nmetrics:\n  accuracy: {}\nrequirements:\n"
                      "  - {metric: accuracy, at_least: 0.0}\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cases = {
        str(tmp_path / "imgs"): f"{broken}: cannot decode image: ",
        str(tmp_path / "empty"): f"{tmp_path / 'empty' / 'cat'}: class folder 'cat' holds "
                                 "no images",
        "bad_factories:flaky": "data factory 'bad_factories:flaky': item 2 raised OSError: "
                               "object store timed out",
        "bad_factories:raises": "data factory 'bad_factories:raises' raised RuntimeError: no "
                                "credentials",
        "bad_factories:a_dict": "data factory 'bad_factories:a_dict' returned dict, not a "
                                "map-style torch.utils.data.Dataset",
    }
    try:
        for data, needle in cases.items():
            assert main(["plan", str(policy), "--model", "m.onnx", "--data", data]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert err[0].startswith("robust-cert: error: " + needle), err[0]
    finally:
        sys.modules.pop("bad_factories", None)
    assert sorted(p.name for p in tmp_path.rglob("*") if "__pycache__" not in p.parts) == \
        [n for n in before if n != "__pycache__"]
