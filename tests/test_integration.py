"""The demo flow and the CLI against a real `mlflow server` on 127.0.0.1 (sqlite store)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robust_cert.cli import main

pytestmark = pytest.mark.integration

MODEL = "digits-cnn"


def _robust_cert_tags(mv) -> dict:
    return {k: v for k, v in mv.tags.items() if k.startswith("robust_cert.")}


def test_demo_certifies_two_versions(demo, client):
    _, workdir, code = demo
    assert code == 0
    v1, v2 = client.get_model_version(MODEL, "1"), client.get_model_version(MODEL, "2")
    assert v1.tags["robust_cert.status"] in ("failed", "inconclusive")
    assert v2.tags["robust_cert.status"] == "passed"
    # version 2 (adversarial training) is visibly more robust than version 1
    key = "robust_cert.robust_acc_0.1"
    assert float(v2.tags[key]) > float(v1.tags[key]) + 0.15
    for v in ("1", "2"):
        report = workdir / "reports" / f"{MODEL}-v{v}" / "report.html"
        assert report.is_file()
        html = report.read_text()
        assert MODEL in html
        assert any(word in html for word in ("PASS", "FAIL", "INCONCLUSIVE"))


def test_demo_certifies_the_onnx_export_with_its_twin(demo, client):
    """Version 3 is version 2 exported to ONNX, certified with version 2 as gradient twin."""
    _, workdir, _ = demo
    v2, v3 = client.get_model_version(MODEL, "2"), client.get_model_version(MODEL, "3")
    assert v3.tags["robust_cert.status"] == "passed"
    assert v3.tags["robust_cert.policy"] == "digits-production-onnx"
    key = "robust_cert.robust_acc_0.1"
    assert v3.tags[key] == v2.tags[key]  # same attacks (twin), same predictions (parity)
    assert float(v3.tags["robust_cert.parity"]) == 1.0
    cert = json.loads((workdir / "reports" / f"{MODEL}-v3" / "certificate.json").read_text())
    model = cert["certificate"]["model"]
    assert model["format"] == "onnx"
    assert model["gradient_twin"]["uri"] == f"models:/{MODEL}/2"
    assert model["gradient_twin"]["agreement"] == "359/359"


def test_certification_run_is_logged(demo, client):
    mv = client.get_model_version(MODEL, "2")
    run = client.get_run(mv.tags["robust_cert.run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["policy"] == "digits-production"
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"certificate.json", "report.html", "per_point.npz"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "certificate.json")
    with open(local) as f:
        cert = json.load(f)
    assert cert["certificate"]["verdict"] == "PASS"
    assert cert["digest"] == mv.tags["robust_cert.certificate_digest"]
    assert cert["certificate"]["model"]["version"] == "2"
    assert cert["certificate"]["model"]["format"] == "pytorch-pt2"
    assert client.get_model_version(MODEL, "1").tags["robust_cert.run_id"] != run.info.run_id
    per_point = np.load(client.download_artifacts(run.info.run_id, "per_point.npz"))
    assert per_point["accuracy/correct"].shape == (359,)


def test_metrics_are_on_the_logged_models(demo, client):
    """Logged with model_id and a dataset, so the experiment's Models tab compares versions."""
    values = {}
    for v in ("1", "2"):
        mv = client.get_model_version(MODEL, v)
        model_id = mv.source.removeprefix("models:/")
        logged = client.get_logged_model(model_id)
        metrics = {m.key: m for m in logged.metrics}
        assert "robust_acc_0.1" in metrics  # the headline metrics (short names)
        assert metrics["acc"].dataset_name == "digits-test"
        values[v] = metrics["robust_acc_0.1"].value
    assert values["2"] > values["1"]


def _register_extra_version(client, server) -> str:
    """A fresh version of a separate model, to check that failures leave no tags."""
    import mlflow

    from robust_cert.digits_cnn import train_digits_cnn

    mlflow.set_tracking_uri(server)
    mlflow.set_registry_uri(server)
    model = train_digits_cnn(epochs=1)
    with mlflow.start_run():
        x = np.zeros((2, 1, 8, 8), dtype=np.float32)
        info = mlflow.pytorch.log_model(model, name="m", input_example=x,
                                        serialization_format="pickle",
                                        registered_model_name="bad-input-target",
                                        pip_requirements=["torch"])
    return str(info.registered_model_version)


@pytest.mark.parametrize("case", ["nan", "shape", "labels", "range", "policy", "no-version"])
def test_bad_input_writes_nothing(demo, client, tmp_path, capsys, case):
    server = demo[0]
    version = _register_extra_version(client, server)
    uri = f"models:/bad-input-target/{version}"
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    y = np.arange(20) % 10
    policy = str(tmp_path / "p.yaml") if case == "policy" else None
    expect = {
        "nan": "NaN", "shape": "shape", "labels": "classes", "range": "outside the declared",
        "policy": "unknown key", "no-version": "has no version 999",
    }[case]
    if case == "nan":
        x[3, 0, 2, 2] = np.nan
    elif case == "shape":
        x = x.reshape(20, 64)
    elif case == "labels":
        y[0] = 12
    elif case == "range":
        x[0] += 5
    elif case == "no-version":
        uri = "models:/bad-input-target/999"
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    if policy:
        (tmp_path / "p.yaml").write_text("name: p\nmetrics: {accuracy: {}}\n"
                                                "requirements: [{metric: accuracy, at_least: 0.5}]"
                                                "\nthreshold: 3\n")
    from tests.conftest import DIGITS_POLICY

    capsys.readouterr()  # drop the registration's own output
    code = main(["certify", uri, "--policy", policy or str(DIGITS_POLICY), "--data", str(data),
                 "--tracking-uri", server, "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert expect in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    mv = client.get_model_version("bad-input-target", version)
    assert _robust_cert_tags(mv) == {}
    assert not (tmp_path / "out" / "report.html").exists()
    assert not (tmp_path / "out" / "certificate.json").exists()


def test_uri_without_version(demo, capsys):
    from tests.conftest import DIGITS_POLICY

    code = main(["certify", f"models:/{MODEL}", "--policy", str(DIGITS_POLICY),
                 "--tracking-uri", demo[0]])
    assert code == 2
    assert "names no version" in capsys.readouterr().err


def test_unreachable_server(capsys, tmp_path):
    import socket

    from tests.conftest import DIGITS_POLICY

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["certify", f"models:/{MODEL}/1", "--policy", str(DIGITS_POLICY),
                 "--tracking-uri", f"http://127.0.0.1:{port}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot reach the MLflow tracking server" in err
    assert not any(tmp_path.iterdir())


def test_certify_by_alias_and_exit_codes(demo, client, tmp_path, capsys):
    from tests.conftest import DIGITS_POLICY

    client.set_registered_model_alias(MODEL, "candidate", "2")
    code = main(["certify", f"models:/{MODEL}@candidate", "--policy", str(DIGITS_POLICY),
                 "--tracking-uri", demo[0], "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "PASS" in out
    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert cert["certificate"]["model"]["version"] == "2"  # alias resolved to the version
    code = main(["certify", f"models:/{MODEL}/1", "--policy", str(DIGITS_POLICY),
                 "--tracking-uri", demo[0], "--out", str(tmp_path / "v1"), "--no-progress"])
    status = client.get_model_version(MODEL, "1").tags["robust_cert.status"]
    assert (code, status) in ((1, "failed"), (3, "inconclusive"))
