import importlib

import pytest
import torch
import torch.nn.functional as F

from animatelcm import ops

linear_module = importlib.import_module("animatelcm.ops.linear")  # `ops.linear` is the function
geglu_module = importlib.import_module("animatelcm.ops.geglu")
LIBRARIES = ["torch"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])
# [rows..., K] x [N, K]: above and below ONEDNN_MIN_MACS, 2-D and 3-D, odd sizes
SHAPES = [((4100, 80), 96), ((3, 1031, 40), 330), ((2, 7, 24), 5), ((1000, 1280), 33)]


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_float64_on_each_library(library, with_bias, monkeypatch):
    monkeypatch.setenv(linear_module.CPU_GEMM_ENV, library)
    for index, (x_shape, out_features) in enumerate(SHAPES):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(x_shape, generator=generator)
        weight = torch.randn(out_features, x_shape[-1], generator=generator) / x_shape[-1] ** 0.5
        bias = torch.randn(out_features, generator=generator) if with_bias else None
        big = x.numel() * out_features >= linear_module.ONEDNN_MIN_MACS
        assert linear_module.uses_onednn(x, weight, bias) == (library == "onednn" and big)
        out = ops.linear(x, weight, bias)
        reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
        assert out.dtype == torch.float32 and out.shape == reference.shape
        torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif("onednn" not in LIBRARIES, reason="PyTorch built without oneDNN")
def test_strided_inputs_and_the_rest_go_to_pytorch(monkeypatch):
    """oneDNN takes contiguous float32 inference calls; strided views (which its op misreads: a slice of the last
    dimension, say), other dtypes, 1-D inputs and autograd go to F.linear. Random strides and sizes, with every
    product sent to oneDNN where it qualifies."""
    monkeypatch.setenv(linear_module.CPU_GEMM_ENV, "onednn")
    monkeypatch.setattr(linear_module, "ONEDNN_MIN_MACS", 0)
    generator = torch.Generator().manual_seed(0)
    for index in range(60):
        k, n = 1 + index % 37, 1 + (index * 7) % 41
        x = torch.randn(3, 5, 2 * k, generator=generator)
        x = [x[..., :k], x[..., ::2], x[..., :k].contiguous(), x[..., :k].transpose(0, 1)][index % 4]
        weight = torch.randn(n, 2 * k, generator=generator)
        weight = weight[:, ::2] if index % 3 == 0 else weight[:, :k].contiguous()
        bias = [None, torch.randn(2 * n, generator=generator)[::2], torch.randn(n, generator=generator)][index % 3]
        contiguous = x.is_contiguous() and weight.is_contiguous() and (bias is None or bias.is_contiguous())
        assert linear_module.uses_onednn(x, weight, bias) == contiguous
        reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
        torch.testing.assert_close(ops.linear(x, weight, bias).double(), reference, atol=1e-5, rtol=1e-5)
    x, weight = torch.randn(3, 2000, 80), torch.randn(200, 80)
    assert linear_module.uses_onednn(x, weight, None)
    assert not linear_module.uses_onednn(x.bfloat16(), weight.bfloat16(), None)
    assert not linear_module.uses_onednn(x[0, 0], weight, None)  # 1-D input
    trainable = weight.clone().requires_grad_()
    assert not linear_module.uses_onednn(x, trainable, None)  # autograd goes through F.linear
    ops.linear(x, trainable).sum().backward()
    torch.testing.assert_close(trainable.grad, x.sum((0, 1)).expand(200, 80), atol=1e-2, rtol=1e-5)
    with torch.no_grad():
        assert linear_module.uses_onednn(x, trainable, None)
    with pytest.raises(RuntimeError):  # mismatched K: PyTorch's own error
        ops.linear(x, torch.randn(200, 81))


def test_library_choice(monkeypatch):
    monkeypatch.setenv(linear_module.CPU_GEMM_ENV, "blas")
    with pytest.raises(ValueError, match="ANIMATELCM_CPU_GEMM"):
        ops.cpu_gemm_library()
    monkeypatch.setenv(linear_module.CPU_GEMM_ENV, "torch")
    assert ops.cpu_gemm_library() == "torch"
    monkeypatch.setenv(linear_module.CPU_GEMM_ENV, "auto")
    expected = "onednn" if linear_module.onednn_is_measured_faster() else "torch"
    assert ops.cpu_gemm_library() == expected
    amd = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    assert linear_module.is_amd_with_avx512(amd)
    assert not linear_module.is_amd_with_avx512(amd.replace(" avx512f", ""))
    assert not linear_module.is_amd_with_avx512(amd.replace("AuthenticAMD", "GenuineIntel"))
    assert not linear_module.is_amd_with_avx512("processor\t: 0\nFeatures\t: fp asimd\n")


@pytest.mark.parametrize("library", LIBRARIES)
def test_linear_geglu_blocks_on_each_library(library, monkeypatch):
    """Enough rows for the blocked CPU path (the last block is a short one, below oneDNN's threshold)."""
    if "cpp" not in ops.available_backends():
        pytest.skip("native module not built")
    monkeypatch.setenv(linear_module.CPU_GEMM_ENV, library)
    rows = geglu_module.MIN_BLOCKS * max(geglu_module.MIN_BLOCK_ROWS, geglu_module.core_cache_bytes() // (640 * 4))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows + 5, 80, generator=generator)
    weight = torch.randn(640, 80, generator=generator) / 80 ** 0.5
    bias = torch.randn(640, generator=generator)
    out = ops.linear_geglu(x, weight, bias, backend="cpp")
    reference = ops.linear_geglu_reference(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("library", LIBRARIES)
def test_compiled_graphs_choose_the_library_when_they_run(library, monkeypatch):
    """Traced without gradients, a large float32 CPU product becomes the custom op animatelcm::linear (no graph
    break), which picks the library at run time; with gradients it stays F.linear, and they flow."""
    monkeypatch.setenv(linear_module.CPU_GEMM_ENV, library)
    x, weight, bias = torch.randn(2, 1000, 96), torch.randn(400, 96) / 10, torch.randn(400)
    assert x.numel() * 400 >= linear_module.ONEDNN_MIN_MACS
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, w, b: ops.linear(a, w, b) * 2, backend="aot_eager", fullgraph=True)
    decisions = []
    monkeypatch.setattr(linear_module, "uses_onednn",
                        lambda *a, _real=linear_module.uses_onednn: decisions.append(_real(*a)) or decisions[-1])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, weight, bias), F.linear(x, weight, bias) * 2, atol=1e-4, rtol=1e-5)
    assert decisions == [library == "onednn"]  # made once, inside the custom op, when the graph ran
    trainable = weight.clone().requires_grad_()
    compiled(x, trainable, bias).sum().backward()
    torch.testing.assert_close(trainable.grad, 2 * x.sum((0, 1)).expand(400, 96), atol=1e-2, rtol=1e-5)
    torch.library.opcheck(linear_module._linear_op, (x, weight, bias))
    torch.library.opcheck(linear_module._linear_op, (x[:, :5], weight, None))
