"""Small helpers shared by several test files."""

from __future__ import annotations

import json
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


def assert_identical(a, b) -> None:
    """Two MetricResults bit for bit the same: identity, counts (clustered counts too),
    per-point arrays (dtype, shape, bytes, key order), diagnostics, description."""
    assert (a.metric, a.kind, a.status, a.reason, a.config, a.description) == \
        (b.metric, b.kind, b.status, b.reason, b.config, b.description)
    assert [(p.params, p.k, p.n, p.population) for p in a.proportions] == \
        [(p.params, p.k, p.n, p.population) for p in b.proportions]
    for p, q in zip(a.proportions, b.proportions, strict=True):
        assert p.clustered == q.clustered
        if p.clustered:
            assert p.cluster_k.tobytes() == q.cluster_k.tobytes()
            assert p.cluster_n.tobytes() == q.cluster_n.tobytes()
    assert list(a.per_point) == list(b.per_point)
    for key, v in a.per_point.items():
        w = b.per_point[key]
        assert (v.dtype, v.shape) == (w.dtype, w.shape), key
        assert v.tobytes() == w.tobytes(), key
    # NaN is not equal to itself in a dict comparison; the JSON texts are
    assert a.diagnostics == b.diagnostics or \
        json.dumps(a.diagnostics, sort_keys=True, default=repr) == \
        json.dumps(b.diagnostics, sort_keys=True, default=repr)
