"""The CPU kernels behind one door: three per-channel operations, as JAX primitives.

``channel_moments``, ``channel_dot`` and ``channel_affine`` (see :mod:`.ops`) are all the
numeric core uses. On the CPU the two reductions run as C++ kernels (:mod:`.build` compiles
``channel_sums.cc`` on first use and registers it with XLA's FFI); everywhere else — float64,
GPU, ``vmap``, ``jax.export``, no compiler, ``JAXBN_NATIVE=0`` — the primitives lower to plain
JAX with the same results up to the order of summation. JAX's extension APIs are used only in
this package.
"""

from jaxbn._cpu_kernels.ops import channel_affine, channel_dot, channel_moments

__all__ = ["channel_affine", "channel_dot", "channel_moments"]
