"""Small helpers shared by several test files."""

from __future__ import annotations

import time

import numpy as np


def paired(n: int, a_only: int, b_only: int, both: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-point successes of two versions on ``n`` points: ``a_only`` points where only A
    succeeds, then ``b_only`` where only B does, then ``both``; the rest fail for both."""
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:a_only] = True
    b[a_only:a_only + b_only] = True
    a[a_only + b_only:a_only + b_only + both] = True
    b[a_only + b_only:a_only + b_only + both] = True
    return a, b


def wait_for(condition, within_s: float, poll_s: float = 0.05):
    """Poll ``condition`` (work happens in other threads/processes) until truthy or the time
    is up; returns its last value (the assertions after it say what was expected)."""
    end = time.monotonic() + within_s
    while True:
        value = condition()
        if value or time.monotonic() > end:
            return value
        time.sleep(poll_s)
