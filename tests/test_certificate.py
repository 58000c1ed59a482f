"""End to end on the digits CNN: certificate content, canonical JSON, tamper evidence, hashing."""

from __future__ import annotations

import copy
import json
import os
import re
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

import robust_cert
from robust_cert import Certificate, DataError, Policy, RobustCertError
from robust_cert.certificate import SCHEMA, canonical_json
from robust_cert.data import digits_split
from robust_cert.models.torch import state_sha256

POLICY = {
    "name": "digits-small",
    "confidence": 0.95,
    "metrics": {
        "accuracy": {},
        "robust_accuracy": {"eps": [0.05], "attacks": ["fgsm"]},
        "probabilistic_robustness": {"eps": 0.05, "samples": 300},
    },
    "requirements": [
        {"metric": "accuracy", "at_least": 0.8},
        {"metric": "robust_accuracy", "eps": 0.05, "at_least": 0.3},
        {"metric": "probabilistic_robustness", "eps": 0.05, "at_most": 0.2},
    ],
}
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def cert(digits_model) -> Certificate:
    return robust_cert.certify(digits_model, "digits", POLICY, seed=3, progress=False)


def test_body_identifies_what_was_certified(cert: Certificate, digits_model) -> None:
    body = cert.body
    assert body["schema"] == SCHEMA
    assert body["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert cert.verdict == body["verdict"]
    assert cert.passed == (body["verdict"] == "PASS")
    assert HEX64.match(body["model"]["sha256"])
    assert body["model"]["sha256"] == state_sha256(digits_model)
    assert body["model"]["num_classes"] == 10
    assert body["model"]["input_shape"] == [1, 8, 8]
    assert body["model"]["gradients"] is True
    assert body["data"]["sha256"] == robust_cert.load_data("digits").sha256
    assert body["data"]["n"] == 359
    assert sum(body["data"]["class_counts"]) == 359
    assert body["policy"]["sha256"] == Policy.from_dict(POLICY).sha256
    assert body["policy"]["document"] == Policy.from_dict(POLICY).canonical()
    assert body["policy"]["confidence"] == 0.95
    assert body["seed"] == 3
    assert body["sanity"]["deterministic_forward"] == "passed"
    assert isinstance(body["issued_at"], str)


def test_environment_is_recorded(cert: Certificate) -> None:
    env = cert.body["environment"]
    for lib in ("torch", "torchattacks", "mlflow", "numpy", "scipy"):
        assert env[lib] == metadata.version(lib)
    assert env["torchattacks"] == "3.3.0"
    assert env["device"] == "cpu"
    # the thread count certify used: $ROBUST_CERT_THREADS (the suite runs with 1 and with 2)
    assert env["threads"] == int(os.environ.get("ROBUST_CERT_THREADS", "1"))
    assert env["python"]


def test_every_result_value_has_an_interval(cert: Certificate) -> None:
    results = {r["metric"]: r for r in cert.results}
    assert set(results) == {"accuracy", "robust_accuracy", "probabilistic_robustness"}
    for r in cert.results:
        assert r["status"] == "ok"
        assert r["values"]
        for v in r["values"]:
            assert v["n"] > 0
            assert 0 <= v["k"] <= v["n"]
            assert v["estimate"] == pytest.approx(v["k"] / v["n"])
            lo, hi = v["ci"]
            assert 0.0 <= lo <= v["estimate"] <= hi <= 1.0
            assert v["confidence"] == 0.95
            assert v["population"]
            if r["metric"] == "probabilistic_robustness":  # several draws per point
                assert v["interval_method"].startswith("betting")
                assert v["points"] <= 359
                cond = v["conditional_ci"]
                assert "clopper-pearson" in cond["interval_method"]
                assert cond["population"].startswith("on this evaluation set")
                assert cond["ci"][1] < hi  # the pooled interval is the narrower, conditional one
            else:  # one outcome per point
                assert "clopper-pearson" in v["ci_method"]
                assert "conditional_ci" not in v
    assert results["accuracy"]["values"][0]["n"] == 359
    assert results["robust_accuracy"]["values"][0]["params"] == {"eps": 0.05}
    assert results["probabilistic_robustness"]["values"][0]["n"] == 300
    assert results["robust_accuracy"]["kind"] == "empirical"
    # robust accuracy cannot exceed clean accuracy
    assert results["robust_accuracy"]["values"][0]["k"] <= results["accuracy"]["values"][0]["k"]
    assert results["accuracy"]["values"][0]["estimate"] > 0.8  # the fixture is trained


def test_requirements_match_verdict(cert: Certificate) -> None:
    reqs = cert.requirements
    assert [r["id"] for r in reqs] == [r.id for r in Policy.from_dict(POLICY).requirements]
    verdicts = {r["verdict"] for r in reqs}
    expected = ("FAIL" if "FAIL" in verdicts
                else "INCONCLUSIVE" if "INCONCLUSIVE" in verdicts else "PASS")
    assert cert.verdict == expected
    for r in reqs:
        assert r["n"] is not None
        assert r["bound"] is not None


def test_per_point_arrays_kept_out_of_json(cert: Certificate, tmp_path: Path) -> None:
    assert cert.per_point["accuracy/correct"].shape == (359,)
    assert cert.per_point["robust_accuracy/robust"].shape == (359, 1)
    assert "per_point" not in cert.to_json()
    path = cert.save_per_point(tmp_path / "pp.npz")
    with np.load(path) as f:
        np.testing.assert_array_equal(f["accuracy/correct"], cert.per_point["accuracy/correct"])


def test_json_is_canonical_and_round_trips(cert: Certificate, tmp_path: Path) -> None:
    text = cert.to_json()
    raw = json.loads(text)
    assert text == json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert "\n" not in text
    assert list(raw) == sorted(raw)
    assert list(raw["certificate"]) == sorted(raw["certificate"])
    assert raw["digest"] == cert.digest
    assert HEX64.match(cert.digest)
    again = Certificate.from_json(text)
    assert again.digest == cert.digest
    assert again.body == json.loads(canonical_json(cert.body))
    assert again.to_json() == text
    saved = cert.save(tmp_path / "cert.json")
    assert Certificate.load(saved).digest == cert.digest
    assert canonical_json(cert.body) == canonical_json(json.loads(canonical_json(cert.body)))


def test_tampering_is_detected(cert: Certificate) -> None:
    text = cert.to_json()
    other = "FAIL" if cert.verdict != "FAIL" else "PASS"
    needle = f'"verdict":"{cert.verdict}"}},"digest"'
    assert needle in text  # the body's verdict (keys sorted: last key of the body)
    tampered = text.replace(needle, f'"verdict":"{other}"}},"digest"')
    assert tampered != text
    with pytest.raises(RobustCertError, match="altered"):
        Certificate.from_json(tampered)
    raw = json.loads(text)
    raw["certificate"]["results"][0]["values"][0]["k"] += 1
    with pytest.raises(RobustCertError, match="altered"):
        Certificate.from_json(json.dumps(raw))


def test_not_a_certificate(tmp_path: Path) -> None:
    with pytest.raises(RobustCertError, match="not a robust_cert certificate"):
        Certificate.from_json("{}")
    with pytest.raises(RobustCertError, match="not a robust_cert certificate"):
        Certificate.from_json("not json")
    with pytest.raises(RobustCertError, match="not a robust_cert certificate"):
        Certificate.from_json(json.dumps({"certificate": {"schema": "x"}, "digest": "0"}))
    with pytest.raises(RobustCertError, match="not found"):
        Certificate.load(tmp_path / "missing.json")


def test_same_seed_same_results(cert: Certificate, digits_model) -> None:
    again = robust_cert.certify(digits_model, "digits", POLICY, seed=3, progress=False)
    assert again.body["results"] == cert.body["results"]
    assert again.body["requirements"] == cert.body["requirements"]
    assert again.verdict == cert.verdict
    for key, arr in cert.per_point.items():
        np.testing.assert_array_equal(again.per_point[key], arr)
    body_a = {k: v for k, v in cert.body.items() if k != "issued_at"}
    body_b = {k: v for k, v in again.body.items() if k != "issued_at"}
    assert body_a == body_b


def test_other_seed_changes_random_draws(cert: Certificate, digits_model) -> None:
    pol = {**POLICY, "metrics": {"probabilistic_robustness": {"eps": 0.05, "samples": 300}},
           "requirements": [POLICY["requirements"][2]]}
    other = robust_cert.certify(digits_model, "digits", pol, seed=4, progress=False)
    key = "probabilistic_robustness/index@0.05"
    assert not np.array_equal(other.per_point[key], cert.per_point[key])
    assert other.body["seed"] == 4


def test_model_hash_is_independent_of_identity(digits_model) -> None:
    twin = copy.deepcopy(digits_model)
    assert state_sha256(twin) == state_sha256(digits_model)
    assert robust_cert.load_model(twin, input_shape=(1, 8, 8)).sha256 == state_sha256(digits_model)
    with torch.no_grad():
        twin.head.bias[0] += 1e-3
    assert state_sha256(twin) != state_sha256(digits_model)
    fresh = robust_cert.digits_cnn.DigitsCNN()
    fresh.load_state_dict(digits_model.state_dict())
    assert state_sha256(fresh) == state_sha256(digits_model)


def test_wrong_sample_shape_names_both_shapes(digits_model) -> None:
    x, y = digits_split("test")
    flat = (x.reshape(len(x), 64), y)
    clf = robust_cert.load_model(digits_model, input_shape=(1, 8, 8))
    with pytest.raises(DataError) as info:
        robust_cert.certify(clf, flat, POLICY, progress=False)
    msg = str(info.value)
    assert "(64,)" in msg
    assert "(1, 8, 8)" in msg


def test_wrong_sample_shape_with_a_plain_module(digits_model) -> None:
    # A plain nn.Module does not declare its input shape, so certify probes it with the data's
    # sample shape. Data that do not fit the model is a DataError ("The evaluation data does
    # not fit the model"), naming the data's sample shape, not a fault of the model.
    x, y = digits_split("test")
    with pytest.raises(DataError) as info:
        robust_cert.certify(copy.deepcopy(digits_model), (x.reshape(len(x), 64), y), POLICY,
                            progress=False)
    assert "(64,)" in str(info.value)


def test_labels_out_of_range(digits_model) -> None:
    x, y = digits_split("test")
    y = y.copy()
    y[0] = 12
    with pytest.raises(DataError) as info:
        robust_cert.certify(copy.deepcopy(digits_model), (x, y), POLICY, progress=False)
    msg = str(info.value)
    assert "12" in msg
    assert "10 classes" in msg
