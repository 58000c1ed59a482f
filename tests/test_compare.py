"""Paired version comparison: known answers, and `robust-cert compare` on the demo versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from robust_cert import stats
from robust_cert.cli import main
from robust_cert.comparison import BETTER, SAME, WORSE, compare
from robust_cert.errors import RobustCertError
from robust_cert.mlflow_plugin.compare import TABLE_ARTIFACT as TABLE
from tests.helpers import paired as _pair


def test_mcnemar_and_delta_known_answers():
    a, b = _pair(200, a_only=3, b_only=17, both=150)
    (q,) = compare({"accuracy": (a, True)}, {"accuracy": (b, True)}, confidence=0.95)
    assert (q.a_only, q.b_only) == (3, 17)
    assert q.p_value == pytest.approx(st.binomtest(3, 20, 0.5).pvalue)
    assert q.delta == pytest.approx((17 - 3) / 200)
    # Tango's score interval (unconditional), not Clopper–Pearson on the 20 discordant points
    assert q.delta_ci == pytest.approx(stats.tango_interval(17, 3, 200, 0.95), abs=1e-12)
    assert q.delta_ci[0] <= q.delta <= q.delta_ci[1]
    assert q.verdict == BETTER
    (r,) = compare({"accuracy": (b, True)}, {"accuracy": (a, True)})
    assert r.verdict == WORSE
    assert r.delta == pytest.approx(-q.delta)


def test_failure_rates_are_lower_is_better():
    a_good, b_good = _pair(300, a_only=0, b_only=25, both=250)  # B fails less often
    (q,) = compare({"p": (a_good, False, None)}, {"p": (b_good, False, None)})
    assert q.rate_b < q.rate_a
    assert q.delta < 0
    assert q.delta_ci[1] < 0
    assert q.verdict == BETTER


def test_holm_across_quantities_and_no_difference():
    a, b = _pair(100, a_only=2, b_only=9)  # p ≈ 0.065 alone: not significant
    same_a, same_b = _pair(100, 0, 0, both=90)
    out = {q.key: q for q in compare({"x": (a, True), "y": (same_a, True)},
                                     {"x": (b, True), "y": (same_b, True)})}
    assert out["x"].verdict == SAME
    assert out["y"].verdict == SAME
    # never disagreeing is not "exactly equal": Tango's interval is ±z²/(n + z²)
    z2 = st.norm.ppf(0.975) ** 2
    assert out["y"].delta_ci == pytest.approx((-z2 / (100 + z2), z2 / (100 + z2)), abs=1e-9)
    assert out["x"].adjusted_p_value >= out["x"].p_value


def test_mismatched_shapes_are_an_error():
    with pytest.raises(RobustCertError, match="different numbers of points"):
        compare({"a": (np.ones(3, bool), True)}, {"a": (np.ones(4, bool), True)})


@pytest.mark.integration
def test_compare_command_on_demo_versions(demo, client, tmp_path, capsys):
    code = main(["compare", "digits-cnn", "--versions", "1", "2", "--baseline", "1",
                 "--tracking-uri", demo[0], "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "robust_accuracy.eps_0.1" in out
    report = json.loads((tmp_path / "comparison.json").read_text())
    (c,) = report["comparisons"]
    q = {x["key"]: x for x in c["quantities"]}
    assert q["robust_accuracy.eps_0.1"]["verdict"] == BETTER  # adversarial training helped
    assert q["robust_accuracy.eps_0.1"]["delta"] > 0.15
    run = client.get_run(report["run_id"])
    assert run.data.metrics["delta.v2.robust_accuracy.eps_0.1"] == pytest.approx(
        q["robust_accuracy.eps_0.1"]["delta"])
    assert run.data.tags["robust_cert.kind"] == "comparison"
    assert {"comparison.json", "comparison.html", "comparison.pdf", "manifest.json",
            "comparison_table.json"} <= {a.path for a in client.list_artifacts(report["run_id"])}
    # the table MLflow's artifact view shows as a table
    (tmp_path / "dl").mkdir()
    local = client.download_artifacts(report["run_id"], "comparison_table.json",
                                      str(tmp_path / "dl"))
    table = json.loads(Path(local).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    row = next(r for r in rows if r["quantity"] == "robust_accuracy.eps_0.1")
    assert (row["baseline"], row["candidate"], row["verdict"]) == ("v1", "v2", BETTER)
    assert row["delta"] == round(q["robust_accuracy.eps_0.1"]["delta"], 4)
    # dated, with an id and the certificates compared; signed like a certification manifest
    assert report["id"].startswith("cmp-")
    assert report["created_at"]
    for v in ("1", "2"):
        mv = client.get_model_version("digits-cnn", v)
        assert report["certificates"][v]["certificate_digest"] == \
            mv.tags["robust_cert.certificate_digest"]
    assert main(["verify", str(tmp_path / "manifest.json")]) == 0
    signed = json.loads((tmp_path / "manifest.json").read_text())["manifest"]
    assert signed["id"] == report["id"]
    assert set(signed["files"]) == {"comparison.json", "comparison.html", "comparison.pdf"}
    assert (tmp_path / "comparison.pdf").read_bytes().startswith(b"%PDF")
    # the comparison report as a browser shows it
    from tests.test_report import _dom

    dom = _dom(tmp_path / "comparison.html", tmp_path)
    assert dom["model-name"] == "digits-cnn"
    assert dom["comparison-id"] == report["id"]
    assert dom["comparison-date"] == report["created_at"]
    assert report["certificates"]["2"]["certificate_digest"] in dom["certificate-v2"]
    assert "PASS" in dom["certificate-v2"]
    section = dom["v2-vs-v1"]
    assert "robust_accuracy.eps_0.1" in section
    assert BETTER in section
    # MLflow's artifact view shows the logged table as a table
    from tests.test_mlflow_ui import _browse, _shots_dir

    exp = run.info.experiment_id
    page = f"{demo[0]}/#/experiments/{exp}/runs/{report['run_id']}/artifacts/{TABLE}"
    png = _shots_dir(tmp_path) / "mlflow-comparison-table.png"
    _browse(page, tmp_path / "profile-shot", f"--screenshot={png}")
    assert png.stat().st_size > 10_000
    shown = _browse(page, tmp_path / "profile-dom", "--dump-dom").stdout.decode()
    assert "View as table" in shown
    assert "rate_baseline" in shown


@pytest.mark.integration
def test_compare_refuses_an_uncertified_version(demo, client, capsys):
    mv = client.get_model_version("digits-cnn", "1")
    new = client.create_model_version("digits-cnn", mv.source, mv.run_id,
                                      model_id=mv.source.removeprefix("models:/"))
    capsys.readouterr()
    assert main(["compare", "digits-cnn", "--versions", "1", new.version,
                 "--tracking-uri", demo[0]]) == 2
    assert "has not been certified" in capsys.readouterr().err
