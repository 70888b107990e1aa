"""Triton GEGLU projection: ``out = h * gelu(g)`` with ``[h | g] = x @ weight.T (+ bias)``, the matrix product and
the activation in one kernel, so the ``[M, 2I]`` projection (the largest activation of a transformer block) is
never written to memory and read back.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of the output from two fp32 accumulators, the hidden half
(weight rows n) and the gate half (weight rows I + n), which share each loaded tile of x. Programs walk the output
in groups of GROUP_M row tiles so that neighbours reuse x and weight tiles from L2. GELU is the exact (erf) one,
as in diffusers' GEGLU; the pre-activation stays in fp32 (diffusers rounds it to x's dtype first).
"""

import triton
import triton.language as tl


@triton.jit
def linear_geglu_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr, rows, inner, depth,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """x [rows, depth], weight [2 * inner, depth], bias [2 * inner], out [rows, inner], all contiguous."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles_n = tl.cdiv(inner, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows

    m = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    m_ok = m < rows
    n_ok = n < inner
    hidden = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for first in range(0, depth, BLOCK_K):
        kk = first + k
        k_ok = kk < depth
        a = tl.load(x_ptr + m[:, None] * depth + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wh = tl.load(weight_ptr + n[None, :] * depth + kk[:, None], mask=w_mask, other=0.0)
        wg = tl.load(weight_ptr + (n[None, :] + inner) * depth + kk[:, None], mask=w_mask, other=0.0)
        if FP32_DOT:  # exact float32 products (fp32 inputs, and bf16 in the interpreter, whose bf16 dot is wrong)
            a = a.to(tl.float32)
            hidden = tl.dot(a, wh.to(tl.float32), hidden, input_precision="ieee")
            gate = tl.dot(a, wg.to(tl.float32), gate, input_precision="ieee")
        else:
            hidden = tl.dot(a, wh, hidden)
            gate = tl.dot(a, wg, gate)
    if HAS_BIAS:
        hidden += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(bias_ptr + inner + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = hidden * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    tl.store(out_ptr + m[:, None] * inner + n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
