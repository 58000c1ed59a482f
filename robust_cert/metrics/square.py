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
"""

from __future__ import annotations

import torch
from torchattacks import Square


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

    def random_int(self, low=0, high=1, shape=(1,)):
        """Uniform integers in ``[low, high]`` (inclusive); ``low`` when ``high < low``.

        Drawn from torch's CPU generator, as upstream draws them, and left on the host:
        upstream uses them only as slice bounds of the window, so on a GPU reading them back
        would cost a device synchronisation at every query."""
        span = max(int(high) - int(low) + 1, 1)
        t = torch.rand(list(shape))
        return (low + torch.floor(span * t).clamp(max=span - 1)).long()


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
