"""Bad input gets one line naming the problem, exit code 2, and leaves nothing behind.

Each case here was a traceback, a wrong exit code, or a half-written run before; see issue 11.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert.cli import main
from tests.conftest import DIGITS_POLICY, REPO

MODEL = "digits-cnn"


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    # MLflow's own INFO lines when it creates a local sqlite store are not ours
    err = "\n".join(ln for ln in err.splitlines() if " INFO mlflow." not in ln)
    assert err.startswith("robust-cert: error:"), err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _tiny_policy(**metrics) -> dict:
    return {"name": "tiny", "metrics": {"accuracy": {}, **metrics},
            "requirements": [{"metric": "accuracy", "at_least": 0.5}]}


# --- no server needed ---------------------------------------------------------------------

def test_non_utf8_policy_names_the_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\nmetrics: {accuracy: {}}\n".encode("latin-1"))
    assert main(["policy", str(path)]) == 2
    _one_line_error(capsys, "latin1.yaml:1", "not UTF-8")


def test_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmetrics: {accuracy: {}\nrequirements: [\n")
    assert main(["policy", str(path)]) == 2
    _one_line_error(capsys, "broken.yaml: not valid YAML: line 3, column 1")


def test_policy_none_in_the_api():
    with pytest.raises(robust_cert.PolicyError, match="policy must be a YAML path, a dict or "
                                                       "a Policy, got NoneType"):
        robust_cert.certify(nn.Linear(64, 10), "digits", None, progress=False)


def test_eps_larger_than_the_input_range_is_refused(digits_model):
    policy = _tiny_policy(robust_accuracy={"eps": [0.1, 1.5], "attacks": ["fgsm"]})
    with pytest.raises(robust_cert.PolicyError, match=r"metrics.robust_accuracy.eps: ε = 1.5 "
                                                       r"is larger than the input range"):
        robust_cert.certify(digits_model, "digits", policy, progress=False)
    # an L2 ball may exceed the L∞ width, up to the range's diagonal (8 for 64 pixels in [0,1])
    ok = _tiny_policy(robust_accuracy={"eps": [1.5], "norm": "l2", "attacks": ["pgd"],
                                       "steps": 1})
    robust_cert.api.check_radii(robust_cert.load_policy(ok),
                                robust_cert.load_data("digits"))
    far = _tiny_policy(robust_accuracy={"eps": [8.5], "norm": "l2", "attacks": ["pgd"]})
    with pytest.raises(robust_cert.PolicyError, match="L2 diagonal 8"):
        robust_cert.api.check_radii(robust_cert.load_policy(far),
                                    robust_cert.load_data("digits"))


def test_unknown_device():
    with pytest.raises(robust_cert.RobustCertError, match="unknown device 'tpu9'"):
        robust_cert.load_model(nn.Linear(4, 2), input_shape=(4,), device="tpu9")
    with pytest.raises(robust_cert.RobustCertError, match="not supported"):
        robust_cert.load_model(nn.Linear(4, 2), input_shape=(4,), device="meta")


def test_unsupported_tracking_uri(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["certify", "models:/m/1", "--policy", str(DIGITS_POLICY),
                 "--tracking-uri", "foo://bar"]) == 2
    _one_line_error(capsys, "unsupported MLflow tracking URI 'foo://bar'")
    assert list(tmp_path.iterdir()) == []  # no stray mlflow.db or report folder


class _Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class _FailsOnLargeBatches(nn.Module):
    """Works for small batches (so the load-time probe passes), raises on large ones."""

    def forward(self, x):
        if x.shape[0] > 32:
            raise RuntimeError(f"batch of {x.shape[0]} is too large for this layer")
        return x


class _FailsOnRealData(nn.Module):
    """Fine on the all-zero probe input, raises on any bright pixel."""

    def forward(self, x):
        if bool((x > 0.9).any()):
            raise ValueError("saturated input")
        return x


@pytest.mark.parametrize(("layer", "needle"), [
    (_FailsOnLargeBatches(), r"layer 'guard' \(_FailsOnLargeBatches\) on an input of shape "
                             r"\(\d+, 64\): RuntimeError: batch of \d+ is too large"),
    (_FailsOnRealData(), r"layer 'guard' \(_FailsOnRealData\) on an input of shape "
                         r"\(\d+, 64\): ValueError: saturated input"),
])
def test_a_model_that_raises_names_the_layer_and_shape(layer, needle):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("flat", _Flatten())
    model.add_module("guard", layer)
    model.add_module("head", nn.Linear(64, 10))
    with pytest.raises(robust_cert.ModelError,
                       match=r"^the first forward passes: the model raised in " + needle):
        robust_cert.certify(model, "digits", _tiny_policy(), progress=False)
    assert model.training  # the model's mode is left as it was


def test_help_does_not_import_torch():
    code = "import sys, robust_cert.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.strip() == "False"
    # and the public names still resolve on first use
    assert robust_cert.certify is robust_cert.api.certify
    assert "certify" in dir(robust_cert)


def test_policy_help_has_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["policy", "--help"])
    out = capsys.readouterr().out
    assert "canonical JSON" in out
    assert "Exit 0 when" in " ".join(out.split())


# --- against the shared MLflow server -----------------------------------------------------

def _state(client):
    """Every run (with status) and every robust_cert tag of the demo's versions."""
    runs = {r.info.run_id: r.info.status
            for exp in client.search_experiments()
            for r in client.search_runs([exp.experiment_id])}
    tags = {mv.version: {k: v for k, v in mv.tags.items() if k.startswith("robust_cert.")}
            for mv in client.search_model_versions(f"name='{MODEL}'")}
    return runs, tags


@pytest.mark.integration
@pytest.mark.parametrize("argv", [
    ["verify", f"models:/{MODEL}@missing"],
    ["compare", "no-such-model", "--versions", "1", "2"],
    ["compare", "no-such-model"],
    ["compare", MODEL, "--versions", "1", "9"],
    ["compare", MODEL, "--versions", "1", "2", "--baseline", "9"],
    ["compare", MODEL, "--versions", "1", "2", "--confidence", "1.5"],
    ["compare", MODEL, "--versions", "1", "1"],
    ["compare", MODEL, "--versions", "1", "x"],
    ["compare", MODEL, "--versions", "1", "²"],
])
def test_registry_lookups_fail_in_one_line(demo, client, argv, capsys, tmp_path):
    before = _state(client)
    capsys.readouterr()
    assert main([*argv, "--tracking-uri", demo[0]]) == 2
    _one_line_error(capsys)
    assert _state(client) == before


@pytest.mark.integration
def test_output_directory_is_checked_before_any_run(demo, client, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    before = _state(client)
    capsys.readouterr()
    for out in (blocker, blocker / "sub"):
        assert main(["certify", f"models:/{MODEL}/1", "--policy", str(DIGITS_POLICY),
                     "--tracking-uri", demo[0], "--out", str(out), "--no-progress"]) == 2
        _one_line_error(capsys, "--out")
    assert _state(client) == before


@pytest.mark.integration
def test_compare_reads_old_to_new(demo, client, tmp_path, capsys):
    capsys.readouterr()
    assert main(["compare", MODEL, "--versions", "1", "2", "--baseline", "2",
                 "--tracking-uri", demo[0], "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "v1 -> v2 (baseline v2):" in out
    line = next(ln for ln in out.splitlines() if "robust_accuracy.eps_0.1" in ln)
    old, new = (float(v) for v in line.split()[1:4:2])
    # version 2 (adversarial training) is the more robust one, and reads as the newer value
    assert new > old
    assert "v2 significantly better" in line
    assert np.isfinite([old, new]).all()


def test_report_rerendered_with_its_data_keeps_the_example_figures(digits_model, tmp_path,
                                                                   capsys):
    policy = _tiny_policy(robust_accuracy={"eps": [0.1], "attacks": ["fgsm"]})
    cert = robust_cert.certify(digits_model, "digits", policy, progress=False)
    path = cert.save(tmp_path / "certificate.json")
    assert main(["report", str(path), "--out", str(tmp_path / "bare"), "--pdf", "off"]) == 0
    cert.save_per_point(tmp_path / "per_point.npz")  # as the run's artifact, beside it
    assert main(["report", str(path), "--out", str(tmp_path / "full"), "--pdf", "off",
                 "--data", "digits"]) == 0
    bare = (tmp_path / "bare" / "report.html").read_text()
    full = (tmp_path / "full" / "report.html").read_text()
    assert "chart-vulnerable-examples" in full  # the clean/adversarial example images
    assert "chart-vulnerable-examples" not in bare
    # other data than the certified data is refused, and nothing is written
    other = tmp_path / "other.npz"
    x, y = robust_cert.load_data("digits").x.numpy(), robust_cert.load_data("digits").y.numpy()
    np.savez(other, x=x[:50], y=y[:50])
    capsys.readouterr()
    assert main(["report", str(path), "--out", str(tmp_path / "wrong"), "--pdf", "off",
                 "--data", str(other)]) == 2
    _one_line_error(capsys, "not the certified data")
    assert not (tmp_path / "wrong").exists()


def test_no_progress_bar_when_stderr_is_not_a_terminal(digits_model, capfd):
    """Progress bars are for terminals: in logs and CI (stderr not a TTY) they stay silent."""
    robust_cert.certify(digits_model, "digits", _tiny_policy(), progress=True)
    err = capfd.readouterr().err
    assert "pt/s" not in err
    assert "\r" not in err


def test_serve_on_a_busy_port_leaves_nothing(tmp_path, monkeypatch, capsys):
    import socket

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", "s3cret")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--policy", str(DIGITS_POLICY), "--port", str(port),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    _one_line_error(capsys, f"cannot listen on 127.0.0.1:{port}")
    assert not list(tmp_path.glob("robust_cert_jobs*"))


def test_serve_register_names_the_server_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", "s3cret")
    assert main(["serve", "--policy", str(DIGITS_POLICY), "--port", "0",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 "--register", "http://127.0.0.1:8765/webhook"]) == 2
    _one_line_error(capsys, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https",
                    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true")
    assert not list(tmp_path.glob("robust_cert_jobs*"))


@pytest.mark.integration
def test_no_key_does_not_silently_withdraw_a_signed_certificate(demo, client, monkeypatch,
                                                                 tmp_path, capsys):
    from robust_cert.signing import KEY_ENV, KEY_FILE_ENV

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert client.get_model_version(MODEL, "2").tags.get("robust_cert.certificate")
    before = _state(client)
    capsys.readouterr()
    assert main(["certify", f"models:/{MODEL}/2", "--policy", str(DIGITS_POLICY),
                 "--tracking-uri", demo[0], "--out", str(tmp_path), "--no-progress"]) == 2
    _one_line_error(capsys, "holds a signed certificate", "--unsigned")
    assert _state(client) == before
