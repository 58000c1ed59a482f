"""The report as a person sees it: the HTML in headless Chromium, the PDF printed to PNG.

These tests need chromium and poppler-utils (pdftoppm, pdftotext, pdfdetach, pdfinfo) and
WeasyPrint's system libraries; `make test` run as root installs them (.ci/system-packages).
A missing tool fails the test with that instruction rather than skipping it.
"""

from __future__ import annotations

import builtins
import hashlib
import re
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
from robust_cert.mlflow_plugin.tracking import claim_for
from robust_cert.report import PdfUnavailable, write_report
from robust_cert.report.charts import (
    EXAMPLE_TITLE_PT,
    PRINT_WIDTH_IN,
    ChartInputs,
    charts_for,
    omitted_for,
)
from robust_cert.report.html import render_html
from robust_cert.report.present import fixed, interval
from robust_cert.signing import Keyring, sign_claim, signature_block, verify_claim
from robust_cert.verification import verify_certificate_file

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
        {"metric": "probabilistic_robustness", "eps": 0.1, "at_most": 0.1},  # bound ~5% here
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
    name = c.body["model"]["name"]
    keyring = Keyring.from_env()
    token = sign_claim(claim_for(c, name, "7", "run-for-report-tests"), keyring)
    c.signature = signature_block(token, verify_claim(token, keyring, name=name, version=7))
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
    assert dom["signature-alg"] == "Ed25519"
    assert dom["signature-value"] == cert.signature["sig"]
    for chart in ("chart-per-class-recall", "chart-robustness-curve",
                  "chart-per-class-robust-accuracy", "chart-vulnerable-examples",
                  "chart-failure-rate"):
        assert chart in dom, f"{chart} missing"
    assert not [k for k in dom if k.startswith("per-point-note")]
    html = written.html.read_text()
    assert html.count("<svg") == 5
    assert "Prepared by" in dom["approvals"]
    assert "Approved by" in dom["approvals"]
    assert "white-box" in dom["threat-model"]
    assert "ε = 0.05, ε = 0.1" in dom["threat-model"]
    # the sanity checks as a table: each check with its result and evidence
    row = dom["sanity-row-deterministic_forward"]
    assert row.startswith("Model is deterministic at evaluation time")
    assert "deterministic_forward the model passed two forward passes" in row
    assert "passed 0 of" in dom["sanity-row-robust_accuracy-gradients_nonzero"]
    assert "not run not run: needs both Square" in dom[
        "sanity-row-robust_accuracy-square_not_better"]
    # configuration and diagnostics as labelled tables, no raw JSON, no nulls
    assert "Attacks FGSM, PGD" in dom["settings-robust_accuracy"]
    assert "Step size" not in dom["settings-robust_accuracy"]  # "step_size": null
    assert "<pre>" not in html
    assert "<details" not in html
    assert dom["command"].startswith("not recorded")
    assert dom["tracking-uri"] == "not recorded"
    assert "Digits classifier for the report tests." in dom["intended-use"]
    assert "the description of the policy report-test" in dom["intended-use"]
    # results: the bound that decided, four decimals, ids that break only between parts
    results = [dom[f"result-{i}"] for i in range(1, len(cert.requirements) + 1)]
    for row, req in zip(results, cert.requirements, strict=True):
        side = "lower" if req["direction"] == "at_least" else "upper"
        # four decimals; a value below 0.001 in scientific notation (present.fixed)
        assert f"{side} {fixed(req['bound'])}" in row
        assert interval(req["ci"]) in row
    assert "probabilistic_<wbr>robustness<wbr>[eps=0.1]" in html

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
    # the sanity checks print (they were hidden from print before) with their results
    assert "Sanity checks" in text
    raw = _run([_tool("pdftotext"), str(written.pdf), "-"], text=True).stdout
    flat = " ".join(raw.split())
    for check in ("deterministic_forward", "in_range_and_ball", "gradients_nonzero",
                  "square_not_better"):
        assert check in flat
    assert "passed" in flat
    assert "not run: needs both Square" in flat
    assert "Attack iterations" in flat  # the configuration, labelled, printed
    assert "Square query budget" in flat
    # no requirement id is broken inside a word: only at "_" or before "["
    allowed = {"probabilistic_", "probabilistic_robustness",
               "probabilistic_robustness[eps=0.1]"}
    tokens = [t for t in text.split() if t.startswith("probabilistic")]
    assert tokens
    assert set(tokens) <= allowed, tokens
    # the PDF names the SHA-256 of the HTML it was printed from (a file cannot name its own)
    html_sha = hashlib.sha256(written.html.read_bytes()).hexdigest()
    assert "report.html with SHA-256" in flat
    assert html_sha in "".join(text.split())
    # nothing runs off the printed page (A4: 595 pt wide, 16 mm margins)
    boxes = _run([_tool("pdftotext"), "-bbox", str(written.pdf), "-"], text=True).stdout
    words = re.findall(r'xMax="([0-9.]+)"[^>]*>([^<]*)</word>', boxes)
    assert words
    outside = [w for x, w in words if float(x) > 595.3 - 16 / 25.4 * 72 + 1]
    assert not outside, outside
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
    # in memory without the evaluation data: only the figures that need its labels or
    # pictures of test points are left out
    inputs = ChartInputs(charts_cert.body, charts_cert.per_point)
    assert omitted_for("robust_accuracy", inputs) == ["Robust accuracy per class",
                                                      "Most vulnerable test points"]
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


# --------------------------------------------------------------------------- PDF/A-3b structure


def test_pdf_is_structurally_pdf_a_3b(cert, written):
    """What veraPDF would look at first, read with pikepdf: the XMP identification, the
    output intent with its ICC profile, and the certificate as an associated file."""
    pikepdf = pytest.importorskip("pikepdf", reason="pip install -e .[dev] installs pikepdf")
    with pikepdf.open(written.pdf) as pdf:
        meta = pdf.open_metadata()
        assert str(meta.get("pdfaid:part")) == "3"
        assert str(meta.get("pdfaid:conformance")) == "B"
        intents = pdf.Root.OutputIntents
        assert len(intents) >= 1
        intent = intents[0]
        assert intent.S == pikepdf.Name.GTS_PDFA1
        profile = intent.DestOutputProfile
        assert int(profile.N) == 3
        icc = profile.read_bytes()
        assert icc[36:40] == b"acsp"  # the ICC profile signature
        files = pdf.attachments
        assert list(files) == ["certificate.json"]
        spec = files["certificate.json"].obj
        assert spec.AFRelationship == pikepdf.Name.Source
        assert files["certificate.json"].get_file().read_bytes() == cert.to_json().encode()
        af = pdf.Root.AF
        assert any(f.objgen == spec.objgen for f in af), "the certificate is not in /AF"


# --------------------------------------------------------------------------- chart legibility


def _svg_texts(svg: str) -> list[str]:
    """The text drawn in a matplotlib SVG (glyphs are paths; each text is in a comment)."""
    return re.findall(r"<!-- (.*?) -->", svg)


def _svg_width_in(svg: str) -> float:
    return float(re.search(r'<svg[^>]* width="([0-9.]+)pt"', svg)[1]) / 72


def test_per_class_axes_are_fixed_and_the_examples_print_legibly(cert, charts_cert, digits40):
    x, y = load_data("digits").x.numpy(), load_data("digits").y.numpy()
    big = {c.id: c for c in charts_for("robust_accuracy", ChartInputs(
        cert.body, cert.per_point, x, y)) + charts_for("accuracy", ChartInputs(cert.body, {}))}
    small = {c.id: c for c in charts_for("robust_accuracy", ChartInputs(
        charts_cert.body, charts_cert.per_point, digits40.x.numpy(), digits40.y.numpy()))
        + charts_for("accuracy", ChartInputs(charts_cert.body, {}))}
    ticks = ["0%", "20%", "40%", "60%", "80%", "100%"]
    for chart in ("chart-per-class-recall", "chart-per-class-robust-accuracy"):
        for charts in (big, small):  # two certificates, the same y axis
            texts = _svg_texts(charts[chart].svg)
            assert [t for t in texts if t.endswith("%") and t[:-1].isdigit()] == ticks, chart
    legend = _svg_texts(big["chart-per-class-robust-accuracy"].svg)
    assert "ε = 0.05" in legend
    assert "ε = 0.1" in legend
    # the examples' captions: 7.5 pt, in a figure no wider than the printed page
    examples = big["chart-vulnerable-examples"].svg
    width = _svg_width_in(examples)
    assert EXAMPLE_TITLE_PT * min(1.0, PRINT_WIDTH_IN / width) >= 7.0, width
    assert any(t.endswith(" clean") for t in _svg_texts(examples))
    # every chart fits the printed width, so none is scaled below its set font sizes
    for c in [*big.values(), *small.values()]:
        assert _svg_width_in(c.svg) <= PRINT_WIDTH_IN, c.id


def test_robustness_curve_draws_every_radius():
    """Curves draw each ε the certificate has (here 4 and clean accuracy at ε = 0)."""
    from robust_cert.report.charts import robustness_curve

    eps = [0.025, 0.05, 0.075, 0.1]
    est = [0.9, 0.8, 0.6, 0.4]
    body = {"policy": {"confidence": 0.95}, "requirements": [], "results": [
        {"metric": "accuracy", "status": "ok", "values": [
            {"params": {}, "estimate": 0.97, "ci": [0.95, 0.98]}]},
        {"metric": "robust_accuracy", "status": "ok", "config": {"attacks": ["pgd"]},
         "values": [{"params": {"eps": e}, "estimate": v, "ci": [v - 0.05, v + 0.05]}
                    for e, v in zip(eps, est, strict=True)]}]}
    chart = robustness_curve(ChartInputs(body, {}))
    labels = [t for t in _svg_texts(chart.svg) if re.fullmatch(r"\d+\.\d%", t)]
    assert labels == ["97.0%", "90.0%", "80.0%", "60.0%", "40.0%"]


def test_a_failed_sanity_check_is_a_red_row_with_what_it_did(cert, tmp_path):
    """A certificate whose gradient check failed (recorded as the three-state records do):
    the row says failed, why, and which requirement it made INCONCLUSIVE; legacy booleans in
    the metric's diagnostics still show as passed/failed."""
    import copy

    body = copy.deepcopy(cert.body)
    for rec in body["sanity"]["checks"]:
        if rec["check"] == "gradients_nonzero":
            rec.update(state="failed", action="inconclusive",
                       detail="gradient masking suspected: 40 of 355 points have an exactly "
                              "zero input gradient (limit 5%)",
                       made_inconclusive=["robust_accuracy[eps=0.05]"])
    body["sanity"]["checks"] = [r for r in body["sanity"]["checks"]
                                if r["check"] != "in_range_and_ball"]
    for res in body["results"]:
        if res["metric"] == "robust_accuracy":
            res["diagnostics"]["sanity"]["in_range_and_ball"] = False  # a legacy boolean
    page = tmp_path / "report.html"
    page.write_text(render_html(Certificate(body=body)))
    dom = _dom(page, tmp_path)
    row = dom["sanity-row-robust_accuracy-gradients_nonzero"]
    assert "failed gradient masking suspected: 40 of 355 points" in row
    assert row.endswith("made INCONCLUSIVE: robust_accuracy[eps=0.05]")
    assert " failed 0 attack outputs outside" in dom["sanity-row-robust_accuracy-in_range_and_ball"]
    img = _screenshot(page, tmp_path)
    assert img.std() > 20
    html = page.read_text()
    assert html.count('class="sanity-failed"') == 2
