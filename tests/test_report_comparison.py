"""Section 8 of the report: a version compared with the previous certified one, on two real
digits models (standard training, then adversarial training), with the regression marked on
the cover. Checked in headless Chromium (DOM and screenshot) and in the printed PDF."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import robust_cert
from robust_cert.certificate import Certificate, canonical_json
from robust_cert.comparison import BETTER, SAME, WORSE
from robust_cert.data import load_data
from robust_cert.digits_cnn import train_digits_cnn
from robust_cert.errors import RobustCertError
from robust_cert.report import write_report
from robust_cert.report.comparison import comparison_entry, quantity_label
from robust_cert.report.html import render_html
from tests.test_report import FAIL_RGB, _dom, _pixels_near, _run, _screenshot, _tool

POLICY = {
    "name": "report-comparison", "version": "1", "confidence": 0.95,
    "metrics": {
        "accuracy": {},
        "robust_accuracy": {"eps": [0.05, 0.1, 0.15], "attacks": ["fgsm"]},
        "probabilistic_robustness": {"eps": [0.1], "samples": 400},
    },
    "requirements": [
        {"metric": "accuracy", "at_least": 0.9},
        {"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.5},
    ],
}


@pytest.fixture(scope="module")
def versions(digits_model):
    """v1: the standard-trained CNN; v2: the same network adversarially trained."""
    torch.set_num_threads(1)
    v2_model = train_digits_cnn(epochs=15, augment="adversarial", eps=0.1, seed=0)
    v1 = robust_cert.certify(digits_model, "digits", POLICY, progress=False)
    v2 = robust_cert.certify(v2_model, "digits", POLICY, progress=False)
    for cert, version in ((v1, "1"), (v2, "2")):
        cert.body["model"] = {**cert.body["model"], "name": "digits-cnn", "version": version}
    return v1, v2


def _with_comparison(cert: Certificate, entry: dict) -> Certificate:
    return Certificate(body={**cert.body, "comparison": entry}, per_point=cert.per_point)


def test_entry_is_json_ready_and_names_the_baseline(versions):
    v1, v2 = versions
    entry = comparison_entry(v2, v1)
    assert json.loads(canonical_json(entry)) == entry  # JSON-ready, no NaN
    assert entry == comparison_entry(v2, v1)  # deterministic
    base = entry["baseline"]
    assert base["certificate_digest"] == v1.digest
    assert base["verdict"] == v1.verdict
    assert (base["model"], base["version"]) == ("digits-cnn", "1")
    assert base["policy"]["sha256"] == v1.body["policy"]["sha256"]
    keys = [q["key"] for q in entry["quantities"]]
    assert keys == ["accuracy", "probabilistic_robustness.eps_0.1",
                    "robust_accuracy.eps_0.05", "robust_accuracy.eps_0.1",
                    "robust_accuracy.eps_0.15"]
    rows = {q["key"]: q for q in entry["quantities"]}
    strong = rows["robust_accuracy.eps_0.1"]
    # adversarial training: v2 is significantly more robust than v1 under attack
    assert strong["verdict"] == BETTER
    assert strong["delta"] > 0
    assert strong["delta_ci"][0] > 0
    assert strong["requirements"] == ["robust_accuracy[eps=0.1]"]
    assert rows["accuracy"]["requirements"] == ["accuracy"]
    assert "McNemar" in rows["accuracy"]["method"]
    assert "betting" in rows["probabilistic_robustness.eps_0.1"]["method"]  # draws per point
    assert strong["rate"] == pytest.approx(v2.per_point["robust_accuracy/robust"][:, 1].mean())
    assert strong["baseline_rate"] == pytest.approx(
        v1.per_point["robust_accuracy/robust"][:, 1].mean())
    assert "robust_accuracy.eps_0.1" in entry["improvements"]
    assert entry["regressions"] == []
    assert quantity_label("robust_accuracy.eps_0.1") == "robust accuracy, ε = 0.1"
    # the other way round the same quantity is a regression
    back = comparison_entry(v1, v2)
    assert "robust_accuracy.eps_0.1" in back["regressions"]
    assert {q["key"]: q["verdict"] for q in back["quantities"]}[
        "robust_accuracy.eps_0.1"] == WORSE


def test_entry_refuses_other_data_and_missing_per_point_arrays(versions):
    v1, v2 = versions
    with pytest.raises(RobustCertError, match="no per-point arrays"):
        comparison_entry(v2, Certificate(body=v1.body))
    other = Certificate(body={**v1.body, "data": {**v1.body["data"], "sha256": "0" * 64}},
                        per_point=v1.per_point)
    with pytest.raises(RobustCertError, match="different data"):
        comparison_entry(v2, other)
    # a version compared with itself: no detectable difference anywhere
    same = comparison_entry(v1, v1)
    assert {q["verdict"] for q in same["quantities"]} == {SAME}
    assert all(q["baseline_only"] == q["current_only"] == 0 for q in same["quantities"])


def test_report_shows_section_8_and_marks_the_regression_on_the_cover(versions, tmp_path):
    v1, v2 = versions
    # v1 rendered against v2 as its baseline: robust accuracy regressed
    regressed = _with_comparison(v1, comparison_entry(v1, v2))
    files = write_report(regressed, tmp_path / "regressed", pdf="required",
                         data=load_data("digits"))
    dom = _dom(files.html, tmp_path)
    assert dom["regressions"].startswith("Regression against digits-cnn v2")
    assert "robust accuracy, ε = 0.1 significantly worse" in dom["regressions"]
    assert "comparison" in dom
    assert dom["baseline-digest"] == v2.digest
    assert "chart-comparison" in dom
    rows = [dom[k] for k in sorted(k for k in dom if k.startswith("cmp-"))]
    assert len(rows) == 5
    worse = [r for r in rows if r.endswith("significantly worse")]
    assert any(r.startswith("robust accuracy, ε = 0.1") for r in worse)
    img = _screenshot(files.html, tmp_path)
    # the regression box on the cover (red border and text) is visible in the first screen
    assert _pixels_near(img[:700], FAIL_RGB) > 300
    text = _run([_tool("pdftotext"), "-layout", str(files.pdf), "-"], text=True).stdout
    flat = " ".join(text.split())
    assert "Regression against digits-cnn v2" in " ".join(text.split("\f")[0].split())
    assert "Comparison with the previous certified version" in flat
    assert "significantly worse" in flat
    assert v2.digest in "".join(text.split())
    # nothing runs off the printed page (A4: 595 pt wide, 16 mm margins)
    boxes = _run([_tool("pdftotext"), "-bbox", str(files.pdf), "-"], text=True).stdout
    words = re.findall(r'xMax="([0-9.]+)"[^>]*>([^<]*)</word>', boxes)
    outside = [w for x, w in words if float(x) > 595.3 - 16 / 25.4 * 72 + 1]
    assert not outside, outside

    # v2 against v1: improvements, no regression box
    improved = _with_comparison(v2, comparison_entry(v2, v1))
    html = render_html(improved)
    # the entry is part of the signed JSON: a report re-rendered from it shows the same section
    again = render_html(Certificate.from_json(improved.to_json()))

    def section(page: str) -> str:
        start = page.index('<section id="comparison">')
        return page[start:page.index("</section>", start)]

    assert section(again) == section(html)
    assert html == render_html(improved)  # deterministic
    assert 'class="warning regression"' not in html
    assert "no significant regression; significantly better: robust accuracy" in html
    # no comparison entry: no section 8 and nothing on the cover
    plain = render_html(v2)
    assert 'id="comparison"' not in plain
    assert 'id="regressions"' not in plain


def test_comparison_rows_use_the_entry_numbers(versions):
    v1, v2 = versions
    entry = comparison_entry(v2, v1)
    html = render_html(_with_comparison(v2, entry))
    for q in entry["quantities"]:
        assert f"{q['baseline_rate']:.4f}" in html
        assert f"{q['rate']:.4f}" in html
    ci = next(q for q in entry["quantities"] if q["key"] == "robust_accuracy.eps_0.1")["delta_ci"]
    assert f"[+{ci[0]:.4f}, +{abs(ci[1]):.4f}]" in html
    assert np.isfinite(ci).all()
