import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from animatelcm import ops
from conftest import assert_close_to_reference, backend_device, backends_usable_here

layer_norm_module = importlib.import_module("animatelcm.ops.layer_norm")  # `ops.layer_norm` is the function
BACKENDS = backends_usable_here(layer_norm_module.IMPLEMENTATIONS)
# x's shape: odd widths, one row, more rows than a program's tile (8 rows of 320 in 512 columns), a width above the
# tile (one row a program), 2-D and 4-D inputs
SHAPES = [(3, 7, 40), (1, 1, 13), (2, 16, 320), (37, 1280), (2, 3, 5, 72), (3, 5000)]


def _inputs(shape, dtype, device, seed, affine=True, addend_rows=None):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3 + 1).to(device, dtype)
    residual = torch.randn(shape, generator=generator).to(device, dtype)
    weight = torch.randn(shape[-1], generator=generator).to(device, dtype) if affine else None
    bias = torch.randn(shape[-1], generator=generator).to(device, dtype) if affine else None
    addend = None
    if addend_rows is not None:
        leading = (1,) * (len(shape) - 2)  # [1, ..., L, C]: the positional embedding's [1, F, C] for 3-D x
        addend = torch.randn(*leading, addend_rows, shape[-1], generator=generator).to(device, dtype)
    return x, residual, weight, bias, addend


def _double(*tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS + ["eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_reference(backend, dtype, poisoned_outputs):
    for index, shape in enumerate(SHAPES):
        device = backend_device(backend)
        for affine, addend_rows in ((True, None), (False, None), (True, shape[-2] if len(shape) > 1 else 1), (True, 1)):
            x, residual, weight, bias, addend = _inputs(shape, dtype, device, index, affine, addend_rows)
            eps = 1e-5 if affine else 1e-6
            out = ops.layer_norm(x, weight, bias, eps, addend, backend=backend)
            assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
            want = ops.layer_norm_reference(*_double(x, weight, bias), eps, *_double(addend))
            assert_close_to_reference(out, want, dtype)

            total, normed = ops.residual_layer_norm(x, residual, weight, bias, eps, addend, backend=backend)
            assert total.shape == normed.shape == x.shape and total.is_contiguous() and normed.is_contiguous()
            # the sum is rounded to the storage dtype before it is normalised, as PyTorch's add then LayerNorm do
            assert_close_to_reference(total, x.double() + residual.double(), dtype)
            want_total, want = ops.residual_layer_norm_reference(total.double(), None, *_double(weight, bias), eps,
                                                                 *_double(addend))
            assert_close_to_reference(normed, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_diffusers_op_sequence(backend):
    """In float32 the fused op gives what the block's ops give (add, LayerNorm, positional embedding add) to float32
    rounding, on diffusers' own modules."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    device = backend_device(backend)
    norm = torch.nn.LayerNorm(48).to(device)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    pos_embed = SinusoidalPositionalEmbedding(48, 32).to(device)
    attn_output, hidden = torch.randn(2, 2, 13, 48, device=device).unbind(0)
    total, normed = ops.residual_layer_norm(attn_output, hidden, norm.weight, norm.bias, norm.eps,
                                            pos_embed.pe[:, :13], backend=backend)
    with torch.no_grad():
        want_total = attn_output + hidden
        want = pos_embed(norm(want_total))
    torch.testing.assert_close(total, want_total, atol=0, rtol=0)
    torch.testing.assert_close(normed, want, atol=2e-6, rtol=2e-5)


def test_strided_inputs_nan_and_empty():
    x = torch.randn(6, 9, 20).transpose(0, 1)  # non-contiguous [9, 6, 20]
    residual = torch.randn(20, 6, 9).permute(2, 1, 0)
    total, normed = ops.residual_layer_norm(x, residual, eps=1e-5)
    torch.testing.assert_close(total, x + residual)
    torch.testing.assert_close(normed, F.layer_norm(x + residual, (20,), eps=1e-5))
    for backend in BACKENDS + ["eager"]:
        device = backend_device(backend)
        y = torch.randn(3, 8, device=device)
        y[1, 5] = float("nan")
        out = ops.layer_norm(y, backend=backend)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
        empty = torch.randn(0, 4, 8, device=device)
        total, normed = ops.residual_layer_norm(empty, empty, backend=backend)
        assert total.shape == normed.shape == (0, 4, 8)


def test_gradients_and_opcheck():
    x, residual, weight, bias = (torch.randn(shape, dtype=torch.float64, requires_grad=True)
                                 for shape in ((2, 5, 6), (2, 5, 6), (6,), (6,)))
    addend = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm(*a[:3], 1e-5, a[3]), (x, weight, bias, addend))
    assert torch.autograd.gradcheck(lambda *a: ops.residual_layer_norm(*a[:4], 1e-5, a[4]),
                                    (x, residual, weight, bias, addend))
    assert torch.autograd.gradcheck(lambda a, b: ops.residual_layer_norm(a, b)[1], (x, residual))  # no affine
    op, residual_op = torch.ops.animatelcm.layer_norm.default, torch.ops.animatelcm.residual_layer_norm.default
    args = [torch.randn(3, 4, 8, requires_grad=True), torch.randn(8, requires_grad=True),
            torch.randn(8, requires_grad=True), 1e-5, torch.randn(1, 4, 8, requires_grad=True), "auto"]
    torch.library.opcheck(op, tuple(args))
    torch.library.opcheck(op, (torch.randn(3, 8), None, None, 1e-6, None, "eager"))
    torch.library.opcheck(residual_op, (torch.randn(3, 4, 8, requires_grad=True), *args[:1], *args[1:]))


def test_bad_inputs():
    x = torch.randn(3, 4, 8)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.layer_norm(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight must be a tensor of shape \(8,\)"):
        ops.layer_norm(x, torch.randn(4))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        ops.layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match=r"addend must be \[C\], \[L, C\] or \[1, ..., L, C\] with C = 8 and L = 1 or "
                                         r"x's second-to-last size; got addend \(1, 5, 8\)"):
        ops.layer_norm(x, addend=torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match=r"addend must be \[C\]"):
        ops.layer_norm(x, addend=torch.randn(3, 4, 8))  # a whole tensor, not rows broadcast over the batch
    with pytest.raises(ValueError, match="addend .* must have x's dtype"):
        ops.layer_norm(x, addend=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"residual \(3, 4, 7\) .* must have x's shape, dtype and device"):
        ops.residual_layer_norm(x, torch.randn(3, 4, 7))
    with pytest.raises(ValueError, match="must have x's shape, dtype and device"):
        ops.residual_layer_norm(x, x.half())
    for shape in ((8,), (4, 8), (1, 4, 8), (1, 1, 8)):  # the broadcasts accepted
        torch.testing.assert_close(ops.layer_norm(x, addend=torch.ones(shape)), F.layer_norm(x, (8,)) + 1)


def test_automatic_choice_of_kernel():
    """Under auto CPU tensors take the C++ kernel; the Triton kernel takes GPU inputs of TRITON_MIN_ELEMENTS or more,
    rows of at most MAX_TRITON_COLUMNS, smaller ones stay on PyTorch, and CPU tensors are Triton's (the interpreter)
    only when forced."""
    triton = layer_norm_module.IMPLEMENTATIONS[1]
    assert [i.backend for i in layer_norm_module.IMPLEMENTATIONS] == ["cpp", "triton", "eager"]

    def fake(device, numel, cols=320):
        return SimpleNamespace(device=torch.device(device), numel=lambda: numel, shape=(numel // cols, cols),
                               dtype=torch.float16)

    minimum = layer_norm_module.TRITON_MIN_ELEMENTS
    assert triton.pass_over(fake("cuda", minimum)) is None
    assert "fewer than" in triton.pass_over(fake("cuda", minimum - 320))
    assert "CPU tensors run the C++ kernel or PyTorch's own" in triton.pass_over(fake("cpu", 2**30))
    assert "rows of at most" in layer_norm_module._reject_triton(fake("cuda", 2**20, cols=32768))
    report = dict(ops.explain_layer_norm(torch.randn(2, 3, 16)))
    assert report["eager"] is None
    if "cpp" in BACKENDS:
        assert report["cpp"] is None
    if "triton" in BACKENDS:  # the interpreter: CPU tensors are Triton's only when forced
        assert "CPU tensors" in report["triton"]
