"""Packaging (templates inside the wheel) and the CLI commands that need no server."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

import robust_cert
from robust_cert.certificate import Certificate
from robust_cert.cli import build_parser, main
from robust_cert.report import render_html, templates_dir
from robust_cert.signing import Keyring
from robust_cert.verification import verify_certificate_file
from tests.conftest import DIGITS_POLICY, REPO


def test_templates_found_in_checkout():
    assert templates_dir() == REPO / "templates"


def test_wheel_ships_templates_and_finds_them_installed(tmp_path):
    """Build the wheel, install it into a bare directory, and find the templates there."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(REPO)], check=True)
    (wheel,) = (tmp_path / "dist").glob("robust_cert-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "robust_cert/templates/report.html.j2" in names
    assert "robust_cert/templates/report.css" in names
    assert {"robust_cert/policies/digits.yaml", "robust_cert/policies/digits-onnx.yaml"} <= \
        set(names)  # the demo's default policies
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    code = ("from robust_cert.report import templates_dir; print(templates_dir())\n"
            "from robust_cert.policy import example_policy; print(example_policy('digits.yaml'))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(target)},
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(target / "robust_cert" / "templates"),
                           str(target / "robust_cert" / "policies" / "digits.yaml")]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("certify", "demo", "policy", "report", "Exit codes"):
        assert word in out


def test_policy_command(capsys, tmp_path):
    assert main(["policy", str(DIGITS_POLICY)]) == 0
    out = capsys.readouterr().out
    assert robust_cert.load_policy(DIGITS_POLICY).sha256 in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nconfidence: 2\nmetrics: {accuracy: {}}\n"
                   "requirements: [{metric: accuracy, at_least: 0.5}]\n")
    assert main(["policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "confidence" in err
    assert err.startswith("robust-cert: error:")


def test_report_rerenders_from_certificate(digits_model, tmp_path, capsys):
    policy = {"name": "tiny", "metrics": {"accuracy": {}},
              "requirements": [{"metric": "accuracy", "at_least": 0.5}]}
    cert = robust_cert.certify(digits_model, "digits", policy, progress=False)
    path = cert.save(tmp_path / "certificate.json")
    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    # the command checks the signature (this certificate is unsigned: NOT VERIFIED banner)
    check = verify_certificate_file(Certificate.load(path), Keyring.from_env())
    assert html == render_html(cert, verification=check)
    assert 'id="not-verified"' in html
    assert 'id="verdict">PASS<' in html
    # a tampered certificate is refused with a one-line error, and no report is written
    raw = json.loads(path.read_text())
    raw["certificate"]["verdict"] = "FAIL"
    path.write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["report", str(path), "--out", str(tmp_path / "t")]) == 2
    assert "altered" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_unwritable_report_directory(digits_model, tmp_path):
    policy = {"name": "tiny", "metrics": {"accuracy": {}},
              "requirements": [{"metric": "accuracy", "at_least": 0.5}]}
    cert = robust_cert.certify(digits_model, "digits", policy, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    from robust_cert.report import write_report

    with pytest.raises(robust_cert.RobustCertError, match="cannot write the report"):
        write_report(cert, blocker / "sub")
