"""The registry gate in a real `mlflow server` (registry store robustcert+sqlite://)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from robust_cert.cli import main
from robust_cert.mlflow_plugin.names import CERT_TAG
from robust_cert.signing import Keyring, generate_private_key_pem, sign_claim, verify_claim
from tests.conftest import DIGITS_POLICY

pytestmark = pytest.mark.integration
MODEL = "digits-cnn"


def _refused(fn, *args, match: str):
    with pytest.raises(MlflowException) as exc:
        fn(*args)
    assert exc.value.error_code == "PERMISSION_DENIED", exc.value.message
    assert match in exc.value.message
    return exc.value.message


def _rest(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _register(client, server_url: str, name: str, **log_kw) -> str:
    import mlflow

    from robust_cert.digits_cnn import train_digits_cnn

    mlflow.set_tracking_uri(server_url)
    mlflow.set_registry_uri(server_url)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            train_digits_cnn(epochs=2), name="m", input_example=np.zeros((2, 1, 8, 8), "f4"),
            serialization_format="pickle", registered_model_name=name,
            pip_requirements=["torch"], **log_kw)
    return str(info.registered_model_version)


def test_failed_version_cannot_take_protected_alias(demo, client):
    msg = _refused(client.set_registered_model_alias, MODEL, "production", "1",
                   match="did not pass certification")
    assert "robust-cert promote" not in msg or "v1" in msg
    # aliases are compared case-insensitively
    _refused(client.set_registered_model_alias, MODEL, "Champion", "1", match="did not pass")
    _refused(client.transition_model_version_stage, MODEL, "1", "Production",
             match="did not pass")
    assert "production" not in client.get_registered_model(MODEL).aliases


def test_passing_version_is_promoted(demo, client, tmp_path):
    version = _register(client, demo[0], "passing")
    assert _certify(demo[0], "passing", version, EASY, tmp_path) == 0
    client.set_registered_model_alias("passing", "production", version)
    assert client.get_model_version_by_alias("passing", "production").version == version
    mv = client.transition_model_version_stage("passing", version, "Production")
    assert mv.current_stage == "Production"
    # unprotected aliases are not gated
    client.set_registered_model_alias(MODEL, "staging", "1")


def test_uncertified_version_is_refused(demo, client):
    version = _register(client, demo[0], "uncertified")
    _refused(client.set_registered_model_alias, "uncertified", "production", version,
             match="has no signed robust_cert certificate")


def test_forged_and_copied_certificates_are_refused(demo, client):
    v2_tag = client.get_model_version(MODEL, "2").tags[CERT_TAG]
    # another version's certificate copied onto version 1: the signature covers the version
    _refused(client.set_model_version_tag, MODEL, "1", CERT_TAG, v2_tag,
             match="does not verify for digits-cnn v1")
    # an altered claim
    fields = v2_tag.split(";")
    fields[2] = "FAIL" if fields[2] == "PASS" else "PASS"
    _refused(client.set_model_version_tag, MODEL, "2", CERT_TAG, ";".join(fields),
             match="does not verify")
    # a claim signed with a key the server does not hold
    claim = {**verify_claim(v2_tag, Keyring.from_env(), name=MODEL, version=2), "version": 1}
    forged = sign_claim(claim, Keyring.from_private_pem(generate_private_key_pem()))
    _refused(client.set_model_version_tag, MODEL, "1", CERT_TAG, forged, match="unknown key")
    _refused(client.set_model_version_tag, MODEL, "1", CERT_TAG, "not a token",
             match="malformed")
    # the old HMAC JSON form is not accepted
    _refused(client.set_model_version_tag, MODEL, "1", CERT_TAG,
             json.dumps({"claim": claim, "kid": "0" * 16, "sig": "AAAA"}), match="malformed")
    # a new version cannot come with a certificate
    mv2 = client.get_model_version(MODEL, "2")
    model_id = mv2.source.removeprefix("models:/")
    _refused(lambda: client.create_model_version(MODEL, mv2.source, mv2.run_id,
                                                 tags={CERT_TAG: v2_tag}, model_id=model_id),
             match="new or copied")


def test_certificate_is_not_copied_with_a_version(demo, client):
    with pytest.raises(MlflowException, match="new or copied version cannot come with"):
        client.copy_model_version(f"models:/{MODEL}/2", "digits-cnn-copy")


def test_raw_rest_calls_get_403(demo):
    url = demo[0]
    code, body = _rest(url, "registered-models/alias",
                       {"name": MODEL, "alias": "PRODUCTION", "version": "1"})
    assert code == 403
    assert body["error_code"] == "PERMISSION_DENIED"
    code, body = _rest(url, "model-versions/transition-stage",
                       {"name": MODEL, "version": "1", "stage": "Production",
                        "archive_existing_versions": False})
    assert code == 403
    code, body = _rest(url, "model-versions/set-tag",
                       {"name": MODEL, "version": "1", "key": CERT_TAG, "value": "{}"})
    assert code == 403
    assert "robust_cert gate" in body["message"]


def test_policy_not_allowed_for_production(demo, client, tmp_path):
    version = _register(client, demo[0], "lenient-target")
    policy = tmp_path / "lenient.yaml"
    policy.write_text("name: lenient\nmetrics: {accuracy: {}}\n"
                      "requirements: [{metric: accuracy, at_least: 0.1}]\n")
    assert main(["certify", f"models:/lenient-target/{version}", "--policy", str(policy),
                 "--tracking-uri", demo[0], "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    _refused(client.set_registered_model_alias, "lenient-target", "production", version,
             match="not allowed for production")


def test_changed_artifacts_are_refused(demo, client, mlflow_server, tmp_path):
    version = _register(client, demo[0], "tampered")
    policy = tmp_path / "allowed.yaml"  # an allowed policy name, easy to pass
    policy.write_text("name: digits-production\nmetrics: {accuracy: {}}\n"
                      "requirements: [{metric: accuracy, at_least: 0.1}]\n")
    assert main(["certify", f"models:/tampered/{version}", "--policy", str(policy),
                 "--tracking-uri", demo[0], "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    mv = client.get_model_version("tampered", version)
    model_id = mv.source.removeprefix("models:/")
    (weights,) = [p for p in (mlflow_server.root / "artifacts").rglob("model.pth")
                  if model_id in str(p)]
    weights.write_bytes(weights.read_bytes() + b"\0")
    _refused(client.set_registered_model_alias, "tampered", "production", version,
             match="no longer match")


def test_prompts_are_left_alone(demo, client):
    import mlflow

    mlflow.set_tracking_uri(demo[0])
    mlflow.set_registry_uri(demo[0])
    prompt = mlflow.genai.register_prompt(name="a-prompt", template="Classify {{image}}")
    mlflow.genai.set_prompt_alias("a-prompt", alias="production", version=prompt.version)
    assert mlflow.genai.load_prompt("prompts:/a-prompt@production").version == prompt.version


def test_promote_and_verify_commands(demo, client, tmp_path, capsys):
    url = demo[0]
    assert main(["verify", f"models:/{MODEL}/2", "--tracking-uri", url]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    cert = demo[1] / "reports" / f"{MODEL}-v2" / "certificate.json"
    assert main(["verify", str(cert)]) == 0
    # a version without a certificate: promote certifies it first, then the gate decides
    version = _register(client, url, "promote-me")
    code = main(["promote", "promote-me", version, "--alias", "champion", "--policy",
                 str(DIGITS_POLICY), "--tracking-uri", url, "--out", str(tmp_path),
                 "--no-progress"])
    status = client.get_model_version("promote-me", version).tags["robust_cert.status"]
    aliases = client.get_registered_model("promote-me").aliases
    if status == "passed":
        assert code == 0
        assert aliases.get("champion") == version
    else:
        assert code == 1
        assert "champion" not in aliases
        # promote does not even ask the server to promote a version that did not pass
        assert "not promoting" in capsys.readouterr().err


def test_gated_server_refuses_to_start_without_public_key(tmp_path):
    """`mlflow server` with the gate and no public key exits at start, naming the setting."""
    import os
    import subprocess
    import sys

    from tests.conftest import _free_port

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ROBUST_CERT_SIGNING", "ROBUST_CERT_PUBLIC"))}
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    db = tmp_path / "m.db"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
         "--port", str(_free_port()), "--workers", "1", "--backend-store-uri",
         f"sqlite:///{db}", "--registry-store-uri", f"robustcert+sqlite:///{db}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ROBUST_CERT_PUBLIC_KEYS" in proc.stderr + proc.stdout


def _certify(server: str, name: str, version: str, policy_text: str, tmp_path) -> int:
    policy = tmp_path / f"policy-{abs(hash(policy_text))}.yaml"
    policy.write_text(policy_text)
    return main(["certify", f"models:/{name}/{version}", "--policy", str(policy),
                 "--tracking-uri", server, "--out", str(tmp_path / "r"), "--no-progress"])


EASY = ("name: digits-production\nmetrics: {accuracy: {}}\n"
        "requirements: [{metric: accuracy, at_least: 0.1}]\n")
STRICT = ("name: digits-production\nmetrics: {accuracy: {}}\n"
          "requirements: [{metric: accuracy, at_least: 0.9999}]\n")


def test_an_older_certificate_cannot_be_replayed(demo, client, tmp_path):
    """A PASS superseded by a newer FAIL cannot be written back to take the alias (no pause
    between the two: claims carry microsecond issue times and the ledger a sequence)."""
    version = _register(client, demo[0], "replay-target")
    assert _certify(demo[0], "replay-target", version, EASY, tmp_path) == 0
    old_pass = client.get_model_version("replay-target", version).tags[CERT_TAG]
    assert _certify(demo[0], "replay-target", version, STRICT, tmp_path) == 1
    _refused(client.set_model_version_tag, "replay-target", version, CERT_TAG, old_pass,
             match="not newer")
    _refused(client.set_registered_model_alias, "replay-target", "production", version,
             match="did not pass")


def test_a_removed_certificate_stays_revoked(demo, client, tmp_path):
    version = _register(client, demo[0], "revoke-target")
    assert _certify(demo[0], "revoke-target", version, EASY, tmp_path) == 0
    tag = client.get_model_version("revoke-target", version).tags[CERT_TAG]
    client.delete_model_version_tag("revoke-target", version, CERT_TAG)
    _refused(client.set_model_version_tag, "revoke-target", version, CERT_TAG, tag,
             match="not newer")
    _refused(client.set_registered_model_alias, "revoke-target", "production", version,
             match="no signed")
    assert _certify(demo[0], "revoke-target", version, EASY, tmp_path) == 0  # a new one works
    client.set_registered_model_alias("revoke-target", "production", version)
