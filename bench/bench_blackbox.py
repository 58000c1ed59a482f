"""Black-box throughput: the Square attack on scikit-learn models against the models' own
``predict_proba`` for the same queries, in one command:

    .venv/bin/python bench/bench_blackbox.py

One CPU thread: torch's, and the models' own thread pools (scikit-learn's OpenMP, BLAS)
limited to one as a certification on one thread limits them
(``robust_cert.devices.library_threads``, which ``robust_cert.api.certify`` opens around a
black-box model's queries). For each model, robust accuracy with Square alone runs on
a tabular set (30 features, 3 classes) through robust_cert's black-box Classifier, recording
every array it sends to ``predict_proba``; the *ideal* time is then ``predict_proba``
replayed on exactly those arrays (the same queries, the same batch sizes, already in the
dtype the model takes; the attack is seeded, so every run sends the same ones, which the
bench checks). The replay runs both on one thread and on the libraries' default threads,
and the faster counts: the ideal is the best way to call ``predict_proba`` on those queries
(for batches of a few dozen rows one thread is the faster on the 2-core machine measured).
Everything runs 3 times, interleaved, and the fastest of each is kept. The cost is Square's
wall time ÷ the ideal: what Square, the Classifier's numpy round trips and the output checks
add to the model's own work. Each row also prints the same ratio in CPU time of the one
thread both run on (``time.thread_time``; the replay on one thread), and the CPU time per
query batch that Square adds: on a machine shared with other processes the wall-time ratio
grows with the load, the CPU-time one much less (an indication, not the target).

Target (issue 22): ≤ 1.2× on models whose predict_proba is the work (a random forest,
gradient boosting). A logistic regression, whose predict_proba on a batch takes
microseconds, is listed with the fixed overhead per query batch (µs) instead: its ratio
measures the attack loop, not the model. The gradient-boosting model runs a second time
under a per-feature threat model (policy ``features: {scale: std, immutable: [5 features]}``,
robust_cert.tabular): every query is decoded from the encoded coordinates first, and the
same target holds. Exit 1 when a target is missed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from harness import CPU, finish, load_average, row, timed
from threadpoolctl import threadpool_limits

from robust_cert.data import EvalSet
from robust_cert.devices import library_threads
from robust_cert.metrics.adversarial import RobustAccuracy, RobustAccuracyConfig
from robust_cert.metrics.base import RunContext
from robust_cert.models.blackbox import from_predict

TARGET = 1.2
POINTS, FEATURES, QUERIES, EPS, BATCH, REPS = 256, 30, 300, 0.25, 256, 3


def tabular(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, FEATURES)).astype(np.float32)
    w = rng.normal(size=(FEATURES, 3))
    y = (x @ w + rng.normal(scale=1.0, size=(n, 3))).argmax(1)
    return x, y


def measure(label: str, estimator, targeted: bool, features: bool = False) -> None:
    from sklearn.base import clone

    x, y = tabular(2000 + POINTS, seed=0)
    est = clone(estimator).fit(x[:2000], y[:2000])
    xe, ye = torch.from_numpy(x[2000:]), torch.from_numpy(y[2000:])
    queries: list[np.ndarray] = []

    def recorded(rows):
        queries.append(rows)
        return est.predict_proba(rows)

    clf = from_predict(recorded, n_features=FEATURES, fmt="sklearn", sha256="0" * 64,
                       name=label, classes=est.classes_)
    data = EvalSet(x=xe, y=ye, input_range=(-1.5, 1.5), name="bench", source="bench",
                   sha256="0" * 64)
    if features:  # ε in standard deviations, five features immutable: the encoded set
        from robust_cert.policy import FeatureSpec
        from robust_cert.tabular import fit

        threat = fit(FeatureSpec(scale="std", immutable=list(range(5))), data)
        clf, data = threat.wrap(clf), threat.encode(data)
    metric = RobustAccuracy(RobustAccuracyConfig(eps=[EPS], attacks=["square"],
                                                 square_queries=QUERIES))
    square_s = ideal_s = square_cpu = ideal_cpu = float("inf")
    first: list[np.ndarray] = []
    for _ in range(REPS):  # interleaved, best of each: load from others hits both alike
        queries.clear()
        with library_threads(1):
            c = time.thread_time()
            res, t = timed(lambda: metric.run(clf, data, RunContext(CPU, batch_size=BATCH,
                                                                      seed=0)))
            square_cpu = min(square_cpu, time.thread_time() - c)
        square_s = min(square_s, t)
        first = first or list(queries)
        if len(queries) != len(first) or not all(
                np.array_equal(a, b) for a, b in zip(queries, first, strict=True)):
            raise SystemExit(f"{label}: the seeded attack sent other queries in another run")
        for threads in (1, None):  # one thread, the libraries' default: the faster counts
            with threadpool_limits(threads):
                c = time.thread_time()
                _, t = timed(lambda: [est.predict_proba(q) for q in queries])
                if threads == 1:
                    ideal_cpu = min(ideal_cpu, time.thread_time() - c)
            ideal_s = min(ideal_s, t)
    calls, rows = len(queries), sum(len(q) for q in queries)
    ratio = square_s / ideal_s
    robust = res.proportions[0].estimate
    row(f"{label}: queries", f"{calls} calls, {rows} rows; robust accuracy {robust:.3f}")
    row(f"{label}: Square / predict_proba", f"{square_s:.2f} s / {ideal_s:.2f} s = "
        f"{ratio:.2f}×", f"≤ {TARGET}×" if targeted else "", ratio <= TARGET if targeted
        else None)
    row(f"{label}: the same in CPU time of the one thread",
        f"{square_cpu:.2f} s / {ideal_cpu:.2f} s = {square_cpu / ideal_cpu:.2f}×; "
        f"{(square_cpu - ideal_cpu) / calls * 1e6:.0f} µs per query batch")
    if not targeted:
        row(f"{label}: overhead per query batch",
            f"{(square_s - ideal_s) / calls * 1e6:.0f} µs")


def main() -> int:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(1)
    measure("random forest (100 trees)",
                 RandomForestClassifier(n_estimators=100, max_depth=10, random_state=0,
                                        n_jobs=1), targeted=True)
    measure("histogram gradient boosting (100 iter.)",
                  HistGradientBoostingClassifier(max_iter=100, random_state=0), targeted=True)
    measure("histogram gradient boosting, per-feature threat model",
            HistGradientBoostingClassifier(max_iter=100, random_state=0), targeted=True,
            features=True)
    measure("logistic regression", LogisticRegression(max_iter=500), targeted=False)
    return finish(f"bench_blackbox: load average at the end {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
