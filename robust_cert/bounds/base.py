"""The vocabulary shared by the graph walk and the bound ops: :class:`NotBoundable`,
:class:`Step` (what one node does to Lipschitz constants and rounding errors), :class:`OpCall`
(one node as an op sees it, whatever its form) and :class:`BoundOp` (the interface of an op).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn


class NotBoundable(ValueError):
    """The network contains an operation whose Lipschitz constant this module cannot bound."""


@dataclass
class Step:
    """How one graph node transforms Lipschitz constants and rounding errors.

    ``kind`` says how the graph walk composes it (the only kinds it knows):

    * ``affine``: z ↦ A z + b. ``l2``/``linf``/``l1`` bound ‖A‖ in each norm (``l1``: the
      largest column sum of |A|; None: derived soundly, from ``matrix`` when there is one, else
      √(outputs)·``l2``); ``apply``/``apply_abs``
      compute A z and |A| z (no bias), ``bias`` is |b|, ``fan_in`` the products per output
      (the γ index), ``matrix`` the explicit (out, in) A when there is one (a final one
      becomes the head of :class:`~robust_cert.bounds.LipschitzBound`).
    * ``max``: a max over windows (exact in float); ``apply`` carries errors through it;
      ``l1``: the most windows one input element lies in.
    * ``act``: an elementwise map of slope ≤ max(``l2``, ``linf``) whose own rounding is
      ``ulps``·u·(linf·|z| + 1/2).
    * ``scale``: multiplication by a constant of magnitude ≤ ``linf`` (one rounding, γ₂).
    * ``same``: the node moves elements without copying one to several outputs (reshape,
      indexing, negation: ``negates``); errors are carried by re-running the node's op.
    * ``first``: element 0 of a (values, indices) tuple.
    * ``add``: Σ ±coef_i·input_i (one rounding, γ₂); ``coef`` are the |coefficients|.
    * ``cat``: concatenation of its inputs (L2 by root sum of squares, L∞ by max, L1 by sum).

    Elementwise kinds (``act``, ``scale``) have the same constant in every norm (their largest
    slope), so their ``l1`` is that.
    """

    node: torch.fx.Node
    kind: str  # affine | max | act | same | add | scale | cat | first
    inputs: list[torch.fx.Node]
    l2: float = 1.0  # operator constants (affine, max, act, scale)
    linf: float = 1.0
    l1: float | None = None  # 1→1 operator constant (None: see above)
    coef: list[float] = field(default_factory=list)  # add: |coefficient| of each input
    # affine: z ↦ A z (no bias); max: the pooling
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None
    apply_abs: Callable[[torch.Tensor], torch.Tensor] | None = None  # affine: z ↦ |A| z
    bias: torch.Tensor | None = None  # affine: |b| (broadcastable to the output)
    fan_in: int = 1  # affine: products per output (the γ index)
    ulps: float = 0.0  # act/scale/add: rounding of the op itself, in units of u·|out|
    u: float = 2.0 ** -24  # elementwise ops; products: from ``u_kind`` when rounding
    u_kind: str | None = None  # affine: the kind of its products (see ``unit_roundoff``)
    matrix: torch.Tensor | None = None  # affine with an explicit (out, in) matrix: the head
    negates: bool = False  # same: the op negates its input (errors are negated back)
    l2_lower: float | None = None  # convolutions: power-iteration estimate of ‖K‖₂ (report)
    info: str = ""


_F_NAMES = {id(v): k for k, v in vars(F).items() if callable(v) and not k.startswith("_")}
_TORCH_NAMES = {id(v): k for k, v in vars(torch).items() if callable(v) and not k.startswith("_")}


def label(fn) -> str:
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


def first(v: Any) -> Any:
    """The tensor of a (tensor, indices)-style tuple output; anything else as it is."""
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        return v[0]
    return v


def aten_targets(*names: str) -> set:
    """The aten ops of these names with all their overloads (``"add"``: aten.add and
    aten.add.Tensor, …; ``"add.Tensor"``: that overload only); names this torch lacks are
    skipped."""
    ops = getattr(torch.ops, "aten", None)
    out = set()
    for n in names:
        base, _, overload = n.partition(".")
        try:
            op = getattr(ops, base)
        except (AttributeError, RuntimeError):
            continue
        out.add(op)
        for ov in ([overload] if overload else op.overloads()):
            try:
                out.add(getattr(op, ov))
            except (AttributeError, RuntimeError):
                pass
    return out


def spec(v) -> tuple[int, ...]:
    """An int-or-tuple argument as a tuple."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def expand(v, dims: int) -> tuple[int, ...]:
    """An int-or-tuple argument as a tuple of ``dims`` entries (a single value repeated)."""
    v = spec(v)
    return v * dims if len(v) == 1 else v


@dataclass
class OpCall:
    """One node of the traced graph as a bound op sees it, whatever its form.

    ``form`` is "module" (``target`` the nn.Module instance, ``label`` its class name),
    "function" (``target`` the callable, ``label`` its readable name; a Tensor method that
    an op registers as a function alias, ``x.add(y)`` as ``torch.add``, arrives in this
    form) or "method" (``target`` and ``label`` the method name). ``deps`` are the node's
    inputs that depend on the network input, in argument order (a module form has exactly
    one). ``values`` holds every needed node's value at the analysis input (batch of one).
    """

    node: torch.fx.Node
    form: str
    target: Any
    deps: list[torch.fx.Node]
    label: str
    values: dict
    depends: dict
    power_iterations: int = 100

    @property
    def where(self) -> str:
        """The node's name, as error messages cite it."""
        return self.node.name

    @property
    def layer(self) -> str:
        """A module form's name in messages: "target (Class)"."""
        return f"{self.node.target} ({type(self.target).__name__})"

    @property
    def z(self) -> torch.Tensor | None:
        """The value of the first dependent input (None when there is none)."""
        return self.values[self.deps[0]] if self.deps else None

    @property
    def single(self) -> bool:
        """One dependent input, passed first (a module form always is)."""
        if self.form == "module":
            return True
        n = self.node
        return len(self.deps) == 1 and bool(n.args) and n.args[0] is self.deps[0]

    def arg(self, i: int, name: str, default=None) -> Any:
        """Argument ``i`` of the call (positional, else keyword ``name``, else default)."""
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def const(self, a) -> Any:
        """The value of an argument that does not depend on the input."""
        if isinstance(a, torch.fx.Node):
            return self.values[a]
        return a

    def is_dep(self, a) -> TypeGuard[torch.fx.Node]:
        """Whether the argument ``a`` depends on the network input."""
        return isinstance(a, torch.fx.Node) and bool(self.depends[a])

    def step(self, kind: str, inputs: list[torch.fx.Node] | None = None, **fields) -> Step:
        """A :class:`Step` of this node (inputs: the dependent inputs unless given)."""
        return Step(self.node, kind, self.deps if inputs is None else inputs, **fields)

    def mark_tuple_output(self) -> None:
        """Record that this node returns a (values, indices) tuple whose element 0 is the
        bounded value (``getitem(…, 0)`` on it is then bounded as that value)."""
        self.node._rc_tuple_first = True

    def unsupported(self, why: str = "") -> NotBoundable:
        """The error for a form or setting of this op that no bound covers (as a module:
        "cannot bound layer NAME (Class)[: why]"; as a function or method: the op and node)."""
        if self.form == "module":
            return NotBoundable(f"cannot bound layer {self.layer}" + (f": {why}" if why else ""))
        if self.form == "method":
            return NotBoundable(f"cannot bound the method .{self.target}() at {self.where}")
        return NotBoundable(f"cannot bound the operation {self.label} at {self.where}")


class BoundOp(abc.ABC):
    """The bounds of one op (or family of ops) in all its forms: modules, functions (torch,
    ``torch.nn.functional``, the aten ops of torch.export, ``operator``) and Tensor methods.

    Keys, read by :func:`~robust_cert.bounds.register_bound_op` when it is given none:
    ``modules`` (nn.Module classes; subclasses match too, the nearest registered class wins),
    ``functions`` (callables), ``methods`` (Tensor method names, or a mapping of a method
    name to the function it is the same call as, self first: ``{"add": torch.add}``).

    Methods:

    * :meth:`params` normalises a call to the op's parameters — the same for every form (a
      module's attributes become the functional arguments), so each bound is written once.
    * :meth:`lipschitz` returns the :class:`Step`: Lipschitz constants in L2 and L∞ and the
      rounding model of the op. Its class docstring states why they are upper bounds.

    * :meth:`interval` (IBP) returns sound elementwise bounds [lo, hi] of the node's output
      over a region, given those of its inputs (``ctx.lower``/``ctx.upper``).
    * :meth:`linear` (CROWN) back-substitutes a linear lower bound through the node: given
      coefficients A on the output (a lower bound Σ A·out + c of some quantity), it returns
      coefficients on the inputs and adds the constant it introduces (``ctx.add_bias``), such
      that Σ A·out ≥ Σ A_in·in + bias everywhere in the region (the input intervals of a
      ``relaxed`` op are the region it holds on).
    * ``relaxed`` ops (activations, max pooling) relax a non-linear map from the bounds of
      their input: the local bound refines those bounds by CROWN first (:meth:`refine` says
      which input elements need it).

    Both take ``ctx`` (:class:`robust_cert.bounds.local.Region`): the interval of every node
    so far, the values of every node at the centres (constants at the batch size), ``rerun``
    (the node's own op on other inputs) and ``transpose`` (the adjoint of a linear node). An
    op without them raises :class:`NotBoundable` naming it (the local bound then falls back to
    the Lipschitz bound). :mod:`robust_cert.bounds.local` runs them; the Lipschitz graph walk
    calls only :meth:`params` and :meth:`lipschitz`.
    """

    modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    functions: ClassVar[Iterable[Callable]] = ()
    methods: ClassVar[Iterable[str] | Mapping[str, Callable]] = ()
    #: the op relaxes a non-linear map from its input bounds (refined by CROWN first)
    relaxed: ClassVar[bool] = False

    def params(self, call: OpCall) -> Any:
        """The op's parameters for ``call``; raises :class:`NotBoundable` (usually
        ``call.unsupported(…)``) for a form or setting the op cannot bound. The default,
        for ops without parameters, accepts one dependent input passed first."""
        if not call.single:
            raise call.unsupported()
        return None

    @abc.abstractmethod
    def lipschitz(self, call: OpCall, params: Any) -> Step:
        """The :class:`Step` of ``call`` (sound Lipschitz constants and rounding model)."""

    def interval(self, call: OpCall, params: Any, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Sound elementwise bounds (lo, hi) of the output (float64, batch of the region) from
        the input bounds ``ctx.lower[node]``/``ctx.upper[node]`` (IBP)."""
        raise NotBoundable(f"no interval bound (IBP) for {call.label} at {call.where}")

    def linear(self, call: OpCall, params: Any, a: torch.Tensor,
               ctx: Any) -> list[tuple[torch.fx.Node, torch.Tensor]]:
        """Back-substitution of the lower-bound coefficients ``a`` (batch, specs, *output
        shape) through the node (CROWN): the coefficients of each dependent input (a node may
        appear twice; they add up), with the constant terms passed to ``ctx.add_bias``."""
        raise NotBoundable(f"no linear relaxation (CROWN) for {call.label} at {call.where}")

    def refine(self, call: OpCall, params: Any, lo: torch.Tensor,
               hi: torch.Tensor) -> torch.Tensor | None:
        """For a ``relaxed`` op: the input elements (a bool mask of ``lo``'s shape) whose
        bounds change the relaxation, so are worth tightening; None: all."""
        return None

    def alpha_init(self, call: OpCall, params: Any, lo: torch.Tensor,
                   hi: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """For a ``relaxed`` op whose relaxation has free parameters (alpha-CROWN: a ReLU's
        lower slopes, a max pooling's weights): the values its :meth:`linear` uses by
        default, each a tensor with the batch first (a tuple of them for several), from
        which the local bound starts optimising them in [0, 1] (:meth:`linear` then reads
        them, in the same form with a spec-row dimension after the batch, from
        ``ctx.alpha[node]``, and must be sound for every value it is given); None: nothing to
        optimise on [lo, hi] (the default)."""
        return None

    def constant(self, call: OpCall, params: Any, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor | None:
        """For a ``relaxed`` elementwise op: the input elements (a bool mask of ``lo``'s
        shape) on which its output is one known constant over [lo, hi] (a ReLU input with
        hi ≤ 0), so that tightening their bounds changes nothing downstream; None: unknown."""
        return None
