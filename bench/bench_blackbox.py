"""Black-box throughput: the Square attack on scikit-learn models against the models' own
``predict_proba`` for the same queries, in one command:

    .venv/bin/python bench/bench_blackbox.py

For each model, robust accuracy with Square alone runs on a tabular set (30 features, 3
classes) through robust_cert's black-box Classifier, recording every array it sends to
``predict_proba`` and timing each of those calls where the attack makes them. The *ideal*
is ``predict_proba`` on exactly those arrays (the same queries, the same batch sizes; the
attack is seeded, so every run sends the same ones, which the bench checks, across thread
counts too), measured two ways:

* **separate replay** (the target): ``predict_proba`` replayed back to back on the recorded
  arrays after the attack, and on float32 copies of them (the same values: the data are
  float32) in case the model converts less from them; the fastest of 3 against the
  attack's fastest of 3. This is the model's best time for those queries;
* **paired** (a row, not the target): each query is asked a second time right after the
  attack's own call, back to back, and timed; the attack's time is its wall time without
  those second calls, and the ratio is the sum over the runs of the attack ÷ the sum of its
  paired calls. Both halves see the same load at the same moments, so it moves less with
  the load; but on gradient boosting the second call was measured about as slow as the
  first (both slower than in the back-to-back replay), so it leaves out the model's
  slow-down inside the attack and would flatter Square as the target.

Threads: both sides run under the same limits, at 1 thread and, when ``predict_proba`` on
the first queries is faster there, at every core. The attack runs as ``robust-cert certify
--threads T`` runs it: torch on T threads and the models' native pools (scikit-learn's
OpenMP, BLAS) limited to T (``robust_cert.devices.library_threads``, which a certification
opens around a black-box model's queries); the replay runs under the same pool limit. After
a warm-up run, everything runs 3 times, interleaved. Square's best thread count is compared
with the model's best, and the ratio at each thread count is printed too.

Each row splits the attack's wall time into the model's calls inside it (timed around the
exact ``predict_proba`` call the attack makes) and the rest, Square's own work, so a gap is
either Square's work or the model running slower between Square's steps than back to back
(caches). The same split in CPU time of the one thread (``time.thread_time``, at 1 thread,
where all the work is on it) moves much less with other processes' load than wall time (an
indication, not the target).

Target (issue 22): ≤ 1.2× on models whose predict_proba is the work (a random forest,
gradient boosting). A logistic regression, whose predict_proba on a batch takes
microseconds, is listed with the fixed overhead per query batch (µs) instead: its ratio
measures the attack loop, not the model. The gradient-boosting model runs a second time
under a per-feature threat model (policy ``features: {scale: std, immutable: [5 features]}``,
robust_cert.tabular): every query is decoded from the encoded coordinates first, and the
same target holds. Exit 1 when a target is missed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
import torch
from harness import CPU, finish, load_average, row, timed

from robust_cert.data import EvalSet
from robust_cert.devices import library_threads
from robust_cert.metrics.adversarial import RobustAccuracy, RobustAccuracyConfig
from robust_cert.metrics.base import RunContext
from robust_cert.models.blackbox import from_predict

TARGET = 1.2
POINTS, FEATURES, QUERIES, EPS, BATCH, REPS = 256, 30, 300, 0.25, 256, 3
#: the thread counts both sides run at: one, and every core
THREADS = tuple(sorted({1, os.cpu_count() or 1}))
#: query batches timed to decide whether a thread count is run (see :func:`probe`)
PROBE = 40


def tabular(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, FEATURES)).astype(np.float32)
    w = rng.normal(size=(FEATURES, 3))
    y = (x @ w + rng.normal(scale=1.0, size=(n, 3))).argmax(1)
    return x, y


def probe(est, queries: list[np.ndarray], threads: int) -> float:
    """The best of 3 wall times of ``predict_proba`` on the first :data:`PROBE` queries under
    a limit of ``threads``: whether a thread count is worth running both sides at (on a
    loaded machine, OpenMP on every core can be several times slower than one thread, and a
    full run there would take minutes for nothing)."""
    with library_threads(threads):
        return min(timed(lambda: [est.predict_proba(q) for q in queries[:PROBE]])[1]
                   for _ in range(3))


@contextlib.contextmanager
def certify_threads(threads: int):
    """Torch's intra-op threads and the native pools at ``threads``, as ``robust-cert certify
    --threads`` sets them around a black-box model's metric run; torch back to 1 after."""
    torch.set_num_threads(threads)
    try:
        with library_threads(threads):
            yield
    finally:
        torch.set_num_threads(1)


def measure(label: str, estimator, targeted: bool, features: bool = False) -> None:
    from sklearn.base import clone

    x, y = tabular(2000 + POINTS, seed=0)
    est = clone(estimator).fit(x[:2000], y[:2000])
    xe, ye = torch.from_numpy(x[2000:]), torch.from_numpy(y[2000:])
    queries: list[np.ndarray] = []
    # the model's calls inside the attack, then the paired replay of each right after it:
    # wall, CPU of this thread
    inside, paired = [0.0, 0.0], [0.0, 0.0]

    def recorded(rows):
        queries.append(rows)
        t, c = time.perf_counter(), time.thread_time()
        out = est.predict_proba(rows)
        t2, c2 = time.perf_counter(), time.thread_time()
        est.predict_proba(rows)  # the same query again, back to back: the paired ideal
        t3, c3 = time.perf_counter(), time.thread_time()
        inside[0] += t2 - t
        inside[1] += c2 - c
        paired[0] += t3 - t2
        paired[1] += c3 - c2
        return out

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

    def attack(threads: int) -> tuple[float, float]:
        """One seeded run at ``threads``: (wall s, CPU s of this thread) of the attack without
        its paired replay calls; fills queries, inside and paired."""
        queries.clear()
        inside[:], paired[:] = [0.0, 0.0], [0.0, 0.0]
        with certify_threads(threads):
            c = time.thread_time()
            out, t = timed(lambda: metric.run(clf, data, RunContext(CPU, batch_size=BATCH,
                                                                      seed=0)))
            result[:] = [out]
            return t - paired[0], time.thread_time() - c - paired[1]

    result: list = []
    attack(1)  # warm-up (lazy imports, first allocations); its queries pick the threads
    first = list(queries)
    one = probe(est, first, 1)
    threads_run = [1] + [t for t in THREADS if t > 1 and probe(est, first, t) < one]
    inf = float("inf")
    square = dict.fromkeys(threads_run, inf)  # wall of the attack, per thread count
    model_in = dict.fromkeys(threads_run, inf)  # wall of the model's calls inside it
    replay = {(t, k): inf for t in threads_run for k in ("as sent", "float32")}
    square_cpu = model_cpu = replay_cpu = inf  # at one thread, CPU of this thread
    # sums over the runs at each thread count: the attack, its paired replay (the target)
    square_sum, paired_sum = dict.fromkeys(threads_run, 0.0), dict.fromkeys(threads_run, 0.0)
    for _ in range(REPS):  # interleaved, best of each: load from others hits both alike
        for threads in threads_run:
            t, c = attack(threads)
            square_sum[threads] += t
            paired_sum[threads] += paired[0]
            square[threads] = min(square[threads], t)
            model_in[threads] = min(model_in[threads], inside[0])
            if threads == 1:
                square_cpu, model_cpu = min(square_cpu, c), min(model_cpu, inside[1])
            if len(queries) != len(first) or not all(
                    np.array_equal(a, b) for a, b in zip(queries, first, strict=True)):
                raise SystemExit(f"{label}: the seeded attack sent other queries in another "
                                 "run")
            f32 = [q.astype(np.float32) for q in queries]
            for kind, arrays in (("as sent", queries), ("float32", f32)):
                with library_threads(threads):
                    c = time.thread_time()
                    _, t = timed(lambda arrays=arrays: [est.predict_proba(q) for q in arrays])
                    c = time.thread_time() - c
                replay[threads, kind] = min(replay[threads, kind], t)
                if threads == 1 and kind == "as sent":
                    replay_cpu = min(replay_cpu, c)
    res = result[0]
    calls, rows = len(queries), sum(len(q) for q in queries)
    best_t = min(threads_run, key=lambda t: square[t])
    (ideal_t, ideal_kind) = min(replay, key=lambda k: replay[k])
    square_s, ideal_s = square[best_t], replay[ideal_t, ideal_kind]
    ratio = square_s / ideal_s
    robust = res.proportions[0].estimate
    row(f"{label}: queries", f"{calls} calls, {rows} rows; robust accuracy {robust:.3f}")
    pt_s = min(threads_run, key=lambda t: square_sum[t])
    pt_i = min(threads_run, key=lambda t: paired_sum[t])
    paired_ratio = square_sum[pt_s] / paired_sum[pt_i]
    row(f"{label}: Square / predict_proba",
        f"{square_s:.2f} s ({best_t} thr.) / {ideal_s:.2f} s ({ideal_t} thr., "
        f"{ideal_kind}) = {ratio:.2f}×", f"≤ {TARGET}×" if targeted else "",
        ratio <= TARGET if targeted else None)
    row(f"{label}: the same against the paired calls (not the target)",
        f"{square_sum[pt_s] / REPS:.2f} s ({pt_s} thr.) / {paired_sum[pt_i] / REPS:.2f} s "
        f"({pt_i} thr.) = {paired_ratio:.2f}×")
    at = {t: min(replay[t, k] for k in ("as sent", "float32")) for t in threads_run}
    same = "; ".join(f"{t} thr. {square[t]:.2f} s / {at[t]:.2f} s = {square[t] / at[t]:.2f}×"
                     for t in threads_run)
    if len(threads_run) < len(THREADS):
        same += (f" ({', '.join(str(t) for t in THREADS if t not in threads_run)} thr. not run: "
                 "predict_proba was slower there on the first queries)")
    row(f"{label}: the same at each thread count", same)
    own = square[best_t] - model_in[best_t]
    row(f"{label}: split of the attack ({best_t} thr.)",
        f"model inside {model_in[best_t]:.2f} s vs replay {replay[best_t, 'as sent']:.2f} s "
        f"({model_in[best_t] / replay[best_t, 'as sent']:.2f}×, "
        f"{(model_in[best_t] - replay[best_t, 'as sent']) / calls * 1e6:+.0f} µs per call); "
        f"Square's own work {own:.2f} s = {own / calls * 1e6:.0f} µs per query batch")
    row(f"{label}: the same in CPU time of the one thread",
        f"{square_cpu:.2f} s / {replay_cpu:.2f} s = {square_cpu / replay_cpu:.2f}×; model "
        f"inside {model_cpu:.2f} s ({model_cpu / replay_cpu:.2f}× the replay); Square's own "
        f"{(square_cpu - model_cpu) / calls * 1e6:.0f} µs per query batch")
    if not targeted:
        row(f"{label}: overhead per query batch",
            f"{(square_sum[pt_s] - paired_sum[pt_i]) / REPS / calls * 1e6:.0f} µs paired, "
            f"{(square_s - ideal_s) / calls * 1e6:.0f} µs against the separate replay")


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
