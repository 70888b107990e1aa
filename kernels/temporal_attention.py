"""Triton temporal attention: one program per sequence (batch0 x batch1 on grid axis 0, so 65,536+ sequences
never meet the 65,535 limit of grid axes 1 and 2), the whole [F, D] tile of q, k, v in registers."""

import triton
import triton.language as tl


@triton.jit
def temporal_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, batch1, frames, head_dim, scale,
    q_s0, q_s1, q_sf, k_s0, k_s1, k_sf, v_s0, v_s1, v_sf, o_s0, o_s1, o_sf,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b0 = pid // batch1
    b1 = pid % batch1
    rows = tl.arange(0, BLOCK_F)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < frames) & (cols[None, :] < head_dim)
    q = tl.load(q_ptr + b0 * q_s0 + b1 * q_s1 + rows[:, None] * q_sf + cols[None, :], mask=mask, other=0.0)
    k = tl.load(k_ptr + b0 * k_s0 + b1 * k_s1 + rows[:, None] * k_sf + cols[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + b0 * v_s0 + b1 * v_s1 + rows[:, None] * v_sf + cols[None, :], mask=mask, other=0.0)
    if FP32_DOT:  # exact float32 products (fp32 inputs, and bf16 in the interpreter, whose bf16 dot is wrong)
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = scores * scale
    scores = tl.where(rows[None, :] < frames, scores, float("-inf"))
    row_max = tl.max(scores, axis=1)
    p = tl.exp(scores - row_max[:, None])
    denominator = tl.sum(p, axis=1)
    if FP32_DOT:
        out = tl.dot(p, v, input_precision="ieee")
    else:
        out = tl.dot(p.to(v.dtype), v)
    out = out / denominator[:, None]
    tl.store(o_ptr + b0 * o_s0 + b1 * o_s1 + rows[:, None] * o_sf + cols[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask)
