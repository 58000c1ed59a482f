"""The data-source registry (robust_cert.sources): each core source on small generated files,
hashes equal to data_sha256 of what the model sees, every bad input's one-line message, the
registry's unknown-reference message and a source installed through an entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import robust_cert
from robust_cert import DataError, DataSpec, load_data
from robust_cert.data import data_sha256
from robust_cert.sources import REGISTRY, Loaded, Source, register_source

REPO = Path(__file__).resolve().parents[1]


def _error(data, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_data(data, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def _frame(n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.integers(0, 90, n) / 100.0,
        "income": rng.random(n),
        "label": np.arange(n) % 3,
        "smoker": rng.random(n) < 0.5,
    })


# --------------------------------------------------------------------------- digits, .npz

#: the hashes main (d2da819) gives: the registry must not change them
DIGITS_TEST_SHA = "305e2271c8226fe7882a54c20ea0aa3de8ff0f860db5356d0105cce7a4d642a4"
DIGITS_TRAIN_SHA = "299f8cca42ab225df51698ce768afaf19040df14130dd173aeabfb7af63f817f"
NPZ_SHA = "b38bc3c9f69d2928610963ec951adedc8eadb21f5bf0656e22df505272cd0ff2"


def test_digits_and_npz_hashes_are_unchanged(tmp_path):
    test, train = load_data("digits"), load_data("digits:train")
    assert (test.sha256, train.sha256) == (DIGITS_TEST_SHA, DIGITS_TRAIN_SHA)
    assert (test.kind, test.name, test.source) == (
        "digits", "digits-test", "sklearn.datasets.load_digits (test split)")
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3) / 23
    np.savez(tmp_path / "e.npz", x=x, y=np.array([0, 1, 2, 1]))
    d = load_data(tmp_path / "e.npz")
    assert (d.sha256, d.kind, d.name) == (NPZ_SHA, "npz", "e")
    assert load_data((x, [0, 1, 2, 1])).kind == "arrays"
    assert load_data(d) is d


# --------------------------------------------------------------------------- tables


def test_csv_features_in_file_order_and_hash(tmp_path):
    frame = _frame()
    path = tmp_path / "credit.csv"
    frame.to_csv(path, index=False)
    d = load_data(path)
    expected_x = np.stack([frame["age"], frame["income"], frame["smoker"].astype(float)],
                          axis=1).astype(np.float32)
    np.testing.assert_array_equal(d.x.numpy(), expected_x)
    assert d.y.tolist() == frame["label"].tolist()
    assert d.sha256 == data_sha256(expected_x, frame["label"].to_numpy())
    assert (d.kind, d.name, d.source) == ("csv", "credit", str(path.resolve()))
    record = d.describe(3)
    assert record["kind"] == "csv"
    assert record["details"] == {"features": ["age", "income", "smoker"], "label": "label"}
    assert load_data(str(path)).sha256 == d.sha256  # stable


def test_parquet_hashes_like_the_same_csv(tmp_path):
    frame = _frame(20, seed=1)
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    from_csv, from_parquet = load_data(tmp_path / "t.csv"), load_data(tmp_path / "t.parquet")
    assert from_parquet.kind == "parquet"
    assert torch.equal(from_csv.x, from_parquet.x)
    assert from_csv.sha256 == from_parquet.sha256


def test_named_label_column_and_categories(tmp_path):
    path = tmp_path / "pets.csv"
    pd.DataFrame({"species": ["cat", "dog", "dog", "cat"], "weight": [0.5, 0.9, 0.75, 0.25],
                  "colour": ["red", "blue", "red", "green"]}).to_csv(path, index=False)
    d = load_data(path, label="species",
                  categories={"species": ["cat", "dog"], "colour": ["red", "green", "blue"]},
                  input_range=(0, 2))
    assert d.x.tolist() == [[0.5, 0.0], [0.8999999761581421, 2.0], [0.75, 0.0], [0.25, 1.0]]
    assert d.y.tolist() == [0, 1, 1, 0]
    assert d.details["features"] == ["weight", "colour"]
    assert d.details["categories"] == {"species": ["cat", "dog"],
                                       "colour": ["red", "green", "blue"]}
    # the same through a DataSpec, as certify and the CLI pass it
    spec = DataSpec(path, label="species",
                    categories={"species": ["cat", "dog"], "colour": ["red", "green", "blue"]})
    assert load_data(spec, input_range=(0, 2)).sha256 == d.sha256


@pytest.mark.parametrize(("content", "kw", "needle"), [
    ("a,b,label\n0.1,0.2,0\n0.3,,1\n0.5,0.6,1\n", {},
     "t.csv: column 'b' has 1 missing value(s) (first at line 3); fill or drop them"),
    ("a,b,label\n0.1,x,0\n0.3,y,1\n", {},
     "t.csv: column 'b' is not numeric ('x' at line 2); map its values to codes with "
     "categories={'b': [...]}"),
    ("a,b,target\n0.1,0.2,0\n", {},
     "t.csv: no label column 'label' (columns: a, b, target); name the label column with "
     "label= (CLI: --label COLUMN)"),
    ("a,b,label\n0.1,0.2,0\n0.3,0.4,1.5\n", {},
     "t.csv: label column 'label' holds 1.5 at line 3; labels must be integers 0..C-1"),
    ("a,b,label\n0.1,0.2,0\n0.3,0.4,-1\n", {},
     "t.csv: label column 'label' holds -1 at line 3; labels must be integers 0..C-1"),
    ("a,b,label\n0.1,0.2,0\n0.3,0.4,\n", {},
     "t.csv: label column 'label' has 1 missing value(s) (first at line 3)"),
    ("a,b,label\n0.1,0.2,cat\n", {},
     "t.csv: label column 'label' is not numeric ('cat' at line 2)"),
    ("a,c,label\n0.1,red,0\n0.3,teal,1\n", {"categories": {"c": ["red", "blue"]}},
     "t.csv: column 'c' holds 'teal' at line 3, which categories['c'] does not list"),
    ("a,label\n0.1,0\n", {"categories": {"z": [1]}},
     "t.csv: categories name column(s) 'z' the table does not have"),
    ("label\n0\n1\n", {}, "t.csv: no feature columns besides the label column 'label'"),
    ("a,b,label\n", {}, "t.csv: the table has no rows"),
    ("", {}, "cannot read"),
])
def test_bad_tables(tmp_path, content, kw, needle):
    path = tmp_path / "t.csv"
    path.write_text(content)
    message = _error(path, **kw)
    assert needle in message
    assert message.startswith(str(path) if needle.startswith("t.csv") else "")


def test_parquet_rows_are_zero_based_and_missing_file(tmp_path):
    pd.DataFrame({"a": [0.1, None, 0.3], "label": [0, 1, 0]}).to_parquet(tmp_path / "p.parquet")
    assert "column 'a' has 1 missing value(s) (first at row 1)" in _error(tmp_path / "p.parquet")
    assert _error(tmp_path / "absent.csv") == f"data file not found: {tmp_path / 'absent.csv'}"


# --------------------------------------------------------------------------- image folders


def _image_folder(root: Path, mode: str = "L", size=(4, 3)) -> dict[str, list[np.ndarray]]:
    """Two classes written as PNG; returns the pixels written, per class, in file order."""
    rng = np.random.default_rng(0)
    written = {}
    for cls, count in (("zebra", 2), ("ant", 3)):  # sorted: ant → 0, zebra → 1
        (root / cls).mkdir(parents=True)
        written[cls] = []
        for i in range(count):
            shape = size if mode == "L" else (*size, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            pixels.flat[0], pixels.flat[1] = 0, 255
            Image.fromarray(pixels, mode=mode).save(root / cls / f"{i:02d}.png")
            written[cls].append(pixels)
    return written


def test_image_folder_grayscale_labels_scaling_and_hash(tmp_path):
    written = _image_folder(tmp_path / "imgs")
    d = load_data(tmp_path / "imgs")
    assert d.x.shape == (5, 1, 4, 3)
    assert d.y.tolist() == [0, 0, 0, 1, 1]
    assert d.details == {"classes": ["ant", "zebra"], "image_size": [4, 3], "mode": "L"}
    expected = np.stack([p[None] for p in written["ant"] + written["zebra"]]) / np.float32(255)
    np.testing.assert_array_equal(d.x.numpy(), expected.astype(np.float32))
    assert float(d.x[:].min()) == 0.0
    assert float(d.x[:].max()) == 1.0  # 255 → the upper end exactly
    assert d.sha256 == data_sha256(d.x.numpy(), d.y.numpy())
    assert (d.kind, d.name) == ("image-folder", "imgs")
    assert load_data(tmp_path / "imgs").sha256 == d.sha256


def test_image_folder_rgb_range_resize_and_jpeg(tmp_path):
    written = _image_folder(tmp_path / "imgs", mode="RGB")
    d = load_data(tmp_path / "imgs", input_range=(-1, 1))
    assert d.x.shape == (5, 3, 4, 3)
    first = written["ant"][0].transpose(2, 0, 1)
    assert d.x[0, 0, 0, 0] == -1.0  # 0 → lo
    assert d.x[0, 1, 0, 0] == 1.0  # 255 → hi
    np.testing.assert_allclose(d.x[0].numpy(), first / 255 * 2 - 1, atol=1e-6)
    resized = load_data(tmp_path / "imgs", image_size=(2, 2), mode="L")
    assert resized.x.shape == (5, 1, 2, 2)
    Image.fromarray(written["ant"][0]).save(tmp_path / "imgs" / "ant" / "extra.jpg")
    with Image.open(tmp_path / "imgs" / "ant" / "extra.jpg") as im:
        decoded = np.asarray(im.convert("RGB")).transpose(2, 0, 1) / np.float32(255)
    d = load_data(tmp_path / "imgs")
    np.testing.assert_array_equal(d.x[3].numpy(), decoded.astype(np.float32))  # after 02.png


def test_bad_image_folders(tmp_path):
    _image_folder(tmp_path / "imgs")
    broken = tmp_path / "imgs" / "ant" / "03.png"
    broken.write_bytes(b"\x89PNG not really")
    assert _error(tmp_path / "imgs").startswith(f"{broken}: cannot decode image: ")
    broken.unlink()
    (tmp_path / "imgs" / "bee").mkdir()
    assert _error(tmp_path / "imgs") == \
        f"{tmp_path / 'imgs' / 'bee'}: class folder 'bee' holds no images"
    (tmp_path / "imgs" / "bee").rmdir()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "imgs" / "ant" / "big.png")
    assert "big.png: image is 5×5 (H×W), not 4×3 like" in _error(tmp_path / "imgs")
    (tmp_path / "imgs" / "ant" / "big.png").unlink()
    (tmp_path / "imgs" / "ant" / "notes.txt").write_text("hi")
    assert _error(tmp_path / "imgs").startswith(
        f"{tmp_path / 'imgs' / 'ant' / 'notes.txt'}: not a PNG or JPEG file")
    (tmp_path / "empty").mkdir()
    assert "an image folder needs one subfolder per class; found none" in \
        _error(tmp_path / "empty")
    assert "image mode 'CMYK' is not supported" in _error(tmp_path / "imgs", mode="CMYK")


# --------------------------------------------------------------------------- factories

FACTORIES = '''
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

X = torch.linspace(0, 1, 24).reshape(6, 4)
Y = torch.tensor([0, 1, 2, 0, 1, 2])

def good():
    return TensorDataset(X, Y)

class Pairs(Dataset):
    def __init__(self, items):
        self.items = items
    def __len__(self):
        return len(self.items)
    def __getitem__(self, i):
        if isinstance(self.items[i], Exception):
            raise self.items[i]
        return self.items[i]

def numpy_items():
    return Pairs([(np.full(3, 0.5, np.float32), np.int64(1)), (np.zeros(3), 0)])

def raises():
    raise OSError("bucket unreachable")

def a_list():
    return [(X[0], 0)]

class Stream(IterableDataset):
    def __iter__(self):
        yield X[0], 0

def iterable():
    return Stream()

def empty():
    return Pairs([])

def bad_item():
    return Pairs([(X[0], 0), KeyError("no row 1")])

def not_a_pair():
    return Pairs([(X[0], 0, 1)])

def float_label():
    return Pairs([(X[0], 0.5)])

def ragged():
    return Pairs([(X[0], 0), (X[0][:2], 1)])
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_factories"
    sys.modules.pop("my_factories", None)


def test_factory_dataset(factories):
    d = load_data(f"{factories}:good")
    x = torch.linspace(0, 1, 24).reshape(6, 4)
    assert torch.equal(d.x[:], x)
    assert d.y.tolist() == [0, 1, 2, 0, 1, 2]
    assert d.sha256 == load_data((x, [0, 1, 2, 0, 1, 2])).sha256
    assert (d.kind, d.name, d.source) == ("factory", "good", f"{factories}:good")
    d = load_data(f"{factories}:numpy_items")
    assert d.x[:].tolist() == [[0.5] * 3, [0.0] * 3]
    assert d.y.tolist() == [1, 0]


@pytest.mark.parametrize(("fn", "needle"), [
    ("raises", "data factory 'my_factories:raises' raised OSError: bucket unreachable"),
    ("a_list", "data factory 'my_factories:a_list' returned list, not a map-style "
               "torch.utils.data.Dataset (with __getitem__ and __len__)"),
    ("iterable", "returned Stream, not a map-style torch.utils.data.Dataset"),
    ("empty", "data factory 'my_factories:empty' returned an empty dataset"),
    ("bad_item", "data factory 'my_factories:bad_item': item 1 raised KeyError: 'no row 1'"),
    ("not_a_pair", "data factory 'my_factories:not_a_pair': item 0 is tuple, not an (x, y) "
                   "pair"),
    ("float_label", "data factory 'my_factories:float_label': item 0 has label 0.5; labels "
                    "must be integers 0..C-1"),
    ("ragged", "data factory 'my_factories:ragged': item 1 has inputs of shape (2,), item 0 "
               "(4,)"),
    ("missing", "data factory 'my_factories:missing': module my_factories has no function "
                "missing"),
])
def test_bad_factories(factories, fn, needle):
    assert needle in _error(f"{factories}:{fn}")


def test_factory_module_that_does_not_import():
    assert _error("no_such_pkg.mod:make").startswith(
        "data factory 'no_such_pkg.mod:make': cannot import no_such_pkg.mod: "
        "ModuleNotFoundError")


# --------------------------------------------------------------------------- the registry


def test_unknown_reference_lists_every_form():
    message = _error("data.xlsx")
    assert message.startswith("unsupported data 'data.xlsx': no data source accepts it; give ")
    for form in ("an EvalSet", "'digits'", ".npz", ".csv or .parquet", "folder of images",
                 "package.module:function", "pair (x, y)"):
        assert form in message
    assert "an object of type int" in _error(42)
    assert "the digits splits are 'digits:test'" in _error("digits:validation")


def test_an_option_the_source_does_not_take_is_refused(tmp_path):
    assert _error("digits", label="y") == \
        "data 'digits' ('digits' (or 'digits:train')) takes no option label (it takes: none)"
    assert "takes no option image_size (it takes: label, categories)" in \
        _error(tmp_path / "t.csv", image_size=(2, 2))


def test_a_registered_source_serves_certify(tmp_path):
    x = np.random.default_rng(0).random((40, 64)).astype(np.float32)
    y = np.arange(40) % 10
    seen = []

    def load(ref, *, input_range, label="label"):
        seen.append((ref, input_range, label))
        return Loaded(x.reshape(40, 1, 8, 8), y, "lake-t", str(ref), "lake",
                      details={"table": "t"})

    source = register_source(Source("lake://TABLE", lambda r: str(r).startswith("lake://"),
                                    load, options=("label",)))
    try:
        d = load_data("lake://t", label="cls")
        assert (d.kind, d.name, d.details) == ("lake", "lake-t", {"table": "t"})
        assert d.sha256 == data_sha256(x.reshape(40, 1, 8, 8), y)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        policy = {"name": "lake", "metrics": {"accuracy": {}},
                  "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
        cert = robust_cert.certify(model, DataSpec("lake://t", label="cls"), policy,
                                   progress=False, device="cpu")
    finally:
        REGISTRY.unregister(source)
    assert seen == [("lake://t", (0.0, 1.0), "cls")] * 2
    assert cert.body["data"]["kind"] == "lake"
    assert cert.body["data"]["details"] == {"table": "t"}
    assert cert.body["data"]["sha256"] == d.sha256
    cert.validate()  # the record fits the certificate schema

    def broken(ref, *, input_range):
        raise RuntimeError("lake offline")

    source = register_source(Source("lake://TABLE", lambda r: str(r).startswith("lake://"),
                                    broken))
    try:
        assert _error("lake://t") == ("the data source for lake://TABLE failed on 'lake://t': "
                                      "RuntimeError: lake offline")
    finally:
        REGISTRY.unregister(source)
    with pytest.raises(TypeError, match="register a robust_cert.sources.Source"):
        register_source(lambda ref: None)


def test_certify_a_csv_through_the_api(tmp_path):
    frame = _frame(30)
    frame.to_csv(tmp_path / "t.csv", index=False)
    model = torch.nn.Linear(3, 3)
    policy = {"name": "table", "metrics": {"accuracy": {}},
              "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
    cert = robust_cert.certify(model, str(tmp_path / "t.csv"), policy, progress=False,
                               device="cpu")
    assert cert.body["data"]["kind"] == "csv"
    assert cert.body["data"]["sha256"] == load_data(tmp_path / "t.csv").sha256
    assert cert.body["data"]["input_shape"] == [3]


def _plugin_dir(tmp_path: Path, target: str) -> Path:
    """A folder on sys.path holding an installed distribution whose only content is one
    entry point in robust_cert.data_sources."""
    site = tmp_path / "site"
    info = site / "lake_source-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lake-source\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[robust_cert.data_sources]\nlake = {target}\n")
    (site / "lake_source.py").write_text(textwrap.dedent("""
        import numpy as np
        from robust_cert.sources import Loaded, Source

        def _load(ref, *, input_range):
            return Loaded(np.full((3, 2), 0.5), np.array([0, 1, 0]), "lake", str(ref), "lake")

        SOURCE = Source("lake://TABLE", lambda r: str(r).startswith("lake://"), _load)
    """))
    return site


def _run(code: str, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "ROBUST_CERT_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=site)


def test_entry_point_source(tmp_path):
    site = _plugin_dir(tmp_path, "lake_source:SOURCE")
    done = _run("from robust_cert.data import load_data\n"
                "d = load_data('lake://t')\nprint(d.kind, len(d), d.x.sum().item())", site)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["lake", "3", "3.0"]
    broken = _plugin_dir(tmp_path / "b", "lake_missing:SOURCE")
    done = _run("from robust_cert.data import load_data\n"
                "from robust_cert.plugins import PluginError\n"
                "print(load_data('digits').kind)\n"  # core sources need no plugin
                "try:\n    load_data('lake://t')\n"
                "except PluginError as exc:\n    print(exc)\n", broken)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "digits"
    assert lines[1].startswith("plugin 'lake' (robust_cert.data_sources = lake_missing:SOURCE) "
                               "failed to import: ModuleNotFoundError")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def onnx_model(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 3)).eval()
    path = tmp_path / "tab.onnx"
    torch.onnx.export(module, (torch.zeros(2, 3),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def test_cli_plan_reads_a_table_with_its_label_column(tmp_path, onnx_model, capsys):
    from robust_cert.cli import main

    frame = _frame(16).rename(columns={"label": "default"})
    frame.to_csv(tmp_path / "t.csv", index=False)
    policy = tmp_path / "p.yaml"
    policy.write_text("name: table\nmetrics:\n  accuracy: {}\nrequirements:\n"
                      "  - {metric: accuracy, at_least: 0.0}\n")
    argv = ["plan", str(policy), "--model", str(onnx_model), "--data", str(tmp_path / "t.csv"),
            "--json", "--pilot-points", "2"]
    assert main([*argv, "--label", "default"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2  # the default label column 'label' is absent
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"robust-cert: error: {tmp_path / 't.csv'}: no label column 'label' "
                   "(columns: age, income, default, smoker); name the label column with "
                   "label= (CLI: --label COLUMN)"]
    assert main([*argv, "--label", "default", "--image-size", "3"]) == 2
    assert capsys.readouterr().err.strip() == \
        "robust-cert: error: --image-size '3': give H,W, e.g. 64,64"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# --------------------------------------------------------------------------- MLflow runs


def test_mlflow_run_artifact_source(tmp_path, monkeypatch):
    """runs:/RUN_ID/PATH reads a run's artifact through the core source its suffix selects,
    pinned by @sha256:; the MLflow plugin registers it through its entry point."""
    import hashlib

    import mlflow

    from robust_cert.mlflow_plugin.datasets import SOURCES

    declared = (REPO / "pyproject.toml").read_text()
    assert '[project.entry-points."robust_cert.data_sources"]' in declared
    assert 'mlflow = "robust_cert.mlflow_plugin.datasets:SOURCES"' in declared
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    frame = _frame(10)
    frame.to_csv(tmp_path / "eval.csv", index=False)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "eval.csv"), artifact_path="data")
    digest = hashlib.sha256((tmp_path / "eval.csv").read_bytes()).hexdigest()
    uri = f"runs:/{run.info.run_id}/data/eval.csv"
    for source in SOURCES:
        register_source(source)
    try:
        d = load_data(uri)
        assert d.sha256 == load_data(tmp_path / "eval.csv").sha256
        assert (d.kind, d.source) == ("mlflow-run-artifact", f"{uri}@sha256:{digest}")
        assert d.details["format"] == "csv"
        assert d.details["artifact_sha256"] == digest
        assert load_data(f"{uri}@sha256:{digest}").sha256 == d.sha256
        wrong = "0" * 64
        assert _error(f"{uri}@sha256:{wrong}") == (
            f"{uri}@sha256:{wrong}: the artifact's SHA-256 is {digest}, not the pinned "
            f"{wrong}; refused")
        assert _error(f"runs:/{run.info.run_id}/data/absent.csv").startswith(
            f"runs:/{run.info.run_id}/data/absent.csv: cannot download the run's artifact "
            "'data/absent.csv'")
        renamed = frame.rename(columns={"label": "y"})
        renamed.to_csv(tmp_path / "eval.csv", index=False)
        with mlflow.start_run() as run2:
            mlflow.log_artifact(str(tmp_path / "eval.csv"))
        assert load_data(f"runs:/{run2.info.run_id}/eval.csv", label="y").sha256 == d.sha256
    finally:
        for source in SOURCES:
            REGISTRY.unregister(source)
        mlflow.set_tracking_uri(None)
