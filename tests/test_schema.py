"""The typed certificate: Verdict, the body schema, its JSON Schema, and unchanged digests."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from robust_cert.certificate import Certificate, canonical_json
from robust_cert.errors import RobustCertError
from robust_cert.schema import CertificateBody, CertificateFile, certificate_json_schema
from robust_cert.verdicts import Verdict
from tests.conftest import REPO

#: written by ``robust_cert.certify`` (a linear model on 24 digits points, seed 1) with the
#: code before the certificate schema existed; its recorded digest must keep verifying
STORED = Path(__file__).parent / "data" / "certificate-v1-pre-schema.json"
SCHEMA_FILE = REPO / "docs" / "certificate.schema.json"


def _stored() -> dict:
    return json.loads(STORED.read_text(encoding="utf-8"))


def _file_with(body: dict) -> str:
    """A certificate file for ``body`` whose digest matches (only the schema can refuse it)."""
    return json.dumps({"certificate": body, "digest": Certificate(body=body).digest})


def test_stored_certificate_keeps_its_digest():
    raw = _stored()
    cert = Certificate.load(STORED)
    assert cert.digest == raw["digest"]
    assert cert.digest == hashlib.sha256(canonical_json(raw["certificate"]).encode()).hexdigest()
    assert cert.to_json() == STORED.read_text(encoding="utf-8")


def test_stored_certificate_validates_and_reads_typed():
    cert = Certificate.load(STORED)
    typed = cert.validate()
    assert isinstance(typed, CertificateBody)
    assert typed.verdict is Verdict.FAIL is cert.verdict
    assert [r.verdict for r in typed.requirements] == [
        Verdict.INCONCLUSIVE, Verdict.FAIL, Verdict.FAIL]
    clustered = typed.results[2].values[0]
    assert clustered.points == 22  # 48 draws
    assert clustered.conditional_ci is not None
    assert typed.environment.processes == 1
    assert typed.sanity.checks[1].state == "passed"
    # validation leaves the body alone: same dict, same digest
    assert cert.body == _stored()["certificate"]
    assert cert.digest == _stored()["digest"]
    CertificateFile.model_validate(_stored())


def test_certify_writes_the_stored_certificate_again(monkeypatch):
    """The same model, data, policy and seed give the stored body back, field for field,
    but for issue time and environment: the schema changed no certificate."""
    import torch
    from torch import nn

    import robust_cert
    from robust_cert.data import load_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    digits = load_data("digits")
    policy = {
        "name": "schema-fixture", "version": "1", "confidence": 0.9,
        "metrics": {"accuracy": {},
                    "robust_accuracy": {"eps": [0.05], "attacks": ["fgsm"]},
                    "probabilistic_robustness": {"eps": 0.05, "samples": 48}},
        "requirements": [{"metric": "accuracy", "at_least": 0.05},
                         {"metric": "robust_accuracy", "eps": 0.05, "at_least": 0.9},
                         {"metric": "probabilistic_robustness", "eps": 0.05, "at_most": 0.5}],
    }
    cert = robust_cert.certify(model, (digits.x[:24].numpy(), digits.y[:24].numpy()), policy,
                               seed=1, progress=False, device="cpu",
                               command="robust-cert certify (test fixture)")
    stored = _stored()["certificate"]
    assert type(cert.body["verdict"]) is str  # plain JSON data, not the enum
    # since the data-source registry the data record names its source's kind: the one key
    # the stored (older) certificate lacks
    assert cert.body["data"].pop("kind") == "arrays"
    for key in sorted(set(stored) | set(cert.body)):
        if key not in ("issued_at", "environment"):
            assert canonical_json(cert.body.get(key)) == canonical_json(stored.get(key)), key


@pytest.mark.parametrize(("edit", "field"), [
    (lambda b: b["results"][0]["values"][0].update(k="many"), "results[0].values[0].k"),
    (lambda b: b.update(verdict="MAYBE"), "verdict"),
    (lambda b: b.pop("seed"), "seed"),
    (lambda b: b["requirements"][1].update(direction="above"), "requirements[1].direction"),
    (lambda b: b["data"].update(sha256="not hex"), "data.sha256"),
    (lambda b: b["sanity"]["checks"][0].update(state="ok"), "sanity.checks[0].state"),
    (lambda b: b.update(surprise=1), "surprise"),
])
def test_a_file_off_the_schema_is_one_line_naming_the_field(edit, field):
    body = copy.deepcopy(_stored()["certificate"])
    edit(body)
    with pytest.raises(RobustCertError) as info:
        Certificate.from_json(_file_with(body))
    message = str(info.value)
    assert message.startswith(f"not a valid robust_cert certificate: {field}: "), message
    assert "\n" not in message


def test_open_records_keep_their_extra_keys_and_the_plugin_keys_validate():
    body = copy.deepcopy(_stored()["certificate"])
    body["model"]["opset"] = 17  # a loader's own fact
    body["environment"]["onnx"] = "1.17.0"
    body["tracking_uri"] = "http://mlflow.internal:5000"
    body["comparison"] = {
        "baseline": {"model": "digits-cnn", "version": "1", "verdict": "PASS",
                     "certificate_digest": "0" * 64, "policy": {"name": "p"}},
        "data_sha256": body["data"]["sha256"], "confidence": 0.95, "method": "McNemar",
        "quantities": [{"key": "accuracy", "label": "accuracy", "verdict":
                        "no detectable difference", "delta_ci": [-0.1, 0.1]}],
        "regressions": [], "improvements": [], "not_compared": []}
    cert = Certificate.from_json(_file_with(body))
    typed = cert.validate()
    assert typed.comparison.baseline.verdict is Verdict.PASS
    assert typed.model.model_extra == {"opset": 17}
    assert typed.tracking_uri == "http://mlflow.internal:5000"


def test_verdict_is_its_string_everywhere():
    assert isinstance(Verdict.PASS, str)
    assert Verdict.PASS == "PASS"
    assert Verdict.FAIL == "FAIL"
    assert Verdict("INCONCLUSIVE") is Verdict.INCONCLUSIVE
    assert {"PASS": 0}[Verdict.PASS] == 0
    assert {Verdict.FAIL: 1}["FAIL"] == 1
    assert str(Verdict.PASS) == f"{Verdict.PASS}" == f"{Verdict.PASS:<4}" == "PASS"
    assert json.dumps({"v": Verdict.FAIL}) == '{"v": "FAIL"}'
    assert canonical_json([Verdict.PASS]) == canonical_json(["PASS"])
    assert ";".join([Verdict.PASS, "x"]) == "PASS;x"
    with pytest.raises(ValueError, match="not a valid Verdict"):
        Verdict("pass")


def test_overall_verdict():
    V = Verdict
    assert V.overall([V.PASS, V.PASS]) is V.PASS
    assert V.overall([V.PASS, V.INCONCLUSIVE]) is V.INCONCLUSIVE
    assert V.overall([V.INCONCLUSIVE, V.FAIL, V.PASS]) is V.FAIL
    assert V.overall(["PASS", "FAIL"]) is V.FAIL
    assert V.overall([]) is V.PASS


def test_schema_and_verdict_import_no_torch():
    code = ("import sys, robust_cert.schema, robust_cert.certificate, robust_cert.verdicts; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.strip() == "False"


def test_schema_command_prints_the_documented_schema(capsys):
    from robust_cert.cli import main

    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == certificate_json_schema()
    assert out == SCHEMA_FILE.read_text(encoding="utf-8"), (
        "docs/certificate.schema.json is stale: robust-cert schema > docs/certificate.schema.json")


def test_json_schema_describes_the_file():
    schema = certificate_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["required"]) == {"certificate", "digest"}
    assert schema["additionalProperties"] is False
    body = schema["$defs"]["CertificateBody"]
    assert set(body["required"]) >= {"schema", "verdict", "model", "data", "policy",
                                     "results", "requirements"}
    assert set(body["properties"]) == set(_stored()["certificate"]) | {"tracking_uri",
                                                                       "comparison"}
    assert schema["$defs"]["Verdict"]["enum"] == ["PASS", "FAIL", "INCONCLUSIVE"]


def test_every_subcommand_names_its_handler():
    from robust_cert.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"certify", "verify", "report", "schema", "policy", "promote"} <= set(sub.choices)
    for name, p in sub.choices.items():
        func = p.get_default("func")
        assert callable(func), name
        assert func.__module__ == "robust_cert.cli", name
