"""Sound Lipschitz constants and float32 rounding bounds of a traced network (Family F).

One algorithm: trace the network with torch.fx (or take a torch.export GraphModule as it is),
walk the graph from the input to the logits and bound, op by op,

* the **Lipschitz constant** of every intermediate value w.r.t. the input, in L2 and L∞
  (composition multiplies, a residual addition a + b adds L_a + L_b, concatenation takes the
  root sum of squares (L2) or the max (L∞));
* the **rounding error** of the floating-point evaluation of every value, elementwise, at the
  input x and anywhere in a ball around x (a standard forward error analysis, see
  :meth:`LipschitzBound.rounding`).

Supported (modules, ``torch.nn.functional`` and the aten ops of torch.export): Linear
(``F.linear``, ``addmm``, ``mm``/``matmul`` by a constant matrix), Conv1d/2d/3d with zero
padding (any stride, dilation, groups), max pooling (any kernel, stride, padding, dilation;
also ``max_pool2d_with_indices``), average pooling and adaptive average pooling, BatchNorm in
eval mode, ReLU, ReLU6, Hardtanh, LeakyReLU, ELU, tanh, sigmoid, Softsign, Identity, Dropout in
eval mode, flatten / view / reshape / squeeze / unsqueeze / permute / transpose / contiguous /
clone and basic indexing, additions and subtractions (residual connections), multiplication
or division by a constant, negation, concatenation. Anything else raises :class:`NotBoundable`
naming the op and the node.

Operator norms (all upper bounds; computed in float64 from the float32 weights and multiplied
by 1 + 1e-9 to cover float64 rounding):

* Linear: exact spectral norm (SVD) for L2, max absolute row sum for L∞.
* Convolution: L∞ = max absolute row sum of the convolution matrix (|K|·1, computed by the
  convolution itself, padding included). L2 = min of two rigorous upper bounds on the
  spectral norm: the zero-padded convolution is a submatrix of the circular convolution on the
  padded grid, whose singular values are those of the C_out × C_in kernel DFT matrices
  (Sedghi et al. 2019), so ‖K‖₂ ≤ max over frequencies of their spectral norm; and
  ‖K‖₂ ≤ √(‖K‖₁‖K‖∞) with both norms computed exactly (|K|ᵀ·1 by autograd). Power
  iteration (a lower bound) is reported beside it as ``l2_lower``, never used as the bound.
* Max pooling: 1 in L∞; in L2 √(the most windows an input can fall in) =
  √∏ ceil(k/s) (∏ k with dilation). Average pooling (any, adaptive too): a non-negative
  matrix A, L∞ = max(A·1), L2 ≤ √(‖A‖₁‖A‖∞) with both computed exactly by the op itself.
* BatchNorm (eval): max |γ/√(σ² + eps)|. Activations: their maximal slope.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_arg

#: Relative safety factor on every operator norm (float64 rounding of SVD, FFT and sums).
NORM_SAFETY = 1.0 + 1e-9
#: Floor of the factor on the error bounds for their own float evaluation; the factor used is
#: the larger of this and :func:`evaluation_safety` of the steps actually walked.
ERROR_BOUND_SAFETY = 1.01
#: Rounded operations per element that the error-bound evaluation of one step adds beyond the
#: op's own sums (magnitudes |ẑ| + 2e + L·r + e_ball, the γ·(…) products, the additions of
#: the local term, the cast of the radius and of the float64 norm, the norm cap).
_BOUND_OPS_PER_STEP = 10

#: u of each ``torch.get_float32_matmul_precision()`` (float32 products on CUDA, and on CPUs
#: whose oneDNN honours it): IEEE float32, TF32 (10-bit mantissa), bfloat16 (7-bit mantissa).
MATMUL_PRECISION_U = {"highest": 2.0 ** -24, "high": 2.0 ** -11, "medium": 2.0 ** -8}


class NotBoundable(ValueError):
    """The network contains an operation whose Lipschitz constant this module cannot bound."""


def matmul_precision_u() -> float:
    """u of float32 matrix products under the current ``torch.set_float32_matmul_precision``:
    "highest" 2^-24, "high" (TF32) 2^-11, "medium" (bfloat16) 2^-8; an unknown setting is
    taken as the coarsest (2^-8); cuBLAS's TF32 switch, when on, means at least 2^-11."""
    u = MATMUL_PRECISION_U.get(str(torch.get_float32_matmul_precision()), 2.0 ** -8)
    if torch.backends.cuda.matmul.allow_tf32:
        u = max(u, 2.0 ** -11)
    return u


def unit_roundoff(dtype: torch.dtype, device: torch.device, kind: str = "") -> float:
    """u of the arithmetic the products of ``kind`` ("matmul", "conv") run in: 2^-53 for
    float64, 2^-11 for float16, 2^-8 for bfloat16; for float32 the coarsest of what may run:
    2^-24, the float32 matmul precision (:func:`matmul_precision_u`; cuBLAS, and the im2col
    convolution without cuDNN) and, for convolutions on CUDA, TF32 (2^-11) when cuDNN may use
    it. Elementwise ops ("") are IEEE float32."""
    if dtype == torch.float64:
        return 2.0 ** -53
    if dtype == torch.float16:
        return 2.0 ** -11
    if dtype == torch.bfloat16:
        return 2.0 ** -8
    u = 2.0 ** -24
    if kind in ("matmul", "conv"):
        u = max(u, matmul_precision_u())
    if kind == "conv" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        u = max(u, 2.0 ** -11)
    return u


@contextlib.contextmanager
def strict_float32():
    """Evaluate inside the error model: cuDNN off (no Winograd/FFT convolutions: every output
    is a sum of rounded products), float32 matrix products in IEEE float32 (no TF32/bf16).
    Restores the previous settings on exit."""
    prec = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with torch.backends.cudnn.flags(enabled=False, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(prec)


def evaluation_safety(steps) -> float:
    """Factor covering the float evaluation of the error bounds themselves over ``steps``.

    Each step computes its bound from its inputs' bounds by sums of k non-negative terms
    (k = its fan-in, or its number of inputs, plus :data:`_BOUND_OPS_PER_STEP`) in
    arithmetic of unit roundoff u, so the computed value is at least the exact one times
    (1 − γ_k). The maps are monotone and of the form A·e + b with A, b ≥ 0 (or a minimum of
    such), so relative shortfalls compound at most multiplicatively: the exact bound is at
    most the computed one times ∏ 1/(1 − γ_k) over the steps walked."""
    log_f = 0.0
    for step in steps:
        k = (step.fan_in if step.kind == "affine" else max(1, len(step.inputs)))
        g = gamma(k + _BOUND_OPS_PER_STEP, max(step.u, 2.0 ** -24))
        log_f -= math.log1p(-g)
    return math.exp(log_f) * (1 + 1e-12)


def gamma(n: int, u: float) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of a sum of n rounded operations."""
    nu = n * u
    if nu >= 0.5:
        raise NotBoundable(f"cannot bound the rounding of a sum of {n} terms at u = {u:g}")
    return nu / (1 - nu)


# --------------------------------------------------------------------------- op analysis


@dataclass
class _Step:
    """How one graph node transforms Lipschitz constants and rounding errors."""

    node: torch.fx.Node
    kind: str  # affine | max | act | same | add | scale | cat | first
    inputs: list[torch.fx.Node]
    l2: float = 1.0  # operator constants (affine, max, act, scale)
    linf: float = 1.0
    coef: list[float] = field(default_factory=list)  # add: |coefficient| of each input
    apply: object = None  # affine: z ↦ A z (no bias); same: the op on another tensor
    apply_abs: object = None  # affine: z ↦ |A| z
    bias: torch.Tensor | None = None  # affine: |b| (broadcastable to the output)
    fan_in: int = 1  # affine: products per output (the γ index)
    ulps: float = 0.0  # act/scale/add: rounding of the op itself, in units of u·|out|
    u: float = 2.0 ** -24  # elementwise ops; products: from ``u_kind`` when rounding
    u_kind: str | None = None  # affine: the kind of its products (see :func:`unit_roundoff`)
    matrix: torch.Tensor | None = None  # affine with an explicit (out, in) matrix: the head
    info: str = ""


def _aten(name: str):
    ops = getattr(torch.ops, "aten", None)
    try:
        return getattr(ops, name)
    except (AttributeError, RuntimeError):
        return None


def _targets(*names: str) -> set:
    out = set()
    for n in names:
        base, _, overload = n.partition(".")
        op = _aten(base)
        if op is None:
            continue
        out.add(op)
        for ov in ([overload] if overload else op.overloads()):
            try:
                out.add(getattr(op, ov))
            except (AttributeError, RuntimeError):
                pass
    return out


_RELU = {F.relu, torch.relu, torch.nn.functional.relu6, F.hardtanh} | _targets(
    "relu", "relu_", "hardtanh", "hardtanh_", "relu6")
_TANH = {torch.tanh, F.tanh} | _targets("tanh")
_SIGMOID = {torch.sigmoid, F.sigmoid} | _targets("sigmoid")
_SOFTSIGN = {F.softsign}
_LEAKY = {F.leaky_relu} | _targets("leaky_relu", "leaky_relu_")
_ELU = {F.elu} | _targets("elu", "elu_")
_SHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
                torch.transpose, torch.clone} | _targets(
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "clone", "contiguous", "alias", "_unsafe_view", "view_copy", "slice",
    "select", "detach", "lift_fresh_copy")
_SHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute",
                  "transpose", "contiguous", "clone", "detach"}
_ADD = {operator.add, operator.iadd, torch.add} | _targets("add", "add_")
_SUB = {operator.sub, operator.isub, torch.sub} | _targets("sub", "sub_", "rsub")
_MUL = {operator.mul, operator.imul, torch.mul} | _targets("mul", "mul_")
_DIV = {operator.truediv, operator.itruediv, torch.div} | _targets("div", "div_")
_NEG = {operator.neg, torch.neg} | _targets("neg")
_CAT = {torch.cat, torch.concat} | _targets("cat", "concat")
_LINEAR = {F.linear} | _targets("linear")
_ADDMM = _targets("addmm")
_MM = {torch.mm, torch.matmul, operator.matmul} | _targets("mm", "matmul")
_CONV = {F.conv1d, F.conv2d, F.conv3d} | _targets("conv1d", "conv2d", "conv3d")
_CONVOLUTION = _targets("convolution", "_convolution")
_MAXPOOL = {F.max_pool1d, F.max_pool2d, F.max_pool3d} | _targets(
    "max_pool1d", "max_pool2d", "max_pool3d")
_MAXPOOL_IDX = {F.max_pool1d_with_indices, F.max_pool2d_with_indices,
                F.max_pool3d_with_indices} | _targets(
    "max_pool2d_with_indices", "max_pool3d_with_indices")
_AVGPOOL = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d, F.adaptive_avg_pool3d} | _targets(
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "mean")
_DROPOUT = {F.dropout} | _targets("dropout")
_BN = {F.batch_norm} | _targets("batch_norm", "_native_batch_norm_legit_no_training")


def _spec(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _expand(v, dims: int) -> tuple[int, ...]:
    v = _spec(v)
    return v * dims if len(v) == 1 else v


class _GraphBound:
    """The analysed graph: steps in execution order, constants per node."""

    def __init__(self, gm: torch.fx.GraphModule, input_shape: tuple[int, ...],
                 power_iterations: int):
        self.gm = gm
        self.power_iterations = power_iterations
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotBoundable(f"cannot bound the model: it takes {len(placeholders)} inputs "
                               "(one tensor expected)")
        self.input = placeholders[0]
        out_node = next(n for n in graph.nodes if n.op == "output")
        outs = [a for a in _flatten_args(out_node.args) if isinstance(a, torch.fx.Node)]
        if len(outs) != 1:
            raise NotBoundable("cannot bound the model: it returns "
                               f"{len(outs)} tensors (one logits tensor expected)")
        self.output = outs[0]
        # the nodes the output needs, in graph order
        needed: set[torch.fx.Node] = set()
        stack = [self.output]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        self.order = [n for n in graph.nodes if n in needed]
        p = next(gm.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x0 = torch.zeros((1, *input_shape), device=self.device, dtype=self.dtype)
        try:
            with torch.no_grad():
                self.values = self._evaluate(x0)
        except NotBoundable:
            raise
        except Exception as exc:  # e.g. a graph exported for one fixed batch size
            raise NotBoundable(f"cannot bound the model: its graph fails on one input of shape "
                               f"{tuple(x0.shape)} ({type(exc).__name__}: {exc})") from None
        # a value depends on the input when it is a tensor computed from it (sizes and other
        # metadata read from the input are constants of the batch, not perturbed values)
        self.depends = {}
        for n in self.order:
            tensor = isinstance(_first(self.values[n]), torch.Tensor)
            self.depends[n] = n is self.input or (tensor and any(
                self.depends.get(a, False) for a in n.all_input_nodes))
        if not self.depends[self.output]:
            raise NotBoundable("cannot bound the model: its output does not depend on the input")
        self.steps: list[_Step] = []
        self.lip: dict[torch.fx.Node, tuple[float, float]] = {self.input: (1.0, 1.0)}
        self.layers: list[dict] = []
        for n in self.order:
            if n is self.input or not self.depends[n]:
                continue
            step = self._analyze(n)
            self._no_duplication(step)
            self.steps.append(step)
            self.lip[n] = self._propagate_lip(step)
            if step.kind in ("affine", "max", "act", "scale") and (step.l2 != 1.0 or
                                                                  step.linf != 1.0):
                entry = {"layer": n.name, "type": step.info or str(n.target), "l2": step.l2,
                         "linf": step.linf}
                if step.info.startswith("Conv") and step.matrix is None:
                    entry["l2_lower"] = getattr(step, "l2_lower", None)
                self.layers.append(entry)

    def _no_duplication(self, step: _Step) -> None:
        """Elementwise and reshaping ops are bounded as maps that never copy an input element
        to several outputs; a broadcast that does (x * c with c larger than x, expand) would
        multiply the L2 norm, so it is refused."""
        if step.kind in ("affine", "max", "cat", "first"):
            return
        out = _first(self.values[step.node])
        per = out[0].numel() if out.ndim else 1
        for a in step.inputs:
            v = _first(self.values[a])
            if v[0].numel() < per if step.kind == "same" else v[0].numel() != per:
                raise NotBoundable(f"cannot bound {step.info or step.node.target} at "
                                   f"{step.node.name}: it broadcasts its input to more elements")

    # ---- evaluation of the needed nodes (guards and other side branches are skipped)

    def _evaluate(self, x: torch.Tensor) -> dict:
        env: dict = {}
        mods = dict(self.gm.named_modules())
        for n in self.order:
            if n.op == "placeholder":
                env[n] = x
            elif n.op == "get_attr":
                obj = self.gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n] = obj
            else:
                args = map_arg(n.args, lambda a: env[a])
                kwargs = map_arg(n.kwargs, lambda a: env[a])
                if n.op == "call_function":
                    env[n] = n.target(*args, **kwargs)
                elif n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                elif n.op == "call_module":
                    env[n] = mods[n.target](*args, **kwargs)
                else:
                    raise NotBoundable(f"cannot bound node {n.name} ({n.op})")
        return env

    # ---- per-op analysis

    def _dep_args(self, n) -> list[torch.fx.Node]:
        return [a for a in n.all_input_nodes if self.depends[a]]

    def _const(self, a):
        """The value of an argument that does not depend on the input."""
        if isinstance(a, torch.fx.Node):
            return self.values[a]
        return a

    def _arg(self, n, i: int, name: str, default=None):
        if len(n.args) > i:
            return n.args[i]
        return n.kwargs.get(name, default)

    def _analyze(self, n: torch.fx.Node) -> _Step:
        deps = self._dep_args(n)
        where = f"{n.name}"
        if n.op == "call_module":
            mod = dict(self.gm.named_modules())[n.target]
            return self._module_step(n, mod, deps)
        if n.op == "call_method":
            if n.target in _SHAPE_METHODS and len(deps) == 1 and n.args[0] is deps[0]:
                return _Step(n, "same", deps, info=f".{n.target}")
            if n.target in ("relu", "relu_") and len(deps) == 1:
                return _Step(n, "act", deps, info="relu")
            if n.target in ("tanh",):
                return _Step(n, "act", deps, ulps=4.0, info="tanh")
            if n.target in ("sigmoid",):
                return _Step(n, "act", deps, l2=0.25, linf=0.25, ulps=4.0, info="sigmoid")
            if n.target in ("add", "sub", "mul", "div", "neg", "__add__", "__sub__"):
                fn = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
                      "neg": torch.neg, "__add__": torch.add, "__sub__": torch.sub}[n.target]
                return self._function_step(n, fn, deps, where)
            raise NotBoundable(f"cannot bound the method .{n.target}() at {where}")
        if n.op == "call_function":
            return self._function_step(n, n.target, deps, where)
        raise NotBoundable(f"cannot bound node {where} ({n.op})")

    def _module_step(self, n, m: nn.Module, deps) -> _Step:
        name = f"{n.target} ({type(m).__name__})"
        if len(deps) != 1:
            raise NotBoundable(f"cannot bound layer {name}: it takes several inputs")
        z = self.values[deps[0]]
        if isinstance(m, nn.Linear):
            return self._linear(n, deps, m.weight.detach(), m.bias, type(m).__name__)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if m.padding_mode != "zeros":
                raise NotBoundable(f"cannot bound layer {name}: padding mode {m.padding_mode}")
            return self._conv(n, deps, z, m.weight.detach(), m.bias, m.stride, m.padding,
                              m.dilation, m.groups, type(m).__name__)
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            return _Step(n, "act", deps, info=type(m).__name__)
        if isinstance(m, (nn.Identity, nn.Flatten, nn.Unflatten)) or (
                isinstance(m, nn.Dropout) and not m.training):
            return _Step(n, "same", deps, apply=m, info=type(m).__name__)
        if isinstance(m, (nn.Tanh, nn.Softsign)):
            return _Step(n, "act", deps, ulps=4.0, info=type(m).__name__)
        if isinstance(m, nn.Sigmoid):
            return _Step(n, "act", deps, l2=0.25, linf=0.25, ulps=4.0, info="Sigmoid")
        if isinstance(m, nn.LeakyReLU):
            s = max(1.0, abs(m.negative_slope))
            return _Step(n, "act", deps, l2=s, linf=s, ulps=1.0, info="LeakyReLU")
        if isinstance(m, nn.ELU):
            s = max(1.0, m.alpha)
            return _Step(n, "act", deps, l2=s, linf=s, ulps=4.0, info="ELU")
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return self._maxpool(n, deps, z, m.kernel_size, m.stride, m.dilation, m,
                                 type(m).__name__)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            if getattr(m, "divisor_override", None):
                raise NotBoundable(f"cannot bound layer {name}: divisor_override")
            return self._nonneg(n, deps, z, m, type(m).__name__)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            if m.training or m.running_var is None:
                raise NotBoundable(f"cannot bound layer {name}: batch norm in training mode "
                                   "(batch statistics)")
            return self._bn(n, deps, z, m.weight, m.bias, m.running_mean, m.running_var, m.eps,
                            lambda v, m=m: F.batch_norm(v, m.running_mean, m.running_var,
                                                        m.weight, m.bias, False, 0.0, m.eps))
        if isinstance(m, nn.Dropout):
            raise NotBoundable(f"cannot bound layer {name}: dropout in training mode")
        raise NotBoundable(f"cannot bound layer {name}")

    def _function_step(self, n, fn, deps, where) -> _Step:
        label = _label(fn)
        z = self.values[deps[0]] if deps else None
        first_dep = bool(n.args) and n.args[0] is (deps[0] if deps else None)
        if fn in _RELU and first_dep and len(deps) == 1:
            return _Step(n, "act", deps, info=label)
        if fn in _TANH | _SOFTSIGN and first_dep and len(deps) == 1:
            return _Step(n, "act", deps, ulps=4.0, info=label)
        if fn in _SIGMOID and first_dep and len(deps) == 1:
            return _Step(n, "act", deps, l2=0.25, linf=0.25, ulps=4.0, info=label)
        if fn in _LEAKY and first_dep and len(deps) == 1:
            s = max(1.0, abs(float(self._arg(n, 1, "negative_slope", 0.01))))
            return _Step(n, "act", deps, l2=s, linf=s, ulps=1.0, info=label)
        if fn in _ELU and first_dep and len(deps) == 1:
            s = max(1.0, abs(float(self._arg(n, 1, "alpha", 1.0))))
            return _Step(n, "act", deps, l2=s, linf=s, ulps=4.0, info=label)
        if fn in _DROPOUT and first_dep and len(deps) == 1:
            train = self._arg(n, 2, "train", self._arg(n, 2, "training", True))
            if train:
                raise NotBoundable(f"cannot bound dropout in training mode at {where}")
            return _Step(n, "same", deps, info=label)
        if fn in _SHAPE_FUNCS and first_dep and len(deps) == 1:
            return _Step(n, "same", deps, info=label)
        if fn is operator.getitem and len(deps) == 1 and n.args[0] is deps[0]:
            src = deps[0]
            if isinstance(self.values[src], torch.Tensor):
                idx = n.args[1]
                items = idx if isinstance(idx, tuple) else (idx,)
                if all(i is None or i is Ellipsis or isinstance(i, (int, slice))
                       for i in items):
                    return _Step(n, "same", deps, info="indexing")
                raise NotBoundable(f"cannot bound indexing with tensors at {where}")
            if n.args[1] == 0 and getattr(src, "_rc_tuple_first", False):
                return _Step(n, "first", deps, info="getitem")
            raise NotBoundable(f"cannot bound element {n.args[1]} of {src.name} at {where}")
        if fn in _LINEAR and first_dep and len(deps) == 1:
            w = self._const(self._arg(n, 1, "weight"))
            b = self._const(self._arg(n, 2, "bias"))
            return self._linear(n, deps, w, b, label)
        if fn in _ADDMM and len(deps) == 1 and n.args[1] is deps[0]:
            wt = self._const(n.args[2])
            beta = float(n.kwargs.get("beta", 1.0))
            alpha = float(n.kwargs.get("alpha", 1.0))
            b = self._const(n.args[0])
            b = None if b is None else b * beta
            return self._linear(n, deps, (wt * alpha).t(), b, "addmm")
        if fn in _MM and len(deps) == 1 and n.args[0] is deps[0] and z is not None \
                and z.ndim == 2:
            wt = self._const(n.args[1])
            if isinstance(wt, torch.Tensor) and wt.ndim == 2:
                return self._linear(n, deps, wt.t(), None, label)
        if fn in _CONV and first_dep and len(deps) == 1:
            w = self._const(self._arg(n, 1, "weight"))
            b = self._const(self._arg(n, 2, "bias"))
            nd = w.ndim - 2
            return self._conv(n, deps, z, w, b, self._arg(n, 3, "stride", 1),
                              self._arg(n, 4, "padding", 0), self._arg(n, 5, "dilation", 1),
                              int(self._arg(n, 6, "groups", 1)), f"Conv{nd}d ({label})")
        if fn in _CONVOLUTION and first_dep and len(deps) == 1:
            if n.args[6]:
                raise NotBoundable(f"cannot bound a transposed convolution at {where}")
            w, b = self._const(n.args[1]), self._const(n.args[2])
            return self._conv(n, deps, z, w, b, n.args[3], n.args[4], n.args[5],
                              int(n.args[8]), f"Conv{w.ndim - 2}d ({label})")
        if (fn in _MAXPOOL or fn in _MAXPOOL_IDX) and first_dep and len(deps) == 1:
            k = self._arg(n, 1, "kernel_size")
            s = self._arg(n, 2, "stride", None) or k
            dil = self._arg(n, 4, "dilation", 1)
            call_args = map_arg(n.args[1:], self._const)
            call_kwargs = map_arg(n.kwargs, self._const)
            if fn is F.max_pool2d or fn is F.max_pool1d or fn is F.max_pool3d:
                call_kwargs = {k2: v for k2, v in call_kwargs.items() if k2 != "return_indices"}
            step = self._maxpool(n, deps, z, k, s, dil,
                                 lambda v: _first(fn(v, *call_args, **call_kwargs)), label)
            if fn in _MAXPOOL_IDX:
                n._rc_tuple_first = True
            return step
        if fn in _AVGPOOL and first_dep and len(deps) == 1:
            if fn in _targets("mean"):
                dims = _spec(self._arg(n, 1, "dim", None))
                if None in dims or 0 in dims:
                    raise NotBoundable(f"cannot bound a mean over the batch at {where}")
            if self._arg(n, 6, "divisor_override", None):
                raise NotBoundable(f"cannot bound average pooling with divisor_override at "
                                   f"{where}")
            call_args = map_arg(n.args[1:], self._const)
            call_kwargs = map_arg(n.kwargs, self._const)
            return self._nonneg(n, deps, z, lambda v: fn(v, *call_args, **call_kwargs), label,
                                spatial=fn not in _targets("mean"))
        if fn in _BN and first_dep and len(deps) == 1:
            if fn is F.batch_norm:
                mean, var = self._const(self._arg(n, 1, "running_mean")), \
                    self._const(self._arg(n, 2, "running_var"))
                w, b = self._const(self._arg(n, 3, "weight")), self._const(self._arg(n, 4, "bias"))
                if self._arg(n, 5, "training", False):
                    raise NotBoundable(f"cannot bound batch norm in training mode at {where}")
                eps = float(self._arg(n, 7, "eps", 1e-5))
            else:
                w, b = self._const(n.args[1]), self._const(n.args[2])
                if "legit" in str(fn):
                    mean, var = self._const(n.args[3]), self._const(n.args[4])
                    eps = float(n.args[6])
                    n._rc_tuple_first = True
                else:  # aten.batch_norm(input, weight, bias, mean, var, training, mom, eps)
                    mean, var = self._const(n.args[3]), self._const(n.args[4])
                    if n.args[5]:
                        raise NotBoundable(f"cannot bound batch norm in training mode at "
                                           f"{where}")
                    eps = float(n.args[7])
            if mean is None or var is None:
                raise NotBoundable(f"cannot bound batch norm without running statistics at "
                                   f"{where}")
            return self._bn(n, deps, z, w, b, mean, var, eps,
                            lambda v: F.batch_norm(v, mean, var, w, b, False, 0.0, eps))
        if fn in _ADD | _SUB:
            plain = fn in (operator.add, operator.sub, operator.iadd, operator.isub)
            alpha = 1.0 if plain else abs(float(n.kwargs.get("alpha", 1.0)))
            rsub = fn in _targets("rsub")
            coefs = [(a, (alpha if rsub else 1.0) if i == 0 else (1.0 if rsub else alpha))
                     for i, a in enumerate(n.args[:2])]
            dep_coef = [c for a, c in coefs if isinstance(a, torch.fx.Node) and self.depends[a]]
            dep_nodes = [a for a, _ in coefs if isinstance(a, torch.fx.Node) and self.depends[a]]
            if set(dep_nodes) != set(deps) or not dep_nodes:
                raise NotBoundable(f"cannot bound the addition at {where}")
            return _Step(n, "add", dep_nodes, coef=dep_coef, ulps=2.0, info=label)
        if fn in _MUL | _DIV and len(deps) == 1 and n.args[0] is deps[0] \
                and not (isinstance(n.args[1], torch.fx.Node) and self.depends[n.args[1]]):
            c = self._const(n.args[1])
            c = c.detach().double().abs() if isinstance(c, torch.Tensor) else abs(float(c))
            if fn in _DIV:
                if n.kwargs.get("rounding_mode") is not None:
                    raise NotBoundable(f"cannot bound a rounding division at {where}")
                cmin = float(c.min()) if isinstance(c, torch.Tensor) else c
                if cmin == 0:
                    raise NotBoundable(f"cannot bound a division by zero at {where}")
                s = 1.0 / cmin
            else:
                s = float(c.max()) if isinstance(c, torch.Tensor) else c
            return _Step(n, "scale", deps, l2=s, linf=s, ulps=2.0, info=label)
        if fn in _MUL and len(deps) == 1 and n.args[1] is deps[0] \
                and not (isinstance(n.args[0], torch.fx.Node) and self.depends[n.args[0]]):
            c = self._const(n.args[0])
            s = float(c.detach().abs().max()) if isinstance(c, torch.Tensor) else abs(float(c))
            return _Step(n, "scale", deps, l2=s, linf=s, ulps=2.0, info=label)
        if fn in _NEG and len(deps) == 1:
            return _Step(n, "same", deps, info=label)
        if fn in _CAT and deps:
            dim = int(self._arg(n, 1, "dim", 0))
            if dim == 0 or dim == -self.values[n].ndim:
                raise NotBoundable(f"cannot bound a concatenation along the batch at {where}")
            return _Step(n, "cat", deps, info=label)
        raise NotBoundable(f"cannot bound the operation {label} at {where}")

    # ---- op constructors

    def _linear(self, n, deps, w, b, label) -> _Step:
        w = w.detach()
        w64 = w.double()
        l2 = float(torch.linalg.matrix_norm(w64, 2)) * NORM_SAFETY
        linf = float(w64.abs().sum(1).max()) * NORM_SAFETY
        wabs = w.abs()
        return _Step(n, "affine", deps, l2=l2, linf=linf,
                     apply=lambda v: F.linear(v, w), apply_abs=lambda v: F.linear(v, wabs),
                     bias=None if b is None else b.detach().abs(), fan_in=w.shape[1] + 1,
                     u=unit_roundoff(w.dtype, w.device, "matmul"), u_kind="matmul", matrix=w,
                     info=label)

    def _conv(self, n, deps, z, w, b, stride, padding, dilation, groups, label) -> _Step:
        w = w.detach()
        nd = w.ndim - 2
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        stride, dilation = _expand(stride, nd), _expand(dilation, nd)
        if isinstance(padding, str):
            if padding == "valid":
                pad = (0,) * nd
            else:  # "same": at most d·(k − 1) in total per dimension
                pad = tuple(d * (k - 1) for d, k in zip(dilation, w.shape[2:], strict=True))
            padding_arg = padding
        else:
            pad = _expand(padding, nd)
            padding_arg = pad
        wabs = w.abs()

        def apply(v):
            return conv(v, w, None, stride, padding_arg, dilation, groups)

        def apply_abs(v):
            return conv(v, wabs, None, stride, padding_arg, dilation, groups)

        in_shape = tuple(z.shape[1:])
        w64 = w.double()
        ones = torch.ones((1, *in_shape), dtype=torch.float64, device=w.device)
        row = conv(ones, w64.abs(), None, stride, padding_arg, dilation, groups)
        linf = float(row.max())
        ones_v = ones.clone().requires_grad_(True)
        with torch.enable_grad():
            out = conv(ones_v, w64.abs(), None, stride, padding_arg, dilation, groups)
            (col,) = torch.autograd.grad(out.sum(), ones_v)
        l1 = float(col.max())
        fourier = _conv_fourier_bound(w64, in_shape, pad, dilation, groups)
        l2 = min(fourier, math.sqrt(l1 * linf))
        step = _Step(n, "affine", deps, l2=l2 * NORM_SAFETY, linf=linf * NORM_SAFETY,
                     apply=apply, apply_abs=apply_abs,
                     bias=None if b is None else b.detach().abs().view(
                         -1, *([1] * nd)),
                     fan_in=int(np.prod(w.shape[1:])) + 1,
                     u=unit_roundoff(w.dtype, w.device, "conv"), u_kind="conv", info=label)
        step.l2_lower = _power_iteration(apply, in_shape, w, self.power_iterations)
        return step

    def _maxpool(self, n, deps, z, k, s, dil, apply, label) -> _Step:
        nd = z.ndim - 2 if z.ndim > 2 else 1
        k, s = _expand(k, nd), _expand(s if s else k, nd)
        dil = _expand(dil, nd)
        if any(d != 1 for d in dil):
            count = float(np.prod(k))
        else:
            count = float(np.prod([math.ceil(ki / si) for ki, si in zip(k, s, strict=False)]))
        return _Step(n, "max", deps, l2=math.sqrt(count), linf=1.0, apply=apply, info=label)

    def _nonneg(self, n, deps, z, apply, label, spatial: bool = True) -> _Step:
        """A linear map with non-negative weights (average pooling): norms from A·1, Aᵀ·1."""
        ones = torch.ones_like(z[:1], dtype=torch.float64).requires_grad_(True)
        with torch.enable_grad():
            out = apply(ones)
            (col,) = torch.autograd.grad(out.sum(), ones)
        linf, l1 = float(out.detach().max()), float(col.max())
        # terms per output (the γ index): a window never spans channels, so at most the
        # spatial size (the whole sample for a mean over several dimensions), + 1 division
        fan = int(np.prod(z.shape[2:])) if spatial and z.ndim > 2 else z[0].numel()
        return _Step(n, "affine", deps, l2=math.sqrt(l1 * linf) * NORM_SAFETY,
                     linf=linf * NORM_SAFETY, apply=apply, apply_abs=apply, bias=None,
                     fan_in=fan + 1, u=unit_roundoff(z.dtype, z.device), u_kind="", info=label)

    def _bn(self, n, deps, z, w, b, mean, var, eps, apply) -> _Step:
        scale = 1.0 / torch.sqrt(var.detach().double() + eps)
        if w is not None:
            scale = scale * w.detach().double()
        s = float(scale.abs().max())
        view = (-1, *([1] * (z.ndim - 2)))
        sabs = scale.abs().to(z.dtype).view(view)
        # |BN(ẑ) − BN(z)| ≤ |s|·e + γ_6(|s||ẑ| + |s||μ| + |β|): a handful of rounded
        # operations per element (folded or not)
        const = (scale.abs() * mean.detach().double().abs()
                 + (b.detach().double().abs() if b is not None else 0.0)).to(z.dtype).view(view)
        return _Step(n, "affine", deps, l2=s * NORM_SAFETY, linf=s * NORM_SAFETY,
                     apply=lambda v: v * sabs, apply_abs=lambda v: v * sabs,
                     bias=const, fan_in=6,
                     u=unit_roundoff(z.dtype, z.device), u_kind="", info="BatchNorm (eval)")

    def _propagate_lip(self, step: _Step) -> tuple[float, float]:
        ins = [self.lip[a] for a in step.inputs]
        if step.kind in ("affine", "max", "act", "scale"):
            return ins[0][0] * step.l2, ins[0][1] * step.linf
        if step.kind in ("same", "first"):
            return ins[0]
        if step.kind == "add":
            return (sum(c * li[0] for c, li in zip(step.coef, ins, strict=True)),
                    sum(c * li[1] for c, li in zip(step.coef, ins, strict=True)))
        if step.kind == "cat":
            return math.sqrt(sum(li[0] ** 2 for li in ins)), max(li[1] for li in ins)
        raise AssertionError(step.kind)

    # ---- rounding errors

    def rounding(self, x: torch.Tensor, radius: torch.Tensor | None, norm: str):
        """Elementwise bounds on |computed − exact| of the logits: at x, and (when ``radius``
        is given, one per point) anywhere in the ``norm`` ball of that radius around x.

        Returns (err_center, err_ball) of the output's shape (err_ball None without radius).
        The bounds are of the evaluation under :func:`strict_float32` (which this runs in), and
        the unit roundoff of every product is read from the settings at this call.
        """
        with strict_float32():
            return self._rounding(x, radius, norm)

    def _rounding(self, x: torch.Tensor, radius: torch.Tensor | None, norm: str):
        for step in self.steps:
            if step.u_kind is not None:
                step.u = unit_roundoff(self.dtype, self.device, step.u_kind)
        with torch.no_grad():
            vals = self._evaluate(x.to(self.dtype))
        col = 0 if norm == "l2" else 1
        shape = (-1,)
        err_c: dict = {self.input: torch.zeros_like(x, dtype=self.dtype)}
        err_b: dict = {self.input: torch.zeros_like(x, dtype=self.dtype)}
        # magnitudes of computed values: at x (|ẑ| of this evaluation, +2e for another run of
        # the same ops), and in the ball (|ẑ(x)| + 2e(x) + L·r + e_ball)
        mag_c: dict = {}
        mag_b: dict = {}

        def r_view(t):
            return radius.to(t.device, t.dtype).view(shape + (1,) * (t.ndim - 1))

        def mags(a):
            if a not in mag_c:
                v = vals[a]
                v = _first(v)
                mag_c[a] = v.abs() + 2 * err_c[a]
                if radius is not None:
                    mag_b[a] = mag_c[a] + self.lip[a][col] * r_view(v) + err_b[a]
            return mag_c[a], mag_b.get(a)

        # the accumulated error of every value also has an L2-norm bound per point, carried
        # forward through the ops' L2 constants: ‖ẑ_k − z_k‖₂ ≤ L_k·‖ẑ_in − z_in‖₂ + ‖r_k‖₂
        # (r_k the op's own rounding). Elementwise errors are capped by it at every node, so
        # deep networks do not compound |W|-products (the elementwise bound alone grows like
        # the L∞ operator norms).
        zero = torch.zeros(x.shape[0], dtype=self.dtype, device=x.device)
        norm_c: dict = {self.input: zero}
        norm_b: dict = {self.input: zero}

        def pnorm(t):
            # in float64 (a sum of numel squares would lose γ_numel in float32), cast back
            # (one rounding, within the per-step allowance of :func:`evaluation_safety`)
            t = t.double()
            return (t.flatten(1).norm(dim=1) if t.ndim > 1 else t.abs()).to(self.dtype)

        with torch.no_grad():
            for step in self.steps:
                n = step.node
                out = _first(vals[n])
                for ball, err, nrm in ((False, err_c, norm_c), (True, err_b, norm_b)):
                    if ball and radius is None:
                        continue
                    e_in = [err[a] for a in step.inputs]
                    n_in = [nrm[a] for a in step.inputs]
                    m_in = [mags(a)[1 if ball else 0] for a in step.inputs]
                    local = None  # the op's own rounding, elementwise
                    if step.kind == "affine":
                        g = gamma(step.fan_in, step.u)
                        local = g * step.apply_abs(m_in[0])
                        if step.bias is not None:
                            local = local + g * step.bias
                        e = step.apply_abs(e_in[0])
                        en = step.l2 * n_in[0]
                    elif step.kind == "max":
                        e, en = step.apply(e_in[0]), step.l2 * n_in[0]
                    elif step.kind == "act":
                        slope = max(step.l2, step.linf)
                        e, en = slope * e_in[0], slope * n_in[0]
                        if step.ulps:
                            # |φ(ẑ)| ≤ |φ(0)| + L|ẑ| (φ(0) = 0, or 1/2 for the sigmoid)
                            local = step.ulps * step.u * (step.linf * m_in[0] + 0.5)
                    elif step.kind == "scale":
                        e, en = step.linf * e_in[0], step.l2 * n_in[0]
                        local = gamma(2, step.u) * step.linf * m_in[0]
                    elif step.kind == "same":
                        e, en = _reapply(n, vals, step.inputs[0], e_in[0], self), n_in[0]
                    elif step.kind == "first":
                        e, en = e_in[0], n_in[0]
                    elif step.kind == "add":
                        e = sum(c * ei for c, ei in zip(step.coef, e_in, strict=True))
                        en = sum(c * ni for c, ni in zip(step.coef, n_in, strict=True))
                        local = gamma(2, step.u) * sum(
                            c * mi for c, mi in zip(step.coef, m_in, strict=True))
                    elif step.kind == "cat":
                        e = _reapply_cat(n, vals, step.inputs, e_in, self)
                        en = torch.sqrt(sum(ni ** 2 for ni in n_in))
                    else:
                        raise AssertionError(step.kind)
                    if local is not None:
                        local = local.expand_as(out) if local.shape != out.shape else local
                        e = e + local
                        en = en + pnorm(local)
                    e = e.expand_as(out) if e.shape != out.shape else e
                    nrm[n] = en
                    err[n] = torch.minimum(e, en.view(-1, *([1] * (e.ndim - 1))))
        safety = max(ERROR_BOUND_SAFETY, evaluation_safety(self.steps))
        self.safety = safety
        # the scaling in float64 (a float32 product could round down)
        return (err_c[self.output].double() * safety,
                err_b[self.output].double() * safety if radius is not None else None)


_F_NAMES = {id(v): k for k, v in vars(F).items() if callable(v) and not k.startswith("_")}
_TORCH_NAMES = {id(v): k for k, v in vars(torch).items() if callable(v) and not k.startswith("_")}


def _label(fn) -> str:
    """A readable name of a call target (torch's boolean_dispatch wrappers are all 'fn')."""
    if id(fn) in _F_NAMES:
        return f"torch.nn.functional.{_F_NAMES[id(fn)]}"
    if id(fn) in _TORCH_NAMES:
        return f"torch.{_TORCH_NAMES[id(fn)]}"
    if isinstance(fn, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(fn)
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{mod}.{name}" if mod and mod != "builtins" and mod != "_operator" else name


def _first(v):
    """The tensor of a (tensor, indices)-style tuple output; anything else as it is."""
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        return v[0]
    return v


def _flatten_args(args):
    for a in args:
        if isinstance(a, (tuple, list)):
            yield from _flatten_args(a)
        elif isinstance(a, dict):
            yield from _flatten_args(list(a.values()))
        else:
            yield a


def _reapply(n: torch.fx.Node, vals: dict, src: torch.fx.Node, t: torch.Tensor,
             gb: _GraphBound) -> torch.Tensor:
    """Run node ``n``'s (shape or sign) op on ``t`` in place of its input ``src``."""
    env = {a: (t if a is src else _first(vals[a])) for a in n.all_input_nodes}
    args = map_arg(n.args, lambda a: env[a])
    kwargs = map_arg(n.kwargs, lambda a: env[a])
    if n.op == "call_function":
        out = n.target(*args, **kwargs)
        if n.target in _NEG:
            out = -out  # an error bound stays non-negative
        return out
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    mod = dict(gb.gm.named_modules())[n.target]
    return mod(*args, **kwargs)


def _reapply_cat(n, vals, inputs, errs, gb) -> torch.Tensor:
    env = {a: torch.zeros_like(_first(vals[a])) for a in n.all_input_nodes}
    for a, e in zip(inputs, errs, strict=True):
        env[a] = e
    args = map_arg(n.args, lambda a: env[a])
    kwargs = map_arg(n.kwargs, lambda a: env[a])
    return n.target(*args, **kwargs)


def _conv_fourier_bound(w: torch.Tensor, in_shape: tuple[int, ...], pad: tuple[int, ...],
                        dilation: tuple[int, ...], groups: int) -> float:
    """max over DFT frequencies of ‖Ŵ(f)‖₂ on a grid holding the padded input: an upper bound
    on the spectral norm of the zero-padded (strided, dilated) convolution (float64)."""
    nd = w.ndim - 2
    k = w.shape[2:]
    kd = [d * (ki - 1) + 1 for d, ki in zip(dilation, k, strict=True)]
    grid = [s + 2 * p + kk for s, p, kk in zip(in_shape[1:], pad, kd, strict=True)]
    if int(np.prod(grid)) * w.shape[0] * w.shape[1] > 50_000_000:
        return math.inf  # too large to transform: the √(‖K‖₁‖K‖∞) bound is used
    full = torch.zeros((*w.shape[:2], *kd), dtype=torch.float64, device=w.device)
    index = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)
    full[index] = w
    spec = torch.fft.fftn(full, s=grid, dim=tuple(range(2, 2 + nd)))
    o, i = w.shape[:2]
    spec = spec.reshape(groups, o // groups, i, -1).permute(3, 0, 1, 2)
    return float(torch.linalg.matrix_norm(spec, 2).max())


def _power_iteration(apply, in_shape, w: torch.Tensor, iters: int) -> float:
    """Power iteration on KᵀK (seeded): a lower estimate of ‖K‖₂, reported only. The norm
    goes to the host once, after the last iteration (no device sync per iteration)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn((1, *in_shape), generator=g, dtype=w.dtype).to(w.device)
    u = None
    for _ in range(iters):
        v = v / v.norm().clamp_min(1e-30)
        vv = v.detach().requires_grad_(True)
        with torch.enable_grad():
            u = apply(vv)
            (v,) = torch.autograd.grad(u, vv, grad_outputs=u.detach())
    return float(u.detach().norm()) if u is not None else 0.0


# --------------------------------------------------------------------------- public API


@dataclass
class LipschitzBound:
    """Per-norm constants of the network up to (``prefix``) its last linear layer (``head``).

    A margin a·f(x) has |a·f(x+δ) − a·f(x)| ≤ ‖aᵀ head‖_dual · prefix[norm] · ‖δ‖ (or
    ‖a‖_dual · prefix when the network does not end in a linear layer). ``graph`` bounds the
    float rounding of the logits (:meth:`rounding`)."""

    prefix: dict[str, float]
    head: torch.Tensor | None
    layers: list[dict]
    input_dim: int
    graph: _GraphBound | None = None

    def margin_constants(self, a: torch.Tensor, norm: str) -> torch.Tensor:
        """Lipschitz bounds of the margins a_j·f (rows of ``a``) w.r.t. the ``norm`` of δ."""
        a = a.double()
        rows = a @ self.head.double() if self.head is not None else a
        l2 = rows.norm(dim=-1) * self.prefix["l2"] * NORM_SAFETY
        if norm == "l2":
            return l2
        linf = rows.abs().sum(-1) * self.prefix["linf"] * NORM_SAFETY
        return torch.minimum(linf, l2 * math.sqrt(self.input_dim))

    def rounding(self, x: torch.Tensor, radius: torch.Tensor | None = None, norm: str = "l2"):
        """Elementwise bounds (float64, shape of the logits) on the rounding error of the
        float evaluation of the logits at x and, with ``radius`` (one per point), at any
        input within that ``norm`` distance of x.

        Error model (standard forward error analysis, Higham ch. 3): every output of a linear
        op (Linear, convolution, average pooling, batch norm) is a sum of n rounded products
        in some order, so |ŷ − y| ≤ |W|·e_in + γ_{n+1}(|W||ẑ| + |b|) with n the fan-in and
        γ_n = n·u/(1 − n·u), u = 2^-24 for float32 (2^-11 for TF32 on CUDA when enabled);
        max pooling, ReLU, clamps and reshapes are exact (e_out = max/same of e_in); additions
        and constant scalings add γ₂ of their result; tanh/sigmoid/ELU add 4 ulp of their
        output. Algorithms that do not compute each output as such a sum (Winograd or FFT
        convolutions) are outside this model: the logits are bounded as evaluated under
        :func:`strict_float32` (cuDNN off, IEEE float32 products), and so must the logits the
        bounds are applied to be. The bounds are multiplied by max(:data:`ERROR_BOUND_SAFETY`,
        :func:`evaluation_safety` of the steps walked) for their own float evaluation."""
        if self.graph is None:
            raise ValueError("no graph to bound the rounding of")
        ec, eb = self.graph.rounding(x, radius, norm)
        return ec.double().flatten(1), (eb.double().flatten(1) if eb is not None else None)


def lipschitz_bound(module: nn.Module, input_shape: tuple[int, ...],
                    power_iterations: int = 100) -> LipschitzBound:
    """Sound Lipschitz constants of ``module`` (see the module docstring for the ops and the
    norm bounds), from a torch.fx trace (a torch.fx/torch.export GraphModule is used as it is).

    ``power_iterations``: iterations of the reported lower estimate of each convolution's
    spectral norm (``layers[i]["l2_lower"]``; never used in the bound). Raises
    :class:`NotBoundable` naming the first op it cannot bound.
    """
    if isinstance(module, torch.fx.GraphModule):
        gm = module
    else:
        try:
            gm = torch.fx.symbolic_trace(module)
        except Exception as exc:  # any tracing failure means "cannot bound"
            raise NotBoundable(f"cannot bound the model: it cannot be traced ({exc})") from None
    graph = _GraphBound(gm, tuple(input_shape), power_iterations)
    out = graph.output
    head = None
    prefix_node = out
    last = next((s for s in graph.steps if s.node is out), None)
    if last is not None and last.kind == "affine" and last.matrix is not None:
        head = last.matrix.detach()
        prefix_node = last.inputs[0]
        graph.layers = [entry for entry in graph.layers if entry["layer"] != out.name]
        graph.layers.append({"layer": out.name, "type": f"{last.info} (head)"})
    l2, linf = graph.lip[prefix_node]
    return LipschitzBound({"l2": l2, "linf": linf}, head, graph.layers,
                          int(np.prod(input_shape)), graph)
