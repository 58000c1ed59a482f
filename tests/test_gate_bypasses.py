"""The bypass battery (issue 15), against a real gated `mlflow server` on sqlite and on
PostgreSQL: every attempt through MlflowClient and raw REST must end in PERMISSION_DENIED
(HTTP 403), never in an uncertified or failed version under a protected alias."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from robust_cert.cli import main
from robust_cert.mlflow_plugin.gate import PROMPT_TAG
from robust_cert.mlflow_plugin.names import CERT_TAG
from robust_cert.signing import Keyring, generate_private_key_pem, sign_claim, verify_claim
from tests.conftest import (
    REPO,
    Server,
    gate_env,
    start_mlflow_server,
    stop_mlflow_server,
)

pytestmark = pytest.mark.integration

EASY = ("name: digits-production\nmetrics: {accuracy: {}}\n"
        "requirements: [{metric: accuracy, at_least: 0.1}]\n")
STRICT = ("name: digits-production\nmetrics: {accuracy: {}}\n"
          "requirements: [{metric: accuracy, at_least: 0.9999}]\n")


OTHER = ("name: other-production\nmetrics: {accuracy: {}}\n"
         "requirements: [{metric: accuracy, at_least: 0.1}]\n")
#: The routes file of the battery's routed servers: the battery's models (names end in -sq
#: or -pg) fall under rules 3 and 4, which accept EASY and STRICT certificates (so every
#: bypass below must still be refused for its own reason); rules 1 and 2 and the default are
#: for test_routes_decide_the_gate.
BATTERY_ROUTES = """\
routes:
  - match: "exempt-*"
    gate: exempt
  - match: "other-*"
    policy: other.yaml
    data: eval.npz
  - match: "*-sq"
    policies: [easy.yaml, strict.yaml]
    data: eval.npz
  - match: "*-pg"
    policies: [easy.yaml, strict.yaml]
    data: eval.npz
default: required
"""


def _routes_folder(root: Path) -> Path:
    """BATTERY_ROUTES with its policies and evaluation data in ``root``; the file's path."""
    from robust_cert.data import digits_split

    for name, text in (("easy.yaml", EASY), ("strict.yaml", STRICT), ("other.yaml", OTHER)):
        (root / name).write_text(text)
    x, y = digits_split("test")
    np.savez(root / "eval.npz", x=x[:20], y=y[:20])
    (root / "routes.yaml").write_text(BATTERY_ROUTES)
    return root / "routes.yaml"


@pytest.fixture(scope="module")
def routed_mlflow_server(tmp_path_factory):
    """A gated sqlite server like `mlflow_server`, started with ROBUST_CERT_ROUTES."""
    root = tmp_path_factory.mktemp("routed_mlflow_server")
    db = root / "mlflow.db"
    proc, url = start_mlflow_server(root, f"sqlite:///{db}", f"robustcert+sqlite:///{db}",
                                    gate_env(ROBUST_CERT_ROUTES=str(_routes_folder(root))))
    yield Server(url, root)
    stop_mlflow_server(proc)


@pytest.fixture(scope="module")
def routed_pg_mlflow_server(postgres, tmp_path_factory):
    """A gated PostgreSQL server like `pg_mlflow_server`, started with ROBUST_CERT_ROUTES."""
    root = tmp_path_factory.mktemp("routed_pg_mlflow_server")
    db = postgres.create_database("gate_battery_routes")
    proc, url = start_mlflow_server(root, db, "robustcert+" + db,
                                    gate_env(ROBUST_CERT_ROUTES=str(_routes_folder(root))))
    yield Server(url, root)
    stop_mlflow_server(proc)


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "sqlite-routes",
                                        "postgresql-routes"])
def gated(request):
    """(url, server root) of a gated server: sqlite, PostgreSQL, and each again started with
    a routes file (BATTERY_ROUTES): the whole battery runs against all four."""
    return request.getfixturevalue({
        "sqlite": "mlflow_server", "postgresql": "pg_mlflow_server",
        "sqlite-routes": "routed_mlflow_server",
        "postgresql-routes": "routed_pg_mlflow_server"}[request.param])


@pytest.fixture(scope="module", autouse=True)
def _no_pdf_reports():
    """The battery is about the gate, not the report: its in-process certifications write
    report.html without report.pdf (a PDF/A render is about 1.5 s of CPU, and the battery
    certifies about seventy times over its four servers). The PDF is tested in
    tests/test_report.py; the manifest checks below cover the files that are written."""
    from functools import partial

    from robust_cert.mlflow_plugin import tracking
    from robust_cert.report import write_report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking, "write_report", partial(write_report, pdf="off"))
        yield


@pytest.fixture(scope="module")
def small_model():
    from robust_cert.digits_cnn import train_digits_cnn

    return train_digits_cnn(epochs=2, seed=0)


@pytest.fixture
def client(gated):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(gated.url)
    mlflow.set_registry_uri(gated.url)
    return MlflowClient(tracking_uri=gated.url, registry_uri=gated.url)


def _register(url: str, name: str, model) -> str:
    import mlflow

    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model, name="m", input_example=np.zeros((2, 1, 8, 8), "f4"),
            serialization_format="pickle", registered_model_name=name,
            pip_requirements=["torch"])
    return str(info.registered_model_version)


def _certify(url: str, name: str, version: str, policy_text: str, tmp_path: Path) -> int:
    policy = tmp_path / f"policy-{abs(hash(policy_text))}.yaml"
    policy.write_text(policy_text)
    return main(["certify", f"models:/{name}/{version}", "--policy", str(policy),
                 "--tracking-uri", url, "--out", str(tmp_path / f"r-{name}-{version}"),
                 "--no-progress"])


def _name(tag: str, gated) -> str:
    return f"{tag}-{'pg' if 'pg_' in str(gated.root) else 'sq'}"


def _refused(fn, *args, match: str = "robust_cert gate"):
    with pytest.raises(MlflowException) as exc:
        fn(*args)
    assert exc.value.error_code == "PERMISSION_DENIED", exc.value.message
    assert match in exc.value.message, exc.value.message
    return exc.value.message


def _rest(url: str, path: str, body: dict, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _rest_refused(url: str, path: str, body: dict, method: str = "POST",
                  match: str = "robust_cert gate") -> str:
    code, doc = _rest(url, path, body, method)
    assert code == 403, (code, doc)
    assert doc["error_code"] == "PERMISSION_DENIED"
    assert match in doc["message"], doc["message"]
    return doc["message"]


def _alias_refused(url: str, client, name: str, version: str, match: str) -> str:
    """Every way to put ``name`` v``version`` under a protected alias is refused (``match``
    in each message); returns the client's message."""
    message = _refused(client.set_registered_model_alias, name, "production", version,
                       match=match)
    _rest_refused(url, "registered-models/alias",
                  {"name": name, "alias": "Production", "version": version}, match=match)
    _rest_refused(url, "model-versions/transition-stage",
                  {"name": name, "version": version, "stage": "production",
                   "archive_existing_versions": False}, match=match)
    aliases = client.get_registered_model(name).aliases
    assert not {a.lower() for a in aliases} & {"production"}
    assert client.get_model_version(name, version).current_stage != "Production"
    return message


# ---- 1. the prompt exemption ---------------------------------------------------------------
def test_prompt_marker_cannot_exempt_a_model_version(gated, client, small_model, tmp_path):
    url, name = gated.url, _name("prompt-bypass", gated)
    version = _register(url, name, small_model)
    assert _certify(url, name, version, STRICT, tmp_path) == 1  # a FAIL
    # the marker cannot be set on the version or on the registered model, nor deleted
    _refused(client.set_model_version_tag, name, version, PROMPT_TAG, "true", match="fixed")
    _rest_refused(url, "model-versions/set-tag",
                  {"name": name, "version": version, "key": PROMPT_TAG, "value": "true"},
                  match="fixed")
    _refused(client.set_registered_model_tag, name, PROMPT_TAG, "true", match="fixed")
    _rest_refused(url, "registered-models/set-tag",
                  {"name": name, "key": PROMPT_TAG, "value": "true"}, match="fixed")
    _rest_refused(url, "model-versions/delete-tag",
                  {"name": name, "version": version, "key": PROMPT_TAG}, method="DELETE",
                  match="fixed")
    _alias_refused(url, client, name, version, "did not pass")


def test_prompt_marker_given_at_creation_does_not_exempt_a_model(gated, client, small_model):
    """A version created with the marker in a normal model, or a model version (real source)
    in a prompt: neither is a prompt version of a prompt, so the gate still applies."""
    import mlflow

    url, name = gated.url, _name("prompt-created", gated)
    version = _register(url, name, small_model)
    src = client.get_model_version(name, version)

    def create_tagged(model: str) -> str | None:  # MlflowClient refuses this; try raw REST
        code, doc = _rest(url, "model-versions/create", {
            "name": model, "source": src.source, "run_id": src.run_id,
            "tags": [{"key": PROMPT_TAG, "value": "true"}]})
        if code != 200:  # MLflow itself refuses a prompt marker on a model source
            assert code in (400, 403), doc
            return None
        return doc["model_version"]["version"]

    prompt = _name("a-prompt", gated)
    mlflow.genai.register_prompt(name=prompt, template="Classify {{image}}")
    for model in (name, prompt):
        smuggled = create_tagged(model)
        if smuggled is not None:
            _alias_refused(url, client, model, smuggled, "no signed robust_cert certificate")


def test_real_prompts_keep_their_aliases(gated, client):
    import mlflow

    url, name = gated.url, _name("real-prompt", gated)
    prompt = mlflow.genai.register_prompt(name=name, template="Classify {{image}}")
    mlflow.genai.set_prompt_alias(name, alias="production", version=prompt.version)
    assert mlflow.genai.load_prompt(f"prompts:/{name}@production").version == prompt.version
    # and its marker is just as fixed (MLflow may also hide prompts from this endpoint)
    code, doc = _rest(url, "registered-models/delete-tag", {"name": name, "key": PROMPT_TAG},
                      "DELETE")
    assert code in (403, 404), doc
    assert mlflow.genai.load_prompt(f"prompts:/{name}@production").version == prompt.version


# ---- 2. same-second replay -------------------------------------------------------------------
def test_same_second_replay_is_refused(gated, client, small_model, tmp_path):
    url, name = gated.url, _name("replay", gated)
    version = _register(url, name, small_model)
    assert _certify(url, name, version, EASY, tmp_path) == 0
    old_pass = client.get_model_version(name, version).tags[CERT_TAG]
    # no sleep: the FAIL may be issued within the same second as the PASS
    assert _certify(url, name, version, STRICT, tmp_path) == 1
    new_fail = client.get_model_version(name, version).tags[CERT_TAG]
    assert verify_claim(new_fail, Keyring.from_env(), name=name, version=version)["verdict"] \
        == "FAIL"
    _refused(client.set_model_version_tag, name, version, CERT_TAG, old_pass,
             match="not newer")
    _rest_refused(url, "model-versions/set-tag",
                  {"name": name, "version": version, "key": CERT_TAG, "value": old_pass},
                  match="not newer")
    # the FAIL itself cannot be re-written either (equal is refused)
    _refused(client.set_model_version_tag, name, version, CERT_TAG, new_fail, match="not newer")
    _alias_refused(url, client, name, version, "did not pass")


def test_removed_certificate_stays_revoked(gated, client, small_model, tmp_path):
    url, name = gated.url, _name("revoked", gated)
    version = _register(url, name, small_model)
    assert _certify(url, name, version, EASY, tmp_path) == 0
    token = client.get_model_version(name, version).tags[CERT_TAG]
    client.delete_model_version_tag(name, version, CERT_TAG)
    _refused(client.set_model_version_tag, name, version, CERT_TAG, token, match="not newer")
    _alias_refused(url, client, name, version, "no signed")
    assert _certify(url, name, version, EASY, tmp_path) == 0  # a new certificate works
    client.set_registered_model_alias(name, "production", version)


# ---- 3. version spelling ---------------------------------------------------------------------
def test_version_spellings_are_one_version(gated, client, small_model, tmp_path):
    url, name = gated.url, _name("spelling", gated)
    version = _register(url, name, small_model)
    assert _certify(url, name, version, EASY, tmp_path) == 0
    token = client.get_model_version(name, version).tags[CERT_TAG]
    # revoke under a non-canonical spelling: it revokes the version itself
    code, doc = _rest(url, "model-versions/delete-tag",
                      {"name": name, "version": f"0{version}", "key": CERT_TAG}, "DELETE")
    assert code == 200, doc
    for spelling in (version, f"0{version}", f"+{version}"):
        _rest_refused(url, "model-versions/set-tag",
                      {"name": name, "version": spelling, "key": CERT_TAG, "value": token},
                      match="not newer")
    _alias_refused(url, client, name, version, "no signed")
    _rest_refused(url, "registered-models/alias",
                  {"name": name, "alias": "production", "version": f"0{version}"},
                  match="no signed")
    # claims refuse non-canonical versions
    with pytest.raises(ValueError, match="not canonical"):
        sign_claim({**verify_claim(token, Keyring.from_env(), name=name, version=version),
                    "version": f"0{version}"}, Keyring.from_env())


# ---- forged, copied, foreign-key certificates ------------------------------------------------
def test_forged_and_copied_certificates(gated, client, small_model, tmp_path):
    url, name = gated.url, _name("forged", gated)
    v1 = _register(url, name, small_model)
    v2 = _register(url, name, small_model)
    assert _certify(url, name, v2, EASY, tmp_path) == 0
    token = client.get_model_version(name, v2).tags[CERT_TAG]
    assert len(token) < 400, "the tag is a compact token"
    # the signed manifest covers the certificate and the report files
    report_dir = tmp_path / f"r-{name}-{v2}"
    assert main(["verify", str(report_dir / "manifest.json")]) == 0
    manifest = json.loads((report_dir / "manifest.json").read_text())["manifest"]
    assert {"certificate.json", "report.html", "per_point.npz"} <= set(manifest["files"])
    assert manifest["claim"] == token
    (report_dir / "report.html").write_text("swapped")
    assert main(["verify", str(report_dir / "manifest.json")]) == 1
    _refused(client.set_model_version_tag, name, v1, CERT_TAG, token, match="does not verify")
    claim = verify_claim(token, Keyring.from_env(), name=name, version=v2)
    attacker = Keyring.from_private_pem(generate_private_key_pem())
    forged = sign_claim({**claim, "version": int(v1)}, attacker)
    _refused(client.set_model_version_tag, name, v1, CERT_TAG, forged, match="unknown key")
    _rest_refused(url, "model-versions/set-tag",
                  {"name": name, "version": v1, "key": CERT_TAG, "value": "not a token"},
                  match="malformed")
    altered = token.replace(";PASS;", ";FAIL;")
    _refused(client.set_model_version_tag, name, v2, CERT_TAG, altered, match="does not verify")
    _alias_refused(url, client, name, v1, "no signed")


# ---- 4. interrupted and killed re-certifications -------------------------------------------
_STALLED_CERTIFY = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from mlflow.tracking import MlflowClient

    # Ctrl-C as in a terminal, even where the suite runs with SIGINT ignored (nohup, a
    # background job), which this process would inherit
    signal.signal(signal.SIGINT, signal.default_int_handler)

    marker, where, stall, url, uri, policy, out = sys.argv[1:8]
    if where == "tags":  # the first summary tag: after the old certificate was withdrawn
        real = MlflowClient.set_model_version_tag

        def stalled(self, name, version, key, value):
            if key == "robust_cert.policy":
                Path(marker).write_text(where)
                time.sleep(float(stall))
            return real(self, name, version, key, value)

        MlflowClient.set_model_version_tag = stalled
    else:  # logging the certification run: before the version is touched
        real = MlflowClient.log_artifact

        def stalled(self, *args, **kwargs):
            Path(marker).write_text(where)
            time.sleep(float(stall))
            return real(self, *args, **kwargs)

        MlflowClient.log_artifact = stalled
    from functools import partial
    from robust_cert.mlflow_plugin import tracking
    from robust_cert.report import write_report
    tracking.write_report = partial(write_report, pdf="off")  # as _no_pdf_reports does
    from robust_cert.cli import main
    sys.exit(main(["certify", uri, "--policy", policy, "--tracking-uri", url, "--out", out,
                   "--no-progress"]))
""")


def _stalled_certification(gated, name, version, tmp_path, where, stall, sig):
    """Re-certify ``name`` v``version`` under STRICT (a FAIL) in a subprocess that stalls at
    ``where`` for ``stall`` seconds; send ``sig`` when it gets there. (exit code, output)."""
    policy = tmp_path / "strict.yaml"
    policy.write_text(STRICT)
    marker, tmp = tmp_path / "marker", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALLED_CERTIFY, str(marker), where, str(stall), gated.url,
         f"models:/{name}/{version}", str(policy), str(tmp_path / "out")], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, f"the certification never reached {where}"
        time.sleep(0.2)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0].decode()
    if sig != signal.SIGKILL:
        assert not [p for p in tmp.iterdir() if p.name.startswith("robust_cert_")], \
            "temporary folders left behind"
    return proc.returncode, out


def _last_run(client, name, version):
    mv = client.get_model_version(name, version)
    experiment = client.get_logged_model(mv.source.removeprefix("models:/")).experiment_id
    return client.search_runs([experiment], f"tags.`robust_cert.model` = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]


def _certified_and_promotable(gated, client, name, small_model, tmp_path):
    version = _register(gated.url, name, small_model)
    assert _certify(gated.url, name, version, EASY, tmp_path) == 0
    client.set_registered_model_alias(name, "production", version)  # a PASS, promoted
    client.delete_registered_model_alias(name, "production")
    return version


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["sigterm", "sigint", "sigkill"])
def test_interrupted_recertification_changes_nothing(gated, client, small_model, tmp_path,
                                                     sig):
    """Stopped while logging its run, a re-certification leaves the version's tags,
    description and certificate exactly as they were, and the files in --out too; the
    previous PASS stays promotable."""
    name = _name(f"interrupted-{sig.name.lower()}", gated)
    version = _certified_and_promotable(gated, client, name, small_model, tmp_path)
    before = client.get_model_version(name, version)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "certificate.json").write_text("previous")  # an earlier certification's file
    code, out = _stalled_certification(gated, name, version, tmp_path, "logging", 300, sig)
    after = client.get_model_version(name, version)
    assert (after.tags, after.description) == (before.tags, before.description)
    assert (out_dir / "certificate.json").read_text() == "previous"
    if sig == signal.SIGKILL:  # nothing runs after SIGKILL: the staging folder stays
        assert code == -signal.SIGKILL
    else:
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
        assert code == 2, out
        assert f"{name} v{version} keeps its previous certificate" in out
        assert _last_run(client, name, version).info.status == "KILLED"
    client.set_registered_model_alias(name, "production", version)  # still a valid PASS
    assert client.get_registered_model(name).aliases["production"] == version
    client.delete_registered_model_alias(name, "production")


def test_interrupt_while_writing_the_version_is_held_back(gated, client, small_model,
                                                          tmp_path):
    """SIGTERM while the version's tags are written waits until the new certificate is in
    place: the version carries the complete new certificate (a FAIL here), never half of it."""
    name = _name("held-back", gated)
    version = _certified_and_promotable(gated, client, name, small_model, tmp_path)
    code, out = _stalled_certification(gated, name, version, tmp_path, "tags", 3,
                                       signal.SIGTERM)
    assert code == 2, out
    assert "held back until the new certificate was in place" in out
    mv = client.get_model_version(name, version)
    assert mv.tags["robust_cert.status"] == "failed"
    assert mv.tags[CERT_TAG]
    run = _last_run(client, name, version)
    assert run.info.run_name.endswith("· FAIL")
    assert run.info.run_id == mv.tags["robust_cert.run_id"]
    assert (tmp_path / "out" / "certificate.json").is_file()
    _alias_refused(gated.url, client, name, version, "did not pass")


def test_killed_while_writing_the_version_leaves_no_pass(gated, client, small_model, tmp_path):
    """SIGKILL inside the version's writes (which nothing can hold back): the old PASS was
    withdrawn first, the new certificate is not there yet, so the version carries none."""
    name = _name("killed", gated)
    version = _certified_and_promotable(gated, client, name, small_model, tmp_path)
    code, out = _stalled_certification(gated, name, version, tmp_path, "tags", 300,
                                       signal.SIGKILL)
    assert code == -signal.SIGKILL
    mv = client.get_model_version(name, version)
    assert CERT_TAG not in mv.tags, "the previous PASS must be gone before the new tags"
    _alias_refused(gated.url, client, name, version, "no signed")
    assert main(["verify", f"models:/{name}/{version}", "--tracking-uri", gated.url]) == 1
    db = gated.root / "mlflow.db"
    if db.exists():  # the sqlite server: the ledger recorded the removal, with its sequence
        import sqlalchemy

        from robust_cert.mlflow_plugin.gate import Ledger

        events = Ledger(sqlalchemy.create_engine(f"sqlite:///{db}")).events(name, int(version))
        assert [e[1] for e in events] == ["accepted", "removed"]
        assert [e[0] for e in events] == [1, 2]


# ---- 5. artifacts swapped after promotion: the verifying loader ------------------------------
def test_load_verified_refuses_swapped_artifacts(gated, client, small_model, tmp_path):
    import torch

    import robust_cert
    from robust_cert.verification import VerificationError

    url, name = gated.url, _name("swapped", gated)
    version = _register(url, name, small_model)
    assert _certify(url, name, version, EASY, tmp_path) == 0
    client.set_registered_model_alias(name, "production", version)
    uri = f"models:/{name}@production"
    import mlflow

    mine = (tmp_path / "callers-store").as_uri()  # a caller's own tracking URI: kept
    mlflow.set_tracking_uri(mine)
    model = robust_cert.load_verified(uri, tracking_uri=url, flavor="pytorch",
                                      allowed_policies=["digits-production"],
                                      map_location="cpu", weights_only=False)
    assert isinstance(model, torch.nn.Module)
    assert mlflow.get_tracking_uri() == mine
    with pytest.raises(VerificationError, match="not allowed"):
        robust_cert.load_verified(uri, tracking_uri=url, allowed_policies=["other"])
    with pytest.raises(VerificationError, match="no policy allow-list"):
        robust_cert.load_verified(uri, tracking_uri=url, allowed_policies=[])
    # a user overwrites the promoted version's weights through the artifact store
    model_id = client.get_model_version(name, version).source.removeprefix("models:/")
    (weights,) = [p for p in (gated.root / "artifacts").rglob("model.pth")
                  if model_id in str(p)]
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(VerificationError, match="do not match the certified SHA-256"):
        robust_cert.load_verified(uri, tracking_uri=url, flavor="pytorch",
                                  allowed_policies=["digits-production"])
    assert main(["verify", uri, "--tracking-uri", url]) == 1


def test_load_verified_refuses_failed_and_uncertified(gated, client, small_model, tmp_path):
    import robust_cert
    from robust_cert.verification import VerificationError

    url, name = gated.url, _name("not-loadable", gated)
    v1 = _register(url, name, small_model)
    v2 = _register(url, name, small_model)
    assert _certify(url, name, v2, STRICT, tmp_path) == 1
    with pytest.raises(VerificationError, match="no signed"):
        robust_cert.load_verified(f"models:/{name}/{v1}", tracking_uri=url,
                                  allowed_policies=["digits-production"])
    with pytest.raises(VerificationError, match="verdict FAIL"):
        robust_cert.load_verified(f"models:/{name}/{v2}", tracking_uri=url,
                                  allowed_policies=["digits-production"])


# ---- 5b. the routes decide which models need which certificate ------------------------------
def test_routes_decide_the_gate(gated, client, small_model, tmp_path):
    """On the routed servers: an exempt model's alias is accepted without a certificate; a
    model certified under another rule's policy is refused, naming its rule and the policy it
    needs, and accepted under its own; a model no rule matches follows the default
    (required: ROBUST_CERT_ALLOWED_POLICIES)."""
    if not gated.root.name.startswith("routed"):
        pytest.skip("the routed servers only (this server has no routes file)")
    url, suffix = gated.url, _name("", gated)  # "-sq" or "-pg"
    exempt = f"exempt-model{suffix}"  # rule 1, although rule 3 or 4 matches it too
    version = _register(url, exempt, small_model)
    client.set_registered_model_alias(exempt, "production", version)
    assert _rest(url, "registered-models/alias", {"name": exempt, "alias": "champion",
                                                  "version": version})[0] == 200
    assert client.get_registered_model(exempt).aliases == {"production": version,
                                                           "champion": version}
    other = f"other-model{suffix}"  # rule 2: other-production only
    version = _register(url, other, small_model)
    assert _certify(url, other, version, EASY, tmp_path) == 0  # a PASS, under rule 3's policy
    message = _alias_refused(url, client, other, version,
                             "falls under rule 2 ('other-*') of the routes file")
    assert "requires a certificate under policy 'other-production'" in message
    assert "certified under 'digits-production'" in message
    assert _certify(url, other, version, OTHER, tmp_path) == 0
    client.set_registered_model_alias(other, "production", version)
    unmatched = f"unmatched{suffix}-x"  # no rule: the default (required) applies
    version = _register(url, unmatched, small_model)
    _alias_refused(url, client, unmatched, version, "no signed robust_cert certificate")
    assert _certify(url, unmatched, version, OTHER, tmp_path) == 0
    _alias_refused(url, client, unmatched, version,
                   "policy 'other-production' is not allowed for production")
    assert _certify(url, unmatched, version, EASY, tmp_path) == 0
    client.set_registered_model_alias(unmatched, "production", version)


# ---- 6. mis-deployment: doctor, and promote refuses an ungated registry ----------------------
def test_doctor_says_gated(gated, capsys):
    assert main(["doctor", gated.url]) == 0
    out = capsys.readouterr().out
    assert "GATED" in out
    assert "NOT GATED" not in out
    import mlflow

    names = [m.name for m in mlflow.MlflowClient(gated.url, gated.url)
             .search_registered_models("name LIKE 'robust-cert-doctor-probe-%'")]
    assert names == [], "the probe was not cleaned up"


def test_doctor_and_promote_on_an_ungated_store(small_model, tmp_path, capsys):
    """A plain sqlite registry (what a second `mlflow server` without the gate serves)."""
    import mlflow

    url = f"sqlite:///{tmp_path / 'plain.db'}"
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    exp = mlflow.create_experiment("plain", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pytorch.log_model(
            small_model, name="m", input_example=np.zeros((2, 1, 8, 8), "f4"),
            serialization_format="pickle", registered_model_name="plain",
            pip_requirements=["torch"])
    version = str(info.registered_model_version)
    assert main(["doctor", url]) == 1
    assert "NOT GATED" in capsys.readouterr().out
    policy = tmp_path / "strict.yaml"
    policy.write_text(STRICT)
    code = main(["promote", "plain", version, "--policy", str(policy), "--tracking-uri", url,
                 "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "refusing to promote" in err
    client = mlflow.MlflowClient(url, url)
    assert "production" not in client.get_registered_model("plain").aliases
    # with --no-gate-check: a loud warning, and still no FAILED version promoted
    code = main(["promote", "plain", version, "--policy", str(policy), "--tracking-uri", url,
                 "--out", str(tmp_path / "r2"), "--no-progress", "--no-gate-check"])
    captured = capsys.readouterr()
    assert "WARNING: --no-gate-check" in captured.err
    assert code == 1
    assert "not promoting" in captured.err
    assert "now @production" not in captured.out
    assert "production" not in client.get_registered_model("plain").aliases


def test_promote_through_the_gate(gated, client, small_model, tmp_path, capsys):
    url, name = gated.url, _name("promote", gated)
    version = _register(url, name, small_model)
    policy = tmp_path / "easy.yaml"
    policy.write_text(EASY)
    assert main(["promote", name, version, "--alias", "champion", "--policy", str(policy),
                 "--tracking-uri", url, "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert "GATED" in capsys.readouterr().out
    assert client.get_registered_model(name).aliases.get("champion") == version
