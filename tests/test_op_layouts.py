"""Every custom op on every backend usable here (the eager reference included) returns outputs with the strides its
fake implementation promises, on the layouts where they could differ: non-contiguous and channels-last inputs,
one-frame clips and 1x1 positions (where a reshape of a permute is a strided view). torch.compile's inductor
trusts the fake strides, so a mismatch would mean wrong results in a compiled graph. ``torch.library.opcheck``
compares them (and checks the schema, autograd registration and the fake implementation)."""

import importlib

import pytest
import torch

from conftest import backend_device, backends_usable_here


# The op modules (animatelcm.ops re-exports functions of the same names as some of them).
attention, consistency, geglu, group_norm = (importlib.import_module(f"animatelcm.ops.{name}")
                                             for name in ("attention", "consistency", "geglu", "group_norm"))


def usable(implementations):
    return backends_usable_here(implementations) + ["eager"]


def random(*shape, device, generator):
    return torch.randn(*shape, generator=generator).to(device)


@pytest.mark.parametrize("backend", usable(group_norm.GROUP_NORM_SILU))
def test_group_norm_silu(backend):
    device, generator = backend_device(backend), torch.Generator().manual_seed(0)
    weight, bias = random(8, device=device, generator=generator), random(8, device=device, generator=generator)
    inputs = [random(2, 8, 3, 5, device=device, generator=generator),
              random(2, 8, 3, 5, device=device, generator=generator).contiguous(memory_format=torch.channels_last),
              random(3, 8, 1, 1, device=device, generator=generator),
              random(2, 5, 8, 3, device=device, generator=generator).transpose(1, 2)]
    for x in inputs:
        torch.library.opcheck(torch.ops.animatelcm.group_norm_silu.default, (x, 4, weight, bias, 1e-5, True, backend))


@pytest.mark.parametrize("backend", usable(group_norm.TEMPORAL_GROUP_NORM))
def test_temporal_group_norm_and_unpermute(backend):
    device, generator = backend_device(backend), torch.Generator().manual_seed(1)
    weight, bias = random(8, device=device, generator=generator), random(8, device=device, generator=generator)
    for batch, frames, height, width in [(2, 3, 2, 3), (2, 1, 4, 4), (1, 3, 1, 1), (2, 1, 1, 1)]:
        x = random(batch * frames, 8, height, width, device=device, generator=generator)
        torch.library.opcheck(torch.ops.animatelcm.temporal_group_norm.default,
                              (x, frames, 2, weight, bias, 1e-6, backend))
        y = random(batch * height * width, frames, 8, device=device, generator=generator)
        if backend in backends_usable_here(group_norm.UNPERMUTE_RESIDUAL) + ["eager"]:
            torch.library.opcheck(torch.ops.animatelcm.temporal_unpermute_residual.default, (y, x, frames, backend))


@pytest.mark.parametrize("backend", usable(attention.IMPLEMENTATIONS))
def test_temporal_attention(backend):
    device, generator = backend_device(backend), torch.Generator().manual_seed(2)
    projection = random(3, 7, 2, 8, device=device, generator=generator).transpose(1, 2)  # [N, heads, F, D] view
    sliced = random(2, 3, 4, 5, 8, device=device, generator=generator)[:, 1:]  # leading dims that do not merge
    single = random(4, 1, 8, device=device, generator=generator)
    for q in (projection, sliced, single):
        torch.library.opcheck(torch.ops.animatelcm.temporal_attention.default, (q, q, q, 0.3, backend))


@pytest.mark.parametrize("backend", usable(geglu.IMPLEMENTATIONS))
def test_geglu(backend):
    device, generator = backend_device(backend), torch.Generator().manual_seed(3)
    transposed = random(10, 6, device=device, generator=generator).t()  # [6, 10], non-contiguous
    for x in (transposed, random(2, 1, 10, device=device, generator=generator)):
        torch.library.opcheck(torch.ops.animatelcm.geglu.default, (x, None, backend))


@pytest.mark.parametrize("backend", usable(geglu.LINEAR_GEGLU_IMPLEMENTATIONS))
def test_linear_geglu(backend):
    device, generator = backend_device(backend), torch.Generator().manual_seed(4)
    weight, bias = random(12, 5, device=device, generator=generator), random(12, device=device, generator=generator)
    x = random(5, 3, 4, device=device, generator=generator).permute(1, 2, 0)  # [3, 4, 5], non-contiguous
    torch.library.opcheck(torch.ops.animatelcm.linear_geglu.default, (x, weight, bias, backend))


@pytest.mark.parametrize("backend", usable(consistency.IMPLEMENTATIONS))
def test_consistency_step(backend):
    device, generator = backend_device(backend), torch.Generator().manual_seed(5)
    sample = random(1, 4, 3, 5, 6, device=device, generator=generator)
    model_output = random(1, 4, 6, 5, 3, device=device, generator=generator).transpose(2, 4)  # non-contiguous
    channels_last = random(2, 4, 5, 6, device=device, generator=generator).contiguous(
        memory_format=torch.channels_last)
    coefficients = torch.rand(6, generator=generator).to(device)
    op = torch.ops.animatelcm.consistency_step.default
    torch.library.opcheck(op, (model_output, sample, coefficients, None, "epsilon", None, backend))
    torch.library.opcheck(op, (channels_last, channels_last, coefficients, channels_last, "v_prediction", 1.0,
                               backend))
