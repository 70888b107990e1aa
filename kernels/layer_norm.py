"""Triton LayerNorm over the last dimension, with the residual add before it and an addend after it fused in.

``out = layer_norm(x + residual) * weight + bias + addend[row % addend_rows]``, and ``x + residual`` written out
too (the transformer block's next residual stream). One program normalises a ``[BLOCK_M, BLOCK_C]`` tile of whole
rows, so the statistics are two reductions over the tile's columns in registers and every element is read once
and written once. The rounding follows PyTorch's op-by-op sequence it replaces: the sum is rounded to the storage
dtype before it is normalised, the normalised row before the addend is added.
"""

import triton
import triton.language as tl


@triton.jit
def layer_norm_kernel(
    x_ptr, residual_ptr, sum_ptr, out_ptr, weight_ptr, bias_ptr, addend_ptr, rows, cols, addend_rows, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADDEND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """x, residual, sum, out [rows, cols] contiguous; weight, bias [cols]; addend [addend_rows, cols]."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_C)
    col_ok = col < cols
    mask = (row < rows)[:, None] & col_ok[None, :]
    offsets = row[:, None] * cols + col[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = (x + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)).to(
            sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, total, mask=mask)
        x = total.to(tl.float32)
    mean = tl.sum(x, axis=1) / cols
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / cols + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ADDEND:
        addend_row = row % addend_rows
        addend = tl.load(addend_ptr + addend_row[:, None] * cols + col[None, :], mask=mask, other=0.0)
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + addend.to(tl.float32)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
