"""Elementwise activations with a bounded slope: ReLU family, tanh, softsign, sigmoid,
leaky ReLU, ELU."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robust_cert.bounds.base import BoundOp, OpCall, Step, aten_targets
from robust_cert.bounds.registry import register_bound_op


class Activation(BoundOp):
    """An elementwise φ with |φ(a) − φ(b)| ≤ L|a − b| (L = :meth:`slope`): L bounds its
    Lipschitz constant in every p-norm (elementwise maps scale each coordinate's change by at
    most L). Rounding ("act"): errors scale by L, and the op itself adds ``ulps`` units of
    roundoff of its result, |φ(ẑ)| ≤ |φ(0)| + L|ẑ| with |φ(0)| ≤ 1/2.

    ``module_info``/``method_info`` name a module or method form in the report (default: the
    module's class name, the method name)."""

    ulps: ClassVar[float] = 0.0
    module_info: ClassVar[str | None] = None
    method_info: ClassVar[str | None] = None

    def slope(self, call: OpCall) -> float | None:
        """The bound L on |φ'| (None: 1, the default of the step)."""
        return None

    def params(self, call: OpCall) -> float | None:
        if not call.single:
            raise call.unsupported()
        return self.slope(call)

    def lipschitz(self, call: OpCall, params: float | None) -> Step:
        if call.form == "module":
            info = self.module_info or call.label
        elif call.form == "method":
            info = self.method_info or call.label
        else:
            info = call.label
        fields: dict[str, Any] = {} if params is None else {"l2": params, "linf": params}
        if self.ulps:
            fields["ulps"] = self.ulps
        return call.step("act", info=info, **fields)


@register_bound_op
class ReLU(Activation):
    """ReLU, ReLU6, Hardtanh (any clamp range): slope ≤ 1; exact in float (a max or clamp,
    no rounding)."""

    modules = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
    functions = {F.relu, torch.relu, F.relu6, F.hardtanh} | aten_targets(
        "relu", "relu_", "hardtanh", "hardtanh_", "relu6")
    methods = ("relu", "relu_")
    method_info = "relu"


@register_bound_op
class Tanh(Activation):
    """tanh (slope 1 − tanh² ≤ 1) and softsign x/(1 + |x|) (slope 1/(1 + |x|)² ≤ 1); the
    library functions are within 4 ulp of their result."""

    modules = (nn.Tanh, nn.Softsign)
    functions = {torch.tanh, F.tanh, F.softsign} | aten_targets("tanh")
    methods = ("tanh",)
    ulps = 4.0
    method_info = "tanh"


@register_bound_op
class Sigmoid(Activation):
    """Logistic sigmoid: slope σ(1 − σ) ≤ 1/4; within 4 ulp of its result."""

    modules = (nn.Sigmoid,)
    functions = {torch.sigmoid, F.sigmoid} | aten_targets("sigmoid")
    methods = ("sigmoid",)
    ulps = 4.0
    module_info = "Sigmoid"
    method_info = "sigmoid"

    def slope(self, call: OpCall) -> float:
        return 0.25


@register_bound_op
class LeakyReLU(Activation):
    """Leaky ReLU with negative slope a: slope ≤ max(1, |a|); 1 ulp (one product)."""

    modules = (nn.LeakyReLU,)
    functions = {F.leaky_relu} | aten_targets("leaky_relu", "leaky_relu_")
    ulps = 1.0
    module_info = "LeakyReLU"

    def slope(self, call: OpCall) -> float:
        a = call.target.negative_slope if call.form == "module" else call.arg(
            1, "negative_slope", 0.01)
        return max(1.0, abs(float(a)))


@register_bound_op
class ELU(Activation):
    """ELU with scale α: α(eˣ − 1) for x < 0 has slope α·eˣ ≤ |α|, so slope ≤ max(1, |α|);
    within 4 ulp of its result."""

    modules = (nn.ELU,)
    functions = {F.elu} | aten_targets("elu", "elu_")
    ulps = 4.0
    module_info = "ELU"

    def slope(self, call: OpCall) -> float:
        a = call.target.alpha if call.form == "module" else call.arg(1, "alpha", 1.0)
        return max(1.0, abs(float(a)))
