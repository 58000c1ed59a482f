"""Metric families. Each module holds one; :data:`REGISTRY` maps policy names to them.

The families, and their facts, are those of the torch-free catalog
(:data:`robust_cert.catalog.CATALOG`): the registry imports each entry's implementation and
:func:`register` makes the class agree with its entry, so a new family is its own module plus
one catalog entry.
"""

from __future__ import annotations

import importlib

from robust_cert.catalog import CATALOG, MetricEntry
from robust_cert.metrics.base import Metric, MetricResult, Proportion, RunContext

#: Class attributes of a metric that state a catalog fact: (attribute, entry field).
FACTS = (("kind", "kind"), ("quantity", "quantity"), ("higher_is_better", "higher_is_better"),
         ("needs_gradients", "needs_gradients"), ("shardable", "shardable"))

REGISTRY: dict[str, type[Metric]] = {}


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


def _load(entry: MetricEntry) -> type[Metric]:
    module, _, name = entry.impl.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise TypeError(f"{entry.impl} (catalog entry {entry.name!r}) is not a Metric class")
    return cls


for _e in CATALOG.values():
    register(_load(_e), _e)

__all__ = ["FACTS", "REGISTRY", "Metric", "MetricResult", "Proportion", "RunContext",
           "register"]
