"""The three verdicts of a certification, importable without torch or pydantic.

:class:`Verdict` is a ``str`` subclass whose members equal, hash, format and serialise as the
bare strings ``"PASS"``, ``"FAIL"`` and ``"INCONCLUSIVE"``: JSON, certificate digests, MLflow
tags and comparisons with the strings stored in older certificates are unchanged. What each
verdict means is in :mod:`robust_cert.verdict`, which re-exports it.
"""

from __future__ import annotations

from enum import Enum


class Verdict(str, Enum):
    """PASS: demonstrated at the policy's confidence; FAIL: the opposite bound excludes the
    threshold; INCONCLUSIVE: the data show neither (or a failed sanity check forbids it)."""

    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"

    def __str__(self) -> str:
        # "PASS", not "Verdict.PASS" (the default of a str mix-in on Python 3.12+)
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def overall(cls, verdicts) -> Verdict:
        """The verdict of a family of requirements: FAIL if any fails, else INCONCLUSIVE if
        any is inconclusive, else PASS (also for an empty family)."""
        found = set(verdicts)
        return cls.FAIL if cls.FAIL in found else (
            cls.INCONCLUSIVE if cls.INCONCLUSIVE in found else cls.PASS)
