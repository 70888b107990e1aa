import importlib

import pytest
import torch
import torch.nn.functional as F

from animatelcm import ops
from animatelcm.ops import native
from animatelcm.ops.geglu import IMPLEMENTATIONS, LINEAR_GEGLU_IMPLEMENTATIONS
from conftest import CPU_ISAS, assert_close_to_reference, backend_device, backends_usable_here

BACKENDS = backends_usable_here(IMPLEMENTATIONS)
geglu_module = importlib.import_module("animatelcm.ops.geglu")  # `ops.geglu` is the function
SHAPES = [(3, 7, 2 * 40), (2, 16, 2 * 1280), (5, 2), (1, 1, 1, 2 * 13)]


@pytest.mark.parametrize("backend", BACKENDS + ["eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_reference(backend, dtype, monkeypatch, poisoned_outputs):
    for index, shape in enumerate(SHAPES):
        generator = torch.Generator().manual_seed(index)
        x = (torch.randn(shape, generator=generator) * 3).to(backend_device(backend), dtype)
        bias = torch.randn(shape[-1], generator=generator).to(x.device, dtype)
        out = ops.geglu(x, backend=backend)
        assert out.shape == (*shape[:-1], shape[-1] // 2)
        assert_close_to_reference(out, ops.geglu_reference(x.double()), dtype)
        # the bias is added in float32 inside the op; the reference adds it in float64
        assert_close_to_reference(ops.geglu(x, bias, backend=backend), ops.geglu_reference(x.double(), bias.double()),
                                  dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_cpu_isa_and_diffusers_geglu(isa, monkeypatch):
    if "cpp" not in BACKENDS:
        pytest.skip("native module not built")
    from diffusers.models.activations import GEGLU

    monkeypatch.setenv("ANIMATELCM_CPU_ISA", isa)
    module = GEGLU(24, 40).eval()
    h = torch.randn(4, 9, 24)
    with torch.no_grad():
        torch.testing.assert_close(ops.geglu(module.proj(h), backend="cpp"), module(h), atol=2e-6, rtol=2e-5)
        unbiased = F.linear(h, module.proj.weight)
        torch.testing.assert_close(ops.geglu(unbiased, module.proj.bias, backend="cpp"), module(h), atol=2e-6,
                                   rtol=2e-5)
    extreme = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 1e-30, 5.0, 30.0, 1e4, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(ops.geglu(extreme, backend="cpp"), ops.geglu_reference(extreme), atol=1e-6, rtol=1e-5)


def test_strided_input_and_nan():
    x = torch.randn(6, 8, 4).transpose(0, 1)  # non-contiguous [8, 6, 4]
    torch.testing.assert_close(ops.geglu(x), ops.geglu_reference(x))
    y = torch.randn(2, 8)
    y[1, 5] = float("nan")  # gate of column 1 in row 1
    out = ops.geglu(y)
    assert torch.isnan(out[1, 1]) and torch.isfinite(out[0]).all() and torch.isfinite(out[1, [0, 2, 3]]).all()


def test_gradients_and_opcheck():
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.geglu, (x,))
    xf = torch.randn(5, 12, requires_grad=True)
    grad = torch.randn(5, 6)
    got = torch.autograd.grad(ops.geglu(xf), xf, grad)[0]
    hidden, gate = xf.chunk(2, dim=-1)
    want = torch.autograd.grad(hidden * F.gelu(gate), xf, grad)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.geglu, (x, b))
    torch.library.opcheck(torch.ops.animatelcm.geglu.default, (torch.randn(3, 8), None, "auto"))
    torch.library.opcheck(torch.ops.animatelcm.geglu.default, (torch.randn(3, 8, requires_grad=True), None, "eager"))
    torch.library.opcheck(torch.ops.animatelcm.geglu.default,
                          (torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True), "auto"))


def test_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        ops.geglu(torch.randn(3, 5))
    with pytest.raises(TypeError, match="float32"):
        ops.geglu(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.geglu([1.0, 2.0])
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(4,\)"):
        ops.geglu(torch.randn(3, 4), torch.randn(2))


LINEAR_BACKENDS = backends_usable_here(LINEAR_GEGLU_IMPLEMENTATIONS)
# (leading shape of x, K, 2I): odd sizes, one row, a 4-D x; several of the Triton kernel's 128 x 64 output tiles
# with partial ones and K across two of its 64-deep steps; more row tiles than one group of 8
LINEAR_SHAPES = [((3, 7), 24, 80), ((1,), 5, 2), ((2, 3, 11), 40, 2 * 72), ((97,), 16, 30), ((5, 61), 72, 2 * 130),
                 ((1100,), 8, 2 * 10)]


@pytest.mark.parametrize("backend", LINEAR_BACKENDS + ["eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "row-blocks"])
def test_linear_geglu_matches_float64_reference(backend, dtype, blocked, monkeypatch, poisoned_outputs):
    if blocked:  # 256-byte "caches", no row floor: blocks of a few rows, a partial last block, always blocked
        monkeypatch.setattr(geglu_module, "core_cache_bytes", lambda: 256)
        monkeypatch.setattr(geglu_module, "MIN_BLOCK_ROWS", 1)
    for index, (lead, k, width) in enumerate(LINEAR_SHAPES):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(*lead, k, generator=generator).to(backend_device(backend), dtype)
        weight = (torch.randn(width, k, generator=generator) / k**0.5).to(x.device, dtype)
        bias = torch.randn(width, generator=generator).to(x.device, dtype)
        for b in (None, bias):
            out = ops.linear_geglu(x, weight, b, backend=backend)
            assert out.shape == (*lead, width // 2) and out.is_contiguous()
            want = ops.linear_geglu_reference(x.double(), weight.double(), None if b is None else b.double())
            assert_close_to_reference(out, want, dtype)


def test_linear_geglu_strided_input_and_diffusers_geglu():
    from diffusers.models.activations import GEGLU

    module = GEGLU(24, 40).eval()
    h = torch.randn(9, 4, 24).transpose(0, 1)  # non-contiguous [4, 9, 24]
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_geglu(h, module.proj.weight, module.proj.bias), module(h),
                                   atol=2e-6, rtol=2e-5)


def test_linear_geglu_gradients_and_opcheck():
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.linear_geglu, (x, weight))
    assert torch.autograd.gradcheck(ops.linear_geglu, (x, weight, bias))
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    grad = torch.randn(3, 4, 5)
    got = torch.autograd.grad(ops.linear_geglu(xf, wf, bf), (xf, wf, bf), grad)
    want = torch.autograd.grad(ops.linear_geglu_reference(xf, wf, bf), (xf, wf, bf), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    op = torch.ops.animatelcm.linear_geglu.default
    torch.library.opcheck(op, (torch.randn(3, 8), torch.randn(6, 8), None, "auto"))
    torch.library.opcheck(op, (torch.randn(3, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True),
                               torch.randn(6, requires_grad=True), "auto"))


def test_linear_geglu_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"weight must be \[2I, K\]"):
        ops.linear_geglu(x, torch.randn(6, 5))
    with pytest.raises(ValueError, match="even number of rows"):
        ops.linear_geglu(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="must have x's dtype"):
        ops.linear_geglu(x, torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight must be float32"):
        ops.linear_geglu(x, torch.ones(6, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.linear_geglu([1.0], torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(6,\)"):
        ops.linear_geglu(x, torch.randn(6, 4), torch.randn(4))


def test_automatic_choice_passes_over_where_a_later_backend_was_measured_faster(monkeypatch):
    """An implementation's pass_over steers only the automatic choice (and says why in explain); forcing that
    backend still runs it. The Triton GEGLU projection passes float32 CUDA inputs, and small ones, over to cuBLAS + the
    CUDA GEGLU."""
    from types import SimpleNamespace

    from animatelcm.ops.dispatch import Implementation, explain, select

    implementations = [
        Implementation("triton", lambda x: "triton", lambda: None, lambda x: None,
                       lambda x: "slower here" if x < 0 else None),
        Implementation("eager", lambda x: "eager", lambda: None, lambda x: None),
    ]
    assert select("demo", implementations, 1).run(1) == "triton"
    assert select("demo", implementations, -1).run(-1) == "eager"
    assert select("demo", implementations, -1, backend="triton").run(-1) == "triton"
    assert explain(implementations, -1) == [("triton", "slower here"), ("eager", None)]

    pass_over = next(i for i in LINEAR_GEGLU_IMPLEMENTATIONS if i.backend == "triton").pass_over

    def fake(dtype, device, numel):
        return SimpleNamespace(dtype=dtype, is_cuda=device == "cuda", device=torch.device(device),
                               numel=lambda: numel)

    assert "cuBLAS" in pass_over(fake(torch.float32, "cuda", 2**30))
    for dtype, device in ((torch.float16, "cuda"), (torch.bfloat16, "cuda"), (torch.float32, "cpu")):
        assert pass_over(fake(dtype, device, 2**24)) is None
    monkeypatch.setattr(native, "cuda_kernels_unavailable_reason", lambda: None)  # as where _C has CUDA kernels
    assert "CUDA C++" in pass_over(fake(torch.float16, "cuda", 2**24 - 1))
    assert pass_over(fake(torch.float16, "cuda", 2**24)) is None
    assert pass_over(fake(torch.float16, "cpu", 10)) is None  # Triton under TRITON_INTERPRET=1 keeps CPU tensors
    assert [i.backend for i in LINEAR_GEGLU_IMPLEMENTATIONS] == ["cpp", "triton", "cuda", "eager"]


def test_small_inputs_pass_over_triton_only_to_a_cuda_twin_that_can_run_them(monkeypatch):
    """small_for_triton sends a small input to the CUDA C++ twin (cheaper launch), and only where that twin exists
    and takes the input: without _C's CUDA kernels, or for a dtype they lack, Triton keeps it."""
    from types import SimpleNamespace

    from animatelcm.ops.native import small_for_triton

    pass_over = small_for_triton(1000)
    small = SimpleNamespace(dtype=torch.float16, device=torch.device("cuda"), numel=lambda: 999)
    monkeypatch.setattr(native, "cuda_kernels_unavailable_reason", lambda: "built without CUDA")
    assert pass_over(small) is None
    monkeypatch.setattr(native, "cuda_kernels_unavailable_reason", lambda: None)
    assert "999 elements, fewer than 1000" in pass_over(small)
    assert pass_over(SimpleNamespace(dtype=torch.float16, device=torch.device("cuda"), numel=lambda: 1000)) is None
    assert pass_over(SimpleNamespace(dtype=torch.float64, device=torch.device("cuda"), numel=lambda: 5)) is None
