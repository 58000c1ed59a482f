"""dataset:RUN_ID/NAME[@DIGEST]: an mlflow.data dataset a run logged (mlflow.log_input), read
from its source and checked against its digest, against a real tracking store (SQLite)."""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

import robust_cert
from robust_cert.data import load_data
from robust_cert.errors import DataError
from robust_cert.mlflow_plugin.datasets import SOURCES
from robust_cert.sources import REGISTRY, register_source


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds)."""
    root = tmp_path_factory.mktemp("datasets")
    return root, f"sqlite:///{root / 'm.db'}"


@pytest.fixture
def store(database, tmp_path, monkeypatch):
    root, uri = database
    monkeypatch.chdir(root)  # the store's artifacts (./mlruns) stay beside it
    mlflow.set_tracking_uri(uri)
    for source in SOURCES:
        register_source(source)
    yield tmp_path
    for source in SOURCES:
        REGISTRY.unregister(source)
    mlflow.set_tracking_uri(None)


def _frame(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.random(n), "b": rng.random(n), "label": np.arange(n) % 3})


def _log(frame, path, name="eval", as_artifact=True):
    """A run that logs the table (as an artifact, when asked) and a dataset whose source is
    that artifact (else the file itself); returns (run id, the dataset's digest)."""
    frame.to_csv(path, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with mlflow.start_run() as run:
            source = str(path)
            if as_artifact:
                mlflow.log_artifact(str(path), artifact_path="data")
                source = mlflow.get_artifact_uri(f"data/{path.name}")
            dataset = mlflow.data.from_pandas(frame, source=source, targets="label", name=name)
            mlflow.log_input(dataset, context="evaluation")
    return run.info.run_id, dataset.digest


def _error(ref, **options) -> str:
    with pytest.raises(DataError) as info:
        load_data(ref, **options)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_logged_pandas_dataset_is_read_from_its_source_and_pinned(store):
    frame = _frame()
    run_id, digest = _log(frame, store / "eval.csv")
    direct = load_data(store / "eval.csv")
    d = load_data(f"dataset:{run_id}/eval")
    assert d.sha256 == direct.sha256
    assert torch.equal(d.x, direct.x)
    assert (d.kind, d.name, d.source) == ("mlflow-dataset", "eval",
                                          f"dataset:{run_id}/eval@{digest}")
    assert d.details["format"] == "csv"
    assert (d.details["run_id"], d.details["dataset_digest"]) == (run_id, digest)
    assert d.details["features"] == ["a", "b"]
    assert load_data(f"dataset:{run_id}/eval@{digest}").sha256 == d.sha256
    wrong = "0" * len(digest)
    assert _error(f"dataset:{run_id}/eval@{wrong}") == (
        f"dataset:{run_id}/eval@{wrong}: run {run_id} logged dataset 'eval' with digest "
        f"{digest}, not the pinned {wrong}; refused")
    assert _error(f"dataset:{run_id}/train") == (
        f"dataset:{run_id}/train: run {run_id} logged no dataset named 'train' (its "
        "datasets: 'eval')")
    assert _error("dataset:0123456789abcdef/eval").startswith(
        "dataset:0123456789abcdef/eval: cannot read run 0123456789abcdef: ")


def test_a_source_that_changed_since_it_was_logged_is_refused(store):
    # (MLflow keeps one source per dataset name and digest in an experiment: a name of its own)
    run_id, digest = _log(_frame(), store / "eval.csv", name="changing", as_artifact=False)
    assert load_data(f"dataset:{run_id}/changing").sha256 == load_data(store / "eval.csv").sha256
    changed = _frame(seed=1)
    changed.to_csv(store / "eval.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        now = mlflow.data.from_pandas(changed).digest
    assert now != digest
    assert _error(f"dataset:{run_id}/changing@{digest}") == (
        f"dataset:{run_id}/changing@{digest}: the data at the dataset's source has digest "
        f"{now}, not the digest {digest} run {run_id} logged for 'changing'; refused (the "
        "source changed since it was logged)")


def test_a_numpy_dataset_and_a_name_logged_twice(store):
    x = np.random.default_rng(0).random((10, 4)).astype(np.float32)
    y = np.arange(10) % 2
    np.savez(store / "eval.npz", x=x, y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with mlflow.start_run() as run:
            first = mlflow.data.from_numpy(x, targets=y, source=str(store / "eval.npz"),
                                           name="eval")
            second = mlflow.data.from_numpy(x[:5], targets=y[:5], source=str(store / "eval.npz"),
                                            name="eval")
            mlflow.log_input(first, context="evaluation")
            mlflow.log_input(second, context="other")
    run_id = run.info.run_id
    both = sorted([first.digest, second.digest])
    assert _error(f"dataset:{run_id}/eval") == (
        f"dataset:{run_id}/eval: run {run_id} logged dataset 'eval' with digests "
        f"{both[0]}, {both[1]}; pin one: dataset:{run_id}/eval@DIGEST")
    d = load_data(f"dataset:{run_id}/eval@{first.digest}")
    assert d.sha256 == load_data((x, y)).sha256
    assert d.details["format"] == "npz"
    # the second dataset's digest covers 5 points; its source holds 10: refused
    assert "not the digest" in _error(f"dataset:{run_id}/eval@{second.digest}")


def test_a_dataset_without_data_is_refused_naming_its_source_type(store):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with mlflow.start_run() as run:
            mlflow.log_input(mlflow.data.from_pandas(_frame(), name="nodata"))  # code source
    assert _error(f"dataset:{run.info.run_id}/nodata") == (
        f"dataset:{run.info.run_id}/nodata: the dataset's source is of type 'code', which holds "
        "no data robust_cert can read; log the dataset with the path or artifact URI of a "
        ".csv, .parquet or .npz file or an image folder as its source "
        "(mlflow.data.from_pandas(df, source=...))")


def test_certify_a_logged_dataset_and_log_it_as_the_same_dataset(store):
    from robust_cert.mlflow_plugin.tracking import _logged_dataset

    run_id, digest = _log(_frame(30), store / "eval.csv")
    model = torch.nn.Linear(2, 3)
    policy = {"name": "table", "metrics": {"accuracy": {}},
              "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
    cert = robust_cert.certify(model, f"dataset:{run_id}/eval@{digest}", policy,
                               progress=False, device="cpu")
    assert cert is not None
    assert cert.body["data"]["kind"] == "mlflow-dataset"
    assert cert.body["data"]["sha256"] == load_data(store / "eval.csv").sha256
    cert.validate()
    logged = _logged_dataset(mlflow, load_data(f"dataset:{run_id}/eval"))
    assert (logged.name, logged.digest) == ("eval", digest)
    # a dataset robust_cert logged (digest: its SHA-256 prefix) reads back too
    evalset = load_data(store / "eval.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with mlflow.start_run() as run:
            mlflow.log_input(_logged_dataset(mlflow, evalset))
    again = load_data(f"dataset:{run.info.run_id}/eval")
    assert again.sha256 == evalset.sha256
    assert again.details["dataset_digest"] == evalset.sha256[:32]


def test_the_dataset_a_certification_run_logs(store):
    """In memory: the float32 arrays (numpy dataset); read on demand: metadata only; a
    reference MLflow resolves no source for (runs:/): a code source naming it."""
    from PIL import Image

    from robust_cert.inputs import Inputs
    from robust_cert.mlflow_plugin.tracking import _logged_dataset

    frame = _frame(8)
    frame.to_csv(store / "t.csv", index=False)
    table = load_data(store / "t.csv")
    logged = _logged_dataset(mlflow, table)
    assert (logged.name, logged.digest, logged.source.to_dict()["uri"]) == \
        ("t", table.sha256[:32], str(store / "t.csv"))
    np.testing.assert_array_equal(logged.features, table.x.numpy())
    for c in range(2):
        (store / "imgs" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 60 * c, np.uint8)).save(
            store / "imgs" / f"c{c}" / "a.png")
    images = load_data(store / "imgs")
    assert isinstance(images.x, Inputs)
    meta = _logged_dataset(mlflow, images)
    assert type(meta).__name__ == "MetaDataset"
    assert (meta.name, meta.digest) == ("imgs", images.sha256[:32])
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(store / "t.csv"))
    artifact = load_data(f"runs:/{run.info.run_id}/t.csv")
    coded = _logged_dataset(mlflow, artifact)
    assert coded.source.to_dict()["tags"] == {"robust_cert.data": artifact.source}
