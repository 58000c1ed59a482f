"""Exceptions robust_cert raises for bad input. Each message names the problem in one line."""

from __future__ import annotations


class RobustCertError(Exception):
    """Base class: a problem the user can fix (bad model, data, policy, server)."""


class PolicyError(RobustCertError):
    """The policy file is invalid; the message names the offending key and why."""


class DataError(RobustCertError):
    """The evaluation data does not fit the model or is malformed."""


class ModelError(RobustCertError):
    """The model is missing, unreadable, or does not behave like a classifier."""


class TrackingError(RobustCertError):
    """The MLflow tracking or registry server cannot be used."""
