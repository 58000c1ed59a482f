"""What a reviewer sees in MLflow: version descriptions and tags, certification runs (names,
kind tag, headline metrics, curves as metric histories), the report's Section 8 comparison
with the previous certified version, and screenshots of the MLflow UI in headless Chromium.

Screenshots go to ``$ROBUST_CERT_SCREENSHOTS`` when set (to look at them), else tmp_path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from robust_cert.certificate import SCHEMA, Certificate
from robust_cert.cli import main
from robust_cert.mlflow_plugin.client import redact_uri
from robust_cert.mlflow_plugin.names import (
    DESCRIPTION_BEGIN,
    DESCRIPTION_END,
    user_description,
    with_summary,
)
from robust_cert.mlflow_plugin.summary import (
    curve_points,
    description_summary,
    headline_metrics,
    short_name,
)

MODEL = "digits-cnn"
KIND_FILTER = "tags.robust_cert.kind = 'certification'"


# ---- pure functions -----------------------------------------------------------------------
def _value(params, estimate, ci=(0.0, 1.0)):
    return {"params": params, "estimate": estimate, "ci": list(ci), "k": 1, "n": 2}


def _requirement(rid, metric, params, estimate, direction, threshold, verdict, ci):
    return {"id": rid, "metric": metric, "params": params, "estimate": estimate, "ci": ci,
            "direction": direction, "threshold": threshold, "verdict": verdict}


def _toy_certificate(verdict="PASS") -> Certificate:
    results = [
        {"metric": "accuracy", "status": "ok", "values": [_value({}, 0.961234567)]},
        {"metric": "robust_accuracy", "status": "ok",
         "values": [_value({"eps": 0.05}, 0.90001), _value({"eps": 0.1}, 0.812345678)]},
        {"metric": "probabilistic_robustness", "status": "ok",
         "values": [_value({"eps": 0.1}, 0.0123456)]},
        {"metric": "randomized_smoothing", "status": "ok",
         "values": [_value({"radius": 0.25}, 0.7), _value({"radius": 0.5}, 0.5)]},
        {"metric": "corruptions", "status": "not_run", "values": []},
    ]
    requirements = [
        _requirement("accuracy", "accuracy", {}, 0.961234567, "at_least", 0.9, "PASS",
                     [0.93, 0.98]),
        _requirement("robust_accuracy@eps=0.1", "robust_accuracy", {"eps": 0.1}, 0.812345678,
                     "at_least", 0.7, "PASS", [0.76, 0.85]),
        _requirement("probabilistic_robustness@eps=0.1", "probabilistic_robustness",
                     {"eps": 0.1}, 0.0123456, "at_most", 0.05, verdict, [0.004, 0.03]),
    ]
    body = {"schema": SCHEMA, "verdict": verdict, "issued_at": "2026-12-02T01:00:00+00:00",
            "policy": {"name": "toy-policy", "version": "1.0", "confidence": 0.95,
                       "sha256": "0" * 64},
            "data": {"sha256": "1" * 64}, "results": results, "requirements": requirements}
    return Certificate(body=body)


def test_short_names_are_distinct_and_valid_metric_names():
    from mlflow.utils.validation import _validate_metric_name

    names = [short_name("accuracy", {}), short_name("robust_accuracy", {"eps": 0.1}),
             short_name("robust_accuracy", {"eps": 0.05}),
             short_name("probabilistic_robustness", {"eps": 0.1}),
             short_name("randomized_smoothing", {"radius": 0.25}),
             short_name("corruptions", {"corruption": "fog", "severity": 3})]
    assert names[:5] == ["acc", "robust_acc_0.1", "robust_acc_0.05", "fail_rate_0.1",
                         "cert_acc_r0.25"]
    assert len(set(names)) == len(names)
    for name in names:
        _validate_metric_name(name)


def test_headline_metrics_and_curves():
    cert = _toy_certificate()
    assert headline_metrics(cert) == {"acc": 0.9612, "robust_acc_0.1": 0.8123,
                                      "fail_rate_0.1": 0.0123, "pass": 1.0}
    assert curve_points(cert) == {
        "curve.robust_accuracy": [(50, 0.9), (100, 0.8123)],
        "curve.failure_rate": [(100, 0.0123)],
        "curve.certified_accuracy": [(250, 0.7), (500, 0.5)],
    }
    assert headline_metrics(_toy_certificate("FAIL"))["pass"] == 0.0


def test_description_block_keeps_the_users_text():
    summary = description_summary(_toy_certificate(), "abc123", "7")
    assert "**Robustness: PASS** under policy `toy-policy` 1.0" in summary
    assert "| robust accuracy, ε = 0.1 | 0.8123 [0.7600, 0.8500] | ≥ 0.7 | **PASS** |" in summary
    assert ("| failure rate under random noise, ε = 0.1 | 0.0123 [0.0040, 0.0300] | ≤ 0.05 |"
            in summary)
    assert "issued 2026-12-02 01:00:00 UTC" in summary
    assert "[Certification run](#/experiments/7/runs/abc123)" in summary
    assert "(#/experiments/7/runs/abc123/artifacts/report.html)" in summary
    first = with_summary("Owned by the vision team.\n\nTrained on v3 data.", summary)
    assert first.startswith(DESCRIPTION_BEGIN)
    assert first.count(DESCRIPTION_BEGIN) == first.count(DESCRIPTION_END) == 1
    assert first.endswith("Owned by the vision team.\n\nTrained on v3 data.")
    second = with_summary(first + "\n\nAdded later.", "new summary")
    assert second.count(DESCRIPTION_BEGIN) == 1
    assert "Robustness" not in second
    assert "new summary" in second
    assert user_description(second) == ("Owned by the vision team.\n\nTrained on v3 data."
                                        "\n\nAdded later.")
    assert with_summary(second, None) == user_description(second)
    assert with_summary(None, "s") == f"{DESCRIPTION_BEGIN}\ns\n{DESCRIPTION_END}"
    assert user_description(None) == ""
    # an end marker edited away: nothing after the begin marker is lost
    assert user_description(f"mine\n{DESCRIPTION_BEGIN}\nold\nmore of mine") == \
        "mine\n\nold\nmore of mine"


def test_only_summary_tags_are_replaced():
    from robust_cert.mlflow_plugin.versions import _summary_tag

    for key in ("robust_cert.metric.robust_accuracy.eps_0.1", "robust_cert.issued_at",
                "robust_cert.policy_sha256", "robust_cert.robust_acc_0.05", "robust_cert.acc",
                "robust_cert.cert_acc_r0.5", "robust_cert.parity"):
        assert _summary_tag(key), key
    for key in ("robust_cert.certificate", "robust_cert.status", "robust_cert.doctor_probe",
                "robust_cert.run_id", "team", "robust_cert.owner"):
        assert not _summary_tag(key), key


def test_tracking_uri_without_credentials():
    assert redact_uri("https://alice:s3cret@mlflow.example.com:5000/") == \
        "https://mlflow.example.com:5000/"
    assert redact_uri("postgresql://u:p@db:5432/mlflow?sslpassword=x") == \
        "postgresql://db:5432/mlflow"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


@pytest.mark.parametrize("fails", [False, True])
def test_tracking_scope_restores_the_callers_uris(tmp_path, fails):
    """What connect() sets inside the scope of a Python-API call (the two process-wide URIs,
    and the variables MLflow exports with them) is put back on exit, on error too."""
    import mlflow

    from robust_cert.mlflow_plugin.client import tracking_scope

    mine = (tmp_path / "mine").as_uri()
    mlflow.set_tracking_uri(mine)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    registry_before = mlflow.get_registry_uri()
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext(), tracking_scope():
        mlflow.set_tracking_uri("http://127.0.0.1:9")
        mlflow.set_registry_uri("http://127.0.0.1:9")
        assert os.environ["MLFLOW_REGISTRY_URI"] == "http://127.0.0.1:9"
        if fails:
            raise RuntimeError("interrupted")
    assert mlflow.get_tracking_uri() == mine
    assert os.environ["MLFLOW_TRACKING_URI"] == mine
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_registry_uri() == registry_before


# ---- the demo store ---------------------------------------------------------------------
def _certificate_of(client, version: str, tmp_path: Path) -> tuple[Certificate, object]:
    mv = client.get_model_version(MODEL, version)
    run_id = mv.tags["robust_cert.run_id"]
    where = tmp_path / f"v{version}"
    where.mkdir(exist_ok=True)
    return Certificate.load(client.download_artifacts(run_id, "certificate.json",
                                                      str(where))), mv


@pytest.mark.integration
def test_v2_certificate_compares_with_v1(demo, client, tmp_path):
    """Section 8: v2's certificate carries the paired comparison with v1, under its digest
    and signature; v1 (nothing earlier) has none."""
    from robust_cert.signing import Keyring, verify_claim

    v1, _ = _certificate_of(client, "1", tmp_path)
    v2, mv2 = _certificate_of(client, "2", tmp_path)
    assert "comparison" not in v1.body
    entry = v2.body["comparison"]
    assert entry["baseline"]["version"] == "1"
    # (v1 may have been certified again since: its certificate then has a newer digest)
    assert len(entry["baseline"]["certificate_digest"]) == 64
    assert entry["baseline"]["verdict"] in ("FAIL", "INCONCLUSIVE")
    q = {x["key"]: x for x in entry["quantities"]}
    assert q["robust_accuracy.eps_0.1"]["verdict"] == "significantly better"
    assert q["robust_accuracy.eps_0.1"]["delta"] > 0.15
    assert "robust_accuracy.eps_0.1" in entry["improvements"]
    # the signed claim names the digest of the body that holds the comparison
    claim = verify_claim(mv2.tags["robust_cert.certificate"], Keyring.from_env(), name=MODEL,
                         version="2")
    assert claim["certificate_digest"] == v2.digest == mv2.tags["robust_cert.certificate_digest"]
    # the report renders it as section 8 and says so on the cover
    html = (demo[1] / "reports" / f"{MODEL}-v2" / "report.html").read_text()
    assert 'id="comparison"' in html
    assert 'id="regressions"' in html
    # v3 (the ONNX export) is compared with v2, the highest certified version below it
    v3, _ = _certificate_of(client, "3", tmp_path)
    assert v3.body["comparison"]["baseline"]["version"] == "2"
    assert v2.body["tracking_uri"] == demo[0]


@pytest.mark.integration
def test_model_facts_in_the_certificate(demo, client, tmp_path):
    v2, mv2 = _certificate_of(client, "2", tmp_path)
    training = v2.body["model"]["training"]
    assert training["run_id"] == mv2.run_id
    assert training["run_name"] == "train adversarial"
    assert training["params"]["augmentation"] == "adversarial"
    html = (demo[1] / "reports" / f"{MODEL}-v2" / "report.html").read_text()
    assert "train adversarial" in html


@pytest.mark.integration
def test_certification_runs_names_kind_metrics_and_curves(demo, client, tmp_path):
    exp = client.get_experiment_by_name("digits-demo").experiment_id
    runs = client.search_runs([exp], KIND_FILTER, order_by=["attributes.run_name ASC"])
    names = [r.info.run_name for r in runs]
    v1_verdict = client.get_run(client.get_model_version(MODEL, "1")
                                .tags["robust_cert.run_id"]).data.tags["robust_cert.verdict"]
    assert {f"certify {MODEL} v1 · {v1_verdict}", f"certify {MODEL} v2 · PASS",
            f"certify {MODEL} v3 · PASS"} <= set(names)
    # every certification run (other tests certify other models here too) reads the same way
    assert all(re.fullmatch(r"certify \S+ v\d+( · (PASS|FAIL|INCONCLUSIVE))?", n)
               for n in names), names
    everything = client.search_runs([exp])
    assert {r.info.run_name for r in everything} - set(names), "training runs are filtered out"
    cert, mv = _certificate_of(client, "2", tmp_path)
    run = client.get_run(mv.tags["robust_cert.run_id"])
    metrics = run.data.metrics
    curves = {"curve.robust_accuracy", "curve.failure_rate"}
    assert set(metrics) == {"acc", "robust_acc_0.1", "fail_rate_0.1", "pass"} | curves
    for key, value in metrics.items():
        assert value == round(value, 4), key
    assert metrics["pass"] == 1.0
    req = {r["id"]: r for r in cert.requirements}
    robust = next(r for r in req.values() if r["metric"] == "robust_accuracy")
    assert metrics["robust_acc_0.1"] == round(robust["estimate"], 4)
    history = client.get_metric_history(run.info.run_id, "curve.robust_accuracy")
    by_step = {m.step: m.value for m in history}
    values = next(r for r in cert.results if r["metric"] == "robust_accuracy")["values"]
    assert by_step == {round(1000 * v["params"]["eps"]): round(v["estimate"], 4)
                       for v in values}
    assert sorted(by_step) == [25, 50, 75, 100]  # the demo policy's four radii
    assert by_step[25] >= by_step[50] >= by_step[75] >= by_step[100]
    noise = client.get_metric_history(run.info.run_id, "curve.failure_rate")
    assert sorted(m.step for m in noise) == [25, 50, 75, 100]


@pytest.mark.integration
def test_version_page_tags_and_description(demo, client):
    from robust_cert.mlflow_plugin.names import STATUS_TAG

    mv = client.get_model_version(MODEL, "2")
    tags = {k for k in mv.tags if k.startswith("robust_cert.")}
    assert tags == {"robust_cert.status", "robust_cert.run_id", "robust_cert.policy",
                    "robust_cert.certificate_digest", "robust_cert.certificate",
                    "robust_cert.data_sha256", "robust_cert.acc", "robust_cert.robust_acc_0.1",
                    "robust_cert.fail_rate_0.1"}
    assert mv.tags[STATUS_TAG] == "passed"
    run_id = mv.tags["robust_cert.run_id"]
    exp = client.get_run(run_id).info.experiment_id
    text = mv.description
    assert text.startswith(DESCRIPTION_BEGIN)
    assert DESCRIPTION_END in text
    assert "**Robustness: PASS**" in text
    assert "`digits-production`" in text
    assert f"(#/experiments/{exp}/runs/{run_id})" in text
    assert f"(#/experiments/{exp}/runs/{run_id}/artifacts/report.html)" in text
    assert "Compared with v1" in text
    assert ("significantly better: robust accuracy, ε = 0.05; robust accuracy, ε = 0.075; "
            "robust accuracy, ε = 0.1") in text
    v3 = client.get_model_version(MODEL, "3")
    assert v3.tags["robust_cert.robust_acc_0.1"] == mv.tags["robust_cert.robust_acc_0.1"]
    assert float(v3.tags["robust_cert.parity"]) == 1.0


EASY = ("name: ui-easy\nmetrics:\n  accuracy: {}\n  robust_accuracy: {eps: [0.02, 0.05], "
        "attacks: [apgd_ce], steps: 5}\nrequirements:\n  - {metric: accuracy, at_least: 0.3}\n")


@pytest.mark.integration
def test_recertification_keeps_the_users_description(demo, client, tmp_path):
    """A version's own description survives certification, the summary block is replaced on
    re-certification, the certificate records both descriptions, and a version with no
    comparable earlier certification has no comparison."""
    import mlflow

    from robust_cert.digits_cnn import train_digits_cnn

    url = demo[0]
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    name = "ui-described"
    with mlflow.start_run(run_name="train tiny"):
        mlflow.log_params({"epochs": 1})
        info = mlflow.pytorch.log_model(
            train_digits_cnn(epochs=1), name="m", serialization_format="pickle",
            input_example=np.zeros((2, 1, 8, 8), dtype=np.float32),
            registered_model_name=name, pip_requirements=["torch"])
    version = str(info.registered_model_version)
    client.update_registered_model(name, description="Reads 8x8 digits on scanned forms.")
    client.update_model_version(name, version, description="Owned by the forms team.")
    policy = tmp_path / "p.yaml"
    policy.write_text(EASY)
    for i in range(2):
        out = tmp_path / f"out{i}"
        code = main(["certify", f"models:/{name}/{version}", "--policy", str(policy),
                     "--tracking-uri", url, "--out", str(out), "--no-progress"])
        assert code == 0
        mv = client.get_model_version(name, version)
        assert mv.description.count(DESCRIPTION_BEGIN) == 1
        assert mv.description.endswith("Owned by the forms team.")
        assert mv.tags["robust_cert.run_id"] in mv.description
        cert = json.loads((out / "certificate.json").read_text())["certificate"]
        assert cert["model"]["version_description"] == "Owned by the forms team."
        assert cert["model"]["registered_model_description"] == \
            "Reads 8x8 digits on scanned forms."
        assert cert["model"]["training"]["run_name"] == "train tiny"
        assert "comparison" not in cert  # nothing earlier, and no other version
        html = (out / "report.html").read_text()
        assert "Owned by the forms team." in html
    runs = client.search_runs([client.get_run(mv.tags["robust_cert.run_id"]).info
                               .experiment_id], KIND_FILTER + f" and tags.`robust_cert.model`"
                              f" = '{name}'")
    assert [r.info.run_name for r in runs] == [f"certify {name} v{version} · PASS"] * 2


# ---- the MLflow UI in a real browser ------------------------------------------------------
def _chromium_bin() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("chromium is needed for the MLflow UI screenshots: apt-get install chromium")


def _browse(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_chromium_bin(), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
         # charts render lazily: let every compositor stage run, with time for the fetches
         "--run-all-compositor-stages-before-draw", "--virtual-time-budget=90000",
         "--window-size=1600,1100", *args, url],
        capture_output=True, timeout=180, check=True)


def _shots_dir(tmp_path: Path) -> Path:
    where = Path(os.environ.get("ROBUST_CERT_SCREENSHOTS") or tmp_path / "shots")
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.mark.integration
def test_mlflow_ui_screenshots(demo, client, tmp_path):
    """The version page shows the verdict and headline numbers (description and tags); the
    runs page filtered to certifications lists only them, by name; its chart view draws each
    curve with the versions overlaid against the step (ε in thousandths)."""
    from PIL import Image

    url = demo[0]
    shots = _shots_dir(tmp_path)
    exp = client.get_experiment_by_name("digits-demo").experiment_id
    pages = {
        "version-2": f"{url}/#/models/{MODEL}/versions/2",
        "runs": f"{url}/#/experiments/{exp}/runs?searchFilter="
                + urllib.parse.quote(KIND_FILTER),
        "chart": f"{url}/#/experiments/{exp}/runs?compareRunsMode=CHART&searchFilter="
                 + urllib.parse.quote(KIND_FILTER),
    }
    dom = {}
    for name, page in pages.items():
        png = shots / f"mlflow-{name}.png"
        _browse(page, tmp_path / f"profile-{name}", f"--screenshot={png}")
        img = np.asarray(Image.open(png).convert("L"), dtype=np.int16)
        assert img.std() > 10, f"the {name} screenshot is blank"
        dom[name] = _browse(page, tmp_path / f"profile-{name}-dom", "--dump-dom").stdout.decode()
    version_page = dom["version-2"]
    assert "Robustness:" in version_page
    assert "PASS" in version_page
    assert "robust accuracy, ε = 0.1" in version_page
    assert "robust_cert.robust_acc_0.1" in version_page
    assert "Certification run" in version_page
    assert "&lt;!--" not in version_page, "the block markers must not show as text"
    runs_page = dom["runs"]
    assert f"certify {MODEL} v2 · PASS" in runs_page
    assert "train standard" not in runs_page, "training runs are filtered out"
    chart_page = dom["chart"]  # the curves, one chart each, runs overlaid, step on the x axis
    assert "curve.robust_accuracy" in chart_page
    assert "Step" in chart_page
