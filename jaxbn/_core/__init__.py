"""The numeric core: every statistic of jaxbn's normalizations, each written once.

* :mod:`~jaxbn._core.shapes` — kept shapes, counts, compute dtypes, shard_map axis types;
* :mod:`~jaxbn._core.moments` — local two-pass moments (masked or not) and the count-weighted
  Chan merge over devices (one collective);
* :mod:`~jaxbn._core.normalize` — the normalize rule with its hand-written JVP;
* :mod:`~jaxbn._core.running` — PyTorch's running-statistics update;
* :mod:`~jaxbn._core.checks` — argument checks with PyTorch's wording.

:mod:`jaxbn.functional` is built on it; the CPU kernels (:mod:`jaxbn._cpu_kernels`) sit
below it. Kept free of imports so that the kernels can use :mod:`~jaxbn._core.shapes` and
:mod:`~jaxbn._core.moments` without a cycle.
"""
