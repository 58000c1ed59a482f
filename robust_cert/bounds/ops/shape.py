"""Ops that move elements: reshapes and views, basic indexing, dropout in eval mode,
concatenation."""

from __future__ import annotations

import operator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from robust_cert.bounds.base import BoundOp, NotBoundable, OpCall, Step, aten_targets
from robust_cert.bounds.registry import register_bound_op

SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
                   torch.transpose, torch.clone} | aten_targets(
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "clone", "contiguous", "alias", "_unsafe_view", "view_copy", "slice",
    "select", "detach", "lift_fresh_copy")
SHAPE_METHODS = ("flatten", "view", "reshape", "squeeze", "unsqueeze", "permute",
                 "transpose", "contiguous", "clone", "detach")
DROPOUT = {F.dropout} | aten_targets("dropout")
CAT = {torch.cat, torch.concat} | aten_targets("cat", "concat")


@register_bound_op
class Reshape(BoundOp):
    """Identity, flatten, view, reshape, squeeze/unsqueeze, permute/transpose, contiguous,
    clone, detach, aten slice/select: each output element is one input element, so L = 1 in
    every norm (a slice or selection can only drop elements) and the op is exact in float
    ("same"; a broadcast that copies an element to several outputs is refused by the walk).

    Local bounds: exact. IBP moves the lower and the upper bounds as the values; CROWN moves
    the coefficients back by the op's adjoint (its vector-Jacobian product).
    """

    modules = (nn.Identity, nn.Flatten, nn.Unflatten)
    functions = SHAPE_FUNCTIONS
    methods = SHAPE_METHODS

    def lipschitz(self, call: OpCall, params: None) -> Step:
        return call.step("same", info=f".{call.label}" if call.form == "method" else call.label)

    def interval(self, call: OpCall, params: None, ctx):
        return _moved(call, ctx)

    def linear(self, call: OpCall, params: None, a: torch.Tensor, ctx):
        return [(call.deps[0], ctx.moved_back(call.node, call.deps[0], a))]


def _moved(call: OpCall, ctx):
    """The op applied to the lower and to the upper bounds of its input (an op that moves
    elements maps bounds to bounds)."""
    src = call.deps[0]
    return (ctx.rerun(call.node, {src: ctx.lower[src]}),
            ctx.rerun(call.node, {src: ctx.upper[src]}))


@register_bound_op
class Dropout(BoundOp):
    """Dropout in eval mode: the identity (L = 1, exact). In training mode it is random and
    refused."""

    modules = (nn.Dropout,)
    functions = DROPOUT

    def params(self, call: OpCall) -> None:
        if call.form == "module":
            if call.target.training:
                raise call.unsupported("dropout in training mode")
            return None
        if not call.single:
            raise call.unsupported()
        if call.arg(2, "train", call.arg(2, "training", True)):
            raise NotBoundable(f"cannot bound dropout in training mode at {call.where}")
        return None

    def lipschitz(self, call: OpCall, params: None) -> Step:
        return call.step("same", info=call.label)

    def interval(self, call: OpCall, params: None, ctx):
        src = call.deps[0]
        return ctx.lower[src], ctx.upper[src]  # the identity in eval mode

    def linear(self, call: OpCall, params: None, a: torch.Tensor, ctx):
        return [(call.deps[0], a)]


@register_bound_op
class Index(BoundOp):
    """``x[...]`` with ints, slices, None and Ellipsis (each output one input element: L = 1,
    exact, "same"), and element 0 of a (values, indices) tuple of an op that marked it
    ("first"). Indexing with tensors is refused."""

    functions = (operator.getitem,)

    def params(self, call: OpCall) -> None:
        if not call.single:
            raise call.unsupported()
        return None

    def lipschitz(self, call: OpCall, params: None) -> Step:
        n, src = call.node, call.deps[0]
        if isinstance(call.values[src], torch.Tensor):
            idx = n.args[1]
            items = idx if isinstance(idx, tuple) else (idx,)
            if all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
                return call.step("same", info="indexing")
            raise NotBoundable(f"cannot bound indexing with tensors at {call.where}")
        if n.args[1] == 0 and getattr(src, "_rc_tuple_first", False):
            return call.step("first", info="getitem")
        raise NotBoundable(f"cannot bound element {n.args[1]} of {src.name} at {call.where}")

    # Local bounds: element 0 of a tuple is the bounded value itself; basic indexing moves
    # elements (exact, as Reshape).

    def interval(self, call: OpCall, params: None, ctx):
        src = call.deps[0]
        if not isinstance(ctx.values[src], torch.Tensor):
            return ctx.lower[src], ctx.upper[src]
        return _moved(call, ctx)

    def linear(self, call: OpCall, params: None, a: torch.Tensor, ctx):
        src = call.deps[0]
        if not isinstance(ctx.values[src], torch.Tensor):
            return [(src, a)]
        return [(src, ctx.transpose(call.node, src, a))]


@register_bound_op
class Concat(BoundOp):
    """Concatenation along a non-batch dimension: ‖(a, b)‖₂² = ‖a‖₂² + ‖b‖₂², so L2 is the
    root sum of squares of the inputs' constants and L∞ their max; exact in float ("cat")."""

    functions = CAT

    def params(self, call: OpCall) -> int:
        if not call.deps:
            raise call.unsupported()
        dim = int(call.arg(1, "dim", 0))
        if dim == 0 or dim == -call.values[call.node].ndim:
            raise NotBoundable(f"cannot bound a concatenation along the batch at {call.where}")
        return dim

    def lipschitz(self, call: OpCall, params: int) -> Step:
        return call.step("cat", info=call.label)

    # Local bounds: exact. IBP concatenates the inputs' bounds (constants as they are);
    # CROWN gives each input its slice of the coefficients.

    def interval(self, call: OpCall, params: int, ctx):
        return (ctx.rerun(call.node, {a: ctx.lower[a] for a in call.deps}).double(),
                ctx.rerun(call.node, {a: ctx.upper[a] for a in call.deps}).double())

    def linear(self, call: OpCall, params: int, a: torch.Tensor, ctx):
        dim = params if params < 0 else params + 1  # in (batch, specs, ...)
        out, offset = [], 0
        for t in cast(list, call.node.args[0]):  # fx: cat's first argument, the tensors
            v = ctx.value(t) if isinstance(t, torch.fx.Node) else t
            size = v.shape[params]
            if call.is_dep(t):
                out.append((t, a.narrow(dim, offset, size)))
            offset += size
        return out
