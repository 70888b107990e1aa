"""Glue between the ops and the Triton kernels in ``animatelcm.kernels``: availability and launches.

Triton runs on CUDA devices, or on the CPU when ``TRITON_INTERPRET=1`` is set before the first Triton kernel is
used (the interpreter is slow: for tests on small shapes).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .layout import plan_attention


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    """Whether triton can be imported (looked up once: the search over sys.path took 41 us a call, on every
    dispatch that reaches the Triton backend, where triton is not installed)."""
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason() -> str | None:
    """Why the Triton backend cannot run in this process, or None."""
    if not _triton_installed():
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels in the CPU interpreter)"
    return None


@functools.lru_cache(maxsize=None)
def _attention_kernel():
    from ..kernels.temporal_attention import temporal_attention_kernel

    return temporal_attention_kernel


def _fp32_dot(dtype) -> bool:
    """Whether the kernel's dots run on float32 operands: for float32 inputs (IEEE, no TF32), and for bfloat16 under
    the interpreter, whose tl.dot gives wrong results on bfloat16 operands (numpy has no bfloat16)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _block(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def triton_attention(q, k, v, scale):
    """Launch the Triton temporal attention on q, k, v ``[..., F, D]`` (one shape); output has q's layout."""
    q, k, v, out, (batch0, batch1), strides = plan_attention(q, k, v)
    frames, head_dim = q.shape[-2], q.shape[-1]
    if batch0 * batch1 == 0:
        return out
    _attention_kernel()[(batch0 * batch1,)](
        q, k, v, out, batch1, frames, head_dim, float(scale), *strides[0], *strides[1], *strides[2], *strides[3],
        BLOCK_F=_block(frames), BLOCK_D=_block(head_dim), FP32_DOT=_fp32_dot(q.dtype),
        num_warps=4 if head_dim > 64 else 2,
    )
    return out


@functools.lru_cache(maxsize=None)
def _linear_geglu_kernel():
    from ..kernels.linear_geglu import linear_geglu_kernel

    return linear_geglu_kernel


# (BLOCK_M, BLOCK_N per half, BLOCK_K, GROUP_M) of the GEGLU projection: a 128 x (2 x 64) fp32 accumulator tile.
LINEAR_GEGLU_TILES = (128, 64, 64, 8)


def triton_linear_geglu(x, weight, bias, tiles=LINEAR_GEGLU_TILES, num_warps=8, num_stages=None):
    """``geglu(x @ weight.T + bias)`` in one Triton kernel: ``x [..., K]``, ``weight [2I, K]`` (x's dtype),
    ``bias [2I]`` or None -> ``[..., I]``; the ``[..., 2I]`` projection is never materialised. ``tiles``
    ((BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)), ``num_warps`` and ``num_stages`` (default 3, 2 in float32) are the
    launch's; the kernel benchmark times other choices beside these."""
    depth, inner = x.shape[-1], weight.shape[0] // 2
    flat = x.reshape(-1, depth).contiguous()
    out = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    if flat.shape[0] == 0 or inner == 0:
        return out
    block_m, block_n, block_k, group_m = tiles
    programs = _cdiv(flat.shape[0], block_m) * _cdiv(inner, block_n)
    _linear_geglu_kernel()[(programs,)](
        flat, weight.contiguous(), flat if bias is None else bias.contiguous(), out, flat.shape[0], inner, depth,
        HAS_BIAS=bias is not None, FP32_DOT=_fp32_dot(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group_m, num_warps=num_warps,
        num_stages=num_stages or (2 if x.dtype == torch.float32 else 3))
    return out


def triton_device_types() -> tuple[str, ...]:
    """Devices whose tensors the Triton kernels take: CUDA, and the CPU under TRITON_INTERPRET=1."""
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def reject_unless_triton(tensor, *rest) -> str | None:
    """An Implementation.reject for the Triton kernels: the first argument must be a float32/float16/bfloat16
    tensor on a device Triton runs on (the ops' own checks have made the other tensors agree with it)."""
    if tensor.device.type not in triton_device_types():
        return f"needs {' or '.join(triton_device_types())} tensors, got {tensor.device.type}"
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"supports float32/float16/bfloat16, got {tensor.dtype}"
    return None


@functools.lru_cache(maxsize=None)
def _group_norm_kernels():
    from ..kernels import group_norm

    return group_norm


PARTIALS_BLOCK = 1024    # elements per step of a partial-sums program
PARTIALS_PROGRAMS = 1024  # partial-sums programs a launch aims for: several per SM on an H100 (132 SMs)
MAX_SPLIT = 1024         # chunks per group at most (the affine kernel adds them in one tile)
TILE = 64                # the permute / unpermute tiles: TILE channels x TILE positions
# A contiguous GroupNorm with at least this many (batch, group) pairs runs as one fused launch, one program per
# group (two programs per SM of an H100's 132); fewer groups would leave SMs idle, so they take the three launches,
# which split each group's statistics. On an H100 (fp16, tune_group_norm_cuda.md) every SD1.5 UNet and VAE shape
# has 512 or more pairs, and there one launch matched or beat three (up to 7x faster at 8x8 latents, up to 3 % behind
# at the VAE's largest); below 512 pairs the threshold is not measured yet.
FUSED_MIN_GROUPS = 264


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _contiguous_affine(weight, bias):
    """Weight and bias as the kernels read them: contiguous, in their own dtype (converted to fp32 as loaded)."""
    return tuple(None if p is None else p.detach().contiguous() for p in (weight, bias))


def _channel_affine(x, batch, channels, groups, group_numel, inner_len, outer_stride, group_offset, batch_stride,
                    weight, bias, eps):
    """Per (batch, channel) fp32 ``scale, shift [batch * C]`` with ``norm(x) * weight + bias = x * scale + shift``,
    from the groups of ``x`` addressed as the kernels' module docstring describes."""
    groups_total = batch * groups
    split = max(1, min(_cdiv(group_numel, PARTIALS_BLOCK), _cdiv(PARTIALS_PROGRAMS, groups_total), MAX_SPLIT))
    chunk = _cdiv(_cdiv(group_numel, split), PARTIALS_BLOCK) * PARTIALS_BLOCK
    split = _cdiv(group_numel, chunk)
    partials = torch.empty(groups_total * split * 2, dtype=torch.float32, device=x.device)
    _group_norm_kernels().group_partials_kernel[(groups_total, split)](
        x, partials, groups, group_numel, inner_len, outer_stride, group_offset, batch_stride, chunk, split,
        SEGMENTED=inner_len != group_numel, BLOCK=PARTIALS_BLOCK, num_warps=4)
    return _affine_from_partials(x, partials, split, batch, channels, groups, group_numel, group_offset,
                                 batch_stride, weight, bias, eps)


# The statistics of channels-last input read along whole rows of channels (channel_partials_kernel): a tile of
# CHANNEL_ROWS_TILE elements, at most CHANNEL_ROWS_TILE_CHANNELS channels wide (512 contiguous bytes a row in fp32).
CHANNEL_ROWS_TILE = 4096
CHANNEL_ROWS_TILE_CHANNELS = 128
# Which statistics kernel a channels-last GroupNorm takes: "runs" (group_partials_kernel, C/G channels at a time,
# what runs 10 and 11 measured: 29 % of the copy's bandwidth on an H100 at [16, 64, 128, 128]) or "rows"
# (channel_partials_kernel, whole rows: written since, to be timed against it on a GPU; the kernel benchmark's
# "triton, row statistics" candidates).
CHANNELS_LAST_STATISTICS = "runs"


def _channel_affine_by_rows(x, batch, channels, groups, positions, weight, bias, eps, block_positions=None,
                            block_channels=None, num_warps=4):
    """:func:`_channel_affine` for a channels-last ``x`` (``[N, S, C]`` in memory), its statistics from
    ``channel_partials_kernel``: each program reads a ``[block_positions, block_channels]`` tile of whole rows a step
    (defaults: CHANNEL_ROWS_TILE elements, CHANNEL_ROWS_TILE_CHANNELS channels at most)."""
    per_group = channels // groups
    block_channels = block_channels or min(_block(channels), CHANNEL_ROWS_TILE_CHANNELS)
    block_positions = block_positions or max(1, CHANNEL_ROWS_TILE // block_channels)
    channel_tiles = _cdiv(channels, block_channels)
    split = max(1, min(_cdiv(positions, block_positions), _cdiv(PARTIALS_PROGRAMS, batch * channel_tiles),
                       MAX_SPLIT // per_group))
    chunk = _cdiv(_cdiv(positions, split), block_positions) * block_positions
    split = _cdiv(positions, chunk)
    partials = torch.empty(batch * channels * split * 2, dtype=torch.float32, device=x.device)
    _group_norm_kernels().channel_partials_kernel[(batch, split, channel_tiles)](
        x, partials, positions, channels, per_group, chunk, split, BLOCK_POSITIONS=block_positions,
        BLOCK_CHANNELS=block_channels, num_warps=num_warps)
    return _affine_from_partials(x, partials, split * per_group, batch, channels, groups, per_group * positions,
                                 per_group, positions * channels, weight, bias, eps)


def _affine_from_partials(x, partials, split, batch, channels, groups, group_numel, group_offset, batch_stride,
                          weight, bias, eps):
    """``scale, shift [batch * C]`` from ``split`` partial (sum, sum of squares) pairs a group (``partials
    [batch * groups, split, 2]``, shifted by the group's first element, addressed by ``group_offset`` and
    ``batch_stride``): ``group_affine_kernel``."""
    scale = torch.empty(batch * channels, dtype=torch.float32, device=x.device)
    shift = torch.empty_like(scale)
    weight, bias = _contiguous_affine(weight, bias)
    block_split = _block(split)
    block_channels = max(1, 1024 // block_split)
    _group_norm_kernels().group_affine_kernel[(_cdiv(batch * channels, block_channels),)](
        x, partials, scale if weight is None else weight, scale if bias is None else bias, scale, shift,
        batch * channels, channels, groups, group_numel, group_offset, batch_stride, split, float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_CHANNELS=block_channels,
        BLOCK_SPLIT=block_split)
    return scale, shift


def _apply_rows(x, out, scale, shift, rows, cols, positions, channel_is_col, silu):
    block_cols = min(1024, _block(cols))
    block_rows = max(1, 2048 // block_cols)
    col_tiles = _cdiv(cols, block_cols)
    _group_norm_kernels().group_apply_rows_kernel[(_cdiv(rows, block_rows) * col_tiles,)](
        x, out, scale, shift, rows, cols, positions, col_tiles, CHANNEL_IS_COL=channel_is_col, SILU=silu,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)


def triton_group_norm_silu(x, num_groups, weight, bias, eps, silu, channels_last: bool,
                           channels_last_statistics: str | None = None, **statistics_tiles):
    """GroupNorm(+SiLU) of ``x [N, C, *]``: contiguous (``x`` is made so) or, with ``channels_last``, a
    channels-last 4-D ``x`` read and written in that layout. Returns the output in that layout. A contiguous x with
    at least FUSED_MIN_GROUPS groups in all runs as one fused launch, else as three. Channels-last input takes three
    launches, its statistics read as ``channels_last_statistics`` says (default CHANNELS_LAST_STATISTICS; "rows"
    takes ``statistics_tiles``: :func:`_channel_affine_by_rows`'s ``block_positions``, ``block_channels``,
    ``num_warps``)."""
    if not channels_last:
        x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if out.numel() == 0:
        return out
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    per_group = channels // num_groups
    group_numel = per_group * spatial
    if channels_last:  # [N, S, C] in memory
        statistics = channels_last_statistics or CHANNELS_LAST_STATISTICS
        if statistics == "rows":
            scale, shift = _channel_affine_by_rows(x, batch, channels, num_groups, spatial, weight, bias, eps,
                                                   **statistics_tiles)
        elif statistics == "runs":  # S runs of C/G channels, C apart
            scale, shift = _channel_affine(x, batch, channels, num_groups, group_numel, per_group, channels,
                                           per_group, spatial * channels, weight, bias, eps)
        else:
            raise ValueError(f"channels_last_statistics must be 'runs' or 'rows', got {statistics!r}")
        _apply_rows(x, out, scale, shift, batch * spatial, channels, spatial, True, silu)
    elif batch * num_groups >= FUSED_MIN_GROUPS:
        group_norm_one_launch(x, out, num_groups, weight, bias, eps, silu)
    else:
        group_norm_three_launches(x, out, num_groups, weight, bias, eps, silu)
    return out


def one_launch_config(group_numel: int) -> tuple[int, int]:
    """(elements per step, warps) of the one-launch GroupNorm for groups of ``group_numel`` elements: the fastest
    of benchmarks/tune_group_norm.py's choices on an H100 in fp16 (benchmarks/results/tune_group_norm_cuda.md):
    1024/4 warps for SD1.5's 8x8 latents (2560-element groups); 2048/8 up to 32768 elements (16x16 and 32x32
    latents, where 4096/16 lost up to 3x on two shapes and won by up to 8 % on others); 4096/16 above (64x64
    latents and the VAE: 1-12 % ahead of 2048/8)."""
    if group_numel <= 4096:
        return 1024, 4
    if group_numel <= 32768:
        return 2048, 8
    return 4096, 16


def group_norm_one_launch(x, out, num_groups, weight, bias, eps, silu, block=None, num_warps=None, programs=None,
                          reverse=True, l2_hints=True, stats_stages=None, apply_stages=None):
    """``out = act(group_norm(x))`` for contiguous ``x, out [N, C, *]`` in one launch, one program per (batch,
    group) (``group_norm_fused_kernel``). ``block`` (elements per step, a power of two) and ``num_warps`` default to
    the tuned choice; benchmarks/tune_group_norm.py times the others. A block as large as the group keeps it in
    registers (one read instead of two). ``programs`` (fewer than the N * num_groups groups) launches that many
    programs instead, each looping over groups (a persistent grid; off by default). ``reverse`` (the second pass
    from the group's end) and ``l2_hints`` (cache eviction hints) steer a group's second read toward L2: on by
    default, since together they were the faster choice on 15 of the tuning script's 18 SD1.5 shapes on an H100
    (benchmarks/results/tune_group_norm_cuda.md, run 9: 67 % of the copy's bandwidth against 60 % at
    ``[32, 320, 64, 64]``, 63 % against 52-54 % on the VAE's large groups); the script times every combination.
    ``stats_stages`` / ``apply_stages`` software-pipeline the first / second pass's loads that many steps deep
    (asynchronous copies through shared memory; None, the default, does not): tuning candidates for more bytes in
    flight per program, not yet timed on a GPU."""
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    per_group = channels // num_groups
    total_groups = batch * num_groups
    default_block, default_warps = one_launch_config(per_group * spatial)
    block, num_warps = block or default_block, num_warps or default_warps
    persistent = programs is not None and 0 < programs < total_groups
    weight, bias = _contiguous_affine(weight, bias)
    _group_norm_kernels().group_norm_fused_kernel[(programs if persistent else total_groups,)](
        x, out, x if weight is None else weight, x if bias is None else bias, num_groups, total_groups, per_group,
        spatial, float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, BLOCK=block,
        ONE_TILE=block >= per_group * spatial, PERSISTENT=persistent, REVERSE=reverse, L2_HINTS=l2_hints,
        STATS_STAGES=stats_stages, APPLY_STAGES=apply_stages, num_warps=num_warps)


def group_norm_three_launches(x, out, num_groups, weight, bias, eps, silu):
    """``out = act(group_norm(x))`` for contiguous ``x, out [N, C, *]``: split partial sums, per-channel affine,
    row-wise apply (for few groups, where one program per group would leave SMs idle)."""
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    group_numel = channels // num_groups * spatial
    scale, shift = _channel_affine(x, batch, channels, num_groups, group_numel, group_numel, 0, group_numel,
                                   channels * spatial, weight, bias, eps)
    _apply_rows(x, out, scale, shift, batch * channels, spatial, 1, False, silu)


def triton_temporal_group_norm(x, num_frames, num_groups, weight, bias, eps):
    """Frame-spanning GroupNorm of ``x [B*F, C, H, W]`` written as ``[B*H*W, F, C]``."""
    x = x.contiguous()
    batch_frames, channels = x.shape[:2]
    spatial = x.shape[2] * x.shape[3]
    batch = batch_frames // num_frames
    out = x.new_empty((batch * spatial, num_frames, channels))
    if out.numel() == 0:
        return out
    per_group = channels // num_groups
    scale, shift = _channel_affine(x, batch, channels, num_groups, num_frames * per_group * spatial,
                                   per_group * spatial, channels * spatial, per_group * spatial,
                                   num_frames * channels * spatial, weight, bias, eps)
    c_tiles, s_tiles = _cdiv(channels, TILE), _cdiv(spatial, TILE)
    _group_norm_kernels().group_apply_permute_kernel[(batch_frames * c_tiles * s_tiles,)](
        x, out, scale, shift, num_frames, channels, spatial, c_tiles, s_tiles, SILU=False, BLOCK_C=TILE,
        BLOCK_S=TILE)
    return out


def triton_unpermute_residual(y, residual, num_frames):
    """``y [B*H*W, F, C]`` back to ``[B*F, C, H, W]`` plus ``residual`` (that shape), contiguous."""
    y, residual = y.contiguous(), residual.contiguous()
    out = torch.empty_like(residual)
    if out.numel() == 0:
        return out
    batch_frames, channels = residual.shape[:2]
    spatial = residual[0, 0].numel()
    c_tiles, s_tiles = _cdiv(channels, TILE), _cdiv(spatial, TILE)
    _group_norm_kernels().unpermute_residual_kernel[(batch_frames * c_tiles * s_tiles,)](
        y, residual, out, num_frames, channels, spatial, c_tiles, s_tiles, BLOCK_C=TILE, BLOCK_S=TILE)
    return out


@functools.lru_cache(maxsize=None)
def _layer_norm_kernel():
    from ..kernels.layer_norm import layer_norm_kernel

    return layer_norm_kernel


LAYER_NORM_TILE = 4096  # elements of a LayerNorm program's tile: whole rows, BLOCK_M of them


def layer_norm_config(cols: int) -> tuple[int, int, int]:
    """(rows a program, the row's power-of-two block, warps) of the Triton LayerNorm for rows of ``cols``: about
    LAYER_NORM_TILE elements a program (SD1.5's widths: 8 rows of 320 in 512 columns, 4 of 640, 2 of 1280), one
    row where a row is longer. A first choice, not yet tuned on a GPU."""
    block_c = _block(cols)
    block_m = max(1, LAYER_NORM_TILE // block_c)
    return block_m, block_c, 4 if block_m * block_c <= LAYER_NORM_TILE else 8


def launch_layer_norm(x, residual, total, out, weight, bias, addend, rows, cols, eps, block_m=None, num_warps=None):
    """The Triton LayerNorm on contiguous rows ``x [rows, cols]`` (+ ``residual``, the sum written to ``total``):
    ``out = layer_norm * weight + bias + addend[row % L]`` for ``addend [L, cols]`` (L = 1, or x's second-to-last
    size: the broadcast of ``[..., L, C]``), in one launch (``ops.layer_norm``'s ``run_kernel`` prepares the
    buffers). ``block_m`` / ``num_warps`` override :func:`layer_norm_config`."""
    default_m, block_c, default_warps = layer_norm_config(cols)
    block_m = block_m or default_m
    weight, bias = _contiguous_affine(weight, bias)
    _layer_norm_kernel()[(_cdiv(rows, block_m),)](
        x, x if residual is None else residual, out if total is None else total, out,
        x if weight is None else weight, x if bias is None else bias, x if addend is None else addend,
        rows, cols, 1 if addend is None else addend.shape[0], float(eps),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_ADDEND=addend is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps or default_warps)
