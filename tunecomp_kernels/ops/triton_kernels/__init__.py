"""Triton kernels for the masked low-rank op, one module per kernel family.

* :mod:`.forward`  fused forward (t on chip) and the expand kernel (also dx)
* :mod:`.backward` the dy kernel: g, dmask, h, dbias and (fused) dU from one read of dy
* :mod:`.decode`   split-K shrink ``x·Vᵀ`` for small N
* :mod:`.gemm`     generic strided split-K GEMM (split-path t, dU, dV)
* :mod:`.autotune` configs, keys and the interpreter's single config

Launch logic lives in :mod:`tunecomp_kernels.ops.triton_backend`.
"""
