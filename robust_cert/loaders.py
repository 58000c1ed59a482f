"""The model-loader registry: one place that turns a model reference into a Classifier.

A :class:`Loader` says which references it accepts (a predicate, e.g. "a string starting
with ``runs:/``") and loads one onto a device. :func:`load_model` asks the registered
loaders in order and the first that accepts the reference loads it. The core registers
four: a :class:`~robust_cert.models.base.Classifier` (returned unchanged), an
``nn.Module`` (``input_shape`` needed), a path to an ``.onnx`` file and a fitted classifier
with ``predict_proba`` or a native XGBoost / LightGBM booster (a black-box model,
:mod:`robust_cert.models.blackbox`; its ``sha256`` is that of its pickle). Other packages add
loaders through the entry-point group ``robust_cert.model_loaders`` (see
:mod:`robust_cert.plugins`); robust_cert's MLflow plugin registers ``models:/NAME/VERSION``,
``models:/NAME@ALIAS``, ``models:/m-ID`` (MLflow 3 logged models) and ``runs:/RUN_ID/PATH``
that way, so this module, the API and the metrics never import MLflow. Entry points are
read the first time no loader registered so far accepts a reference; a reference no loader
accepts is refused with the list of what the registered loaders accept.

In code, :func:`register_loader` adds one (first match wins, so register a more specific
loader before a broader one)::

    from robust_cert.loaders import Loader, register_loader

    register_loader(Loader(
        "my-zoo://NAME", accepts=lambda ref: str(ref).startswith("my-zoo://"),
        load=lambda ref, *, input_shape, device: my_zoo_classifier(ref, device)))
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from robust_cert.errors import ModelError, RobustCertError
from robust_cert.plugins import PluginError, load_group

if TYPE_CHECKING:  # not imported at run time: this module stays torch-free
    from robust_cert.models.base import Classifier

#: The entry-point group of third-party loaders.
ENTRY_POINT_GROUP = "robust_cert.model_loaders"


@dataclass(frozen=True)
class Loader:
    """One kind of model reference.

    ``form`` is what it accepts, as a user would write it (``models:/NAME/VERSION``): error
    messages list it. ``accepts(ref)`` must be cheap and must not raise or import heavy
    libraries. ``load(ref, *, input_shape, device)`` returns a Classifier on ``device`` (a
    ``torch.device``) with its identity set (``sha256`` of exactly what runs; ``name``,
    ``version``, ``uri`` and ``extra`` where known) or raises ModelError naming the problem.
    ``input_shape`` is the evaluation data's per-sample shape when known (a loader may use it
    when the model does not declare one), else None.
    """

    form: str
    accepts: Callable[[object], bool]
    load: Callable[..., Classifier]


class LoaderRegistry:
    """Loaders in registration order; entry points read once, on first need."""

    def __init__(self, group: str = ENTRY_POINT_GROUP):
        self.group = group
        self._loaders: list[Loader] = []
        self._plugins_read = False

    def register(self, loader: Loader) -> None:
        if not isinstance(loader, Loader):
            raise TypeError(f"register a robust_cert.loaders.Loader, not "
                            f"{type(loader).__name__}")
        self._loaders.append(loader)

    def unregister(self, loader: Loader) -> None:
        self._loaders.remove(loader)

    def _read_plugins(self) -> None:
        if self._plugins_read:
            return
        self._plugins_read = True  # once: a broken plugin is reported, not retried
        for name, obj in load_group(self.group):
            found = [obj] if isinstance(obj, Loader) else obj
            if not isinstance(found, Iterable) or not all(isinstance(x, Loader)
                                                          for x in found):
                raise PluginError(f"plugin {name!r} ({self.group}) gives "
                                  f"{type(obj).__name__}, not Loader objects")
            for loader in found:
                self.register(loader)

    def find(self, ref) -> Loader:
        """The first loader that accepts ``ref``; ModelError listing the accepted forms
        when none does (PluginError when a loader plugin fails to import)."""
        for reading_plugins in (False, True):
            if reading_plugins:
                self._read_plugins()
            for loader in self._loaders:
                if loader.accepts(ref):
                    return loader
        raise ModelError(f"cannot load model {_shown(ref)}: no model loader accepts it; give "
                         + ", ".join(self.forms()))

    def forms(self) -> list[str]:
        """What the registered loaders accept (entry points included)."""
        self._read_plugins()
        return [loader.form for loader in self._loaders]

    def load(self, ref, *, input_shape: tuple[int, ...] | None = None,
             device=None) -> Classifier:
        """``ref`` loaded by the first loader that accepts it, on ``device`` (a
        ``torch.device``, a name such as ``"cuda:0"``, or None for the best present)."""
        from robust_cert.devices import select_device

        loader = self.find(ref)
        shape = tuple(input_shape) if input_shape is not None else None
        dev = select_device(device)
        try:
            return loader.load(ref, input_shape=shape, device=dev)
        except RobustCertError:
            raise
        except Exception as exc:  # a third-party loader's own failure: name it and the ref
            raise ModelError(f"the model loader for {loader.form} failed on {_shown(ref)}: "
                             f"{type(exc).__name__}: {exc}") from exc


def _shown(ref) -> str:
    return repr(str(ref)) if isinstance(ref, (str, Path)) else \
        f"an object of type {type(ref).__name__}"


def _is_classifier(ref) -> bool:
    base = sys.modules.get("robust_cert.models.base")  # not imported: cannot be one
    return base is not None and isinstance(ref, base.Classifier)


def _is_module(ref) -> bool:
    nn = sys.modules.get("torch.nn")
    return nn is not None and isinstance(ref, nn.Module)


def _is_onnx_path(ref) -> bool:
    return isinstance(ref, (str, Path)) and "://" not in str(ref) and \
        ":/" not in str(ref) and str(ref).lower().endswith(".onnx")


def _is_estimator(ref) -> bool:
    """A fitted classifier with ``predict_proba`` (scikit-learn, XGBoost, LightGBM) or a native
    XGBoost / LightGBM Booster; read from the class alone, nothing imported."""
    if isinstance(ref, (str, Path)) or _is_module(ref) or _is_classifier(ref):
        return False
    top = type(ref).__module__.split(".")[0]
    return hasattr(ref, "predict_proba") or (
        top in ("xgboost", "lightgbm") and type(ref).__name__ == "Booster")


def _load_classifier(ref, *, input_shape, device):
    return ref


def _load_module(ref, *, input_shape, device):
    from robust_cert.models.torch import from_module

    if input_shape is None:
        raise ModelError("input_shape is needed to wrap an nn.Module")
    return from_module(ref, input_shape, device=device)


def _load_onnx(ref, *, input_shape, device):
    from robust_cert.models.onnx import from_onnx

    return from_onnx(str(ref), device=device, name=Path(str(ref)).stem, input_shape=input_shape)


def _load_estimator(ref, *, input_shape, device):
    from robust_cert.models.blackbox import from_estimator

    return from_estimator(ref, input_shape=input_shape)


#: The registry :func:`load_model` uses.
REGISTRY = LoaderRegistry()
for _loader in (Loader("a robust_cert Classifier", _is_classifier, _load_classifier),
                Loader("an nn.Module (with input_shape)", _is_module, _load_module),
                Loader("a path to an .onnx file", _is_onnx_path, _load_onnx),
                Loader("a fitted classifier with predict_proba (scikit-learn, XGBoost, "
                       "LightGBM) or a native XGBoost / LightGBM Booster",
                       _is_estimator, _load_estimator)):
    REGISTRY.register(_loader)


def register_loader(loader: Loader) -> Loader:
    """Add ``loader`` to the registry :func:`load_model` uses (after those already there)
    and return it (so it can be unregistered with ``REGISTRY.unregister``)."""
    REGISTRY.register(loader)
    return loader


def load_model(ref, *, input_shape: tuple[int, ...] | None = None,
               device=None) -> Classifier:
    """A Classifier from any reference a registered loader accepts (see the module doc)."""
    return REGISTRY.load(ref, input_shape=input_shape, device=device)
