"""Triton GroupNorm family (same contract as the CPU and CUDA kernels in csrc/): three launches for a norm.

Statistics are per (batch, group). A group's elements are described by one addressing rule, so one partial-sums
kernel serves every layout: element i of group (b, g) sits at
``b * batch_stride + g * group_offset + (i // inner_len) * outer_stride + i % inner_len``:

- ``[N, C, S]`` contiguous (a plain GroupNorm): the group is one run, ``inner_len = C/G * S`` (SEGMENTED off);
- ``[B*F, C, S]`` with frame-spanning groups (the motion module's norm): F runs of ``C/G * S``, ``C * S`` apart;
- ``[N, S, C]`` (a channels-last ``[N, C, H, W]``): S runs of ``C/G`` channels, ``C`` apart.

1. ``group_partials_kernel``: grid (batch * groups, split); each program sums ``x - shift`` and its square over one
   chunk of its group (shift: the group's first element, so the variance does not cancel), fp32 per lane. For
   channels-last input, ``channel_partials_kernel`` instead reads whole rows of channels, per-channel sums that
   the next kernel adds up as pieces of the groups (a tuning candidate).
2. ``group_affine_kernel``: per (batch, channel), the group's partials added in fp64, then the per-channel
   ``scale = rstd * weight`` and ``shift = bias - mean * scale`` (fp32) the apply kernels read. Weight and bias are
   read in their own dtype (no conversion launches on the host).
3. an apply kernel writes ``act(x * scale + shift)``: ``group_apply_rows_kernel`` for ``[rows, S]`` and
   ``[positions, C]`` tiles in place of layout; ``group_apply_permute_kernel`` for ``[B*F, C, S] -> [B, S, F, C]``
   (the tile is read along S and written along C; Triton stages the transpose through shared memory).
``unpermute_residual_kernel`` is the layout change back plus the residual add, tiled the same way.

``group_norm_fused_kernel`` does a contiguous ``[N, C, S]`` GroupNorm in one launch, one program per (batch, group):
the statistics in a first pass over the group, then the normalisation in a second pass that reads the group back
while it is likely still in L2 (a group of SD1.5's UNet at 64x64 latents is 80 KB in fp16), or, with a block as
large as the group (ONE_TILE), one read kept in registers. With enough groups to fill the GPU that is one read of x
from memory instead of two. PERSISTENT launches fewer programs, each looping over groups (a tuning candidate).
"""

import triton
import triton.language as tl


@triton.jit
def _silu(v):
    return v / (1.0 + tl.exp(-v))


@triton.jit
def group_partials_kernel(
    x_ptr, partials_ptr, groups, group_numel, inner_len, outer_stride, group_offset, batch_stride, chunk, split,
    SEGMENTED: tl.constexpr, BLOCK: tl.constexpr,
):
    bg = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    base = (bg // groups) * batch_stride + (bg % groups) * group_offset
    shift = tl.load(x_ptr + base).to(tl.float32)
    start = piece * chunk
    end = tl.minimum(start + chunk, group_numel)
    lanes = tl.arange(0, BLOCK)
    sums = tl.zeros([BLOCK], dtype=tl.float32)
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    for first in range(start, end, BLOCK):
        i = first + lanes
        mask = i < end
        if SEGMENTED:
            offset = (i // inner_len).to(tl.int64) * outer_stride + i % inner_len
        else:
            offset = i
        centred = tl.where(mask, tl.load(x_ptr + base + offset, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        sums += centred
        squares += centred * centred
    out = partials_ptr + (bg * split + piece) * 2
    tl.store(out, tl.sum(sums, axis=0))
    tl.store(out + 1, tl.sum(squares, axis=0))


@triton.jit
def channel_partials_kernel(
    x_ptr, partials_ptr, positions, channels, per_group, chunk, split,
    BLOCK_POSITIONS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):
    """The statistics of a channels-last x ([N, S, C] in memory) read along whole rows of channels: grid (N, split,
    channel tiles). Program (b, piece, tile) sums ``x - shift`` and its square, per channel c of its tile, over the
    positions ``[piece * chunk, piece * chunk + chunk)`` (shift: the first element of c's group,
    ``x[b, 0, (c // per_group) * per_group]``, as group_partials_kernel's), and writes channel c's pair as piece
    ``piece * per_group + c % per_group`` of group ``(b, c // per_group)``: group_affine_kernel then adds a group's
    ``split * per_group`` pieces. group_partials_kernel reads the same x as runs of C/G channels, C apart (4 bytes
    of every 128 in fp16 at 64 channels and 32 groups)."""
    b = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    c_valid = c < channels
    group = c // per_group
    x_ptr += b * positions * channels
    shift = tl.load(x_ptr + group * per_group, mask=c_valid, other=0.0).to(tl.float32)
    start = piece * chunk
    end = tl.minimum(start + chunk, positions)
    rows = tl.arange(0, BLOCK_POSITIONS)
    sums = tl.zeros([BLOCK_POSITIONS, BLOCK_CHANNELS], dtype=tl.float32)
    squares = tl.zeros([BLOCK_POSITIONS, BLOCK_CHANNELS], dtype=tl.float32)
    for first in range(start, end, BLOCK_POSITIONS):
        s = first + rows
        mask = (s < end)[:, None] & c_valid[None, :]
        v = tl.load(x_ptr + s.to(tl.int64)[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, v - shift[None, :], 0.0)
        sums += centred
        squares += centred * centred
    out = partials_ptr + ((b * (channels // per_group) + group) * (split * per_group) + piece * per_group
                          + c % per_group) * 2
    tl.store(out, tl.sum(sums, axis=0), mask=c_valid)
    tl.store(out + 1, tl.sum(squares, axis=0), mask=c_valid)


@triton.jit
def group_affine_kernel(
    x_ptr, partials_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, batch_channels, channels, groups, group_numel,
    group_offset, batch_stride, split, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)  # batch * C + c
    valid = index < batch_channels
    batch = index // channels
    channel = index % channels
    group = channel // (channels // groups)
    bg = batch * groups + group
    pieces = tl.arange(0, BLOCK_SPLIT)
    mask = valid[:, None] & (pieces[None, :] < split)
    partial = partials_ptr + (bg[:, None] * split + pieces[None, :]) * 2
    total = tl.sum(tl.load(partial, mask=mask, other=0.0).to(tl.float64), axis=1)
    total_squares = tl.sum(tl.load(partial + 1, mask=mask, other=0.0).to(tl.float64), axis=1)
    shift = tl.load(x_ptr + batch * batch_stride + group * group_offset, mask=valid, other=0.0).to(tl.float32)
    mean_shifted = total / group_numel
    variance = tl.maximum(total_squares / group_numel - mean_shifted * mean_shifted, 0.0)
    rstd = 1.0 / tl.sqrt(variance.to(tl.float32) + eps)
    mean = mean_shifted.to(tl.float32) + shift
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + channel, mask=valid, other=1.0).to(tl.float32)
    offset = -mean * scale
    if HAS_BIAS:
        offset += tl.load(b_ptr + channel, mask=valid, other=0.0).to(tl.float32)
    tl.store(scale_ptr + index, scale, mask=valid)
    tl.store(shift_ptr + index, offset, mask=valid)


@triton.jit
def group_apply_rows_kernel(
    x_ptr, y_ptr, scale_ptr, shift_ptr, rows, cols, positions, col_tiles,
    CHANNEL_IS_COL: tl.constexpr, SILU: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """x, y [rows, cols] contiguous, y = act(x * scale + shift). CHANNEL_IS_COL off: x is [N*C, S], row r has the
    affine of (batch, channel) index r. On: x is [N*S, C] (channels-last, S = positions), the affine index of
    (r, c) is (r // S) * C + c."""
    pid = tl.program_id(0).to(tl.int64)
    row = (pid // col_tiles) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = (pid % col_tiles) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (row[:, None] < rows) & (col[None, :] < cols)
    if CHANNEL_IS_COL:
        affine = (row // positions)[:, None] * cols + col[None, :]
        scale = tl.load(scale_ptr + affine, mask=mask, other=0.0)
        shift = tl.load(shift_ptr + affine, mask=mask, other=0.0)
    else:
        scale = tl.load(scale_ptr + row, mask=row < rows, other=0.0)[:, None]
        shift = tl.load(shift_ptr + row, mask=row < rows, other=0.0)[:, None]
    offsets = row[:, None] * cols + col[None, :]
    v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * scale + shift
    if SILU:
        v = _silu(v)
    tl.store(y_ptr + offsets, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_apply_permute_kernel(
    x_ptr, y_ptr, scale_ptr, shift_ptr, frames, channels, spatial, c_tiles, s_tiles,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """x [B*F, C, S] -> y [B, S, F, C] = act(x * scale + shift), affine per (b, c)."""
    pid = tl.program_id(0).to(tl.int64)
    bf = pid // (c_tiles * s_tiles)
    tile = pid % (c_tiles * s_tiles)
    c = (tile // s_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = (tile % s_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = bf // frames
    f = bf % frames
    mask = (c[:, None] < channels) & (s[None, :] < spatial)
    scale = tl.load(scale_ptr + b * channels + c, mask=c < channels, other=0.0)
    shift = tl.load(shift_ptr + b * channels + c, mask=c < channels, other=0.0)
    v = tl.load(x_ptr + (bf * channels + c[:, None]) * spatial + s[None, :], mask=mask, other=0.0).to(tl.float32)
    v = v * scale[:, None] + shift[:, None]
    if SILU:
        v = _silu(v)
    out = y_ptr + ((b * spatial + s[None, :]) * frames + f) * channels + c[:, None]
    tl.store(out, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def unpermute_residual_kernel(
    y_ptr, residual_ptr, out_ptr, frames, channels, spatial, c_tiles, s_tiles,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out [B*F, C, S] = y [B, S, F, C] seen as [B*F, C, S] + residual [B*F, C, S]."""
    pid = tl.program_id(0).to(tl.int64)
    bf = pid // (c_tiles * s_tiles)
    tile = pid % (c_tiles * s_tiles)
    c = (tile // s_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = (tile % s_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = bf // frames
    f = bf % frames
    mask = (c[:, None] < channels) & (s[None, :] < spatial)
    v = tl.load(y_ptr + ((b * spatial + s[None, :]) * frames + f) * channels + c[:, None], mask=mask,
                other=0.0).to(tl.float32)
    offsets = (bf * channels + c[:, None]) * spatial + s[None, :]
    v += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_fused_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, groups, total_groups, per_group, spatial, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr, PERSISTENT: tl.constexpr, REVERSE: tl.constexpr, L2_HINTS: tl.constexpr,
    STATS_STAGES: tl.constexpr = None, APPLY_STAGES: tl.constexpr = None,
):
    """x, y [N, C, S] contiguous, total_groups = N * groups; group bg (group bg % groups of batch entry
    bg // groups) is the per_group * spatial contiguous elements from bg * per_group * spatial. One program per
    group, or with PERSISTENT fewer programs, each looping over groups program_id, program_id + num_programs, ...
    (fewer groups in flight at once). ONE_TILE (BLOCK >= the group): the group is loaded once and kept in registers
    for both the statistics (two-pass, about its mean) and the output. Two more tuning candidates for the second
    read of a group to find it in L2: REVERSE runs the second pass from the group's end (the most recently read
    steps first); L2_HINTS marks the first pass's loads evict_last, the second's evict_first and the stores
    streaming (.cs), so the output does not push the groups still to be reread out of L2. STATS_STAGES and
    APPLY_STAGES (None: Triton's default, no pipelining without a matrix product) software-pipeline the first and
    the second pass's loads through shared memory (asynchronous copies, that many steps in flight), for more bytes
    in flight per program (tuning candidates)."""
    if PERSISTENT:
        for bg in range(tl.program_id(0).to(tl.int64), total_groups, tl.num_programs(0)):
            _normalise_group(bg, x_ptr, y_ptr, w_ptr, b_ptr, groups, per_group, spatial, eps,
                             HAS_WEIGHT, HAS_BIAS, SILU, BLOCK, ONE_TILE, REVERSE, L2_HINTS, STATS_STAGES, APPLY_STAGES)
    else:
        _normalise_group(tl.program_id(0).to(tl.int64), x_ptr, y_ptr, w_ptr, b_ptr, groups, per_group, spatial, eps,
                         HAS_WEIGHT, HAS_BIAS, SILU, BLOCK, ONE_TILE, REVERSE, L2_HINTS, STATS_STAGES, APPLY_STAGES)


@triton.jit
def _normalise_group(
    bg, x_ptr, y_ptr, w_ptr, b_ptr, groups, per_group, spatial, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr, REVERSE: tl.constexpr, L2_HINTS: tl.constexpr, STATS_STAGES: tl.constexpr,
    APPLY_STAGES: tl.constexpr,
):
    """group_norm_fused_kernel's work for group bg (int64)."""
    group_numel = per_group * spatial
    base = bg * group_numel
    lanes = tl.arange(0, BLOCK)
    first_channel = (bg % groups) * per_group
    if ONE_TILE:
        mask = lanes < group_numel
        v = tl.load(x_ptr + base + lanes, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=0) / group_numel
        centred = tl.where(mask, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / group_numel + eps)
        channel = first_channel + lanes // spatial
        scale = rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + channel, mask=mask, other=1.0).to(tl.float32)
        out = centred * scale
        if HAS_BIAS:
            out += tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            out = _silu(out)
        tl.store(y_ptr + base + lanes, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        shift = tl.load(x_ptr + base).to(tl.float32)
        sums = tl.zeros([BLOCK], dtype=tl.float32)
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for first in tl.range(0, group_numel, BLOCK, num_stages=STATS_STAGES):
            i = first + lanes
            mask = i < group_numel
            v = tl.load(x_ptr + base + i, mask=mask, other=0.0, eviction_policy="evict_last" if L2_HINTS else "")
            centred = tl.where(mask, v.to(tl.float32) - shift, 0.0)
            sums += centred
            squares += centred * centred
        mean_shifted = tl.sum(sums, axis=0) / group_numel
        variance = tl.maximum(tl.sum(squares, axis=0) / group_numel - mean_shifted * mean_shifted, 0.0)
        rstd = 1.0 / tl.sqrt(variance + eps)
        mean = mean_shifted + shift
        steps = tl.cdiv(group_numel, BLOCK)
        for step in tl.range(0, steps, num_stages=APPLY_STAGES):
            i = ((steps - 1 - step) if REVERSE else step) * BLOCK + lanes
            mask = i < group_numel
            channel = first_channel + i // spatial
            scale = rstd
            if HAS_WEIGHT:
                scale = scale * tl.load(w_ptr + channel, mask=mask, other=1.0).to(tl.float32)
            offset = -mean * scale
            if HAS_BIAS:
                offset += tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(x_ptr + base + i, mask=mask, other=0.0, eviction_policy="evict_first" if L2_HINTS else "")
            v = v.to(tl.float32) * scale + offset
            if SILU:
                v = _silu(v)
            tl.store(y_ptr + base + i, v.to(y_ptr.dtype.element_ty), mask=mask,
                     cache_modifier=".cs" if L2_HINTS else "")
