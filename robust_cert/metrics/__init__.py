"""Metric families. Each module holds one; :data:`REGISTRY` maps policy names to them.

The families, and their facts, are those of the torch-free catalog
(:data:`robust_cert.catalog.CATALOG`): the registry imports an entry's implementation the
first time it is looked up and :func:`register` makes the class agree with its entry, so a new
family is its own module plus one catalog entry. Looking a family up imports its module alone:
a policy with ``accuracy`` alone never imports the attack, smoothing or Han et al. modules
(nor scipy.stats, torchattacks and the others they import), which took seconds at start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping

from robust_cert.catalog import CATALOG, MetricEntry
from robust_cert.metrics import base as _base
from robust_cert.metrics.base import Metric, MetricResult, Proportion, RunContext

#: Class attributes of a metric that state a catalog fact: (attribute, entry field).
FACTS = (("kind", "kind"), ("quantity", "quantity"), ("higher_is_better", "higher_is_better"),
         ("needs_gradients", "needs_gradients"), ("shardable", "shardable"))



class _Registry(MutableMapping[str, "type[Metric]"]):
    """Policy names → metric classes: every catalog family (in the catalog's order), then the
    classes registered under other names. A catalog family's module is imported, and its
    class checked against its entry (:func:`register`), on its first look-up; membership and
    iteration over the names import nothing."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Metric]] = {}

    def __getitem__(self, name: str) -> type[Metric]:
        cls = self._classes.get(name)
        if cls is None:
            entry = CATALOG.get(name)
            if entry is None:
                raise KeyError(name)
            loaded = _load(entry)  # (its class registers itself as it is defined)
            cls = self._classes.get(name) or register(loaded, entry)
        return cls

    def __setitem__(self, name: str, cls: type[Metric]) -> None:
        self._classes[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes or name in CATALOG

    def __iter__(self) -> Iterator[str]:
        yield from CATALOG
        yield from (name for name in self._classes if name not in CATALOG)

    def __len__(self) -> int:
        return len(CATALOG) + sum(name not in CATALOG for name in self._classes)


REGISTRY: MutableMapping[str, type[Metric]] = _Registry()


def register(cls: type[Metric], entry: MetricEntry | None = None) -> type[Metric]:
    """Add ``cls`` to :data:`REGISTRY` under its ``name``, agreeing with its catalog entry
    (``entry``, default ``CATALOG[cls.name]``): each fact of :data:`FACTS` the class leaves
    out is set from the entry, and one it sets to another value is a TypeError, so a class
    and its entry never disagree. Returns ``cls``."""
    entry = entry if entry is not None else CATALOG.get(getattr(cls, "name", ""))
    if entry is None or entry.name != cls.name:
        raise TypeError(f"{cls.__qualname__}: no catalog entry named {cls.name!r}")
    for attr, field in FACTS:
        want = getattr(entry, field)
        have = next((k.__dict__[attr] for k in cls.__mro__[:-1]
                     if attr in k.__dict__ and k is not Metric), want)
        if have != want:
            raise TypeError(f"{cls.__qualname__}.{attr} = {have!r}, but the catalog entry of "
                            f"{entry.name!r} says {want!r}")
        setattr(cls, attr, want)
    REGISTRY[entry.name] = cls
    return cls


_base.ON_FAMILY_DEFINED = register  # a family's class registers itself as it is defined


def _load(entry: MetricEntry) -> type[Metric]:
    module, _, name = entry.impl.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise TypeError(f"{entry.impl} (catalog entry {entry.name!r}) is not a Metric class")
    return cls


__all__ = ["FACTS", "REGISTRY", "Metric", "MetricResult", "Proportion", "RunContext",
           "register"]
