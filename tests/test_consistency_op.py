import pytest
import torch

from animatelcm import ops
from animatelcm.ops.consistency import IMPLEMENTATIONS
from conftest import CPU_ISAS, TOLERANCE, assert_close_to_reference, backend_device, backends_usable_here

USABLE_HERE = backends_usable_here(IMPLEMENTATIONS)


def coefficients(generator):
    c = torch.rand(6, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    return c.float()


def inputs(shape, dtype, generator, noise=True, contiguous=True, device="cpu"):
    make = lambda: torch.randn(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    tensors = [make(), make(), make() if noise else None]
    if not contiguous:  # same values seen through a transposed view
        tensors = [None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in tensors]
    return [None if t is None else t.to(device, dtype) for t in tensors]


def run_backend(backend, monkeypatch, *args, **kwargs):
    monkeypatch.setenv("ANIMATELCM_BACKEND", backend)
    return ops.consistency_step(*args, **kwargs)


@pytest.mark.parametrize("backend", USABLE_HERE + ["eager"])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", [(1, 4, 1, 3, 5), (2, 4, 7, 13, 9), (3, 4, 16, 8, 8), (1, 1, 1, 1, 1), (257,)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_matches_float64_reference(backend, dtype, shape, prediction_type, monkeypatch, poisoned_outputs):
    generator = torch.Generator().manual_seed(hash((shape, str(dtype), prediction_type)) % 2**31)
    device = backend_device(backend)
    model_output, sample, noise = inputs(shape, dtype, generator, contiguous=len(shape) < 2 or shape[-1] % 2 == 1,
                                         device=device)
    coefs = coefficients(generator).to(device)
    for noise_arg, clip in ((noise, None), (None, 0.8)):
        prev, denoised = run_backend(backend, monkeypatch, model_output, sample, coefs, noise=noise_arg,
                                     prediction_type=prediction_type, clip_range=clip)
        ref_prev, ref_denoised = ops.consistency_step_reference(
            model_output.double(), sample.double(), coefs, None if noise_arg is None else noise_arg.double(),
            prediction_type, clip)
        for got, want in ((prev, ref_prev), (denoised, ref_denoised)):
            assert got.shape == sample.shape
            assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("backend", USABLE_HERE + ["eager"])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_buffers_one_element_off_alignment(backend, dtype, monkeypatch):
    """Contiguous inputs that start one element into their storage (not 16-byte aligned: the CUDA kernel's
    one-element path) and element counts around its 16-byte packs."""
    generator = torch.Generator().manual_seed(11)
    device = backend_device(backend)
    coefs = coefficients(generator).to(device)
    for numel in (8, 23, 64, 1001):
        model_output, sample, noise = (torch.randn(numel + 1, generator=generator, dtype=torch.float64)
                                       .to(device, dtype)[1:] for _ in range(3))
        prev, denoised = run_backend(backend, monkeypatch, model_output, sample, coefs, noise=noise)
        ref_prev, ref_denoised = ops.consistency_step_reference(model_output.double(), sample.double(), coefs,
                                                                noise.double())
        assert_close_to_reference(prev, ref_prev, dtype)
        assert_close_to_reference(denoised, ref_denoised, dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpp_is_bitwise_equal_to_reference_in_float32(isa, monkeypatch):
    if "cpp" not in USABLE_HERE:
        pytest.skip("native module not built")
    monkeypatch.setenv("ANIMATELCM_CPU_ISA", isa)
    generator = torch.Generator().manual_seed(7)
    model_output, sample, noise = inputs((2, 4, 16, 9, 9), torch.float32, generator)
    coefs = coefficients(generator)
    fast = run_backend("cpp", monkeypatch, model_output, sample, coefs, noise=noise)
    slow = ops.consistency_step_reference(model_output, sample, coefs, noise)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_nan_propagates_elementwise(monkeypatch):
    for backend in USABLE_HERE:
        device = backend_device(backend)
        sample = torch.randn(4, 5, device=device)
        sample[1, 2] = float("nan")
        prev, denoised = run_backend(backend, monkeypatch, torch.randn(4, 5, device=device), sample,
                                     coefficients(torch.Generator().manual_seed(0)).to(device))
        assert torch.isnan(denoised[1, 2]) and torch.isfinite(denoised).sum() == 19


def test_bad_inputs_raise_clear_errors():
    c = torch.rand(6)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="does not match"):
        ops.consistency_step(x, torch.randn(3, 2), c)
    with pytest.raises(TypeError, match="floating dtype"):
        ops.consistency_step(x.long(), x.long(), c)
    with pytest.raises(TypeError, match="floating dtype"):
        ops.consistency_step(x, x.half(), c)
    with pytest.raises(ValueError, match="coefficients"):
        ops.consistency_step(x, x, torch.rand(5))
    with pytest.raises(ValueError, match="coefficients"):
        ops.consistency_step(x, x, torch.rand(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="different devices"):
        ops.consistency_step(x, x.to("meta"), c)
    with pytest.raises(ValueError, match="noise"):
        ops.consistency_step(x, x, c, noise=torch.randn(2, 4))
    with pytest.raises(ValueError, match="prediction_type"):
        ops.consistency_step(x, x, c, prediction_type="flow")
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.consistency_step([1.0], x, c)


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("ANIMATELCM_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.consistency_step(torch.randn(3), torch.randn(3), torch.rand(6))
    monkeypatch.setenv("ANIMATELCM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="not a backend"):
        ops.consistency_step(torch.randn(3), torch.randn(3), torch.rand(6))


def test_explain_available_backends_and_report():
    report = dict(ops.explain_consistency_step(torch.randn(3), torch.randn(3), torch.rand(6)))
    assert report["eager"] is None
    assert "cuda" in report["cuda"] or "CUDA" in report["cuda"]
    full = ops.backend_report()
    assert set(full) == {"eager", "cpp", "cuda", "triton"} and full["eager"] is None
    usable = ops.available_backends()
    assert usable == [name for name, reason in full.items() if reason is None] and "eager" in usable
    if not torch.cuda.is_available():
        assert "cuda" not in usable and full["cuda"]
    if "cpp" in usable:
        double = dict(ops.explain_consistency_step(torch.randn(3).double(), torch.randn(3).double(), torch.rand(6)))
        assert "float64" in double["cpp"]


def test_environment_forces_where_implemented_and_argument_is_strict(monkeypatch):
    model_output, sample, coefficients = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.rand(6)
    monkeypatch.setenv("ANIMATELCM_BACKEND", "triton")  # no Triton consistency step: it keeps the automatic choice
    for got, want in zip(ops.consistency_step(model_output, sample, coefficients),
                         ops.consistency_step_reference(model_output, sample, coefficients)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ops.BackendUnavailableError, match="no triton implementation"):
        ops.consistency_step(model_output, sample, coefficients, backend="triton")


def test_gpu_implementations_run_on_their_inputs_device(monkeypatch):
    """Triton and _C's CUDA launchers launch on the current CUDA device: every cuda and triton implementation's run
    makes its first input's device current where it is not (inputs on cuda:1 while cuda:0 is current) for the call,
    and changes nothing otherwise."""
    import contextlib
    import types

    from animatelcm.ops import _implementations
    from animatelcm.ops.dispatch import Implementation

    made_current = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext(made_current.append(device)))
    calls = []
    run = lambda x, *rest: calls.append(rest) or "ran"  # noqa: E731
    for backend in ("cuda", "triton"):
        implementation = Implementation(backend, run, lambda: None, lambda *a: None)
        for device, current in (("cuda:1", ["cuda:1"]), ("cuda:0", []), ("cpu", [])):
            made_current.clear()
            assert implementation.run(types.SimpleNamespace(device=torch.device(device)), 7) == "ran"
            assert made_current == [torch.device(d) for d in current] and calls[-1] == (7,)
    assert Implementation("cpp", run, lambda: None, lambda *a: None).run is run
    for implementations in _implementations().values():
        for implementation in implementations:
            wrapped = getattr(implementation.run, "__wrapped__", None) is not None
            assert wrapped == (implementation.backend in ("cuda", "triton")), implementation


def test_native_build_info():
    info = ops.build_info()
    if not info["native"]:
        pytest.skip(info["reason"])
    import animatelcm

    assert info["version"] == animatelcm.__version__
    assert info["version"].endswith("+cpu") == (not info["cuda"])
    if info["cuda"]:
        assert info["version"].split("+")[1].startswith("cu")


def test_opcheck_and_compile():
    generator = torch.Generator().manual_seed(11)
    model_output, sample, noise = inputs((1, 4, 3, 5, 6), torch.float32, generator)
    coefs = coefficients(generator)
    op = torch.ops.animatelcm.consistency_step.default
    torch.library.opcheck(op, (model_output, sample, coefs, noise, "epsilon", None, "auto"))
    torch.library.opcheck(op, (model_output, sample, coefs, None, "v_prediction", 0.5, "eager"))
    compiled = torch.compile(lambda m, s, c, z: ops.consistency_step(m, s, c, z)[0] * 1.0, backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(model_output, sample, coefs, noise),
                               ops.consistency_step(model_output, sample, coefs, noise)[0])


def test_backend_argument_forces_and_validates():
    x = torch.randn(4)
    c = torch.rand(6)
    assert torch.equal(ops.consistency_step(x, x, c, backend="eager")[0], ops.consistency_step_reference(x, x, c)[0])
    with pytest.raises(ValueError, match="backend="):
        ops.consistency_step(x, x, c, backend="fast")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.consistency_step(x, x, c, backend="cuda")
