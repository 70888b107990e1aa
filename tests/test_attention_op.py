import pytest
import torch
import torch.nn.functional as F

from animatelcm import ops
from animatelcm.ops import native
from animatelcm.ops.attention import IMPLEMENTATIONS
from conftest import CPU_ISAS, assert_close_to_reference, backend_device, backends_usable_here

BACKENDS = backends_usable_here(IMPLEMENTATIONS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FRAMES = [1, 7, 13, 16, 24, 32]
HEAD_DIMS = [8, 40, 72, 80, 160]


def make(shape, dtype, seed, layout="contiguous", device="cpu"):
    """q, k, v of `shape` [N, heads, F, D] on `device`; layout 'projection' gives the [N, F, heads, D] tensor seen
    through a transpose (what attention processors produce), without a copy."""
    generator = torch.Generator().manual_seed(seed)
    n, heads, frames, dim = shape
    tensors = []
    for _ in range(3):
        if layout == "projection":
            t = torch.randn(n, frames, heads, dim, generator=generator).to(device, dtype).transpose(1, 2)
        else:
            t = torch.randn(shape, generator=generator).to(device, dtype)
        tensors.append(t)
    return tensors


def run(backend, monkeypatch, *args, **kwargs):
    monkeypatch.setenv("ANIMATELCM_BACKEND", backend)
    return ops.temporal_attention(*args, **kwargs)


def shapes_for(backend):
    # The Triton interpreter is slow: a diagonal of the matrix; the C++ kernel gets the full product.
    if backend == "triton":
        return [(3, 2, f, d) for f, d in zip(FRAMES, HEAD_DIMS + [40])]
    return [(3, 5, f, d) for f in FRAMES for d in HEAD_DIMS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "projection"])
def test_matches_float64_reference(backend, dtype, layout, monkeypatch, poisoned_outputs):
    for index, shape in enumerate(shapes_for(backend)):
        q, k, v = make(shape, dtype, seed=index, layout=layout, device=backend_device(backend))
        out = run(backend, monkeypatch, q, k, v)
        assert out.shape == q.shape
        assert_close_to_reference(out, ops.temporal_attention_reference(q.double(), k.double(), v.double()), dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_cpu_isa_build(isa, monkeypatch, poisoned_outputs):
    if "cpp" not in BACKENDS:
        pytest.skip("native module not built")
    monkeypatch.setenv("ANIMATELCM_CPU_ISA", isa)
    for frames, dim in [(16, 40), (7, 72), (33, 8), (64, 160)]:
        for dtype in DTYPES:
            q, k, v = make((2, 3, frames, dim), dtype, seed=frames + dim)
            out = run("cpp", monkeypatch, q, k, v, scale=0.3)
            assert_close_to_reference(out, ops.temporal_attention_reference(q.double(), k.double(), v.double(), 0.3), dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_calls_larger_than_the_cache_stream_their_output(isa, monkeypatch, poisoned_outputs):
    # When q, k, v and out exceed the last-level cache (made 1 MiB here) the C++ kernel stages each sequence's output
    # and writes it with streaming stores; these sequence blocks (1872 and 112 bytes) mostly start and end off a
    # vector boundary. The projection layout (rows not contiguous) keeps the direct stores.
    if "cpp" not in BACKENDS:
        pytest.skip("native module not built")
    monkeypatch.setenv("ANIMATELCM_CPU_ISA", isa)
    monkeypatch.setattr(native, "last_level_cache_bytes", lambda: 1 << 20)
    for dtype, (frames, dim), layout in [(torch.float32, (16, 40), "contiguous"), (torch.bfloat16, (13, 72), "contiguous"),
                                         (torch.float16, (7, 8), "contiguous"), (torch.float32, (16, 40), "projection")]:
        batch = (1 << 20) // (3 * frames * dim * dtype.itemsize) + 1
        q, k, v = make((batch, 3, frames, dim), dtype, seed=frames, layout=layout)
        assert native.exceeds_last_level_cache(q, k, v)
        out = run("cpp", monkeypatch, q, k, v)
        assert_close_to_reference(out, ops.temporal_attention_reference(q.double(), k.double(), v.double()), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_keeps_projection_layout_and_odd_leading_dims(backend, monkeypatch):
    device = backend_device(backend)
    q, k, v = make((5, 3, 16, 40), torch.float32, seed=3, layout="projection", device=device)
    out = run(backend, monkeypatch, q, k, v)
    assert out.stride() == q.stride()  # written straight into [N, F, heads, D] memory
    five_d = torch.randn(2, 3, 4, 9, 8, device=device)  # three leading dims, a sliced (non-mergeable) view
    sliced = five_d[:, 1:]
    out = run(backend, monkeypatch, sliced, sliced, sliced)
    assert_close_to_reference(out, ops.temporal_attention_reference(*(sliced.double(),) * 3), torch.float32)
    two_d = torch.randn(6, 8, device=device)
    assert_close_to_reference(run(backend, monkeypatch, two_d, two_d, two_d),
                              ops.temporal_attention_reference(*(two_d.double(),) * 3), torch.float32)


def test_batch_beyond_the_65535_grid_limit(monkeypatch):
    q, k, v = make((9000, 8, 2, 8), torch.float32, seed=0)  # 72,000 sequences
    backend = "cpp" if "cpp" in BACKENDS else "eager"
    out = run(backend, monkeypatch, q, k, v)
    assert_close_to_reference(out, ops.temporal_attention_reference(q.double(), k.double(), v.double()), torch.float32)


def test_matches_sdpa_semantics():
    q, k, v = make((4, 2, 16, 40), torch.float32, seed=1)
    torch.testing.assert_close(ops.temporal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.temporal_attention(q, k, v, scale=0.5),
                               F.scaled_dot_product_attention(q, k, v, scale=0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["eager"])
def test_other_key_lengths_and_value_widths_as_sdpa(backend, monkeypatch):
    """k, v of another length than q, or v of another width: SDPA's semantics, on the eager reference (the kernels
    say why they decline), with gradients, under the custom op's fake implementation too."""
    generator = torch.Generator().manual_seed(3)
    for q_shape, k_shape, v_shape in [((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 8)), ((5, 16, 40), (5, 1, 40), (5, 1, 24)),
                                      ((2, 2, 4, 8), (2, 2, 4, 8), (2, 2, 4, 3))]:
        q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in (q_shape, k_shape, v_shape))
        if backend != "eager":
            on_device = (t.float().to(backend_device(backend)) for t in (q, k, v))
            assert "self-attention" in dict(ops.explain_temporal_attention(*on_device))[backend]
        out = run("auto" if backend != "eager" else "eager", monkeypatch, q, k, v, scale=0.4)
        assert out.shape == (*q_shape[:-1], v_shape[-1])
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.4))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(lambda a, b, c: ops.temporal_attention(a, b, c, scale=0.4), leaves)
        torch.library.opcheck(torch.ops.animatelcm.temporal_attention.default, (q.float(), k.float(), v.float(), 0.4,
                                                                                "auto"))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "projection"])
def test_long_sequences_on_the_cpu(isa, layout, monkeypatch, poisoned_outputs):
    """Beyond 64 frames the C++ kernel streams the softmax over key blocks (64 keys) and query blocks (16-64
    queries by ISA): lengths off every block boundary, every head dim, and scores whose maximum moves between key
    blocks (late keys larger, early keys larger) so the running max rescales what is accumulated."""
    if "cpp" not in BACKENDS:
        pytest.skip("native module not built")
    monkeypatch.setenv("ANIMATELCM_CPU_ISA", isa)
    for index, (frames, dim) in enumerate([(65, 8), (127, 40), (129, 72), (200, 80), (333, 160)]):
        for dtype in DTYPES:
            q, k, v = make((2, 3, frames, dim), dtype, seed=index, layout=layout)
            out = run("cpp", monkeypatch, q, k, v)
            assert out.shape == q.shape
            assert_close_to_reference(out, ops.temporal_attention_reference(q.double(), k.double(), v.double()), dtype)
    q, k, v = make((1, 2, 300, 40), torch.float32, seed=9, layout=layout)
    ramp = torch.linspace(0.1, 4.0, 300)[:, None]
    for keys in (k * ramp, k * ramp.flip(0)):
        out = run("cpp", monkeypatch, q * 3, keys, v)
        reference = ops.temporal_attention_reference(q.double() * 3, keys.double(), v.double())
        assert_close_to_reference(out, reference, torch.float32)


def test_large_head_dim_and_frames_fall_back_to_eager(monkeypatch):
    report = dict(ops.explain_temporal_attention(*make((1, 1, 65, 8), torch.float32, 0)))
    assert report["eager"] is None and report["cpp"] == native.native_unavailable_reason()  # any length on the CPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernel's own limits, as on a GPU
    from animatelcm.ops.attention import _reject_triton

    q = torch.randn(1, 1, 65, 8)
    assert "frames <= 64" in _reject_triton(q, q, q, 1.0)
    q = torch.randn(1, 1, 4, 200)
    assert "head_dim" in dict(ops.explain_temporal_attention(q, q, q))["cpp"]
    torch.testing.assert_close(ops.temporal_attention(q, q, q), ops.temporal_attention_reference(q, q, q))


@pytest.mark.parametrize("backend", BACKENDS + ["eager"])
def test_gradients_match_autograd_of_reference(backend, monkeypatch):
    device = backend_device(backend)
    q, k, v = (t.requires_grad_() for t in make((2, 3, 13, 40), torch.float32, seed=5, layout="projection",
                                                device=device))
    grad = torch.randn(q.shape, device=device)
    out = run(backend, monkeypatch, q, k, v)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(F.scaled_dot_product_attention(qr, kr, vr), (qr, kr, vr), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.temporal_attention(a, b, c, scale=0.7), (q, k, v))


def test_opcheck():
    q, k, v = make((2, 3, 16, 8), torch.float32, seed=2, layout="projection")
    for args in ((q, k, v, 0.35, "auto"),
                 tuple(t.requires_grad_() for t in make((1, 2, 7, 8), torch.float32, 3)) + (0.5, "cpp")):
        torch.library.opcheck(torch.ops.animatelcm.temporal_attention.default, args)


def test_traces_under_torch_compile_without_graph_breaks():
    q, k, v = make((2, 2, 16, 8), torch.float32, seed=4)
    compiled = torch.compile(lambda a, b, c: ops.temporal_attention(a, b, c) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), ops.temporal_attention(q, k, v) * 2)


@pytest.mark.parametrize("backend", BACKENDS + ["eager"])
def test_leading_dims_broadcast_as_in_sdpa(backend, monkeypatch):
    """k, v of batch 1 against q of batch N (and heads against batch): stride-0 views on every backend, SDPA's
    result; gradients (the reference's, float64, so checked once) summed over the broadcast dims."""
    generator = torch.Generator().manual_seed(5)
    for q_shape, kv_shape in [((3, 2, 16, 40), (1, 2, 16, 40)), ((3, 1, 7, 8), (1, 4, 7, 8)), ((5, 13, 72), (13, 72))]:
        q = torch.randn(q_shape, generator=generator, dtype=torch.float64)
        k, v = (torch.randn(kv_shape, generator=generator, dtype=torch.float64) for _ in range(2))
        expected = F.scaled_dot_product_attention(q, k, v)
        on_device = [t.float().to(backend_device(backend)) for t in (q, k, v)]
        out = run(backend, monkeypatch, *on_device)
        assert out.shape == expected.shape
        assert_close_to_reference(out, expected, torch.float32)
        monkeypatch.delenv("ANIMATELCM_BACKEND")
        if backend == "eager":
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]  # float64: the reference, under "auto"
            assert torch.autograd.gradcheck(lambda a, b, c: ops.temporal_attention(a, b, c, backend="auto"), leaves,
                                            fast_mode=True)


def test_nan_reaches_rows_that_attend_to_it(monkeypatch):
    for backend in BACKENDS:
        q, k, v = make((1, 1, 6, 8), torch.float32, seed=6, device=backend_device(backend))
        v[0, 0, 2, 3] = float("nan")
        out = run(backend, monkeypatch, q, k, v)
        assert torch.isnan(out[..., 3]).all() and torch.isfinite(out[..., [0, 1, 2, 4, 5, 6, 7]]).all()


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match="one shape"):
        ops.temporal_attention(q, q, q[:, :, :3])  # k and v of different lengths
    with pytest.raises(ValueError, match="leading dims that broadcast"):
        ops.temporal_attention(q, q[:1, :2], q[:1, :2])
    with pytest.raises(ValueError, match=r"\[\.\.\., S, D\]"):
        ops.temporal_attention(q, q[..., :4], q)
    with pytest.raises(TypeError, match="floating dtype"):
        ops.temporal_attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="floating dtype"):
        ops.temporal_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="different devices"):
        ops.temporal_attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="frames, head_dim"):
        ops.temporal_attention(q[0, 0, 0], q[0, 0, 0], q[0, 0, 0])
    with pytest.raises(ValueError, match="scale"):
        ops.temporal_attention(q, q, q, scale=float("nan"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.temporal_attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match="head_dim is 0.*pass scale"):
        ops.temporal_attention(q[..., :0], q[..., :0], q[..., :0])


def test_auto_prefers_cpp_over_the_triton_interpreter_on_cpu():
    q = torch.randn(1, 2, 8, 8)
    report = ops.explain_temporal_attention(q, q, q)
    first_accepting = next(backend for backend, reason in report if reason is None)
    assert first_accepting == ("cpp" if "cpp" in BACKENDS else "eager" if "triton" not in BACKENDS else "triton")


def test_profiler_sees_the_op_by_name():
    """Inference calls skip the torch.library layer, except while torch.profiler records."""
    q = torch.randn(2, 2, 8, 16)
    with torch.profiler.profile() as profile:
        ops.temporal_attention(q, q, q)
    assert any(event.key == "animatelcm::temporal_attention" for event in profile.key_averages())
