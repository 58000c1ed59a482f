"""The built-in bound ops, one class per op family; importing this package registers them.

linear (Linear), conv (Conv), pooling (MaxPool, AvgPool), norm (BatchNorm), activations
(ReLU, Tanh, Sigmoid, LeakyReLU, ELU), arithmetic (Add, Scale, Neg), shape (Reshape, Dropout,
Index, Concat).
"""

from robust_cert.bounds.ops import activations, arithmetic, conv, linear, norm, pooling, shape

__all__ = ["activations", "arithmetic", "conv", "linear", "norm", "pooling", "shape"]
