import copy
import os

import torch

# Under pytest-xdist (`make test` runs two workers), one thread per worker: two workers of two threads each on
# two cores would oversubscribe them. Subprocesses the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# No GPU here: run the Triton kernels in the interpreter (must be set before triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from animatelcm.testing import TinyConfig, tiny_components  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_components_cache(tmp_path_factory):
    return tiny_components(tmp_path_factory.mktemp("tokenizer"), TinyConfig(), seed=0)


@pytest.fixture
def components(_tiny_components_cache):
    """Fresh deep copies of the tiny SD-shaped parts (unet, motion_adapter, vae, text_encoder, tokenizer)."""
    return {k: (v if k == "tokenizer" else copy.deepcopy(v)) for k, v in _tiny_components_cache.items()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch):
    """Every test starts with the dispatcher's automatic choice, whatever ANIMATELCM_BACKEND the shell exported
    (a forced backend is strict: inputs it cannot run raise); tests that force one set it themselves."""
    monkeypatch.delenv("ANIMATELCM_BACKEND", raising=False)


# Per-dtype tolerance of a fast kernel against the float64 reference: |fast - ref| <= atol + rtol * |ref|.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def assert_close_to_reference(got, want, dtype):
    """Compare a kernel output with a float64 reference under the per-dtype tolerance table (on the CPU: a GPU
    kernel's output may be checked against a reference computed on the CPU)."""
    atol, rtol = TOLERANCE[dtype]
    assert got.dtype == dtype, (got.dtype, dtype)
    assert torch.isfinite(got).all(), "non-finite values (unwritten output?)"
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), atol=atol * max(1.0, want.abs().max().item()), rtol=rtol)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Make every fresh float tensor from torch.empty/empty_like NaN-filled, so elements a kernel fails to write
    show up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def backends_usable_here(implementations):
    """Backends of an op that can run in this process (the eager reference excluded: it is the baseline)."""
    return [impl.backend for impl in implementations if impl.backend != "eager" and impl.available() is None]


def backend_device(backend):
    """The device a backend's test inputs live on: CUDA for the cuda backend and for triton on a GPU; the CPU for
    the rest, and for triton under TRITON_INTERPRET=1 (as in CI)."""
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        return torch.device("cuda")
    return torch.device("cpu")


CPU_ISAS = ["baseline", "avx2", "avx512"]
