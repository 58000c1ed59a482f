"""Certifying a model before it is registered: ``runs:/RUN_ID/PATH`` and MLflow 3 logged
models (``models:/m-ID``) against the session's real MLflow server. A certification run and
its report, and nothing on any registered version."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from robust_cert.cli import main

pytestmark = pytest.mark.integration

POLICY = """\
name: before-registration
metrics: {accuracy: {}}
requirements: [{metric: accuracy, at_least: 0.0}]
"""


@pytest.fixture(scope="module")
def logged(demo):
    """A small model logged by a run (name "m"), never registered: (run id, model id)."""
    mlflow.set_tracking_uri(demo[0])
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=demo[0]).create_experiment("before-registration")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with mlflow.start_run(experiment_id=experiment) as run:
        info = mlflow.pytorch.log_model(model, name="m", serialization_format="pickle",
                                        input_example=np.zeros((2, 1, 8, 8), np.float32),
                                        pip_requirements=["torch"])
    mlflow.set_tracking_uri(None)
    return run.info.run_id, info.model_id


def _certify(url, ref, policy, out) -> int:
    return main(["certify", ref, "--policy", str(policy), "--tracking-uri", url,
                 "--out", str(out), "--no-progress"])


def test_certify_a_run_model(demo, client, logged, tmp_path, capsys):
    url = demo[0]
    run_id, model_id = logged
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    before = {m.name: len(client.search_model_versions(f"name='{m.name}'"))
              for m in client.search_registered_models()}
    ref = f"runs:/{run_id}/m"
    assert _certify(url, ref, policy, tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert f"{ref}: PASS\n" in out
    body = json.loads((tmp_path / "a" / "certificate.json").read_text())["certificate"]
    model = body["model"]
    assert (model["name"], model["version"], model["uri"]) == ("m", None, ref)
    assert (model["run_id"], model["model_id"]) == (run_id, model_id)
    assert model["training"]["run_id"] == run_id
    experiment = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([experiment], "tags.`robust_cert.kind` = 'certification'")
    assert [r.info.run_name for r in runs] == [f"certify {ref} · PASS"]
    assert runs[0].data.tags["robust_cert.source"] == ref
    assert {"certificate.json", "report.html", "per_point.npz"} <= \
        {f.path for f in client.list_artifacts(runs[0].info.run_id)}
    assert "signature" not in json.loads((tmp_path / "a" / "certificate.json").read_text()) or \
        json.loads((tmp_path / "a" / "certificate.json").read_text())["signature"] is None
    # the same artifacts through the logged model's id: the same model hash
    assert _certify(url, f"models:/{model_id}", policy, tmp_path / "b") == 0
    again = json.loads((tmp_path / "b" / "certificate.json").read_text())["certificate"]
    assert again["model"]["sha256"] == model["sha256"]
    assert again["model"]["uri"] == f"models:/{model_id}"
    after = {m.name: len(client.search_model_versions(f"name='{m.name}'"))
             for m in client.search_registered_models()}
    assert after == before  # nothing was registered, no version was tagged


def test_unknown_run_or_logged_model(demo, tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    for ref, what in (("runs:/0123456789abcdef0123456789abcdef/m", "no such run"),
                      ("models:/m-0123456789abcdef0123456789abcdef", "no such logged model")):
        assert _certify(demo[0], ref, policy, tmp_path / "out") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert what in err[0]
        assert ref in err[0]
    assert not (tmp_path / "out").exists()


def test_unknown_reference_is_refused_before_anything(tmp_path, capsys):
    """No server is needed: the reference is refused before connecting."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    code = main(["certify", "zoo://x", "--policy", str(policy), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'never.db'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert "no model loader accepts it" in err[0]
    assert "runs:/" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # not even the store
