import pytest
import torch
import torch.nn.functional as F

from animatelcm import ops
from animatelcm.ops.group_norm import GROUP_NORM_SILU, TEMPORAL_GROUP_NORM, UNPERMUTE_RESIDUAL
from conftest import CPU_ISAS, assert_close_to_reference, backend_device, backends_usable_here

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, C, spatial dims, groups): odd sizes on purpose, SD1.5-like ones too.
# (2, 16, 37, 16): rows of whole vectors; (1, 8, 5, 25): unaligned rows, tails (both also on the streaming path);
# (2, 8, 64, 72): groups of several 8192-element chunks (the CUDA statistics split).
PLAIN_SHAPES = [((3, 12, 5, 7), 4), ((2, 32, 9), 8), ((1, 64, 8, 8), 32), ((5, 6, 1, 1), 3), ((2, 40, 3, 3, 3), 2),
                ((2, 16, 37, 16), 4), ((1, 8, 5, 25), 2), ((2, 8, 64, 72), 2)]
# (B, F, C, H, W, groups); the last ones: groups of several 8192-element chunks per frame (the CUDA statistics
# split), channels and positions across 32-wide tiles with partial ones (the CUDA transposes).
TEMPORAL_SHAPES = [(1, 16, 32, 4, 4, 8), (2, 7, 24, 3, 5, 4), (3, 13, 16, 1, 1, 16), (1, 1, 8, 17, 3, 2),
                   (1, 3, 40, 48, 48, 4), (2, 2, 72, 5, 9, 8)]


def run(backend, monkeypatch, fn, *args, **kwargs):
    monkeypatch.setenv("ANIMATELCM_BACKEND", backend)
    return fn(*args, **kwargs)


def affine(channels, generator, dtype=torch.float32, device="cpu"):
    return tuple(torch.randn(channels, generator=generator).to(device, dtype) for _ in range(2))


@pytest.mark.parametrize("backend", backends_usable_here(GROUP_NORM_SILU))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_silu_matches_reference(backend, dtype, silu, monkeypatch, poisoned_outputs):
    for index, (shape, groups) in enumerate(PLAIN_SHAPES):
        generator = torch.Generator().manual_seed(index)
        x = (torch.randn(shape, generator=generator) * 3 + 1).to(backend_device(backend), dtype)
        weight, bias = affine(shape[1], generator, device=x.device)
        for w, b in ((weight, bias), (weight.to(dtype), bias.to(dtype)), (None, None)):
            out = run(backend, monkeypatch, ops.group_norm_silu, x, groups, w, b, 1e-5, silu)
            want = ops.group_norm_silu_reference(x.double(), groups, w, b, 1e-5, silu)
            assert out.shape == x.shape
            assert_close_to_reference(out, want, dtype)


@pytest.mark.parametrize("fused", [True, False], ids=["one-launch", "three-launches"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_group_norm_both_paths_match_reference(fused, dtype, monkeypatch, poisoned_outputs):
    """The Triton kernel picks one fused launch per group or three launches by the number of groups; both run."""
    if "triton" not in backends_usable_here(GROUP_NORM_SILU):
        pytest.skip("the triton backend is not usable here")
    from animatelcm.ops import triton_backend

    monkeypatch.setattr(triton_backend, "FUSED_MIN_GROUPS", 1 if fused else 2**62)
    for index, (shape, groups) in enumerate(PLAIN_SHAPES):
        generator = torch.Generator().manual_seed(index)
        x = (torch.randn(shape, generator=generator) * 3 + 40).to(backend_device("triton"), dtype)
        weight, bias = affine(shape[1], generator, dtype, device=x.device)
        for w, b, silu in ((weight, bias, True), (None, None, False)):
            out = ops.group_norm_silu(x, groups, w, b, 1e-5, silu, backend="triton")
            assert_close_to_reference(out, ops.group_norm_silu_reference(x.double(), groups, w, b, 1e-5, silu), dtype)


@pytest.mark.parametrize("block, num_warps", [(1024, 4), (2048, 8), (4096, 16), (16384, 16), (None, None)],
                         ids=["1024-4w", "2048-8w", "4096-16w", "16384-16w", "default"])
def test_triton_one_launch_configurations_match_reference(block, num_warps, poisoned_outputs):
    """Every (block, warps) the tuning script times, and the size-based default, give the reference: groups shorter
    than, equal to and longer than a block (with a partial last step; a group within one block is kept in registers,
    a longer one read twice), weight and bias in another dtype than x."""
    if "triton" not in backends_usable_here(GROUP_NORM_SILU):
        pytest.skip("the triton backend is not usable here")
    from animatelcm.ops import triton_backend

    generator = torch.Generator().manual_seed(7)
    for shape, groups in (((2, 8, 5, 7), 4), ((1, 16, 32, 32), 4), ((2, 6, 73, 61), 2)):
        x = (torch.randn(shape, generator=generator) * 2 + 5).to(backend_device("triton"), torch.float16)
        weight, bias = affine(shape[1], generator, torch.bfloat16, device=x.device)
        out = torch.full_like(x, float("nan"))
        triton_backend.group_norm_one_launch(x, out, groups, weight, bias, 1e-5, True, block=block, num_warps=num_warps)
        assert_close_to_reference(out, ops.group_norm_silu_reference(x.double(), groups, weight, bias, 1e-5),
                                  torch.float16)


@pytest.mark.parametrize("programs, reverse, l2_hints, stages", [
    (1, False, False, None), (3, False, False, None), (7, False, False, None), (None, False, False, None),
    (None, True, False, None), (None, False, True, None), (3, True, True, None), (None, True, True, (3, None)),
    (3, True, True, (2, 2))])
def test_triton_one_launch_tuning_candidates_match_reference(programs, reverse, l2_hints, stages, poisoned_outputs):
    """The tuning candidates: a persistent grid (fewer programs than groups, each looping over groups; as many
    programs as groups or more is the plain grid), the second pass run forwards or backwards (the default), with or
    without the cache hints (on by default), the passes' loads software-pipelined. Every group written once and
    right, with groups kept in registers and groups read twice (a partial last step included)."""
    if "triton" not in backends_usable_here(GROUP_NORM_SILU):
        pytest.skip("the triton backend is not usable here")
    from animatelcm.ops import triton_backend

    generator = torch.Generator().manual_seed(8)
    for shape, groups, block in (((2, 8, 5, 7), 4, None), ((3, 6, 9, 11), 3, 64), ((1, 4, 3, 3), 4, None)):
        x = (torch.randn(shape, generator=generator) * 2 + 5).to(backend_device("triton"), torch.float32)
        weight, bias = affine(shape[1], generator, torch.float32, device=x.device)
        out = torch.full_like(x, float("nan"))
        stats_stages, apply_stages = stages or (None, None)
        triton_backend.group_norm_one_launch(x, out, groups, weight, bias, 1e-5, True, block=block, programs=programs,
                                             reverse=reverse, l2_hints=l2_hints, stats_stages=stats_stages,
                                             apply_stages=apply_stages)
        assert_close_to_reference(out, ops.group_norm_silu_reference(x.double(), groups, weight, bias, 1e-5),
                                  torch.float32)


def test_one_launch_configuration_grows_with_the_group():
    from animatelcm.ops.triton_backend import one_launch_config

    sizes = [one_launch_config(n) for n in (1, 2560, 4096, 4097, 32768, 40960, 2**20)]
    assert sizes == [(1024, 4)] * 3 + [(2048, 8)] * 2 + [(4096, 16)] * 2


# Channels-last [N, C, H, W] (groups): channels not a multiple of any vector width, H*W across the CPU kernel's
# 128-position blocks with a partial last one, one channel per group, a 1x1 image.
CHANNELS_LAST_SHAPES = [((3, 40, 13, 11), 8), ((2, 7, 5, 30), 7), ((1, 64, 16, 16), 32), ((4, 6, 1, 1), 3),
                        ((2, 20, 9, 17), 4)]


@pytest.mark.parametrize("backend", backends_usable_here(GROUP_NORM_SILU))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_channels_last_input_keeps_its_layout(backend, dtype, isa, monkeypatch, poisoned_outputs):
    """What the VAE decoder's convolutions hand its ResNet blocks; far-from-zero means test the shifted sums."""
    monkeypatch.setenv("ANIMATELCM_CPU_ISA", isa)
    for index, (shape, groups) in enumerate(CHANNELS_LAST_SHAPES):
        generator = torch.Generator().manual_seed(index)
        x = (torch.randn(shape, generator=generator) * 3 + 50 * (index % 2)).to(backend_device(backend), dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight, bias = affine(shape[1], generator, device=x.device)
        # affine in fp32 and in x's dtype (what a half-precision module passes: converted to fp32 for the kernel)
        for w, b, silu in ((weight, bias, True), (weight.to(dtype), bias.to(dtype), False), (None, None, False)):
            out = run(backend, monkeypatch, ops.group_norm_silu, x, groups, w, b, 1e-5, silu)
            assert out.shape == x.shape
            assert shape[1] == 1 or shape[2] * shape[3] == 1 or out.is_contiguous(memory_format=torch.channels_last)
            assert_close_to_reference(out, ops.group_norm_silu_reference(x.double(), groups, w, b, 1e-5, silu),
                                      dtype)
    eager = run("eager", monkeypatch, ops.group_norm_silu, x, 2)  # PyTorch's own: the same layout rule
    assert eager.is_contiguous(memory_format=torch.channels_last)


def _check_row_statistics(shapes, dtype, call):
    for index, (shape, groups) in enumerate(shapes):
        generator = torch.Generator().manual_seed(index)
        x = (torch.randn(shape, generator=generator) * 3 + 50 * (index % 2)).to(backend_device("triton"), dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight, bias = affine(shape[1], generator, device=x.device)
        for w, b, silu in ((weight, bias, True), (weight.to(dtype), bias.to(dtype), False), (None, None, True)):
            out = call(x, groups, w, b, silu)
            assert shape[1] == 1 or shape[2] * shape[3] == 1 or out.is_contiguous(memory_format=torch.channels_last)
            assert_close_to_reference(out, ops.group_norm_silu_reference(x.double(), groups, w, b, 1e-5, silu),
                                      dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_channels_last_row_statistics_match_reference(dtype, monkeypatch, poisoned_outputs):
    """The channels-last statistics read along whole rows of channels (channel_partials_kernel), as the dispatcher
    runs them once CHANNELS_LAST_STATISTICS says "rows": channel tiles across groups with a partial last one, far
    from zero (the shifted sums), weight and bias in x's dtype, in float32 and absent; a bad choice is an error."""
    if "triton" not in backends_usable_here(GROUP_NORM_SILU):
        pytest.skip("the triton backend is not usable here")
    from animatelcm.ops import triton_backend

    monkeypatch.setattr(triton_backend, "CHANNELS_LAST_STATISTICS", "rows")
    _check_row_statistics([*CHANNELS_LAST_SHAPES, ((1, 300, 5, 7), 3)], dtype,
                          lambda x, groups, w, b, silu: ops.group_norm_silu(x, groups, w, b, 1e-5, silu,
                                                                            backend="triton"))
    with pytest.raises(ValueError, match="'runs' or 'rows'"):
        triton_backend.triton_group_norm_silu(torch.ones(1, 2, 1, 1, device=backend_device("triton")), 1, None,
                                              None, 1e-5, True, True, "columns")


@pytest.mark.parametrize("tiles", [{"block_positions": 4, "block_channels": 8}, {"block_positions": 1}],
                         ids=["small-tiles", "one-row"])
def test_triton_channels_last_row_statistics_tiles(tiles, monkeypatch, poisoned_outputs):
    """The row statistics with the tiles the kernel benchmark times and a few programs, so each group's positions
    split over several programs with partial last steps (one group of all channels too)."""
    if "triton" not in backends_usable_here(GROUP_NORM_SILU):
        pytest.skip("the triton backend is not usable here")
    from animatelcm.ops import triton_backend

    monkeypatch.setattr(triton_backend, "PARTIALS_PROGRAMS", 40)
    _check_row_statistics([((3, 40, 13, 11), 8), ((2, 12, 9, 5), 1)], torch.float16,
                          lambda x, groups, w, b, silu: triton_backend.triton_group_norm_silu(
                              x, groups, w, b, 1e-5, silu, True, "rows", **tiles))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_calls_larger_than_the_cache_stream_their_output(isa, monkeypatch, poisoned_outputs):
    """With x and y over the last-level cache (made 64 bytes here) the CPU kernel writes each channel's run with
    streaming stores: straight from registers for float32 rows on a vector boundary, through a staging row for the
    others (rows of 5 * 25 elements start off a vector boundary; 16-bit types are always staged)."""
    if "cpp" not in backends_usable_here(GROUP_NORM_SILU):
        pytest.skip("native module not built")
    from animatelcm.ops import native

    monkeypatch.setenv("ANIMATELCM_CPU_ISA", isa)
    monkeypatch.setattr(native, "last_level_cache_bytes", lambda: 64)
    for index, (shape, groups) in enumerate(PLAIN_SHAPES):
        for dtype in DTYPES:
            generator = torch.Generator().manual_seed(index)
            x = (torch.randn(shape, generator=generator) * 3 + 1).to(dtype)
            weight, bias = affine(shape[1], generator)
            assert native.exceeds_last_level_cache(x, x)
            out = run("cpp", monkeypatch, ops.group_norm_silu, x, groups, weight, bias)
            assert_close_to_reference(out, ops.group_norm_silu_reference(x.double(), groups, weight, bias), dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_cpu_isa_build(isa, monkeypatch, poisoned_outputs):
    if "cpp" not in backends_usable_here(GROUP_NORM_SILU):
        pytest.skip("native module not built")
    monkeypatch.setenv("ANIMATELCM_CPU_ISA", isa)
    generator = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        x = torch.randn(2, 64, 11, 13, generator=generator).to(dtype)
        w, b = affine(64, generator)
        out = run("cpp", monkeypatch, ops.group_norm_silu, x, 32, w, b)
        assert_close_to_reference(out, ops.group_norm_silu_reference(x.double(), 32, w, b), dtype)
        # A weight of 60 and biases from -150 to 150 take the SiLU's exp past its clamps (-87, 88) on both sides.
        wide_w, wide_b = torch.full((64,), 60.0).to(dtype), torch.linspace(-150, 150, 64).to(dtype)
        out = run("cpp", monkeypatch, ops.group_norm_silu, x, 32, wide_w, wide_b)
        want = ops.group_norm_silu_reference(x.double(), 32, wide_w.double(), wide_b.double())
        before_silu = F.group_norm(x.double(), 32, wide_w.double(), wide_b.double())
        assert before_silu.min() < -87 and before_silu.max() > 88
        assert_close_to_reference(out, want, dtype)
        # The transposing passes work in tiles of one vector of channels x one vector of positions: 40 channels and
        # 21 or 35 positions leave partial tiles on both sides for every vector width.
        for channels, groups, (h, w_) in [(64, 32, (3, 7)), (40, 8, (5, 7))]:
            wt, bt = affine(channels, generator)
            xt = torch.randn(2 * 5, channels, h, w_, generator=generator).to(dtype)
            out = run("cpp", monkeypatch, ops.temporal_group_norm, xt, 5, groups, wt, bt)
            assert_close_to_reference(out, ops.temporal_group_norm_reference(xt.double(), 5, groups, wt, bt), dtype)
            y = torch.randn(2 * h * w_, 5, channels, generator=generator).to(dtype)
            out = run("cpp", monkeypatch, ops.temporal_unpermute_residual, y, xt, 5)
            want = ops.temporal_unpermute_residual_reference(y.double(), xt.double(), 5)
            assert_close_to_reference(out, want, dtype)


def test_matches_torch_functional_and_accepts_views(monkeypatch):
    x = torch.randn(4, 16, 6, 6)
    w, b = torch.randn(16), torch.randn(16)
    torch.testing.assert_close(ops.group_norm_silu(x, 4, w, b), F.silu(F.group_norm(x, 4, w, b, 1e-5)),
                               atol=1e-5, rtol=1e-5)
    view = torch.randn(16, 4, 6, 6).transpose(0, 1)  # non-contiguous
    torch.testing.assert_close(ops.group_norm_silu(view, 4, w, b, silu=False), F.group_norm(view, 4, w, b, 1e-5),
                               atol=1e-5, rtol=1e-5)
    bf16_affine = ops.group_norm_silu(x.bfloat16(), 4, w.bfloat16(), b.bfloat16())
    assert bf16_affine.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", backends_usable_here(TEMPORAL_GROUP_NORM))
@pytest.mark.parametrize("dtype", DTYPES)
def test_temporal_group_norm_matches_diffusers_layout(backend, dtype, monkeypatch, poisoned_outputs):
    for index, (batch, frames, channels, h, w_, groups) in enumerate(TEMPORAL_SHAPES):
        generator = torch.Generator().manual_seed(10 + index)
        x = torch.randn(batch * frames, channels, h, w_, generator=generator).to(backend_device(backend), dtype)
        weight, bias = affine(channels, generator, device=x.device)
        out = run(backend, monkeypatch, ops.temporal_group_norm, x, frames, groups, weight, bias, 1e-6)
        assert out.shape == (batch * h * w_, frames, channels)
        assert_close_to_reference(out, ops.temporal_group_norm_reference(x.double(), frames, groups, weight, bias, 1e-6), dtype)


@pytest.mark.parametrize("backend", backends_usable_here(UNPERMUTE_RESIDUAL))
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_residual(backend, dtype, monkeypatch, poisoned_outputs):
    for index, (batch, frames, channels, h, w_, _) in enumerate(TEMPORAL_SHAPES):
        generator = torch.Generator().manual_seed(20 + index)
        residual = torch.randn(batch * frames, channels, h, w_, generator=generator).to(backend_device(backend), dtype)
        y = torch.randn(batch * h * w_, frames, channels, generator=generator).to(residual.device, dtype)
        out = run(backend, monkeypatch, ops.temporal_unpermute_residual, y, residual, frames)
        want = ops.temporal_unpermute_residual_reference(y.double(), residual.double(), frames)
        assert_close_to_reference(out, want, dtype)


def test_reference_equals_diffusers_motion_module_norm():
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    block = AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
                                     positional_embeddings="sinusoidal", num_positional_embeddings=32).eval()
    with torch.no_grad():
        block.proj_out.weight.normal_()
    captured = {}
    def capture(module, args, kwargs):  # diffusers calls proj_in(input=...) by keyword
        captured["normed"] = kwargs.get("input", args[0] if args else None)

    block.proj_in.register_forward_pre_hook(capture, with_kwargs=True)
    x = torch.randn(2 * 5, 16, 3, 4)
    with torch.no_grad():
        expected = block(x, num_frames=5)
        normed = ops.temporal_group_norm(x, 5, 4, block.norm.weight, block.norm.bias, block.norm.eps)
        torch.testing.assert_close(normed, captured["normed"], atol=1e-5, rtol=1e-5)
        hidden = block.proj_in(normed)
        for transformer in block.transformer_blocks:
            hidden = transformer(hidden)
        out = ops.temporal_unpermute_residual(block.proj_out(hidden), x, 5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backends_usable_here(GROUP_NORM_SILU) + ["eager"])
def test_gradients(backend, monkeypatch):
    monkeypatch.setenv("ANIMATELCM_BACKEND", backend)
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 5, 5, generator=generator).to(device).requires_grad_()
    w, b = (t.requires_grad_() for t in affine(8, generator, device=device))
    grad = torch.randn(x.shape, generator=generator).to(device)
    got = torch.autograd.grad(ops.group_norm_silu(x, 2, w, b), (x, w, b), grad)
    want = torch.autograd.grad(F.silu(F.group_norm(x, 2, w, b, 1e-5)), (x, w, b), grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)

    xt = torch.randn(2 * 3, 8, 2, 3, generator=generator).to(device).requires_grad_()
    grad_t = torch.randn(2 * 2 * 3, 3, 8, generator=generator).to(device)
    got = torch.autograd.grad(ops.temporal_group_norm(xt, 3, 2, w, b), (xt, w, b), grad_t)
    want = torch.autograd.grad(ops.temporal_group_norm_reference(xt, 3, 2, w, b), (xt, w, b), grad_t)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64():
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.group_norm_silu(t[0], 3, t[1], t[2]), (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: ops.group_norm_silu(t[0], 3, t[1], t[2], silu=False), (x, w, b))
    xt = torch.randn(2 * 2, 6, 2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.temporal_group_norm(t[0], 2, 3, t[1], t[2]), (xt, w, b))
    y = torch.randn(2 * 2, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, r: ops.temporal_unpermute_residual(a, r, 2), (y, xt))


def test_opcheck():
    x = torch.randn(2, 8, 3, 3)
    w, b = torch.randn(8), torch.randn(8)
    torch.library.opcheck(torch.ops.animatelcm.group_norm_silu.default, (x, 4, w, b, 1e-5, True, "auto"))
    torch.library.opcheck(torch.ops.animatelcm.group_norm_silu.default,
                          (x.requires_grad_(), 2, w.requires_grad_(), None, 1e-5, False, "eager"))
    channels_last = torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.animatelcm.group_norm_silu.default, (channels_last, 4, w, b, 1e-5, True, "auto"))
    xt = torch.randn(2 * 4, 8, 2, 3)
    torch.library.opcheck(torch.ops.animatelcm.temporal_group_norm.default, (xt, 4, 2, w, b, 1e-6, "auto"))
    y = torch.randn(2 * 6, 4, 8)
    torch.library.opcheck(torch.ops.animatelcm.temporal_unpermute_residual.default, (y, xt, 4, "auto"))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="divisor of the 6 channels"):
        ops.group_norm_silu(x, 4)
    with pytest.raises(TypeError, match="float32"):
        ops.group_norm_silu(x.long(), 2)
    with pytest.raises(ValueError, match="weight must be a tensor of shape"):
        ops.group_norm_silu(x, 2, torch.randn(5))
    with pytest.raises(ValueError, match="eps"):
        ops.group_norm_silu(x, 2, eps=-1)
    with pytest.raises(ValueError, match="move them"):
        ops.group_norm_silu(x, 2, torch.randn(6, device="meta"))
    with pytest.raises(ValueError, match="num_frames"):
        ops.temporal_group_norm(x, 3, 2)
    with pytest.raises(ValueError, match=r"must be \[B\*F, C, H, W\]"):
        ops.temporal_group_norm(x[0], 1, 2)
    with pytest.raises(ValueError, match="y must be"):
        ops.temporal_unpermute_residual(torch.randn(3, 2, 6), x, 2)
    with pytest.raises(ValueError, match="share dtype"):
        ops.temporal_unpermute_residual(torch.randn(16, 2, 6).double(), x, 2)


@pytest.mark.parametrize("backend", backends_usable_here(GROUP_NORM_SILU))
def test_empty_tensors(backend, monkeypatch):
    """No rows (batch 0) or no positions: empty outputs of the right shape and layout, as PyTorch's."""
    weight, bias = affine(6, torch.Generator().manual_seed(0), device=backend_device(backend))
    for shape in [(0, 6, 4, 4), (2, 6, 0, 4), (0, 6)]:
        x = torch.randn(shape, device=backend_device(backend))
        out = run(backend, monkeypatch, ops.group_norm_silu, x, 3, weight, bias)
        assert out.shape == x.shape
        if x.dim() == 4:
            channels_last = run(backend, monkeypatch, ops.group_norm_silu, x.to(memory_format=torch.channels_last), 3)
            assert channels_last.shape == x.shape
    for frames_first in [torch.randn(0, 6, 4, 4), torch.randn(8, 6, 0, 4)]:
        rows = run(backend, monkeypatch, ops.temporal_group_norm, frames_first.to(backend_device(backend)), 4, 3)
        assert rows.shape == (frames_first.shape[0] // 4 * frames_first.shape[2] * frames_first.shape[3], 4, 6)
    residual = torch.randn(0, 6, 4, 4, device=backend_device(backend))
    back = run(backend, monkeypatch, ops.temporal_unpermute_residual, residual.new_empty(0, 4, 6), residual, 4)
    assert back.shape == residual.shape


def test_nan_stays_in_its_group(monkeypatch):
    for backend in backends_usable_here(GROUP_NORM_SILU):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 4, 3, 3, device=backend_device(backend))
            x[1, 2, 1, 1] = float("nan")
            out = run(backend, monkeypatch, ops.group_norm_silu, x.contiguous(memory_format=layout), 2)
            assert torch.isnan(out[1, 2:]).all() and torch.isfinite(out[0]).all()
            assert torch.isfinite(out[1, :2]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_groups_read_once_match_reference(dtype, poisoned_outputs):
    """The CUDA kernel reads a group from memory once when it can: kept in one block's shared memory if it fits
    there, or (asked for with cluster_packs, on sm_90) held in the registers of a thread block cluster (up to 8
    blocks of 256 threads, 8 16-byte packs a thread); both need 16-byte packs and at least two blocks an SM. Every
    path (as dispatched, cluster sizes, shared memory only, the three launches) matches the reference, with and
    without weight, bias and SiLU, and the profiler shows which one ran."""
    from animatelcm.ops import group_norm

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hopper = torch.cuda.get_device_capability(0)[0] >= 9
    # (shape, groups, fits one block's shared memory, fits a cluster)
    cases = [((2 * sms // 8 + 3, 64, 16, 16), 8, True, True),  # 2048-element groups
             ((-(-2 * sms // 32), 320, 64, 64), 32, dtype != torch.float32, True),  # SD1.5's 64x64 level
             ((sms, 96, 9, 7), 32, False, False),  # 63 positions: no 16-byte packs
             ((1, 64, 8, 8), 4, False, False),  # 4 groups
             ((1, 32, 384, 384), 32, False, False)]  # 147456-element groups: too large for either

    def kernels(call):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            out = call()
            torch.cuda.synchronize()
        return out, " ".join(event.name for event in profile.events())

    for index, (shape, groups, fits_shared, fits_cluster) in enumerate(cases):
        generator = torch.Generator().manual_seed(index)
        x = (torch.randn(shape, generator=generator) * 3 + 1).to("cuda", dtype)
        weight, bias = affine(shape[1], generator, dtype, device="cuda")
        # weight and bias as stored (x's dtype), absent, one absent, and of two dtypes (both then read as float32)
        for w, b, silu in ((weight, bias, True), (None, None, False), (weight, None, True),
                           (weight, bias.float(), True)):
            want = ops.group_norm_silu_reference(x.double(), groups, w, b, 1e-5, silu)
            paths = [("as dispatched", None, "resident" if fits_shared else None),
                     ("shared memory only", dict(cluster_packs=0), "resident" if fits_shared else None),
                     ("three launches", dict(cluster_packs=0, resident_groups=False), None)]
            if hopper:
                paths += [(f"cluster of {packs} packs a thread", dict(cluster_packs=packs),
                           "cluster" if fits_cluster else "resident" if fits_shared else None) for packs in (1, 4, 8)]
            for name, options, expected in paths:
                if options is None:
                    got, ran = kernels(lambda: ops.group_norm_silu(x, groups, w, b, 1e-5, silu, backend="cuda"))
                else:
                    got, ran = kernels(lambda: group_norm._native_group_norm(
                        "group_norm_cuda", group_norm._cuda_extra, x, shape[0], 1, groups, w, b, 1e-5, silu, False,
                        **options))
                for path in ("cluster", "resident"):
                    assert (f"group_norm_{path}_kernel" in ran) == (expected == path), (shape, dtype, name, ran[:300])
                assert_close_to_reference(got, want, dtype)
