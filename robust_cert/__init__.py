"""robust_cert: certify classifiers for robustness with statistical guarantees.

    >>> import robust_cert
    >>> cert = robust_cert.certify(model, "digits", "examples/policies/digits.yaml")
    >>> cert.verdict
    'PASS'
"""

from __future__ import annotations

from robust_cert.api import certify, load_model
from robust_cert.certificate import Certificate
from robust_cert.data import EvalSet, load_data
from robust_cert.errors import DataError, ModelError, PolicyError, RobustCertError, TrackingError
from robust_cert.policy import Policy, load_policy

__version__ = "0.1.0"

__all__ = [
    "Certificate",
    "DataError",
    "EvalSet",
    "ModelError",
    "Policy",
    "PolicyError",
    "RobustCertError",
    "TrackingError",
    "certify",
    "load_data",
    "load_model",
    "load_policy",
]
