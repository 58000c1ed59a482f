"""The bound-op registry: which :class:`~robust_cert.bounds.base.BoundOp` bounds a module
class, a callable or a Tensor method (auto_LiRPA's ``bound_op_map`` / ``register_custom_op``).

The built-in ops register themselves when :mod:`robust_cert.bounds.ops` is imported; a user
adds one with :func:`register_bound_op`, and an installed package with an entry point in the
group :data:`ENTRY_POINT_GROUP` (loaded by :func:`load_bound_op_plugins` before a bound is
computed).
"""

from __future__ import annotations

import importlib.metadata
import types
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from robust_cert.bounds.base import BoundOp
from robust_cert.plugins import PluginError

#: Entry-point group of bound-op plugins: each names a BoundOp (class or instance, registered
#: under its own keys) or a module whose import registers ops with :func:`register_bound_op`.
ENTRY_POINT_GROUP = "robust_cert.bound_ops"

_MODULES: dict[type, BoundOp] = {}
_FUNCTIONS: dict[Callable, BoundOp] = {}
_METHODS: dict[str, tuple[BoundOp, Callable | None]] = {}
_LOADED_PLUGINS: set[str] = set()


class BoundOpPluginError(PluginError):
    """A plugin of the ``robust_cert.bound_ops`` entry-point group failed to load; the message
    names the plugin in one line."""


def register_bound_op(op=None, *, modules: Iterable[type] | None = None,
                      functions: Iterable[Callable] | None = None,
                      methods: Iterable[str] | Mapping[str, Callable] | None = None,
                      replace: bool = False):
    """Register a :class:`BoundOp` for module classes, callables and Tensor methods.

    ``op`` is an instance or a subclass (instantiated without arguments). Keys not given are
    read from the op's ``modules``/``functions``/``methods``. Use it as a function
    (``register_bound_op(MyBound(), modules=[MyLayer])``) or as a class decorator, with or
    without keys (``@register_bound_op`` / ``@register_bound_op(modules=[MyLayer])``); it
    returns what it was given.

    A key already bound by an op of another class raises ValueError unless ``replace`` (the
    new op then takes it over); registering the same class again for a key changes nothing.
    Guarantees: after it returns, every given key resolves to this op (or to the op of the
    same class already there).
    """

    def register(obj):
        inst = obj() if isinstance(obj, type) else obj
        if not isinstance(inst, BoundOp):
            raise TypeError(f"register_bound_op needs a BoundOp, not {obj!r}")
        mods = tuple(inst.modules if modules is None else modules)
        funcs = tuple(inst.functions if functions is None else functions)
        meths = inst.methods if methods is None else methods
        meths = dict(meths) if isinstance(meths, Mapping) else dict.fromkeys(meths)
        if not (mods or funcs or meths):
            raise ValueError(f"{type(inst).__name__} names no module class, function or method")
        for m in mods:
            if not (isinstance(m, type) and issubclass(m, nn.Module)):
                raise TypeError(f"{m!r} is not an nn.Module class")
        for f in funcs:
            if not callable(f):
                raise TypeError(f"{f!r} is not callable")
        for name, alias in meths.items():
            if not isinstance(name, str) or (alias is not None and not callable(alias)):
                raise TypeError(f"method {name!r}: a name (and a callable alias) expected")
        entries = ([(_MODULES, m, inst, m.__name__) for m in mods]
                   + [(_FUNCTIONS, f, inst, repr(f)) for f in funcs]
                   + [(_METHODS, n, (inst, a), f".{n}()") for n, a in meths.items()])
        todo = []
        table: dict  # three tables, three key types
        for table, key, value, shown in entries:
            old = table.get(key)
            old_op = old[0] if isinstance(old, tuple) else old
            if old_op is not None and type(old_op) is type(inst):
                continue
            if old_op is not None and not replace:
                raise ValueError(f"{shown} is already bound by {type(old_op).__name__} "
                                 "(replace=True to override)")
            todo.append((table, key, value))
        for table, key, value in todo:
            table[key] = value
        return obj

    if op is None:
        return register
    return register(op)


def module_op(cls: type) -> BoundOp | None:
    """The op registered for ``cls`` or its nearest registered base class, or None."""
    for base in cls.__mro__:
        op = _MODULES.get(base)
        if op is not None:
            return op
    return None


def is_registered_module(cls: type) -> bool:
    """Whether this very class (not only a base class) is registered: the tracer keeps such a
    module as one node."""
    return cls in _MODULES


def function_op(fn: Callable) -> BoundOp | None:
    """The op registered for the callable ``fn`` (an unhashable target has none), or None."""
    try:
        return _FUNCTIONS.get(fn)
    except TypeError:
        return None


def method_op(name: str) -> tuple[BoundOp, Callable | None] | None:
    """(op, the function the method is an alias of, or None) for a Tensor method, or None."""
    return _METHODS.get(name)


def load_bound_op_plugins() -> list[str]:
    """Load the plugins of :data:`ENTRY_POINT_GROUP` not loaded yet; returns their names.

    A plugin names a BoundOp (class or instance: registered under its own keys) or a module
    (its import registers its ops). One that fails to import or register raises
    :class:`BoundOpPluginError` naming it (the plugins before it stay loaded; it is tried
    again on the next call)."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _LOADED_PLUGINS:
            continue
        try:
            obj = ep.load()
            if isinstance(obj, BoundOp) or (isinstance(obj, type) and issubclass(obj, BoundOp)):
                register_bound_op(obj)
            elif not isinstance(obj, types.ModuleType):
                raise TypeError(f"it names {type(obj).__name__}, not a BoundOp or a module")
        except Exception as exc:
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise BoundOpPluginError(f"bound-op plugin {ep.name!r} ({ep.value}) failed to "
                                     f"load: {why}") from exc
        _LOADED_PLUGINS.add(ep.name)
        loaded.append(ep.name)
    return loaded
