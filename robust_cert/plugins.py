"""Entry points: how other packages extend robust_cert.

A package declares, in its ``pyproject.toml``, an entry point in one of robust_cert's groups;
robust_cert imports it the first time that kind of thing is looked up. The groups:

- ``robust_cert.model_loaders``: a :class:`robust_cert.loaders.Loader`, or an iterable of
  them (robust_cert's own MLflow loaders are registered this way);
- ``robust_cert.data_sources``: a :class:`robust_cert.sources.Source`, or an iterable of
  them (evaluation-data references the core's sources do not accept);
- ``robust_cert.bound_ops``: bound ops for the safe-radius bounds, a BoundOp or a module that
  registers some (:func:`robust_cert.bounds.load_bound_op_plugins`).

A plugin that fails to import is an error naming the plugin, its group and its target,
never a silent omission: a gate or certificate must not depend on which plugins happened to
load.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from robust_cert.errors import RobustCertError


class PluginError(RobustCertError):
    """An entry-point plugin could not be imported or is not what its group expects."""


def load_group(group: str) -> list[tuple[str, object]]:
    """``(name, loaded object)`` of every entry point in ``group``, sorted by name (a stable
    order whatever order the installed distributions are found in). Raises PluginError naming
    the first plugin whose import fails."""
    out = []
    for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
        try:
            out.append((ep.name, ep.load()))
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({group} = {ep.value}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
    return out
