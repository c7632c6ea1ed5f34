"""Triton backend ``"triton"``: launch wrappers and ``torch.library.triton_op`` registration.

The kernels live in :mod:`tunecomp_kernels.ops.triton_kernels`; this module picks a path,
allocates outputs and launches them through ``torch.library.wrap_triton``, so that
``torch.compile`` traces into the kernels while an eager call crosses exactly one op
boundary (the ``triton_op`` itself). Under ``TRITON_INTERPRET=1`` the same functions
are registered as opaque ``custom_op``s instead (see the note at ``OPS``). Shapes: x
``[..., in]`` viewed as ``[N, K]``, U ``[O, r]``, mask ``[r]``, V ``[r, K]``, W0 ``[O, K]``.

Forward paths (chosen per call from N, in, out and r):

* **decode**, ``N <= TRITON_DECODE_MAX_N``: split-K shrink ``t = x·Vᵀ`` (reads V once across the
  whole GPU), then the expand kernel: ``y = a·x·W0ᵀ + (t ⊙ s·mask)·Uᵀ + s·b + a·b0`` in
  one accumulator.
* **fused**, ``r <= FUSED_MAX_R`` (256) and out narrow enough (below): one kernel; x is
  read once per output tile and feeds both ``t`` (kept in registers) and the teacher
  tile; ``t ⊙ s·mask`` goes through one extra ``tl.dot`` into the same accumulator.
* **split**, otherwise: split at the small ``[N, r]`` tensor: a GEMM writes t, then the
  expand kernel as in decode (teacher, mask, U and biases in one accumulator).

Choosing between them. Past 256 ranks a ``[BLOCK_M, r]`` fp32 tile no longer fits in
registers next to the accumulator (ptxas spills; ``python -m bench.compile_check``).
Below that, the fused kernel still recomputes t once per group of output tiles (one
group spans ``FUSED_OUT_SPAN`` = 256 columns at most), i.e. ``ceil(out / 256) - 1``
extra ``2·N·in·r``-FLOP GEMMs, while the split path pays a round trip of t
(``8·N·r`` bytes) and one more launch. :func:`_fused_is_cheaper` compares the two on
the H200 roofline (docs/design.md#measuring: figures derated to 700 TFLOP/s and
3.5 TB/s, plus 4 µs per launch): the fused kernel wins for narrow layers and small
r·N, the split path for wide ones (e.g. in = out = 4096 at r = 256, where the fused
kernel would do 15 extra t GEMMs, more than the teacher GEMM itself). This is a model,
not a measurement: no GPU was available when it was written; ``python -m bench.kernels``
measures both.

Save t or recompute it: the contract saves ``t = x·Vᵀ`` ([N, r], fp32 for half inputs)
and this backend keeps that choice. Recomputing t in backward costs a full ``2·N·in·r``
FLOP GEMM plus another read of x (``N·in`` elements); saving it costs writing and
reading ``N·r`` fp32 values. With ``r < in / 2`` (always, for a compressing layer) the
saved tensor moves less data than x alone, and the GEMM is avoided outright; the
memory cost is ``r·4`` bytes per row next to x's ``in·2``.

Backward: the dy kernel (:mod:`.triton_kernels.backward`) reads dy once for g = dy·U,
the folded dmask reduction, h = s·g ⊙ mask, dbias and, in the decode regime
(``N <= FUSE_DU_MAX_N``, ``r <= FUSE_DU_MAX_R``), dU;
dx = h·V + a·dy·W0 is one expand-kernel launch (one accumulator); dV = hᵀ·x and the
unfused dU are GEMMs with split-K over N. Unneeded gradients are not computed and come
back as fresh 0-element tensors.

Compacted ranks: once a layer is finalised, ``MaskedLowRankLinear.compact()`` drops the
ranks whose mask is 0, and the kernels simply see a smaller r. We chose compacted U/V
over an index list of live ranks because (1) every kernel stays a dense, coalesced GEMM:
an index list turns each U/V tile load into a gather (V rows are fine, but U's columns
are strided per element), (2) a smaller r moves the layer to a cheaper path (smaller
``BLOCK_R``, fused instead of split), which a list over the full-size tensors cannot do,
and (3) pruned ranks then cost neither memory nor optimiser state. While training,
before compaction, zero-mask ranks are still computed: their dmask is part of the
contract.

Dtypes: fp32, fp16 and bf16 run in the kernels with fp32 accumulation (fp32 dots use
IEEE fp32 unless ``torch.set_float32_matmul_precision`` allows TF32). The intermediates
t and h stay fp32 between and inside the kernels; the products that read them run on
fp32 operands, TF32 for half inputs (``_wide_precision``; why:
:mod:`.triton_kernels.forward`). A teacher stored in bf16/fp16 next to fp32 x is loaded
tile by tile and converted to fp32 before its ``tl.dot`` (``dot_operand`` casts to x's
dtype), so no upcast copy of W0 exists. float64 (used by gradcheck), r = 0 and problems
whose offsets overflow int32 are served by the reference math inside the same op.
Atomic reductions (split-K, dmask, dbias, fused dU) make results run-to-run
nondeterministic in the last bits.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import reference
from .contract import BackendOps, register_backend_ops
from .triton_kernels import autotune as at
from .triton_kernels.backward import dy_kernel
from .triton_kernels.decode import decode_shrink_kernel
from .triton_kernels.forward import expand_kernel, fused_forward_kernel
from .triton_kernels.gemm import gemm_kernel

#: Largest rank served by the fully fused forward kernel (t held in registers).
FUSED_MAX_R = 256
#: Widest span of output columns one fused-forward program covers (BLOCK_N·OUT_TILES).
FUSED_OUT_SPAN = 256
#: Roofline model of the fused-vs-split choice (H200 figures of docs/design.md#measuring, derated).
MODEL_FLOPS = 700e12
MODEL_BANDWIDTH = 3.5e12
MODEL_LAUNCH_S = 4e-6
#: Largest row count served by the Triton decode path (split-K shrink + expand). The CUDA
#: backend's decode kernels have their own, smaller limit (cuda_tables.CUDA_DECODE_MAX_N).
TRITON_DECODE_MAX_N = 64
#: Former name of TRITON_DECODE_MAX_N, kept for imports (read-only: the backend uses the
#: new name).
DECODE_MAX_N = TRITON_DECODE_MAX_N
#: dU is fused into the backward dy kernel only up to this many rows and ranks. Each
#: row tile adds a full [O, r] fp32 partial atomically, which beats re-reading dy
#: (N·O 16-bit values) only while there are very few row tiles: the decode regime,
#: where saving a launch matters most. r = 128 is the widest rank slice for which
#: ``python -m bench.compile_check`` showed spill-free fused-dU configs on sm_90 (measured
#: when t·mask was a 16-bit operand; it is fp32 now, so re-check on a GPU).
FUSE_DU_MAX_N = 64
FUSE_DU_MAX_R = 128


def _fused_is_cheaper(n: int, k: int, out_f: int, r: int) -> bool:
    """Fused forward vs split (t GEMM + expand) on the roofline model: the fused kernel's
    t recomputation ``(ceil(out / FUSED_OUT_SPAN) - 1)·2·N·in·r`` FLOPs against the
    split's t round trip ``8·N·r`` bytes plus one launch."""
    if r > FUSED_MAX_R:
        return False
    groups = triton.cdiv(out_f, FUSED_OUT_SPAN)
    recompute_s = (groups - 1) * 2 * n * k * r / MODEL_FLOPS
    split_s = 8 * n * r / MODEL_BANDWIDTH + MODEL_LAUNCH_S
    return recompute_s <= split_s


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE fp32 unless torch allows TF32 for fp32 matmuls."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _wide_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision of the products that read the fp32 intermediates t and h: the
    fp32 inputs' own precision, TF32 for half inputs (fp32 range, fp16's mantissa: see
    :mod:`.triton_kernels.forward`)."""
    return _precision(dtype) if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """Feed bf16 tiles to ``tl.dot`` as fp32 under the interpreter (see common.dot_operand)."""
    return dtype == torch.bfloat16 and at.interpreting()


def _rank_block(r: int) -> int:
    """``BLOCK_R`` for kernels that hold a whole rank slice: r padded to a power of two
    (at least 16, the smallest ``tl.dot`` dim), at most the fused limit."""
    return max(16, triton.next_power_of_2(min(r, FUSED_MAX_R)))


def _int32_indexable(n: int, k: int, out_f: int, r: int,
                     *tensors: torch.Tensor | None) -> bool:
    """Whether every element offset fits the kernels' int32 index arithmetic: the
    outputs and intermediates ([N, in], [N, out], [N, r], [out, in]) and each strided
    input. Larger problems (e.g. an lm_head over a huge vocabulary) use the reference."""
    limit = 2**31 - 1
    spans = [n * k, n * out_f, n * r, out_f * k]
    for t in tensors:
        if t is not None and t.numel() > 0:
            spans.append(sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride())))
    return max(spans) < limit


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """A 1-element fp32 stand-in for an output a kernel will not touch."""
    return torch.zeros(1, dtype=torch.float32, device=like.device)


def _gemm(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, key_m: int, key_n: int,
          key_k: int, *, scale: torch.Tensor | None = None,
          alpha: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``alpha · a [M, K] @ b [K, N] ⊙ scale [N]`` (a, b may be strided views; alpha a
    0-d tensor). An fp32 operand next to a half ``ref`` runs the product in fp32/TF32."""
    wide = a.dtype != b.dtype or (a.dtype == torch.float32 and ref.dtype != torch.float32)
    m, k = a.shape
    n = b.shape[1]
    c = torch.zeros((m, n), dtype=torch.float32, device=a.device)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]),
                meta["SPLIT_K"])

    wrap_triton(gemm_kernel)[grid](
        a, b, c, scale if scale is not None else ref, ref,
        m, n, k, key_m, key_n, key_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        alpha if alpha is not None else c,
        HAS_SCALE=scale is not None, HAS_ALPHA=alpha is not None, WIDE=wide,
        UPCAST=_upcast(ref.dtype),
        PRECISION=_wide_precision(ref.dtype) if wide else _precision(ref.dtype),
    )
    return c


def _expand(out: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, ref: torch.Tensor,
            s: torch.Tensor, a: torch.Tensor, *, mask: torch.Tensor | None = None,
            a2: torch.Tensor | None = None, b2: torch.Tensor | None = None,
            bias1: torch.Tensor | None = None, bias2: torch.Tensor | None = None) -> None:
    """out [M, N] = (a1 [M, R1] ⊙ s·mask) @ b1 [R1, N] + a·a2 [M, K2] @ b2 [K2, N]
    + s·bias1 + a·bias2, in one kernel and one accumulator (s, a: 0-d tensors; a1 fp32)."""
    m, n = out.shape
    r1 = a1.shape[1]
    has_second = a2 is not None
    k2 = a2.shape[1] if has_second else 0
    a2_, b2_ = (a2, b2) if has_second else (a1, b1)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    wrap_triton(expand_kernel)[grid](
        a1, b1, mask if mask is not None else ref, a2_, b2_,
        bias1 if bias1 is not None else ref, bias2 if bias2 is not None else ref, out, ref,
        m, n, r1, k2, at.n_bucket(m), n, k2, r1,
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1),
        out.stride(0), out.stride(1),
        s, a,
        HAS_MASK=mask is not None, HAS_SECOND=has_second, HAS_BIAS1=bias1 is not None,
        HAS_BIAS2=bias2 is not None, UPCAST=_upcast(ref.dtype), PRECISION=_precision(ref.dtype),
        WIDE_PRECISION=_wide_precision(ref.dtype),
    )


def _shrink_decode(x2: torch.Tensor, V: torch.Tensor, out_features: int) -> torch.Tensor:
    """t [N, r] fp32 = x2 [N, K] @ Vᵀ for N <= TRITON_DECODE_MAX_N, split-K over K."""
    n, k = x2.shape
    r = V.shape[0]
    t = torch.zeros((n, r), dtype=torch.float32, device=x2.device)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(r, meta["BLOCK_R"]), meta["SPLIT_K"])

    wrap_triton(decode_shrink_kernel)[grid](
        x2, V, t, n, k, out_features, r, at.n_bucket(n),
        x2.stride(0), x2.stride(1), V.stride(0), V.stride(1), t.stride(0), t.stride(1),
        UPCAST=_upcast(x2.dtype), PRECISION=_precision(x2.dtype),
        BLOCK_M=max(16, triton.next_power_of_2(n)),
    )
    return t


def forward(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [..., O] (x's dtype) and t = x·Vᵀ [N, r] (fp32 for half inputs); see the contract.
    The scales are 0-d tensors the kernels load."""
    out_f, r = U.shape
    if x.dtype == torch.float64 or r == 0:
        return reference.forward(x, U, mask, V, bias, teacher_weight, teacher_bias,
                                 teacher_scale, student_scale)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    n = x2.shape[0]
    if not _int32_indexable(n, k, out_f, r, x2, U, V, teacher_weight):
        return reference.forward(x, U, mask, V, bias, teacher_weight, teacher_bias,
                                 teacher_scale, student_scale)
    y = torch.empty((n, out_f), dtype=x.dtype, device=x.device)
    if n == 0:
        return (y.reshape(*x.shape[:-1], out_f),
                torch.empty((0, r), dtype=torch.float32, device=x.device))
    mask = mask.contiguous()
    bias = bias.contiguous() if bias is not None else None
    has_teacher = teacher_weight is not None
    w0 = teacher_weight
    b0 = teacher_bias.contiguous() if has_teacher and teacher_bias is not None else None

    if n <= TRITON_DECODE_MAX_N or not _fused_is_cheaper(n, k, out_f, r):
        t = (_shrink_decode(x2, V, out_f) if n <= TRITON_DECODE_MAX_N
             else _gemm(x2, V.t(), x2, at.n_bucket(n), r, k))
        _expand(y, t, U.t(), x2, student_scale, teacher_scale, mask=mask,
                a2=x2 if has_teacher else None, b2=w0.t() if has_teacher else None,
                bias1=bias, bias2=b0)
    else:
        t = torch.empty((n, r), dtype=torch.float32, device=x.device)
        wt = w0 if w0 is not None else V  # never read without a teacher

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(n, meta["BLOCK_M"]),
                    triton.cdiv(triton.cdiv(out_f, meta["BLOCK_N"]), meta["OUT_TILES"]))

        wrap_triton(fused_forward_kernel)[grid](
            x2, V, U, mask, bias if bias is not None else mask, wt,
            b0 if b0 is not None else mask, y, t,
            n, k, out_f, r, at.n_bucket(n),
            x2.stride(0), x2.stride(1), V.stride(0), V.stride(1), U.stride(0), U.stride(1),
            wt.stride(0), wt.stride(1), y.stride(0), y.stride(1), t.stride(0), t.stride(1),
            teacher_scale, student_scale,
            HAS_BIAS=bias is not None, HAS_TEACHER=has_teacher,
            HAS_TEACHER_BIAS=b0 is not None, UPCAST=_upcast(x.dtype),
            PRECISION=_precision(x.dtype), WIDE_PRECISION=_wide_precision(x.dtype),
            BLOCK_R=_rank_block(r),
        )
    return y.reshape(*x.shape[:-1], out_f), t


def _launch_dy(dy: torch.Tensor, U: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
               h: torch.Tensor, du_acc: torch.Tensor, dmask_acc: torch.Tensor,
               dbias_acc: torch.Tensor, x2: torch.Tensor, student_scale: torch.Tensor, *,
               fuse_du: bool, need_mask: bool, need_h: bool, fold_bias: bool) -> None:
    """The dy kernel: g = dy·U, h, dmask, dbias and (``fuse_du``) dU from one read of dy."""
    n, out_f, r, k = dy.shape[0], U.shape[0], U.shape[1], x2.shape[1]
    block_r = _rank_block(r)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(r, block_r))

    wrap_triton(dy_kernel)[grid](
        dy, U, t, mask, h, du_acc, dmask_acc, dbias_acc, x2,
        n, k, out_f, r, at.n_bucket(n),
        dy.stride(0), dy.stride(1), U.stride(0), U.stride(1), t.stride(0), t.stride(1),
        h.stride(0), h.stride(-1), du_acc.stride(0), du_acc.stride(-1),
        student_scale,
        FUSE_DU=fuse_du, NEED_MASK=need_mask, NEED_H=need_h,
        NEED_BIAS=fold_bias, UPCAST=_upcast(x2.dtype), PRECISION=_precision(x2.dtype),
        WIDE_PRECISION=_wide_precision(x2.dtype), BLOCK_R=block_r,
    )


def _zero_grads(grad_y: torch.Tensor, x: torch.Tensor, U: torch.Tensor, mask: torch.Tensor,
                V: torch.Tensor, needs_grad: list[bool]) -> tuple[torch.Tensor, ...]:
    """Contiguous zero gradients (N = 0), 0-element tensors where not needed."""
    shapes = (x.shape, U.shape, mask.shape, V.shape, (U.shape[0],))
    return tuple(grad_y.new_zeros(shape, dtype=ref.dtype) if need else grad_y.new_empty((0,))
                 for shape, ref, need in zip(shapes, (x, U, mask, V, grad_y), needs_grad))


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    t: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dU, dmask, dV, dbias) from docs/design.md#the-op; fresh 0-element tensors
    where not needed. h = s·(dy·U) ⊙ mask is kept in fp32 between the kernels (see the dy
    kernel)."""
    out_f, r = U.shape
    if x.dtype == torch.float64 or r == 0:
        return reference.backward(grad_y, x, U, mask, V, t, teacher_weight, teacher_scale,
                                  student_scale, needs_grad)
    need_x, need_U, need_mask, need_V, need_bias = (bool(v) for v in needs_grad)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    dy = grad_y.reshape(-1, out_f)
    n = dy.shape[0]
    if not _int32_indexable(n, k, out_f, r, x2, dy, U, V, t, teacher_weight):
        return reference.backward(grad_y, x, U, mask, V, t, teacher_weight, teacher_scale,
                                  student_scale, needs_grad)
    if n == 0:  # nothing to reduce: the gradients are zero
        return _zero_grads(grad_y, x, U, mask, V, needs_grad)
    dx, dU, dmask, dV, dbias = (grad_y.new_empty((0,)) for _ in range(5))

    mask = mask.contiguous()
    need_g = need_x or need_V or need_mask
    need_h = need_x or need_V
    fuse_du = need_U and need_g and n <= FUSE_DU_MAX_N and r <= FUSE_DU_MAX_R
    h = torch.empty((n, r), dtype=torch.float32, device=x.device) if need_h else _scratch(x)
    du_acc = torch.zeros((out_f, r), dtype=torch.float32, device=x.device) if fuse_du \
        else _scratch(x)
    dmask_acc = torch.zeros(r, dtype=torch.float32, device=x.device) if need_mask \
        else _scratch(x)
    fold_bias = need_bias and need_g
    dbias_acc = torch.zeros(out_f, dtype=torch.float32, device=x.device) if fold_bias \
        else _scratch(x)

    if need_g:
        _launch_dy(dy, U, t, mask, h, du_acc, dmask_acc, dbias_acc, x2, student_scale,
                   fuse_du=fuse_du, need_mask=need_mask, need_h=need_h, fold_bias=fold_bias)
    if need_U:
        if not fuse_du:
            du_acc = _gemm(dy.t(), t, x2, out_f, r, at.n_bucket(n), scale=mask,
                           alpha=student_scale)
        dU = du_acc.to(U.dtype)
    if need_mask:
        dmask = dmask_acc.to(mask.dtype)
    if need_bias:
        if not fold_bias:
            dbias_acc = dy.to(torch.float32).sum(0) * student_scale
        dbias = dbias_acc.to(grad_y.dtype)
    if need_V:
        dV = _gemm(h.t(), x2, x2, r, k, at.n_bucket(n)).to(V.dtype)
    if need_x:
        has_teacher = teacher_weight is not None
        dx2 = torch.empty((n, k), dtype=x.dtype, device=x.device)
        _expand(dx2, h, V, x2, student_scale, teacher_scale, a2=dy if has_teacher else None,
                b2=teacher_weight if has_teacher else None)
        dx = dx2.reshape(x.shape)
    return dx, dU, dmask, dV, dbias


# On a GPU the ops are ``triton_op``s: torch.compile traces into them and sees the kernels.
# Under TRITON_INTERPRET=1 they are opaque ``custom_op``s with the contract's fake
# implementations instead: torch lets interpreted kernels bypass ``wrap_triton``, so
# tracing ``forward`` with fake tensors would launch the interpreter on them.
OPS: BackendOps = register_backend_ops(
    "triton", forward, backward,
    make_op=torch.library.custom_op if at.interpreting() else triton_op)
