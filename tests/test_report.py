"""The report as a person sees it: the HTML in headless Chromium, the PDF printed to PNG.

These tests need chromium and poppler-utils (pdftoppm, pdftotext, pdfdetach, pdfinfo) and
WeasyPrint's system libraries; `make test` run as root installs them (.ci/system-packages).
A missing tool fails the test with that instruction rather than skipping it.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

import robust_cert
from robust_cert.certificate import Certificate
from robust_cert.cli import main
from robust_cert.data import digits_split, load_data
from robust_cert.mlflow_plugin.promotion import verify_certificate_file
from robust_cert.mlflow_plugin.tracking import claim_for
from robust_cert.report import PdfUnavailable, write_report
from robust_cert.report.charts import ChartInputs, charts_for, omitted_for
from robust_cert.report.html import render_html
from robust_cert.signing import Keyring, sign_claim

POLICY = {
    "name": "report-test", "version": "2", "confidence": 0.95,
    "description": "Digits classifier for the report tests.",
    "metrics": {
        "accuracy": {},
        "robust_accuracy": {"eps": [0.05, 0.1], "attacks": ["fgsm", "pgd"], "steps": 5},
        "probabilistic_robustness": {"eps": [0.05, 0.1], "samples": 1000},
    },
    "requirements": [
        {"metric": "accuracy", "at_least": 0.9},
        {"metric": "robust_accuracy", "eps": 0.05, "at_least": 0.5},
        {"metric": "probabilistic_robustness", "eps": 0.1, "at_most": 0.05},
    ],
}
PASS_RGB = (0x1B, 0x7A, 0x3A)  # --pass in report.css
FAIL_RGB = (0xB3, 0x26, 0x1E)  # --fail
SECTIONS = ("cover", "model", "data", "threat-model", "definitions", "acceptance",
            "requirements", "metric-accuracy", "metric-robust_accuracy",
            "metric-probabilistic_robustness", "limitations", "reproducibility", "integrity",
            "approvals")


def _tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{names[0]} is not installed: run `make test` as root, which installs it "
                "(see .ci/system-packages)")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, check=True, timeout=120, **kw)


def _chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([_tool("chromium", "chromium-browser"), "--headless", "--no-sandbox",
                 "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--hide-scrollbars",
                 f"--user-data-dir={tmp / 'chromium-profile'}", *args, page.as_uri()])


def _screenshot(page: Path, tmp: Path) -> np.ndarray:
    png = tmp / f"{page.stem}.png"
    _chromium(page, tmp, f"--screenshot={png}", "--window-size=1200,2000")
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def _pixels_near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> int:
    return int((np.abs(img - np.array(rgb)).max(axis=2) <= tol).sum())


class _TextById(HTMLParser):
    """Text content of every element with an id (enough for a flat check of the DOM)."""

    def __init__(self):
        super().__init__()
        self.text: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("meta", "br", "link", "img", "input", "wbr", "col", "hr", "path", "use"):
            return
        ident = dict(attrs).get("id")
        self._open.append((tag, ident))
        if ident:
            self.text.setdefault(ident, "")

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, ident in self._open:
            if ident:
                self.text[ident] += data


def _dom(page: Path, tmp: Path) -> dict[str, str]:
    parser = _TextById()
    parser.feed(_chromium(page, tmp, "--dump-dom").stdout.decode())
    return {k: " ".join(v.split()) for k, v in parser.text.items()}


@pytest.fixture(scope="module")
def cert(digits_model):
    """A signed PASS certificate with all three metric families and per-point arrays."""
    c = robust_cert.certify(digits_model, "digits", POLICY, progress=False)
    assert c.verdict == "PASS", [r["verdict"] for r in c.requirements]
    claim = claim_for(c, c.body["model"]["name"], "7", "run-for-report-tests")
    c.signature = json.loads(sign_claim(claim, Keyring.from_env()))
    return c


@pytest.fixture(scope="module")
def written(cert, tmp_path_factory):
    """The report as the certification run writes it: verified, with the data for figures."""
    check = verify_certificate_file(cert, Keyring.from_env())
    assert check.ok, check.message
    out = tmp_path_factory.mktemp("report")
    return write_report(cert, out, pdf="required", verification=check, data=load_data("digits"))


def test_html_in_chromium_shows_verdict_model_and_every_section(cert, written, tmp_path):
    img = _screenshot(written.html, tmp_path)
    assert img.shape[:2] == (2000, 1200)
    assert img.std() > 20, "the screenshot is blank"
    # the large PASS and the cover's border are drawn in the verdict colour
    assert _pixels_near(img, PASS_RGB) > 2000
    assert _pixels_near(img, FAIL_RGB) < 200, "a verified PASS report shows no red banner"
    dom = _dom(written.html, tmp_path)
    assert dom["verdict"] == "PASS"
    assert dom["model-name"] == cert.body["model"]["name"]
    assert dom["digest"] == cert.digest
    for section in SECTIONS:
        assert section in dom, f"section {section} missing"
    assert "not-verified" not in dom
    assert dom["verification"].startswith("verified when this report was rendered")
    assert dom["signature-kid"] == cert.signature["kid"]
    for chart in ("chart-per-class-recall", "chart-robustness-curve",
                  "chart-vulnerable-examples", "chart-failure-rate"):
        assert chart in dom, f"{chart} missing"
    assert not [k for k in dom if k.startswith("per-point-note")]
    html = written.html.read_text()
    assert html.count("<svg") == 4
    assert "Prepared by" in dom["approvals"]
    assert "Approved by" in dom["approvals"]
    assert "white-box" in dom["threat-model"]
    assert "ε = 0.05, ε = 0.1" in dom["threat-model"]


def test_pdf_pages_text_and_attached_certificate(cert, written, tmp_path):
    assert written.pdf == written.html.with_name("report.pdf")
    info = _run([_tool("pdfinfo"), str(written.pdf)], text=True).stdout
    pages = int(next(ln.split()[-1] for ln in info.splitlines() if ln.startswith("Pages:")))
    assert "A4" in info
    assert pages > 1
    _run([_tool("pdftoppm"), "-png", "-r", "50", str(written.pdf), str(tmp_path / "page")])
    pngs = sorted(tmp_path.glob("page-*.png"))
    assert len(pngs) == pages
    first = np.asarray(Image.open(pngs[0]).convert("RGB"), dtype=np.int16)
    assert first.std() > 20
    assert _pixels_near(first, PASS_RGB) > 100
    text = _run([_tool("pdftotext"), "-layout", str(written.pdf), "-"], text=True).stdout
    per_page = text.split("\f")
    assert "PASS" in per_page[0]
    assert cert.body["model"]["name"] in per_page[0]
    for i in range(1, pages + 1):  # the running header and "Page X of Y" on every page
        assert f"Page {i} of {pages}" in per_page[i - 1]
        assert f"robust_cert report {cert.digest[:12]}" in per_page[i - 1]
    assert "Prepared by" in text
    assert cert.digest in text.replace("\n", "")
    meta = _run([_tool("pdfinfo"), "-meta", str(written.pdf)], text=True).stdout
    assert 'pdfaid:part="3"' in meta
    assert 'pdfaid:conformance="B"' in meta
    attached = tmp_path / "attached"
    attached.mkdir()
    _run([_tool("pdfdetach"), "-saveall", "-o", str(attached), str(written.pdf)])
    assert [p.name for p in attached.iterdir()] == ["certificate.json"]
    data = (attached / "certificate.json").read_bytes()
    assert data == cert.to_json().encode()
    assert Certificate.from_json(data.decode()).digest == cert.digest


def test_same_certificate_same_bytes(cert, written, tmp_path):
    again = write_report(cert, tmp_path, pdf="required",
                         verification=verify_certificate_file(cert, Keyring.from_env()),
                         data=load_data("digits"))
    assert again.html.read_text() == written.html.read_text()
    assert (hashlib.sha256(again.pdf.read_bytes()).hexdigest()
            == hashlib.sha256(written.pdf.read_bytes()).hexdigest())


def _without_weasyprint(monkeypatch, error: Exception) -> None:
    """Make ``import weasyprint`` fail as it does without the package or its libraries."""
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "weasyprint" or name.startswith("weasyprint."):
            raise error
        return real(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "weasyprint" or m.startswith("weasyprint.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", fake)


def test_pdf_required_without_engine_names_the_install_command(cert, tmp_path, monkeypatch,
                                                               capsys, caplog):
    path = cert.save(tmp_path / "certificate.json")
    _without_weasyprint(monkeypatch, OSError("cannot load library 'libpango-1.0-0'"))
    apt = "apt-get install -y libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0"
    with pytest.raises(PdfUnavailable, match=apt):
        write_report(cert, tmp_path / "lib", pdf="required")
    assert not (tmp_path / "lib").exists()  # required: nothing written
    capsys.readouterr()
    assert main(["report", str(path), "--out", str(tmp_path / "cli"), "--pdf", "required"]) == 2
    err = capsys.readouterr().err
    assert apt in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()
    # auto: the HTML alone, with a warning; off: no PDF and no warning
    assert main(["report", str(path), "--out", str(tmp_path / "auto"), "--pdf", "auto"]) == 0
    assert "report.pdf skipped" in caplog.text
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == ["report.html"]
    files = write_report(cert, tmp_path / "off", pdf="off")
    assert files.pdf is None
    assert files.pdf_skipped == "off"
    _without_weasyprint(monkeypatch, ModuleNotFoundError("No module named 'weasyprint'"))
    with pytest.raises(PdfUnavailable, match=r"-m pip install weasyprint"):
        write_report(cert, tmp_path / "nopkg", pdf="required")


def test_unwritable_pdf_is_a_clear_error(cert, tmp_path):
    (tmp_path / "report.pdf").mkdir()  # the PDF's place is taken by a directory
    with pytest.raises(robust_cert.RobustCertError, match="cannot write the report into"):
        write_report(cert, tmp_path, pdf="required")


def test_not_verified_banner_and_strict_refusal(cert, tmp_path, monkeypatch, capsys):
    unsigned = Certificate(body=cert.body).save(tmp_path / "unsigned.json")
    forged = Certificate(body={**cert.body, "seed": 99}, signature=cert.signature)
    forged = forged.save(tmp_path / "forged.json")
    signed = cert.save(tmp_path / "signed.json")
    cases = [(unsigned, "not signed"), (forged, "covers another certificate")]
    for path, reason in cases:
        out = tmp_path / f"out-{path.stem}"
        assert main(["report", str(path), "--out", str(out), "--pdf", "off"]) == 0
        err = capsys.readouterr().err
        assert "NOT VERIFIED" in err
        assert reason in err
        dom = _dom(out / "report.html", tmp_path)
        assert dom["not-verified"].startswith("NOT VERIFIED")
        assert reason in dom["not-verified"]
        assert reason in dom["verification"]
        assert main(["report", str(path), "--out", str(tmp_path / "strict"), "--strict"]) == 2
        err = capsys.readouterr().err
        assert "NOT VERIFIED" in err
        assert reason in err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "strict").exists()
    img = _screenshot(tmp_path / "out-forged" / "report.html", tmp_path)
    assert _pixels_near(img, FAIL_RGB) > 5000, "the NOT VERIFIED banner is not visible"
    # a signed certificate cannot be checked without the key: rendered NOT VERIFIED
    monkeypatch.delenv("ROBUST_CERT_SIGNING_KEY")
    monkeypatch.delenv("ROBUST_CERT_SIGNING_KEY_FILE", raising=False)
    assert main(["report", str(signed), "--out", str(tmp_path / "nokey"), "--pdf", "off"]) == 0
    assert "no signing key" in (tmp_path / "nokey" / "report.html").read_text()
    assert main(["report", str(signed), "--out", str(tmp_path / "s"), "--strict"]) == 2


def test_rerendered_from_json_omits_only_per_point_figures(cert, tmp_path, capsys):
    path = cert.save(tmp_path / "certificate.json")
    assert main(["report", str(path), "--out", str(tmp_path / "r"), "--strict"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "r" / "report.html"), str(tmp_path / "r" / "report.pdf")]
    html = (tmp_path / "r" / "report.html").read_text()
    assert 'id="not-verified"' not in html
    assert 'id="chart-vulnerable-examples"' not in html
    assert 'id="per-point-note-robust_accuracy"' in html
    assert html.count('class="note per-point-note"') == 1
    for chart in ("chart-per-class-recall", "chart-robustness-curve", "chart-failure-rate"):
        assert f'id="{chart}"' in html
    text = _run([_tool("pdftotext"), str(tmp_path / "r" / "report.pdf"), "-"]).stdout.decode()
    assert "PASS" in text
    assert "NOT VERIFIED" not in text


def test_charts_are_deterministic_svg(cert):
    """Same bytes every time, whatever matplotlib style the caller has set."""
    inputs = ChartInputs(cert.body, cert.per_point)
    first = [c.svg for c in charts_for("robust_accuracy", inputs)]
    with matplotlib.rc_context({"font.size": 20, "axes.grid": False, "lines.linewidth": 5}):
        second = [c.svg for c in charts_for("robust_accuracy", inputs)]
        assert matplotlib.rcParams["font.size"] == 20  # the caller's style is left alone
    assert first == second
    assert first[0].startswith("<svg")
    assert "<dc:date>" not in first[0]
    assert charts_for("a_metric_without_charts", inputs) == []


# --------------------------------------------------------------------------- the other families

#: Small budgets: 40 digits, every family with a chart of its own beyond those of POLICY.
CHART_POLICY = {
    "name": "report-charts", "version": "1", "confidence": 0.95,
    "metrics": {
        "accuracy": {},
        "robust_accuracy": {"eps": [0.05, 0.1], "attacks": ["fgsm"]},
        "randomized_smoothing": {"sigma": 0.25, "n0": 10, "n": 100,
                                 "radii": [0.0, 0.1, 0.2, 0.3]},
        "analytical_robustness": {"sigma": 0.1, "estimators": ["mvs"], "primary": "mvs",
                                  "validate_points": 0},
        "safe_radius": {"norms": ["l2", "linf"], "clever_batches": 2, "clever_samples": 5,
                        "bisection_steps": 3, "attack_steps": 5},
        "divergence": {"eps": [0.1], "steps": 3, "restarts": 0, "surface_grid": 11},
    },
    "requirements": [{"metric": "randomized_smoothing", "radius": 0.1, "at_least": 0.5}],
}
#: The charts each family adds, by element id.
NEW_CHARTS = {
    "randomized_smoothing": ["chart-certified-accuracy"],
    "analytical_robustness": ["chart-p-sigma"],
    "safe_radius": ["chart-safe-radius-l2", "chart-safe-radius-linf"],
    "divergence": ["chart-decision-surfaces"],
}


@pytest.fixture(scope="module")
def digits40():
    x, y = digits_split("test")
    return load_data((x[:40], y[:40]))


@pytest.fixture(scope="module")
def charts_cert(digits_model, digits40):
    return robust_cert.certify(digits_model, digits40, CHART_POLICY, progress=False)


def _section(html: str, metric: str) -> str | None:
    """The HTML of one metric's section, or None when the report has none."""
    start = html.find(f'<section class="metric" id="metric-{metric}">')
    return None if start < 0 else html[start:html.index("</section>", start)]


def test_each_family_draws_its_charts_in_its_section(charts_cert, digits40, tmp_path):
    html = render_html(charts_cert, data=digits40)
    for metric, ids in NEW_CHARTS.items():
        section = _section(html, metric)
        assert section is not None, metric
        for chart in ids:
            assert f'<figure class="chart" id="{chart}">' in section, chart
        assert section.count("<svg") == len(ids)
    assert "per-point-note" not in html
    # the vulnerable examples now show the adversarial input next to the clean one
    examples = _section(html, "robust_accuracy")
    assert 'id="chart-vulnerable-examples"' in examples
    assert "the adversarial input that broke it" in examples
    page = tmp_path / "report.html"
    page.write_text(html)
    dom = _dom(page, tmp_path)
    for chart in [c for ids in NEW_CHARTS.values() for c in ids]:
        assert chart in dom, f"{chart} missing in Chromium's DOM"
    img = _screenshot(page, tmp_path)
    assert img.std() > 20, "the screenshot is blank"


def test_adversarial_examples_are_kept_for_a_few_broken_points(charts_cert, digits40):
    pp = charts_cert.per_point
    index, adv = pp["robust_accuracy/example_index"], pp["robust_accuracy/example_adv"]
    pred, eps = pp["robust_accuracy/example_pred"], pp["robust_accuracy/example_eps"]
    assert 0 < len(index) <= 8
    assert adv.shape == (len(index), *digits40.input_shape)
    assert adv.dtype == np.float32
    x, y = digits40.x.numpy()[index], digits40.y.numpy()[index]
    assert (pred != y).all()  # each example broke its point
    assert (np.abs(adv - x).reshape(len(index), -1).max(1) <= eps + 1e-6).all()
    assert adv.min() >= 0
    assert adv.max() <= 1
    robust = pp["robust_accuracy/robust"]
    first = np.array(CHART_POLICY["metrics"]["robust_accuracy"]["eps"])[
        (~robust[index]).argmax(1)]
    np.testing.assert_array_equal(eps, first)  # kept at the smallest ε that broke it
    assert (np.diff(eps) >= 0).all()  # ordered by ε, then index
    assert all(np.diff(index[eps == e]).min(initial=1) > 0 for e in set(eps))


def test_families_that_did_not_run_draw_nothing(written):
    html = written.html.read_text()
    for metric, ids in NEW_CHARTS.items():
        assert _section(html, metric) is None
        for chart in ids:
            assert f'id="{chart}"' not in html


def test_rerendered_from_json_keeps_the_charts_the_json_allows(charts_cert):
    """The certified-accuracy curve and the decision surfaces come from the certificate JSON;
    the p_σ histogram and the safe-radius sandwich need the per-point arrays."""
    again = Certificate.from_json(charts_cert.to_json())
    html = render_html(again)
    assert 'id="chart-certified-accuracy"' in _section(html, "randomized_smoothing")
    assert 'id="chart-decision-surfaces"' in _section(html, "divergence")
    for metric in ("analytical_robustness", "safe_radius"):
        section = _section(html, metric)
        assert "<svg" not in section
        assert f'id="per-point-note-{metric}"' in section
    assert 'id="per-point-note-robust_accuracy"' in html
    # in memory without the evaluation inputs: only the pictures of test points are left out
    inputs = ChartInputs(charts_cert.body, charts_cert.per_point)
    assert omitted_for("robust_accuracy", inputs) == ["Most vulnerable test points"]
    assert omitted_for("safe_radius", inputs) == omitted_for("analytical_robustness",
                                                             inputs) == []
    assert [c.id for c in charts_for("safe_radius", inputs)] == NEW_CHARTS["safe_radius"]


@pytest.mark.parametrize("metric", [*NEW_CHARTS, "robust_accuracy"])
def test_new_charts_are_deterministic_svg(charts_cert, digits40, metric):
    x, y = digits40.x.numpy(), digits40.y.numpy()
    inputs = ChartInputs(charts_cert.body, charts_cert.per_point, x, y)
    first = [c.svg for c in charts_for(metric, inputs)]
    with matplotlib.rc_context({"font.size": 20, "axes.grid": False, "image.cmap": "jet"}):
        second = [c.svg for c in charts_for(metric, inputs)]
    assert first
    assert first == second
    assert all(s.startswith("<svg") and "<dc:date>" not in s for s in first)
