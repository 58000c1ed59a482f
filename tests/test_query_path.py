"""The black-box query path, made cheaper per query without changing what it computes:
FullSquare's L∞ loop against torchattacks' own loop (same draws, same queries, same result),
the window positions against ``random_int``'s float32 arithmetic, the vectorised output
checks of a black-box model, and the vectorised decoding of immutable features against a
per-column reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn
from torchattacks import Square

from robust_cert.errors import ModelError
from robust_cert.metrics.square import FullSquare
from robust_cert.models.blackbox import check_probabilities, from_predict


class _Recorded(nn.Module):
    """A small MLP that records every batch it is asked about; rows whose first input is
    above ``nan_above`` get NaN logits (a model that fails on some inputs)."""

    def __init__(self, d: int, classes: int, seed: int, nan_above: float | None = None,
                 double: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))
        self.nan_above, self.as_double = nan_above, double
        self.queries: list[torch.Tensor] = []

    def forward(self, x):
        self.queries.append(x.clone())
        out = self.net(x).double() if self.as_double else self.net(x)
        if self.nan_above is not None:
            out = torch.where((x.flatten(1)[:, :1] > self.nan_above), float("nan"), out)
        return out


def _labels(model: _Recorded, x: torch.Tensor) -> torch.Tensor:
    """The model's own predictions on ``x`` (the points' labels: every point starts robust)."""
    with torch.no_grad():
        return model.net(x).argmax(1)


def _single_runs(loop, x, model, seed: int, targeted: bool = False, **attack):
    """``attack_single_run`` of ``loop`` and of upstream's loop on ``x``, each on a fresh
    ``model()`` (a :class:`_Recorded`) with torch's generator at ``seed``: [(queries per
    point, best points, the queries the model saw)] for the two, in that order."""
    runs = []
    for cls in (loop, _UpstreamLoop):
        net = model()
        y = _labels(net, x)
        if targeted:
            y = (y + 1) % net.net[-1].out_features
        atk = cls(net, norm="Linf", seed=0, **attack)
        atk.targeted = targeted
        atk.init_hyperparam(x)
        net.queries.clear()
        torch.manual_seed(seed)
        n_queries, best = atk.attack_single_run(x, y)
        runs.append((n_queries, best, net.queries))
    return runs


class _TensorLoop(FullSquare):
    """FullSquare's L∞ loop in tensor operations (the path of inputs on a GPU), on the CPU."""

    def attack_single_run(self, x, y):
        return self._linf_torch(x, y)


class _UpstreamLoop(FullSquare):
    """torchattacks' own loop and margin, with FullSquare's window positions."""

    def attack_single_run(self, x, y):
        return Square.attack_single_run(self, x, y)

    def margin_and_loss(self, x, y):
        return Square.margin_and_loss(self, x, y)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("loop", [FullSquare, _TensorLoop], ids=["numpy", "tensor"])
@pytest.mark.parametrize(("shape", "eps", "loss", "targeted", "nan_above", "double"), [
    ((1, 1, 13), 0.15, "margin", False, None, False),  # a tabular row (the black-box layout)
    ((1, 1, 13), 0.4, "ce", False, None, False),
    ((3, 5, 6), 0.1, "margin", True, None, False),  # an image, targeted
    ((2, 4, 4), 0.3, "ce", True, None, False),
    ((1, 1, 9), 0.2, "margin", False, 0.8, False),  # NaN logits on some rows
    ((1, 1, 9), 0.25, "ce", False, 0.8, False),
    ((2, 3, 3), 0.2, "margin", False, None, True),  # float64 logits
    ((1, 1, 11), 0.3, "ce", True, None, True),
])
def test_linf_loop_makes_upstreams_queries_and_result(loop, shape, eps, loss, targeted,
                                                      nan_above, double):
    """Every query (rows, order, values), the queries per point and the best points equal
    upstream's loop on the same seed, including points that stop early (broken), points
    never broken, a query budget that runs out, and rows with NaN margins; for both of
    FullSquare's L∞ loops (numpy on the CPU, tensors elsewhere)."""
    d = int(np.prod(shape))
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.uniform(0, 1, size=(40, *shape)), dtype=torch.float32)
    model = functools.partial(_Recorded, d, 4, seed=5, nan_above=nan_above, double=double)
    (nq, best, queries), (nq_up, best_up, queries_up) = _single_runs(
        loop, x, model, 11, targeted=targeted, eps=eps, n_queries=120, loss=loss)
    assert len(queries) == len(queries_up)
    for q, q_up in zip(queries, queries_up, strict=True):
        _same(q, q_up)
        assert q.numpy().tobytes() == q_up.numpy().tobytes()  # the signs of zeros too
    _same(nq, nq_up)
    _same(best, best_up)
    assert ((nq > 1) & (nq < 121)).any()  # some stopped during the search
    assert (nq == 121).any()  # some ran the whole budget


@pytest.mark.parametrize("loop", [FullSquare, _TensorLoop], ids=["numpy", "tensor"])
def test_linf_loop_on_inputs_outside_the_unit_box_makes_upstreams_queries(loop):
    """Inputs further than ε outside [0, 1] (whose ε-box misses [0, 1]: the numpy loop's one
    clip to the intersection does not apply there, and it clips twice as upstream does): the
    same queries (to the sign of zeros), queries per point and best points as upstream."""
    x = torch.tensor(np.random.default_rng(5).uniform(-0.6, 1.6, size=(40, 1, 1, 9)),
                     dtype=torch.float32)
    (nq, best, queries), (nq_up, best_up, queries_up) = _single_runs(
        loop, x, functools.partial(_Recorded, 9, 3, seed=4), 2, eps=0.1, n_queries=50)
    assert len(queries) == len(queries_up) > 2
    for q, q_up in zip(queries, queries_up, strict=True):
        assert q.numpy().tobytes() == q_up.numpy().tobytes()
    _same(nq, nq_up)
    _same(best, best_up)
    assert ((best < 0) | (best > 1)).sum() == 0  # every query was clipped into [0, 1]


def test_full_attack_with_restarts_equals_upstreams_loop():
    """Through ``forward`` and ``perturb`` (two restarts, the per-channel layout of a
    (C, 1, 1) row): the same adversarial points as upstream's loop."""
    x = torch.tensor(np.random.default_rng(4).uniform(0, 1, size=(30, 10, 1, 1)),
                     dtype=torch.float32)
    outs = []
    for cls in (FullSquare, _UpstreamLoop):
        model = _Recorded(10, 3, seed=2)
        y = _labels(model, x)
        outs.append(cls(model, norm="Linf", eps=0.2, n_queries=60, n_restarts=2, seed=9)(x, y))
    _same(outs[0], outs[1])


def test_window_positions_follow_random_ints_float32_arithmetic(monkeypatch):
    """``_position(high)`` is ``random_int(0, high)`` as an int, for the same uniform draw t,
    including draws where ``span · t`` rounds up to an integer in float32 (the largest
    float32 below k / span) and the largest draw below 1."""
    atk = FullSquare(_Recorded(3, 2, seed=0), eps=0.1)
    draws = []
    for span in range(1, 70):
        for k in range(1, span + 1):
            edge = np.nextafter(np.float32(k / span), np.float32(0))
            draws += [(span, float(edge)), (span, float(np.float32(k / span)))]
        draws += [(span, float(np.nextafter(np.float32(1), np.float32(0)))), (span, 0.0)]
    draws += [(0, 0.3), (-4, 0.9)]  # a window wider than the image: position 0
    rounded_up = 0
    for span, t in draws:
        value = torch.tensor([t], dtype=torch.float32)
        monkeypatch.setattr(torch, "rand", lambda *a, v=value, **k: v.clone())
        expected = int(atk.random_int(0, span - 1))
        assert atk._position(span - 1) == expected, (span, t)
        rounded_up += span > 0 and expected == int(np.float32(span) * np.float32(t)) and \
            expected > int(span * t)
    assert rounded_up > 0  # the float32 rounding case was exercised


def test_output_checks_catch_every_bad_batch_in_forward_calls():
    """A model valid on the probe but not later: labels, NaN in one entry, ±inf, a row off 1
    by more than the tolerance, a negative entry; each refused with its one line at the call
    that sees it. Within the tolerance a row is accepted and a negative entry becomes log of
    float32 tiny."""
    bad = {
        1.0: (np.array([0.4, 0.6, np.nan]), "NaN or infinite"),
        2.0: (np.array([np.inf, 0.0, 0.0]), "NaN or infinite"),
        3.0: (np.array([-np.inf, 1.0, 1.0]), "NaN or infinite"),
        4.0: (np.array([0.5, 0.5, 2e-4]), "do not sum to 1"),
        5.0: (np.array([-0.01, 0.5, 0.51]), "negative values"),
    }

    def predict(rows):
        out = np.tile([0.2, 0.3, 0.5], (len(rows), 1))
        for i, v in enumerate(rows[:, 0]):
            if v in bad:
                out[i] = bad[v][0]
            if v == 6.0:
                out[i] = [-5e-5, 0.5, 0.50005]  # within the tolerance
        return out

    clf = from_predict(predict, n_features=2, fmt="pyfunc", sha256="0" * 64, name="m")
    ok = torch.zeros(5, 2)
    np.testing.assert_allclose(clf.logits(ok).numpy(), np.log([[0.2, 0.3, 0.5]] * 5),
                               rtol=1e-6)
    for value, (_, phrase) in bad.items():
        x = torch.zeros(5, 2)
        x[3, 0] = value
        with pytest.raises(ModelError, match=phrase) as err:
            clf.logits(x)
        assert "\n" not in str(err.value)
        if phrase == "NaN or infinite":
            assert "first row 3 of the batch" in str(err.value)
        if phrase == "do not sum to 1":
            assert "row 3 of the batch sums to 1.0002" in str(err.value)
    x = torch.zeros(5, 2)
    x[1, 0] = 6.0
    out = clf.logits(x).numpy()
    assert out[1, 0] == pytest.approx(np.log(np.finfo(np.float32).tiny), abs=1e-3)
    assert out[1, 2] == pytest.approx(np.log(0.50005), abs=1e-6)
    clipped = check_probabilities(predict(np.array([[6.0, 0.0]])), 1, "m")
    assert clipped[0, 0] == 0.0
    assert (clipped >= 0).all()
    labels = from_predict(lambda r: np.tile([0.5, 0.5], (len(r), 1)) if len(r) == 2
                          else np.zeros(len(r), dtype=np.int64),
                          n_features=2, fmt="pyfunc", sha256="0" * 64, name="m")
    with pytest.raises(ModelError, match=r"one value per row \(labels\?\)"):
        labels.logits(torch.zeros(3, 2))


def test_decode_of_immutable_features_equals_a_per_column_reference():
    """Decoding every immutable column at once equals decoding them one by one (round to the
    grid, clamp to the known values, look up), for perturbations that stay on a value, move
    to another index, or fall off either end of the list; free features are clipped to their
    range; gradients reach free features only. The numpy path (CPU, no gradients) and the
    tensor path give the same values, in float32 and float64."""
    from robust_cert.data import load_data
    from robust_cert.policy import FeatureSpec
    from robust_cert.tabular import fit

    rng = np.random.default_rng(8)
    n = 60
    x = np.stack([rng.uniform(-2, 2, n), rng.integers(0, 4, n) * 2.5, rng.normal(0, 3, n),
                  rng.choice([-7.0, 1.0, 30.0], n), rng.uniform(0, 1, n)],
                 axis=1).astype(np.float32)
    data = load_data((x, np.zeros(n, dtype=np.int64)), input_range=(-1e3, 1e3))
    threat = fit(FeatureSpec(scale="std", immutable=[3, 1]), data)
    u = threat.encode(data).x[:]
    k = rng.integers(-2, 6, size=(n, 5)).astype(np.float32)
    jitter = rng.uniform(-0.4, 0.4, size=(n, 5)).astype(np.float32)
    moved = u + torch.from_numpy((k + jitter) * threat.grid * np.isin(np.arange(5), [1, 3])
                                 + rng.normal(0, 3, size=(n, 5)).astype(np.float32)
                                 * ~np.isin(np.arange(5), [1, 3]))
    got = threat.decode(moved)
    _same(got, threat.decode(moved.clone().requires_grad_(True)).detach())  # numpy = torch
    _same(threat.decode(moved.double()),
          threat.decode(moved.double().requires_grad_(True)).detach())
    flat = moved.double().numpy()
    want = np.clip(threat.lo + threat.scale * flat, threat.lo, threat.hi)
    for j in (1, 3):
        values = threat.values[j]
        idx = np.clip(np.round(flat[:, j] / threat.grid), 0, len(values) - 1).astype(int)
        want[:, j] = values[idx]
    np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))
    moved.requires_grad_(True)
    threat.decode(moved).sum().backward()
    assert moved.grad is not None
    assert (moved.grad[:, [1, 3]] == 0).all()
    assert (moved.grad[:, [0, 2, 4]] != 0).any()


@pytest.mark.parametrize(("lo", "hi", "shape"), [
    (-1.5, 1.5, (30,)), (1 / 3, 2 / 3 + 1e-7, (3, 4, 5)), (-3.3, 1e3, (2, 7)),
    (0.0, 1.0, (3, 4, 5)), (0.0, 1.0, (6,)), (0.0, 255.0, (9,))])
def test_view_to_data_in_numpy_equals_its_tensor_arithmetic(lo, hi, shape):
    """The attack view's map from [0, 1] back to the data range gives bit for bit the same
    float32 values on a CPU tensor without gradients (numpy) as on one with gradients (torch
    operations), tabular padding column dropped alike; float64 arithmetic rounded once would
    differ, so the comparison can tell float32 steps apart."""
    from robust_cert.metrics.adversarial import _UnitRangeView

    view = _UnitRangeView(nn.Identity(), lo, hi, shape)
    x = torch.from_numpy(np.random.default_rng(6).uniform(lo, hi, size=(300, *shape))
                         .astype(np.float32))
    u = view.to_attack(x)
    fast = view.to_data(u)
    slow = view.to_data(u.clone().requires_grad_(True)).detach()
    assert fast.shape == (300, *shape)
    assert fast.dtype == torch.float32
    _same(fast, slow)
    if (lo, hi) == (-3.3, 1e3):
        flat = u[..., :-1].reshape(300, *shape).double()
        assert not torch.equal((lo + (hi - lo) * flat).float(), fast)


def test_black_box_forward_reads_tensors_of_any_layout():
    """The black-box forward gives the same logits for a contiguous batch, a strided view of
    it and a batch that requires gradients, and a (0, classes) answer for an empty batch
    without asking the model."""
    calls = []

    def predict(rows):
        calls.append(len(rows))
        p = np.exp(rows[:, :3])
        return p / p.sum(1, keepdims=True)

    clf = from_predict(predict, n_features=4, fmt="pyfunc", sha256="0" * 64, name="m")
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(8, 6)).astype(np.float32))
    view = x[:, 1:5]
    want = clf.forward(view.contiguous())
    _same(clf.forward(view), want)
    _same(clf.forward(view.clone().requires_grad_(True)), want)
    np.testing.assert_allclose(want.numpy(), torch.log_softmax(view[:, :3].double(), 1).numpy(),
                               rtol=1e-6)
    calls.clear()
    empty = clf.forward(torch.zeros(0, 4))
    assert empty.shape == (0, 3)
    assert calls == []


class _TensorQueries(FullSquare):
    """FullSquare's numpy loop with its queries sent as tensors through ``get_logits`` (the
    path of a model that declares no numpy form)."""

    def _numpy_query(self):
        return None


def _tabular_model(d: int, classes: int, seed: int):
    """A black-box Classifier (from_predict) of a softmax-linear model, recording every
    array its predict gets."""
    w = np.random.default_rng(seed).normal(size=(d, classes))
    calls: list[np.ndarray] = []

    def predict(rows):
        calls.append(rows.copy())
        z = rows @ w
        p = np.exp(z - z.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    return from_predict(predict, n_features=d, fmt="sklearn", sha256="0" * 64,
                        name="linear"), calls


@pytest.mark.parametrize(("loss", "targeted", "features"), [
    ("margin", False, False), ("ce", True, False), ("margin", False, True),
    ("ce", False, True)])
def test_numpy_queries_of_a_black_box_model_equal_its_tensor_queries(loss, targeted,
                                                                      features):
    """Through the attack view of a black-box Classifier (and under a per-feature threat
    model, its decoding), the loop's numpy queries reach the model's predict as the same
    arrays (rows, order, values, dtype) as the tensor queries through ``get_logits``, with
    the same queries per point and best points; the numpy form is really taken (the view's
    module is not called per query) and a wrapper that declares none keeps every call."""
    from robust_cert.data import EvalSet
    from robust_cert.metrics.adversarial import _UnitRangeView

    d, classes = 12, 3
    rng = np.random.default_rng(8)
    x = torch.tensor(rng.uniform(-1, 1, size=(50, d)), dtype=torch.float32)
    model, calls = _tabular_model(d, classes, seed=1)
    data = EvalSet(x=x, y=torch.zeros(50, dtype=torch.long), input_range=(-1.5, 1.5),
                   name="t", source="t", sha256="0" * 64)
    if features:
        from robust_cert.policy import FeatureSpec
        from robust_cert.tabular import fit

        threat = fit(FeatureSpec(scale="std", immutable=[0, 3]), data)
        model, data = threat.wrap(model), threat.encode(data)
    xd = data.x
    assert isinstance(xd, torch.Tensor)
    with torch.no_grad():
        y = model.logits(xd).argmax(1)
    if targeted:
        y = (y + 1) % classes
    lo, hi = data.input_range
    runs = []
    for cls in (FullSquare, _TensorQueries):
        view = _UnitRangeView(model.query_module(), lo, hi, data.input_shape)
        module_calls: list[int] = []
        view.register_forward_pre_hook(
            lambda _m, args, seen=module_calls: seen.append(len(args[0])))
        u = view.to_attack(xd)
        atk = cls(view, norm="Linf", eps=0.3 / (hi - lo), n_queries=80, loss=loss, seed=0)
        atk.targeted = targeted
        atk.init_hyperparam(u)
        calls.clear()
        torch.manual_seed(11)
        n_queries, best = atk.attack_single_run(u, y)
        runs.append((n_queries, best, list(calls), len(module_calls)))
    (nq, best, queries, via_module), (nq_t, best_t, queries_t, via_module_t) = runs
    assert len(queries) == len(queries_t) > 40
    for q, q_t in zip(queries, queries_t, strict=True):
        assert q.dtype == q_t.dtype == np.float64
        np.testing.assert_array_equal(q, q_t)
    _same(nq, nq_t)
    _same(best, best_t)
    assert ((nq > 1) & (nq < 81)).any()
    assert via_module == 1  # the first query (stripes); then the numpy form
    assert via_module_t == len(queries_t)
    # a forward wrapped by something that declares no numpy form: the tensor path
    counted = []

    def counting(t):
        counted.append(len(t))
        return model.forward(t)

    import dataclasses

    wrapped = dataclasses.replace(model, forward=counting)
    view = _UnitRangeView(wrapped.query_module(), lo, hi, data.input_shape)
    atk = FullSquare(view, norm="Linf", eps=0.3 / (hi - lo), n_queries=80, loss=loss, seed=0)
    atk.targeted = targeted
    atk.init_hyperparam(u)
    assert atk._numpy_query() is None
    calls.clear()
    torch.manual_seed(11)
    n_queries, best = atk.attack_single_run(u, y)
    assert len(counted) == len(calls) == len(queries)
    _same(n_queries, nq)
    _same(best, best_t)


@pytest.mark.parametrize(("shape", "eps", "chunk", "draws_too", "whole"), [
    ((12,), 0.15, 7, False, True),  # a tabular row: one sign per query; blocks of 7
    ((3, 4, 4), 0.03, 16, False, True),  # an image: a sign per channel
    ((3, 4, 4), 0.15, 16, False, False),  # all broken early: the last block partly used
    ((12,), 0.15, 7, True, True),  # a model that draws from torch's generator itself
])
def test_draws_in_blocks_equal_one_draw_per_query(monkeypatch, shape, eps, chunk, draws_too,
                                                  whole):
    """The numpy loop's draws taken a block of queries at a time (``_Draws``) give the same
    queries (rows, order, values), queries per point and best points as one ``torch.rand``
    per query (the tensor queries' loop), and leave torch's generator in the same state (the
    next draw after the attack is the same). A model whose predict draws from the generator
    too is caught and the attack rerun with one draw per query: the same result again. An
    attack that ends within a block rewinds the generator to the draws it used."""
    from robust_cert.metrics import square
    from robust_cert.metrics.adversarial import _UnitRangeView

    monkeypatch.setattr(square._Draws, "CHUNK", chunk)
    d, classes = int(np.prod(shape)), 3
    w = np.random.default_rng(1).normal(size=(d, classes))
    calls: list[np.ndarray] = []

    def predict(rows):
        calls.append(rows.copy())
        if draws_too:
            torch.rand(1)
        z = rows.reshape(len(rows), -1) @ w
        p = np.exp(z - z.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    model = from_predict(predict, n_features=d, fmt="sklearn", sha256="0" * 64, name="m",
                         input_shape=shape)
    x = torch.tensor(np.random.default_rng(8).uniform(-1, 1, size=(40, *shape)),
                     dtype=torch.float32)
    with torch.no_grad():
        y = model.logits(x).argmax(1)
    runs = []
    for cls in (FullSquare, _TensorQueries):
        view = _UnitRangeView(model.query_module(), -1.5, 1.5, shape)
        u = view.to_attack(x)
        atk = cls(view, norm="Linf", eps=eps, n_queries=60, seed=0)
        atk.init_hyperparam(u)
        calls.clear()
        torch.manual_seed(11)
        n_queries, best = atk.attack_single_run(u, y)
        runs.append((n_queries, best, list(calls), torch.rand(5)))
    (nq, best, queries, after), (nq_t, best_t, queries_t, after_t) = runs
    if draws_too:  # the first query and the first block's, then the rerun's
        assert len(queries) == 1 + chunk + len(queries_t)
        queries = queries[1 + chunk:]
    assert len(queries) == len(queries_t) > chunk + 1
    for q, q_t in zip(queries, queries_t, strict=True):
        np.testing.assert_array_equal(q, q_t)
    _same(nq, nq_t)
    _same(best, best_t)
    _same(after, after_t)
    assert ((nq > 1) & (nq < 61)).any()  # some stopped during the search
    assert bool((nq == 61).any()) == whole  # some ran the whole budget, or none did
