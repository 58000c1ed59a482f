"""Ed25519 signing: keys from the environment, rotation, compact tokens, canonical versions,
signed manifests over the report files, and `robust-cert keygen` / `verify manifest.json`."""

from __future__ import annotations

import json
import os
import stat

import pytest

from robust_cert.cli import main
from robust_cert.signing import (
    KEY_ENV,
    KEY_FILE_ENV,
    PUBLIC_KEYS_ENV,
    Keyring,
    SignatureError,
    SigningKeyError,
    canonical_version,
    generate_private_key_pem,
    now_us,
    public_pem,
    sign_claim,
    sign_manifest,
    signature_block,
    verify_claim,
    verify_manifest,
    verify_signature_block,
)

CLAIM = {"model": "digits-cnn", "version": 2, "verdict": "PASS", "policy": "digits;prod",
         "policy_sha256": "a" * 64, "model_sha256": "b" * 64, "certificate_digest": "c" * 64,
         "run_id": "0123456789abcdef0123456789abcdef"}


def _pair():
    k = Keyring.from_private_pem(generate_private_key_pem())
    return k, Keyring.from_public_pems(public_pem(k.private.public_key()))


def test_token_is_compact_and_binds_model_and_version():
    signer, verifier = _pair()
    token = sign_claim({**CLAIM, "issued_us": now_us()}, signer)
    assert len(token) < 340
    assert token.startswith(f"rc1;{signer.signing_kid};PASS;digits%3Bprod;")
    claim = verify_claim(token, verifier, name="digits-cnn", version="2")
    assert claim["policy"] == "digits;prod"
    assert claim["kid"] == signer.signing_kid
    assert claim["issued_at"].endswith("Z")
    for name, version in (("digits-cnn", 1), ("other", 2)):
        with pytest.raises(SignatureError, match="does not verify"):
            verify_claim(token, verifier, name=name, version=version)
    with pytest.raises(SignatureError, match="unknown key"):
        verify_claim(token, _pair()[1], name="digits-cnn", version=2)
    with pytest.raises(SignatureError, match="malformed"):
        verify_claim(token[:-3], verifier, name="digits-cnn", version=2)


def test_versions_are_canonical_integers():
    assert canonical_version("7") == 7
    assert canonical_version(7) == 7
    for bad in ("07", "+7", " 7", "7.0", "0", "", "٧", True, -1, 7.0):
        with pytest.raises(ValueError, match="version"):
            canonical_version(bad)
    signer, verifier = _pair()
    with pytest.raises(ValueError, match="not canonical"):
        sign_claim({**CLAIM, "version": "02", "issued_us": 1}, signer)
    token = sign_claim({**CLAIM, "issued_us": 1}, signer)
    with pytest.raises(SignatureError, match="not canonical"):
        verify_claim(token, verifier, name="digits-cnn", version="02")


def test_verifiers_cannot_sign():
    _, verifier = _pair()
    with pytest.raises(SigningKeyError, match="no private key"):
        sign_claim({**CLAIM, "issued_us": 1}, verifier)


def test_keys_from_the_environment_and_rotation(tmp_path):
    old, new = _pair()[0], _pair()[0]
    keydir = tmp_path / "public"
    keydir.mkdir()
    for k in (old, new):
        (keydir / f"{k.signing_kid}.pem").write_text(public_pem(k.private.public_key()))
    gate = Keyring.public_from_env({PUBLIC_KEYS_ENV: str(keydir)})
    assert set(gate.public) == {old.signing_kid, new.signing_kid}
    assert gate.private is None
    for k in (old, new):  # both verify during the rotation
        token = sign_claim({**CLAIM, "issued_us": 5}, k)
        assert verify_claim(token, gate, name="digits-cnn", version=2)["kid"] == k.signing_kid
    pem_text = public_pem(new.private.public_key()) + public_pem(old.private.public_key())
    assert set(Keyring.public_from_env({PUBLIC_KEYS_ENV: pem_text}).public) == set(gate.public)
    files = os.pathsep.join(str(p) for p in sorted(keydir.glob("*.pem")))
    assert set(Keyring.public_from_env({PUBLIC_KEYS_ENV: files}).public) == set(gate.public)
    # the certifier: private key as PEM text or as a file
    from robust_cert.signing import private_pem

    pem = private_pem(new.private)
    assert Keyring.from_env({KEY_ENV: pem}).signing_kid == new.signing_kid
    key_file = tmp_path / "k.key"
    key_file.write_text(pem)
    assert Keyring.from_env({KEY_FILE_ENV: str(key_file)},
                            require_private=True).signing_kid == new.signing_kid
    # clear errors naming the settings
    with pytest.raises(SigningKeyError, match=PUBLIC_KEYS_ENV):
        Keyring.public_from_env({})
    with pytest.raises(SigningKeyError, match=KEY_ENV):
        Keyring.from_env({})
    with pytest.raises(SigningKeyError, match=KEY_FILE_ENV):
        Keyring.from_env({PUBLIC_KEYS_ENV: pem_text}, require_private=True)
    with pytest.raises(SigningKeyError, match="PEM text"):
        Keyring.from_env({KEY_ENV: "an-old-hmac-secret-0123456789"})
    with pytest.raises(SigningKeyError, match="cannot read"):
        Keyring.from_env({KEY_FILE_ENV: str(tmp_path / "missing")})


def test_signature_block_and_manifest(tmp_path):
    signer, verifier = _pair()
    token = sign_claim({**CLAIM, "issued_us": 9}, signer)
    block = signature_block(token, verify_claim(token, verifier, name="digits-cnn", version=2))
    assert block["alg"] == "Ed25519"
    assert block["kid"] == signer.signing_kid
    assert token.endswith(block["sig"])
    assert verify_signature_block(block, verifier)["verdict"] == "PASS"
    shown = json.loads(json.dumps(block))
    shown["claim"]["verdict"] = "FAIL"  # the readable copy cannot disagree with the token
    with pytest.raises(SignatureError, match="differs"):
        verify_signature_block(shown, verifier)
    (tmp_path / "report.html").write_text("<html>PASS</html>")
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.7 ...")
    from robust_cert.signing import file_sha256

    doc = sign_manifest({"claim": token, "files": {
        n: file_sha256(tmp_path / n) for n in ("report.html", "report.pdf")}}, signer)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    assert verify_manifest(doc, verifier, root=tmp_path)["claim"] == token
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.7 changed")
    with pytest.raises(SignatureError, match="report.pdf"):
        verify_manifest(doc, verifier, root=tmp_path)
    doc["manifest"]["files"]["report.pdf"] = file_sha256(tmp_path / "report.pdf")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(doc, verifier)


def test_keygen_and_verify_manifest_commands(tmp_path, capsys, monkeypatch):
    assert main(["keygen", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    (private,) = (tmp_path / "keys").glob("signing-*.key")
    (public,) = (tmp_path / "keys").glob("public-*.pem")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    kid = private.name.removeprefix("signing-").removesuffix(".key")
    assert f"key id {kid}" in out
    assert public.name == f"public-{kid}.pem"
    # a directory of public keys is what the gate reads: the private key is not a *.pem
    assert set(Keyring.public_from_env({PUBLIC_KEYS_ENV: str(tmp_path / "keys")}).public) \
        == {kid}
    signer = Keyring.from_env({KEY_FILE_ENV: str(private)}, require_private=True)
    (tmp_path / "report.html").write_text("report")
    from robust_cert.signing import file_sha256

    doc = sign_manifest({"files": {"report.html": file_sha256(tmp_path / "report.html")}},
                        signer)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv(PUBLIC_KEYS_ENV, str(public))  # verify holds the public key only
    assert main(["verify", str(tmp_path / "manifest.json")]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    (tmp_path / "report.html").write_text("altered")
    assert main(["verify", str(tmp_path / "manifest.json")]) == 1
    assert "NOT VERIFIED: report.html" in capsys.readouterr().out


@pytest.mark.parametrize(("verdict", "code"), [("PASS", 0), ("FAIL", 4), ("INCONCLUSIVE", 4)])
def test_verify_of_a_certification_manifest_exits_on_its_signed_verdict(
        tmp_path, capsys, monkeypatch, verdict, code):
    """`robust-cert verify manifest.json && deploy` must not deploy a signed FAIL."""
    monkeypatch.setenv(KEY_ENV, generate_private_key_pem())  # verify derives the public key
    signer = Keyring.from_env(require_private=True)
    token = sign_claim({**CLAIM, "verdict": verdict, "issued_us": now_us()}, signer)
    (tmp_path / "certificate.json").write_text("{}")
    from robust_cert.signing import file_sha256

    manifest = {"model": CLAIM["model"], "version": CLAIM["version"], "verdict": verdict,
                "certificate_digest": CLAIM["certificate_digest"], "claim": token,
                "files": {"certificate.json": file_sha256(tmp_path / "certificate.json")}}
    (tmp_path / "manifest.json").write_text(json.dumps(sign_manifest(manifest, signer)))
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "manifest.json")]) == code
    assert f"verdict {verdict}" in capsys.readouterr().out
    # a manifest whose unsigned-looking verdict was edited no longer verifies
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["manifest"]["verdict"] = "PASS" if verdict != "PASS" else "FAIL"
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    assert main(["verify", str(tmp_path / "manifest.json")]) == 1


def test_canonical_version_refuses_a_trailing_newline():
    with pytest.raises(ValueError, match="not canonical"):
        canonical_version("1\n")
    assert canonical_version("1") == 1
