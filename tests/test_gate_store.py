"""The gated registry store in-process (no server): the removed artifact switch, tags written
around the gate by an ungated store on the same database, and the ledger's sequence."""

from __future__ import annotations

import logging

import pytest
from mlflow.entities.model_registry import ModelVersionTag
from mlflow.exceptions import MlflowException

from robust_cert.mlflow_plugin.gate import GatedRegistryStore
from robust_cert.mlflow_plugin.names import CERT_TAG
from robust_cert.mlflow_plugin.registry import artifacts_sha256
from robust_cert.signing import PUBLIC_KEYS_ENV, Keyring, now_us, sign_claim
from tests.conftest import PUBLIC_KEY


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """(gated store, plain store, model dir) on one sqlite database."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    monkeypatch.setenv(PUBLIC_KEYS_ENV, PUBLIC_KEY)
    monkeypatch.setenv("ROBUST_CERT_VERIFY_ARTIFACTS", "false")
    monkeypatch.setenv("ROBUST_CERT_ALLOWED_POLICIES", "p")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    gated = GatedRegistryStore("robustcert+" + db)
    plain = SqlAlchemyStore(db)
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"certified bytes")
    gated.create_registered_model("m")
    gated.create_model_version("m", str(model))
    return gated, plain, model


def _token(model_dir, verdict="PASS", issued_us=None) -> str:
    return sign_claim({
        "model": "m", "version": 1, "verdict": verdict, "policy": "p",
        "policy_sha256": "a" * 64, "model_sha256": artifacts_sha256(model_dir),
        "certificate_digest": "c" * 64, "run_id": "r" * 32,
        "issued_us": issued_us or now_us()}, Keyring.from_env())


def _denied(fn, *args, match: str):
    with pytest.raises(MlflowException) as exc:
        fn(*args)
    assert exc.value.error_code == "PERMISSION_DENIED", exc.value.message
    assert match in exc.value.message, exc.value.message


def test_artifact_switch_is_gone(stores, caplog):
    gated, _, model = stores
    with caplog.at_level(logging.ERROR):
        GatedRegistryStore(f"robustcert+{gated.db_uri}")
    assert "ROBUST_CERT_VERIFY_ARTIFACTS=false is IGNORED" in caplog.text
    gated.set_model_version_tag("m", "1", ModelVersionTag(CERT_TAG, _token(model)))
    (model / "weights.bin").write_bytes(b"other bytes")  # the certificate moves to new bytes
    _denied(gated.set_registered_model_alias, "m", "production", "1", match="no longer match")
    (model / "weights.bin").write_bytes(b"certified bytes")
    gated.set_registered_model_alias("m", "production", "1")


def test_a_tag_written_around_the_gate_is_refused(stores):
    """A second, ungated server on the same database can write any tag; the gated server
    still promotes only the certificate its ledger recorded."""
    gated, plain, model = stores
    old = _token(model)
    gated.set_model_version_tag("m", "1", ModelVersionTag(CERT_TAG, old))
    gated.set_model_version_tag("m", "1", ModelVersionTag(CERT_TAG, _token(model, "FAIL")))
    plain.set_model_version_tag("m", "1", ModelVersionTag(CERT_TAG, old))  # replay, ungated
    _denied(gated.set_registered_model_alias, "m", "production", "1",
            match="not the one the registry recorded")
    # a valid PASS the gate never saw (signed but written only through the ungated store)
    plain.set_model_version_tag("m", "1", ModelVersionTag(CERT_TAG, _token(model)))
    _denied(gated.set_registered_model_alias, "m", "production", "1",
            match="not the one the registry recorded")


def test_ledger_sequence_is_strict_per_canonical_version(stores):
    gated, _, model = stores
    t = now_us()
    first, same_time = _token(model, issued_us=t), _token(model, "FAIL", issued_us=t)
    gated.set_model_version_tag("m", "01", ModelVersionTag(CERT_TAG, first))
    _denied(gated.set_model_version_tag, "m", "1", ModelVersionTag(CERT_TAG, same_time),
            match="not newer")
    gated.delete_model_version_tag("m", "+1", CERT_TAG)
    _denied(gated.set_model_version_tag, "m", "1", ModelVersionTag(CERT_TAG, first),
            match="not newer")
    later = _token(model, issued_us=t + 1)
    gated.set_model_version_tag("m", "1", ModelVersionTag(CERT_TAG, later))
    assert [(seq, event) for seq, event, _ in gated.ledger.events("m", 1)] == [
        (1, "accepted"), (2, "removed"), (3, "accepted")]
    gated.set_registered_model_alias("m", "production", "001")
