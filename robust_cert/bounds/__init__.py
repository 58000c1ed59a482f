"""Sound Lipschitz constants and float32 rounding bounds of a traced network (Family F).

One algorithm: trace the network with torch.fx (or take a torch.export GraphModule as it is),
walk the graph from the input to the logits and bound, op by op,

* the **Lipschitz constant** of every intermediate value w.r.t. the input, in L2 and L∞
  (composition multiplies, a residual addition a + b adds L_a + L_b, concatenation takes the
  root sum of squares (L2) or the max (L∞));
* the **rounding error** of the floating-point evaluation of every value, elementwise, at the
  input x and anywhere in a ball around x (a standard forward error analysis, see
  :meth:`LipschitzBound.rounding`).

Layout: :mod:`~robust_cert.bounds.graph` walks the graph; each op is bounded by the
:class:`BoundOp` registered for its module class, callable or Tensor method
(:mod:`~robust_cert.bounds.registry`); the built-in ops are in :mod:`robust_cert.bounds.ops`,
one class per op family covering its module, ``torch.nn.functional`` and aten forms, whose
docstring states its constants and why they are upper bounds;
:mod:`~robust_cert.bounds.rounding` holds the float helpers.

Supported: Linear (``F.linear``, ``addmm``, ``mm``/``matmul`` by a constant matrix),
Conv1d/2d/3d with zero padding (any stride, dilation, groups), max pooling (also
``max_pool2d_with_indices``), average and adaptive average pooling, BatchNorm in eval mode,
ReLU, ReLU6, Hardtanh, LeakyReLU, ELU, tanh, sigmoid, Softsign, Identity, Dropout in eval
mode, flatten / view / reshape / squeeze / unsqueeze / permute / transpose / contiguous /
clone and basic indexing, additions and subtractions (residual connections), multiplication
or division by a constant, negation, concatenation. Anything else raises :class:`NotBoundable`
naming the op and the node — unless an op is registered for it: :func:`register_bound_op`,
or a plugin in the ``robust_cert.bound_ops`` entry-point group.

Local bounds (:func:`local_bounds`, :mod:`~robust_cert.bounds.local`): sound lower bounds of
margins over a ball around each point, by interval bound propagation (IBP) and backward linear
relaxations (CROWN), from each op's ``interval`` and ``linear`` methods — all the ops above
have them (tanh, sigmoid, softsign and ELU by constant relaxations in CROWN; max pooling in
CROWN 2-D without ``ceil_mode``); an op without one raises :class:`NotBoundable` naming it.
"""

from robust_cert.bounds.base import BoundOp, NotBoundable, OpCall, Step
from robust_cert.bounds.graph import LipschitzBound, lipschitz_bound
from robust_cert.bounds.local import LocalMargins, local_bounds, local_radius
from robust_cert.bounds.registry import (
    ENTRY_POINT_GROUP,
    BoundOpPluginError,
    load_bound_op_plugins,
    register_bound_op,
)
from robust_cert.bounds.rounding import (
    ERROR_BOUND_SAFETY,
    MATMUL_PRECISION_U,
    NORM_SAFETY,
    evaluation_safety,
    gamma,
    matmul_precision_u,
    strict_float32,
    unit_roundoff,
)

__all__ = ["ENTRY_POINT_GROUP", "ERROR_BOUND_SAFETY", "MATMUL_PRECISION_U", "NORM_SAFETY",
           "BoundOp", "BoundOpPluginError", "LipschitzBound", "LocalMargins", "NotBoundable",
           "OpCall", "Step", "evaluation_safety", "gamma", "lipschitz_bound",
           "load_bound_op_plugins", "local_bounds", "local_radius",
           "matmul_precision_u", "register_bound_op", "strict_float32", "unit_roundoff"]
