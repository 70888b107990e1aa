"""Kernel benchmarks: each op against what diffusers / PyTorch users run today, torch.compile, and our backends,
with a plain copy of the same tensor as the memory floor. CPU always; CUDA shapes and providers when a GPU is
present. Run: `make bench` (writes benchmarks/results/kernels.{csv,md})."""

import functools

import diffusers
import pytest
import torch
import torch.nn.functional as F

from animatelcm import LCMScheduler, ops
from benchmarks.harness import device_seconds_per_call, make_row, time_with_pytest_benchmark

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETS = 4  # rotating input sets per measurement


def configs(device):
    """Shapes, dtype and rounds per device: the issue's CPU goals, SD1.5 AnimateLCM shapes on a GPU. On a GPU the
    step is also timed at ``step_roofline``: the pipeline's 2 MB latents take about the profiler's 1 us resolution,
    too short to read a bandwidth from."""
    if device == "cpu":
        return dict(attention=(1024, 8, 16, 40), group_norm=(16, 320, 32, 32), temporal=(2, 16, 320, 16, 16),
                    step=(1, 4, 16, 64, 64), step_roofline=None, feed_forward=(16384, 80, 640),
                    dtype=torch.float32, rounds=40)
    return dict(attention=(8192, 8, 16, 40), group_norm=(32, 320, 64, 64), temporal=(2, 16, 320, 64, 64),
                step=(1, 4, 16, 64, 64), step_roofline=(16, 4, 16, 128, 128), feed_forward=(65536, 320, 2560),
                dtype=torch.float16, rounds=100)


@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn)


def run(benchmark, record, op, provider, baseline, shape, device, input_sets, fn, bytes_moved):
    samples = time_with_pytest_benchmark(benchmark, fn, input_sets, torch.device(device), configs(device)["rounds"])
    record(make_row(op, provider, shape, configs(device)["dtype"], torch.device(device), samples, bytes_moved, None,
                    device_seconds_per_call(fn, input_sets, torch.device(device))), baseline)


def kernel_backends(device):
    """Our backends measured on a device: the C++ kernels on the CPU; the CUDA and Triton kernels on a GPU (the
    Triton interpreter's CPU timings would mean nothing)."""
    return ["cpp"] if device == "cpu" else ["cuda", "triton"]


def forced(backend, fn):
    """fn with ANIMATELCM_BACKEND forced for the duration of each call."""
    import os

    def call(*args):
        previous = os.environ.get("ANIMATELCM_BACKEND")
        os.environ["ANIMATELCM_BACKEND"] = backend
        try:
            return fn(*args)
        finally:
            if previous is None:
                del os.environ["ANIMATELCM_BACKEND"]
            else:
                os.environ["ANIMATELCM_BACKEND"] = previous
    return call


# ---- temporal attention ----------------------------------------------------------------------------------------

def attention_providers(device):
    providers = {
        "sdpa (torch)": F.scaled_dot_product_attention,
        "eager reference": ops.temporal_attention_reference,
        "torch.compile(reference)": compiled(ops.temporal_attention_reference),
        "copy (floor)": lambda q, k, v: q.clone(),
    }
    if device == "cpu":
        providers["cpp"] = forced("cpp", ops.temporal_attention)
    else:
        providers["triton"] = forced("triton", ops.temporal_attention)
    return providers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["sdpa (torch)", "eager reference", "torch.compile(reference)", "cpp", "triton",
                                      "copy (floor)"])
def test_temporal_attention(benchmark, record, device, provider):
    providers = attention_providers(device)
    if provider not in providers:
        pytest.skip(f"{provider} does not run on {device}")
    cfg = configs(device)
    shape = cfg["attention"]
    sets = [tuple(torch.randn(shape, device=device, dtype=cfg["dtype"]) for _ in range(3)) for _ in range(SETS)]
    numel = sets[0][0].numel() * sets[0][0].element_size()
    run(benchmark, record, "temporal_attention", provider, "sdpa (torch)", shape, device, sets, providers[provider],
        2 * numel if provider == "copy (floor)" else 4 * numel)


@pytest.mark.parametrize("provider", ["sdpa (torch)", "cpp", "copy (floor)"])
def test_spatial_self_attention(benchmark, record, provider):
    """CPU only: the end-to-end benchmark's first-level spatial self-attention (32x32 latents, 16 frames, 2 heads of
    40), which patch_pipeline runs on the C++ kernel's streaming-softmax path on the CPU."""
    providers = {"sdpa (torch)": F.scaled_dot_product_attention, "cpp": forced("cpp", ops.temporal_attention),
                 "copy (floor)": lambda q, k, v: q.clone()}
    shape = (16, 2, 1024, 40)
    sets = [tuple(torch.randn(shape) for _ in range(3)) for _ in range(SETS)]
    numel = sets[0][0].numel() * sets[0][0].element_size()
    run(benchmark, record, "spatial_self_attention", provider, "sdpa (torch)", shape, "cpu", sets, providers[provider],
        2 * numel if provider == "copy (floor)" else 4 * numel)


# ---- GroupNorm + SiLU ------------------------------------------------------------------------------------------

def diffusers_group_norm_silu(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["F.group_norm + F.silu", "torch.compile", "cpp", "cuda", "triton",
                                      "copy (floor)"])
def test_group_norm_silu(benchmark, record, device, provider):
    providers = {
        "F.group_norm + F.silu": diffusers_group_norm_silu,
        "torch.compile": compiled(diffusers_group_norm_silu),
        "copy (floor)": lambda x, w, b: x.clone(),
        **{backend: forced(backend, lambda x, w, b: ops.group_norm_silu(x, 32, w, b))
           for backend in kernel_backends(device)},
    }
    if provider not in providers:
        pytest.skip(f"{provider} does not run on {device}")
    cfg = configs(device)
    shape = cfg["group_norm"]
    sets = [(torch.randn(shape, device=device, dtype=cfg["dtype"]), torch.randn(shape[1], device=device, dtype=cfg["dtype"]),
             torch.randn(shape[1], device=device, dtype=cfg["dtype"])) for _ in range(SETS)]
    run(benchmark, record, "group_norm_silu", provider, "F.group_norm + F.silu", shape, device, sets,
        providers[provider], 2 * sets[0][0].numel() * sets[0][0].element_size())


# The Triton channels-last GroupNorm with its statistics read along whole rows of channels (channel_partials_kernel)
# instead of as runs of C/G channels (the default, "triton"): its tiles (positions x channels, warps); {}: the
# default tile (triton_backend.CHANNEL_ROWS_TILE).
CHANNELS_LAST_ROW_TILES = {"triton, row statistics": {},
                           "triton, row statistics 64x64": dict(block_positions=64, block_channels=64),
                           "triton, row statistics 64x128, 8 warps": dict(block_positions=64, block_channels=128,
                                                                          num_warps=8)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(16, 64, 128, 128), (16, 256, 256, 256)], ids=["quarter-vae", "sd15-vae"])
@pytest.mark.parametrize("provider", ["F.group_norm + F.silu", "torch.compile", "cpp", "cuda", "triton",
                                      *CHANNELS_LAST_ROW_TILES, "copy (floor)"])
def test_group_norm_silu_channels_last(benchmark, record, device, shape, provider):
    """The VAE decoder's ResNet blocks: channels-last activations from its convolutions ([16, 64, 128, 128] is a
    quarter-width decoder at 256x256 pixels, 16 frames; on a GPU also SD1.5's decoder at 256x256 of its 512x512,
    [16, 256, 256, 256]). The CUDA kernel copies to and from the contiguous layout; the C++ and Triton kernels read
    and write channels-last."""
    if device == "cpu" and shape[1] > 64:
        pytest.skip("SD1.5's decoder width is measured on a GPU only")
    providers = {
        "F.group_norm + F.silu": diffusers_group_norm_silu,
        "torch.compile": compiled(diffusers_group_norm_silu),
        "copy (floor)": lambda x, w, b: x.clone(),
        **{backend: forced(backend, lambda x, w, b: ops.group_norm_silu(x, 32, w, b))
           for backend in kernel_backends(device)},
    }
    if device == "cuda":
        from animatelcm.ops import triton_backend

        providers.update({name: lambda x, w, b, tiles=tiles: triton_backend.triton_group_norm_silu(
            x, 32, w, b, 1e-5, True, True, "rows", **tiles) for name, tiles in CHANNELS_LAST_ROW_TILES.items()})
    if provider not in providers:
        pytest.skip(f"{provider} does not run on {device}")
    cfg = configs(device)
    sets = [(torch.randn(shape, device=device, dtype=cfg["dtype"]).contiguous(memory_format=torch.channels_last),
             torch.randn(shape[1], device=device, dtype=cfg["dtype"]),
             torch.randn(shape[1], device=device, dtype=cfg["dtype"])) for _ in range(SETS)]
    run(benchmark, record, "group_norm_silu (channels-last)", provider, "F.group_norm + F.silu", shape, device, sets,
        providers[provider], 2 * sets[0][0].numel() * sets[0][0].element_size())


# ---- motion-module norm with the permute, and the permute back with the residual -------------------------------

def diffusers_temporal_norm(x, w, b, frames=16):
    return ops.temporal_group_norm_reference(x, frames, 32, w, b, 1e-6)


def diffusers_unpermute(y, residual, frames=16):
    return ops.temporal_unpermute_residual_reference(y, residual, frames)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["diffusers ops", "torch.compile", "cpp", "cuda", "triton", "copy (floor)"])
def test_temporal_group_norm(benchmark, record, device, provider):
    providers = {"diffusers ops": diffusers_temporal_norm, "torch.compile": compiled(diffusers_temporal_norm),
                 "copy (floor)": lambda x, w, b: x.clone(),
                 **{backend: forced(backend, lambda x, w, b: ops.temporal_group_norm(x, 16, 32, w, b))
                    for backend in kernel_backends(device)}}
    if provider not in providers:
        pytest.skip(f"{provider} does not run on {device}")
    cfg = configs(device)
    batch, frames, channels, h, w_ = cfg["temporal"]
    shape = (batch * frames, channels, h, w_)
    sets = [(torch.randn(shape, device=device, dtype=cfg["dtype"]), torch.randn(channels, device=device),
             torch.randn(channels, device=device)) for _ in range(SETS)]
    run(benchmark, record, "temporal_group_norm (+permute)", provider, "diffusers ops", shape, device, sets,
        providers[provider], 2 * sets[0][0].numel() * sets[0][0].element_size())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["diffusers ops", "torch.compile", "cpp", "cuda", "triton", "copy (floor)"])
def test_unpermute_residual(benchmark, record, device, provider):
    providers = {"diffusers ops": diffusers_unpermute, "torch.compile": compiled(diffusers_unpermute),
                 "copy (floor)": lambda y, r: y.clone(),
                 **{backend: forced(backend, lambda y, r: ops.temporal_unpermute_residual(y, r, 16))
                    for backend in kernel_backends(device)}}
    if provider not in providers:
        pytest.skip(f"{provider} does not run on {device}")
    cfg = configs(device)
    batch, frames, channels, h, w_ = cfg["temporal"]
    sets = [(torch.randn(batch * h * w_, frames, channels, device=device, dtype=cfg["dtype"]),
             torch.randn(batch * frames, channels, h, w_, device=device, dtype=cfg["dtype"])) for _ in range(SETS)]
    numel = sets[0][0].numel() * sets[0][0].element_size()
    run(benchmark, record, "unpermute_residual", provider, "diffusers ops", (batch * frames, channels, h, w_), device,
        sets, providers[provider], 2 * numel if provider == "copy (floor)" else 3 * numel)


# ---- LCM scheduler step ----------------------------------------------------------------------------------------

def scheduler_at(cls, index, device):
    scheduler = cls(beta_schedule="linear", original_inference_steps=100)
    scheduler.set_timesteps(4, device=device)

    def step(model_output, sample):
        scheduler._step_index = index
        return scheduler.step(model_output, scheduler.timesteps[index], sample).prev_sample
    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", ["step", "step_roofline"])
@pytest.mark.parametrize("which", ["final", "middle"])
@pytest.mark.parametrize("provider", ["diffusers.LCMScheduler.step", "animatelcm.LCMScheduler.step", "copy (floor)"])
def test_scheduler_step(benchmark, record, device, size, which, provider):
    shape = configs(device)[size]
    if shape is None:
        pytest.skip(f"no {size} shape on {device}")
    index = 3 if which == "final" else 1
    providers = {"diffusers.LCMScheduler.step": scheduler_at(diffusers.LCMScheduler, index, device),
                 "animatelcm.LCMScheduler.step": scheduler_at(LCMScheduler, index, device),
                 "copy (floor)": lambda m, s: s.clone()}
    cfg = configs(device)
    sets = [(torch.randn(shape, device=device, dtype=cfg["dtype"]), torch.randn(shape, device=device, dtype=cfg["dtype"]))
            for _ in range(SETS)]
    numel = sets[0][0].numel() * sets[0][0].element_size()
    moved = {"final": 4, "middle": 6}[which] * numel if provider != "copy (floor)" else 2 * numel
    run(benchmark, record, f"LCMScheduler.step ({which} step)", provider, "diffusers.LCMScheduler.step", shape, device,
        sets, providers[provider], moved)


# ---- GEGLU feed-forward projection + activation ----------------------------------------------------------------

def diffusers_geglu(x, weight, bias):
    """diffusers' GEGLU.forward with its nn.Linear projection."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


# the Triton GEGLU projection's launch choices beside the dispatched one ((BLOCK_M, BLOCK_N per half, BLOCK_K,
# GROUP_M), warps, stages): larger tiles and deeper pipelines, candidates for its default (run 9: 0.355 ms at the GPU
# shape below, about 30 % of the H100's fp16 peak)
LINEAR_GEGLU_CANDIDATES = {"triton, 128x2x128 tile, 3 stages": ((128, 128, 64, 8), 8, 3),
                           "triton, 128x2x64 tile, 4 stages": ((128, 64, 64, 8), 8, 4),
                           "triton, 64x2x128 tile, 4 warps": ((64, 128, 64, 8), 4, 4)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["diffusers GEGLU", "torch.compile", "cpp", "cuda", "triton",
                                      *LINEAR_GEGLU_CANDIDATES, "copy (floor)"])
def test_linear_geglu(benchmark, record, device, provider):
    """CPU: the first feed-forward projection of a width-80 transformer block at 32x32 latents, 16 frames (the
    end-to-end benchmark's largest activation); GPU: SD1.5's width 320 at 64x64, 16 frames, with CFG (cuda:
    cuBLAS and the CUDA GEGLU kernel; triton: the product and the activation in one kernel)."""
    backends = ["cpp"] if device == "cpu" else ["cuda", "triton"]
    providers = {"diffusers GEGLU": diffusers_geglu, "torch.compile": compiled(diffusers_geglu),
                 "copy (floor)": lambda x, w, b: x.clone(),
                 **{backend: forced(backend, ops.linear_geglu) for backend in backends}}
    if device == "cuda":
        from animatelcm.ops.triton_backend import triton_linear_geglu

        providers.update({name: lambda x, w, b, launch=launch: triton_linear_geglu(x, w, b, *launch)
                          for name, launch in LINEAR_GEGLU_CANDIDATES.items()})
    if provider not in providers:
        pytest.skip(f"{provider} does not run on {device}")
    cfg = configs(device)
    rows, k, width = cfg["feed_forward"]
    sets = [(torch.randn(rows, k, device=device, dtype=cfg["dtype"]),
             torch.randn(width, k, device=device, dtype=cfg["dtype"]) / k**0.5,
             torch.randn(width, device=device, dtype=cfg["dtype"])) for _ in range(SETS)]
    element = sets[0][0].element_size()
    moved = 2 * rows * k * element if provider == "copy (floor)" else rows * (k + width // 2) * element
    run(benchmark, record, "linear_geglu", provider, "diffusers GEGLU", (rows, k, width), device, sets,
        providers[provider], moved)


# ---- transformer block: residual add + LayerNorm + positional embedding ----------------------------------------

def diffusers_residual_norm(attn_output, hidden, weight, bias, pe):
    """A motion-module block between its attentions: the residual add, norm2 and the positional embedding."""
    hidden = attn_output + hidden
    return hidden, F.layer_norm(hidden, (hidden.shape[-1],), weight, bias, 1e-5) + pe


# the Triton LayerNorm's tile choices beside the dispatched one (rows a program, warps): candidates for its default
LAYER_NORM_TILES = {"triton, 4 rows, 4 warps": (4, 4), "triton, 16 rows, 8 warps": (16, 8),
                    "triton, 8 rows, 8 warps": (8, 8)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["diffusers ops", "torch.compile", "cpp", "triton", *LAYER_NORM_TILES,
                                      "copy (floor)"])
def test_residual_layer_norm(benchmark, record, device, provider):
    """A motion-module block's tokens ``[B*H*W, F, C]`` between its attentions: CPU: width 80 at 32x32 latents, 16
    frames (the end-to-end benchmark's largest); GPU: SD1.5's width 320 at 64x64, 16 frames, with CFG."""
    providers = {"diffusers ops": diffusers_residual_norm, "torch.compile": compiled(diffusers_residual_norm),
                 "copy (floor)": lambda a, h, w, b, pe: a.clone(),
                 **{backend: lambda a, h, w, b, pe, backend=backend: ops.residual_layer_norm(a, h, w, b, 1e-5, pe,
                                                                                              backend=backend)
                    for backend in kernel_backends(device)}}
    if device == "cuda":
        from animatelcm.ops.layer_norm import run_kernel
        from animatelcm.ops.triton_backend import launch_layer_norm

        providers.update({name: lambda a, h, w, b, pe, tile=tile: run_kernel(launch_layer_norm, a, h, w, b, 1e-5, pe,
                                                                             block_m=tile[0], num_warps=tile[1])
                          for name, tile in LAYER_NORM_TILES.items()})
    if provider not in providers:
        pytest.skip(f"{provider} does not run on {device}")
    shape, dtype = ((1024, 16, 80) if device == "cpu" else (8192, 16, 320)), configs(device)["dtype"]
    sets = [(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype),
             torch.randn(shape[-1], device=device, dtype=dtype), torch.randn(shape[-1], device=device, dtype=dtype),
             torch.randn(1, *shape[1:], device=device, dtype=dtype)) for _ in range(SETS)]
    numel = sets[0][0].numel() * sets[0][0].element_size()
    run(benchmark, record, "residual_layer_norm (+positional embedding)", provider, "diffusers ops", shape, device,
        sets, providers[provider], 2 * numel if provider == "copy (floor)" else 4 * numel)


# ---- CPU matrix products: PyTorch's BLAS against oneDNN (ops.linear) -----------------------------------------------

@pytest.mark.parametrize("shape", [(16384, 80, 80), (16384, 320, 80), (1024, 320, 2560)])
@pytest.mark.parametrize("provider", ["F.linear (torch)", "ops.linear (oneDNN)"])
def test_cpu_linear(benchmark, record, shape, provider, monkeypatch):
    """CPU only: x [M, K] @ weight [N, K].T + bias at the end-to-end benchmark's motion-module shapes, on PyTorch's
    BLAS and on oneDNN (ops.linear with ANIMATELCM_CPU_GEMM=onednn). Compute-bound: read the times."""
    if provider.startswith("ops.linear"):
        if not torch.backends.mkldnn.is_available():
            pytest.skip("PyTorch built without oneDNN")
        monkeypatch.setenv("ANIMATELCM_CPU_GEMM", "onednn")
    rows, k, n = shape
    sets = [(torch.randn(rows, k), torch.randn(n, k) / k**0.5, torch.randn(n)) for _ in range(SETS)]
    fn = F.linear if provider.startswith("F.linear") else ops.linear
    run(benchmark, record, f"linear_{rows}x{k}x{n}", provider, "F.linear (torch)", shape, "cpu", sets, fn,
        4 * (rows * (k + n) + n * k))
