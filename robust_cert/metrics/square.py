"""Square attack (Andriushchenko et al. 2020) with every window position reachable.

One algorithm: torchattacks' :class:`torchattacks.Square` (3.3.0), unchanged except for where
its square windows may be placed. Upstream draws a window's top-left corner with
``random_int(0, h - s)``, i.e. ``int(low + (high - low) * U[0, 1))``, which never returns
``high``: a window of side s never starts at row ``h - s`` or column ``w - s``, so the last
row and the last column of an image are never searched once the windows are smaller than
the image (and a one-pixel-wide dimension stays frozen after the first query). A model that
reads only those pixels looks robust to Square. See ``docs/adversarial-suite.md``.

:class:`FullSquare` draws positions uniformly from ``{low, …, high}`` (both ends included;
``high < low`` — a window larger than the image — gives ``low``). It consumes the same random
numbers as upstream (one ``torch.rand`` per position), so everything else about the attack —
schedule, losses, seeding, restarts — is upstream's. One more layout fix: an input whose
channels are single pixels (C > 1, H = W = 1, e.g. a tabular row presented as (d, 1, 1))
gives upstream nothing to search but all-channel random sign vectors (its windows set one
random sign per channel at once, a 2^-C lottery); such inputs are searched as (1, 1, C) rows
and reshaped back before the model sees them. The ε-balls (L∞, L2) and the box do not
depend on the layout, so the attack's validity is unchanged.

The L∞ search loop is re-implemented (:meth:`FullSquare.attack_single_run`) for its cost per
query, not to change the algorithm: upstream spends about 0.7 ms of tensor bookkeeping per
query on CPU (whole-batch gathers and scatters, a full-image delta, a cross-entropy its margin
loss discards), which is the model's own time for a tree ensemble on a few dozen rows. The
re-implementation draws the same random numbers in the same order (for a black-box model, a
block of queries' draws at once, leaving torch's generator where upstream's draws leave it),
sends the model the same inputs (same rows, same order, same values) and keeps the same best
points, so the attack's queries and result are upstream's (``tests/test_query_path.py``
compares the two on fixed seeds). On the CPU its per-query bookkeeping is numpy on views of
the same memory (at a few dozen rows a torch operation costs several microseconds of
dispatch, a numpy one about one); elsewhere (a GPU) it is tensor operations. The L2 loop is
upstream's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchattacks import Square

from robust_cert.models.base import numpy_forward


class FullSquare(Square):
    """torchattacks' Square attack with window positions drawn from every valid position.

    Args (as :class:`torchattacks.Square`):
        model: the ``nn.Module`` to attack; inputs (N, C, H, W) in [0, 1].
        norm: ``"Linf"`` (default) or ``"L2"``.
        eps: radius of the ball in [0, 1] units (default 8/255).
        n_queries: queries per restart (default 5000).
        n_restarts: random restarts (default 1).
        p_init: initial fraction of pixels a window covers (default 0.8).
        loss: ``"margin"`` (default) or ``"ce"``.
        resc_schedule: rescale the p schedule to ``n_queries`` (default True).
        seed: seed of torch's global generator at the start of ``perturb`` (default 0).
        verbose: print progress (default False).

    Guarantee: none beyond upstream's — it is a search; every returned input is within the
    ε-ball and [0, 1]. The only difference from upstream is that every window position
    ``0 … size − s`` in each spatial dimension has probability ``1 / (size − s + 1)``.

    Example::

        atk = FullSquare(model, norm="Linf", eps=0.1, n_queries=1000, seed=0)
        adv = atk(images, labels)
    """

    _layout: tuple[int, ...] | None = None

    def forward(self, images, labels):
        """Adversarial images of ``images`` (N, C, H, W), same shape."""
        n, c, h, w = images.shape
        if c > 1 and h * w == 1:
            self._layout = (c, h, w)
            try:
                return super().forward(images.reshape(n, 1, 1, c), labels).reshape(images.shape)
            finally:
                self._layout = None
        return super().forward(images, labels)

    def get_logits(self, inputs, labels=None, *args, **kwargs):
        if self._layout is not None:
            inputs = inputs.reshape(inputs.shape[0], *self._layout)
        return super().get_logits(inputs, labels, *args, **kwargs)

    def margin_and_loss(self, x, y):
        """Upstream's (margin, loss) of the logits at ``x``: the margin is the label's logit
        minus the best other one (the reverse when targeted); the loss is the margin, or the
        cross-entropy (negated when untargeted) with ``loss="ce"``, computed only then."""
        logits = self.get_logits(x)
        index = y.unsqueeze(1)
        y_corr = logits.gather(1, index).squeeze(1)
        y_others = logits.scatter(1, index, float("-inf")).amax(1)
        margin = y_others - y_corr if self.targeted else y_corr - y_others
        if self.loss == "margin":
            return margin, margin
        xent = F.cross_entropy(logits, y, reduction="none")
        return margin, (xent if self.targeted else -1.0 * xent)

    def attack_single_run(self, x, y):
        """Upstream's L∞ random search (L2: upstream's own loop), with less work per query.

        Per query it draws what upstream draws, in the same order (two window positions, one
        sign per channel), and sends the model the same batch: the rows whose margin is still
        positive, in index order, each its best point with the window set to
        ``clip(min(max(best + 2ε·sign, x − ε), x + ε), 0, 1)`` — upstream computes the same
        expression over the whole image, where outside the window it returns the best point
        itself (which already lies in the ε-box and [0, 1]). The still-attacked rows are held
        compacted and re-gathered only when one stops (margin ≤ 0 or NaN); a point's best is
        replaced where the loss improved or the margin is ≤ 0, and its margin and loss are
        blended with upstream's arithmetic (so non-finite values propagate alike). Returns
        upstream's (queries per point, best points)."""
        if self.norm != "Linf" or self.verbose:
            return super().attack_single_run(x, y)
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return self._linf_numpy(x, y)
        return self._linf_torch(x, y)

    def _start(self, x, y):
        """Upstream's first query: vertical stripes of ±ε (one draw per row, channel and
        column), clipped to [0, 1]; its margin and loss; one query counted per point."""
        c, w = x.shape[1], x.shape[3]
        x_best = torch.clamp(x + self.eps * self.random_choice([x.shape[0], c, 1, w]), 0., 1.)
        margin, loss = self.margin_and_loss(x_best, y)
        return x_best, margin, loss, torch.ones(x.shape[0], device=self.device)

    def _linf_torch(self, x, y):
        """The L∞ loop of :meth:`attack_single_run` in tensor operations (any device)."""
        with torch.no_grad():
            c, h, w = x.shape[1:]
            n_features = c * h * w
            eps = self.eps
            x_best, margin, loss, n_queries = self._start(x, y)
            # the rows still attacked, compacted: index, clean, ε-box, label, best, margin, loss
            at = (margin > 0.0).nonzero().flatten()
            xa, ba, ya = x[at], x_best[at], y[at]
            lo, hi, ma, la = xa - eps, xa + eps, margin[at], loss[at]
            done = 0  # queries made
            for i_iter in range(self.n_queries):
                keep = ma > 0.0
                if not bool(keep.all()):  # some rows stop: write them back, compact the rest
                    gone = ~keep
                    x_best[at[gone]] = ba[gone]
                    n_queries[at[gone]] += done
                    at, xa, ba, ya = at[keep], xa[keep], ba[keep], ya[keep]
                    lo, hi, ma, la = lo[keep], hi[keep], ma[keep], la[keep]
                if at.numel() == 0:
                    break
                p = self.p_selection(i_iter)
                s = max(int(round(math.sqrt(p * n_features / c))), 1)
                vh, vw = self._position(h - s), self._position(w - s)
                if c == 1:  # one sign, as a number: upstream's sign(2t − 1) · 2ε in float32
                    t = float(torch.rand([1, 1, 1]))
                    delta = float(np.float32(2. * self.eps)) * ((t > 0.5) - (t < 0.5))
                else:
                    delta = 2. * self.eps * self.random_choice([c, 1, 1])
                rows, cols = slice(vh, vh + s), slice(vw, vw + s)
                x_new = ba.clone()
                x_new[:, :, rows, cols] = torch.clamp(torch.min(torch.max(
                    ba[:, :, rows, cols] + delta, lo[:, :, rows, cols]), hi[:, :, rows, cols]),
                    0., 1.)
                m, loss_new = self.margin_and_loss(x_new, ya)
                done += 1
                # upstream's blend, not a select: a NaN or infinite margin or loss of the new
                # query makes the kept one NaN there (0 · inf), and the row then stops
                if self.loss == "margin":  # loss = margin, and on a live row margin ≤ 0
                    better = (m < ma).float()  # implies a lower loss: the two blends are one
                    ma = la = better * m + (1. - better) * ma
                else:
                    better = (loss_new < la).float()
                    la = better * loss_new + (1. - better) * la
                    better = torch.max(better, (m <= 0.).float())
                    ma = better * m + (1. - better) * ma
                ba = torch.where(better.view(-1, 1, 1, 1) > 0, x_new, ba)
            x_best[at] = ba
            n_queries[at] += done
        return n_queries, x_best

    def _linf_numpy(self, x, y):
        """The L∞ loop of :meth:`attack_single_run` for float32 inputs on the CPU, its
        per-query bookkeeping in numpy on views of the same memory: at a few dozen rows a
        torch operation costs several microseconds of dispatch and a numpy one about one, and
        the loop makes a dozen per query. The arithmetic is the tensor loop's, element by
        element in float32 (a Python float operand is rounded to float32 first, by numpy's
        scalar promotion as by torch's CPU kernels; min, max and clip propagate NaN alike);
        the draws are the same uniforms in the same order (a query's two positions and its
        signs from one ``torch.rand`` block, which the CPU generator fills exactly as it
        answers the single calls upstream makes for them, one after another); the model gets
        each query as a CPU tensor (sharing the query's memory, a fresh array every query) and
        its logits are read in their own dtype — or, when the model declares a numpy form
        (:meth:`_numpy_query`: a black-box model behind the attack view), the query array
        itself, its logits coming back as an array, with no torch operation on the way. The
        cross-entropy loss (``loss="ce"``) is torch's own on those logits.

        With a numpy form the draws of :data:`_Draws.CHUNK` queries come from one
        ``torch.rand`` block (:class:`_Draws`): the first torch operation after a tree
        model's ``predict_proba`` costs tens of microseconds, once per query otherwise. The
        generator is left where the per-query draws leave it. Should the model itself draw
        from torch's CPU generator during the loop (seen as a changed generator state at the
        next block or at the end), the attack is rerun from its start with one draw per
        query, after restoring the generator: the same queries and result as upstream, at the
        cost of the up to ``1 + CHUNK`` queries made before the change was seen."""
        query = self._numpy_query()
        if query is not None:
            state = torch.get_rng_state()
            try:
                return self._linf_numpy_loop(x, y, query, chunked=True)
            except _GeneratorShared:  # the model drew too: again, one draw per query
                torch.set_rng_state(state)
        return self._linf_numpy_loop(x, y, query, chunked=False)

    def _linf_numpy_loop(self, x, y, query, chunked: bool):
        """:meth:`_linf_numpy` with the model's numpy form ``query`` (or None: tensors through
        :meth:`get_logits`); ``chunked``: the draws from :class:`_Draws` (raises
        :class:`_GeneratorShared` when something else drew from the generator meanwhile)."""
        with torch.no_grad():
            c, h, w = x.shape[1:]
            n_features = c * h * w
            eps = self.eps
            x_best, margin, loss, n_queries = self._start(x, y)
            best_np, nq_np = x_best.numpy(), n_queries.numpy()  # views: written back in place
            at = (margin > 0.0).nonzero().flatten().numpy()
            lo_t, hi_t = x - eps, x + eps  # torch's float32 arithmetic, as the tensor loop
            ba, ya = best_np[at], y.numpy()[at]
            lo, hi = lo_t.numpy()[at], hi_t.numpy()[at]
            ma, la = margin.numpy()[at], loss.numpy()[at]
            one, zero = np.float32(1.), np.float32(0.)
            # the window's clip to the ε-box and then to [0, 1] is one clip to their
            # intersection, with the same values (max and min only select), when every
            # box meets [0, 1] (as it does for inputs in [0, 1]); else the two clips
            fused = bool(np.all(hi >= zero) and np.all(lo <= one))
            if fused:
                lo, hi = np.maximum(lo, zero), np.minimum(hi, one)
            targeted, ce = self.targeted, self.loss != "margin"
            draws = _Draws(self, (c, h, w)) if chunked else None
            # per live row: its label's column among the logits (bool), its index
            label, live = None, np.arange(0)
            done = 0  # queries made
            for i_iter in range(self.n_queries):
                # a live row has margin > 0; ma.min() is NaN when a margin is
                if at.size and not ma.min() > zero:  # rows stop: write back, compact the rest
                    keep = ma > zero
                    gone = ~keep
                    best_np[at[gone]] = ba[gone]
                    nq_np[at[gone]] += done
                    at, ba, ya, lo, hi = at[keep], ba[keep], ya[keep], lo[keep], hi[keep]
                    ma, la, label = ma[keep], la[keep], None
                if at.size == 0:
                    break
                if draws is not None:
                    s, vh, vw, delta = draws.step(i_iter)
                else:
                    p = self.p_selection(i_iter)
                    s = max(int(round(math.sqrt(p * n_features / c))), 1)
                    # the query's draws in one call: upstream draws two positions, then c
                    # signs, one torch.rand each (nothing in between), and the CPU generator
                    # gives a block of n uniforms equal to n single draws, in order
                    t = torch.rand([2 + c]).numpy()
                    vh = _position_at(h - s, float(t[0]))
                    vw = _position_at(w - s, float(t[1]))
                    if c == 1:  # one sign, a number: upstream's sign(2t − 1) · 2ε in float32
                        t2 = float(t[2])
                        delta = np.float32(2. * eps) * np.float32((t2 > 0.5) - (t2 < 0.5))
                    else:  # random_choice's sign(2t − 1) in float32
                        signs = np.sign(np.float32(2.) * t[2:] - np.float32(1.))
                        delta = np.float32(2. * eps) * signs.reshape(c, 1, 1)
                rows, cols = slice(vh, vh + s), slice(vw, vw + s)
                x_new = ba.copy()
                win = np.add(ba[:, :, rows, cols], delta)
                np.maximum(win, lo[:, :, rows, cols], out=win)
                np.minimum(win, hi[:, :, rows, cols], out=win)
                if not fused:
                    np.clip(win, zero, one, out=win)
                x_new[:, :, rows, cols] = win
                if query is not None:
                    logits = query(x_new)
                else:
                    logits_t = self.get_logits(torch.from_numpy(x_new))
                    if logits_t.requires_grad or logits_t.device.type != "cpu":
                        logits_t = logits_t.detach().cpu()
                    logits = logits_t.numpy()
                done += 1
                if label is None:
                    label = ya[:, None] == np.arange(logits.shape[1])
                    live = np.arange(len(ya))
                y_corr = logits[live, ya]
                y_others = np.where(label, -np.inf, logits).max(1)
                m = y_others - y_corr if targeted else y_corr - y_others
                # upstream's blend, not a select: a NaN or infinite margin or loss of the new
                # query makes the kept one NaN there (0 · inf), and the row then stops; the
                # weights are booleans (numpy multiplies them as 0. and 1.)
                if not ce:  # loss = margin, and on a live row margin ≤ 0
                    better = m < ma  # implies a lower loss: one blend
                    ma = la = better * m + ~better * ma
                else:
                    xent = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(ya),
                                           reduction="none").numpy()
                    loss_new = xent if targeted else np.float32(-1.) * xent
                    better = loss_new < la
                    la = better * loss_new + ~better * la
                    better |= m <= zero
                    ma = better * m + ~better * ma
                ba = np.where(better[:, None, None, None], x_new, ba)
            if draws is not None:
                draws.finish()
            best_np[at] = ba
            nq_np[at] += done
        return n_queries, x_best

    def _numpy_query(self):
        """The model's numpy forward (:func:`robust_cert.models.base.numpy_forward`) where
        :meth:`get_logits` would only hand it the batch: torchattacks applies no
        normalisation of its own and ``get_logits`` is FullSquare's; with the per-channel
        layout the batch is reshaped to it first, as ``get_logits`` does. None otherwise, or
        when the model declares none: the loop then asks ``get_logits`` with a tensor."""
        if self._normalization_applied is False or \
                type(self).get_logits is not FullSquare.get_logits:
            return None
        fn = numpy_forward(self.model)
        layout = self._layout
        if fn is None or layout is None:
            return fn
        return lambda a: fn(a.reshape(a.shape[0], *layout))

    def _position(self, high: int) -> int:
        """:meth:`random_int` ``(0, high)`` as a Python int: the same draw (one
        ``torch.rand(1)``) and the same float32 arithmetic (``span · t`` rounded to float32,
        then floored), without the tensor operations."""
        return _position_at(high, torch.rand([1]).item())

    def random_int(self, low=0, high=1, shape=(1,)):
        """Uniform integers in ``[low, high]`` (inclusive); ``low`` when ``high < low``.

        Drawn from torch's CPU generator, as upstream draws them, and left on the host:
        upstream uses them only as slice bounds of the window, so on a GPU reading them back
        would cost a device synchronisation at every query."""
        span = max(int(high) - int(low) + 1, 1)
        t = torch.rand(list(shape))
        return (low + torch.floor(span * t).clamp(max=span - 1)).long()


class _GeneratorShared(Exception):
    """Something other than the attack drew from torch's CPU generator during the loop."""


class _Draws:
    """The L∞ loop's draws (window side, two positions and the signs of each query),
    :data:`CHUNK` queries at a time: one ``torch.rand`` block of ``CHUNK · (2 + c)`` uniforms
    instead of one call per query.

    Guarantee: :meth:`step` gives query ``i`` exactly what the per-query draws give (torch's
    CPU generator fills a block of n uniforms as n single draws, in order; the side is
    :meth:`~torchattacks.Square.p_selection`'s; positions and signs are computed with
    :func:`_position_at`'s and ``random_choice``'s float32 arithmetic, element by element),
    and :meth:`finish` leaves the generator where the per-query draws would have left it
    (rewound to the start of the last block, then advanced by the uniforms used). Only valid
    when nothing else draws from the generator during the loop — the case of a model's numpy
    form, which computes logits only; a change of the generator state since the last block
    is detected (compared at every block and at the end) and raises
    :class:`_GeneratorShared`, on which the caller reruns the attack with one draw per
    query."""

    #: queries per block of draws
    CHUNK = 128

    def __init__(self, attack: Square, shape: tuple[int, int, int]):
        self.attack, (self.c, self.h, self.w) = attack, shape
        self.first = self.k = self.used = 0  # the block: its first query, queries, used
        # per query of the block: window side, row, column; the deltas (float32)
        self.sides: list[int] = []
        self.vh: list[int] = []
        self.vw: list[int] = []
        self.delta = np.zeros(0, dtype=np.float32)
        self.before: torch.Tensor | None = None  # generator state before the block
        self.after: torch.Tensor | None = None  # and after it

    def _check(self) -> None:
        if self.after is not None and not torch.equal(torch.get_rng_state(), self.after):
            raise _GeneratorShared

    def _draw(self, first: int) -> None:
        self._check()
        atk, c, h, w = self.attack, self.c, self.h, self.w
        k = min(self.CHUNK, atk.n_queries - first)
        n_features = c * h * w
        sides = np.array([max(int(round(math.sqrt(atk.p_selection(i) * n_features / c))), 1)
                          for i in range(first, first + k)], dtype=np.int64)
        self.before = torch.get_rng_state()
        t = torch.rand([k * (2 + c)]).numpy().reshape(k, 2 + c)
        self.after = torch.get_rng_state()
        self.first, self.k, self.sides = first, k, sides.tolist()
        self.vh = _positions_at(h - sides, t[:, 0]).tolist()
        self.vw = _positions_at(w - sides, t[:, 1]).tolist()
        two_eps = np.float32(2. * atk.eps)
        if c == 1:  # upstream's sign(2t − 1) · 2ε in float32, as a number
            t2 = t[:, 2]
            self.delta = two_eps * ((t2 > 0.5).astype(np.float32)
                                    - (t2 < 0.5).astype(np.float32))
        else:  # random_choice's sign(2t − 1) in float32
            signs = np.sign(np.float32(2.) * t[:, 2:] - np.float32(1.))
            self.delta = two_eps * signs.reshape(k, c, 1, 1)

    def step(self, i: int):
        """(side, row, column, delta) of query ``i`` (queries asked in order from 0)."""
        if i >= self.first + self.k:
            self._draw(i)
        j = i - self.first
        self.used = j + 1
        return self.sides[j], self.vh[j], self.vw[j], self.delta[j]

    def finish(self) -> None:
        """Check the generator, then leave it where the per-query draws would have."""
        if self.before is None:  # nothing drawn
            return
        self._check()
        used = self.used
        if used < self.k:
            torch.set_rng_state(self.before)
            if used:
                torch.rand([used * (2 + self.c)])


def _positions_at(high: np.ndarray, t: np.ndarray) -> np.ndarray:
    """:func:`_position_at` element by element: ``floor(float32(span · t))`` with ``span =
    max(high + 1, 1)`` and ``t`` float32 uniforms, the product in float64 (a Python float
    times an int), at most ``span − 1``."""
    span = np.maximum(high + 1, 1)
    pos = np.floor((span.astype(np.float64) * t.astype(np.float64)).astype(np.float32))
    return np.minimum(pos.astype(np.int64), span - 1)


def _position_at(high: int, t: float) -> int:
    """The window position :meth:`FullSquare._position` gives for the uniform draw ``t`` (a
    float32 value): ``floor(float32(span · t))`` with ``span = max(high + 1, 1)``, at most
    ``span − 1``."""
    span = max(int(high) + 1, 1)
    return min(int(np.float32(span * t)), span - 1)


def full_square_inside(attack):
    """Replace every upstream :class:`torchattacks.Square` inside ``attack`` (an
    ``AutoAttack`` or a ``MultiAttack``, nested or not) by a :class:`FullSquare` with the same
    parameters (norm, eps, queries, restarts, p_init, loss, schedule, seed); returns ``attack``.

    Example::

        aa = full_square_inside(torchattacks.AutoAttack(model, eps=0.1, n_classes=10, seed=0))
    """
    inner = getattr(attack, "_autoattack", None)
    if inner is not None:
        full_square_inside(inner)
    subs = getattr(attack, "attacks", None)
    if subs is not None:
        for i, a in enumerate(subs):
            if type(a) is Square:
                subs[i] = FullSquare(a.model, norm=a.norm, eps=a.eps, n_queries=a.n_queries,
                                     n_restarts=a.n_restarts, p_init=a.p_init, loss=a.loss,
                                     resc_schedule=a.rescale_schedule,
                                     # torchattacks infers int from its default 0
                                     seed=a.seed,  # pyright: ignore[reportArgumentType]
                                     verbose=a.verbose)
            else:
                full_square_inside(a)
    return attack
