"""robust_cert: certify classifiers for robustness with statistical guarantees.

    >>> import robust_cert
    >>> cert = robust_cert.certify(model, "digits", "examples/policies/digits.yaml")
    >>> cert.verdict
    'PASS'

The public names are imported on first use (PEP 562), so ``import robust_cert`` and
``robust-cert --help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"


#: public name -> the module that defines it
_PUBLIC = {
    "certify": "robust_cert.api",
    "load_model": "robust_cert.loaders",
    "Loader": "robust_cert.loaders",
    "register_loader": "robust_cert.loaders",
    "Certificate": "robust_cert.certificate",
    "EvalSet": "robust_cert.data",
    "load_data": "robust_cert.data",
    "DataSpec": "robust_cert.sources",
    "Source": "robust_cert.sources",
    "register_source": "robust_cert.sources",
    "DataError": "robust_cert.errors",
    "ModelError": "robust_cert.errors",
    "PolicyError": "robust_cert.errors",
    "RobustCertError": "robust_cert.errors",
    "TrackingError": "robust_cert.errors",
    "Policy": "robust_cert.policy",
    "load_policy": "robust_cert.policy",
    # deployments load registered models through it (checks the signed certificate)
    "load_verified": "robust_cert.mlflow_plugin.verified",
}

__all__ = [
    "Certificate",
    "DataError",
    "DataSpec",
    "EvalSet",
    "Loader",
    "ModelError",
    "Policy",
    "PolicyError",
    "RobustCertError",
    "Source",
    "TrackingError",
    "certify",
    "load_data",
    "load_model",
    "load_policy",
    "load_verified",
    "register_loader",
    "register_source",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from robust_cert.api import certify
    from robust_cert.certificate import Certificate
    from robust_cert.data import EvalSet, load_data
    from robust_cert.errors import (
        DataError,
        ModelError,
        PolicyError,
        RobustCertError,
        TrackingError,
    )
    from robust_cert.loaders import Loader, load_model, register_loader
    from robust_cert.mlflow_plugin.verified import load_verified
    from robust_cert.policy import Policy, load_policy
    from robust_cert.sources import DataSpec, Source, register_source


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'robust_cert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
