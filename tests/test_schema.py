"""The typed certificate: a stored certificate from before the schema keeps its digest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from robust_cert.certificate import Certificate, canonical_json

#: written by ``robust_cert.certify`` (a linear model on 24 digits points, seed 1) with the
#: code before the certificate schema existed; its recorded digest must keep verifying
STORED = Path(__file__).parent / "data" / "certificate-v1-pre-schema.json"


def test_stored_certificate_keeps_its_digest():
    raw = json.loads(STORED.read_text(encoding="utf-8"))
    cert = Certificate.load(STORED)
    assert cert.digest == raw["digest"]
    assert cert.digest == hashlib.sha256(canonical_json(raw["certificate"]).encode()).hexdigest()
    assert cert.to_json() == STORED.read_text(encoding="utf-8")
