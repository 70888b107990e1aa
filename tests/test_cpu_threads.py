"""The C++ kernels split their work over OpenMP threads; `make test` runs the suite with one thread per pytest
worker, so this checks every C++ kernel under three threads (an odd count: uneven splits) in a fresh process,
against the eager reference, at shapes past each kernel's parallel threshold."""

import os
import subprocess
import sys

import pytest

from animatelcm.ops.native import native_unavailable_reason

SCRIPT = r"""
import torch
from animatelcm import ops

torch.manual_seed(0)
def check(name, got, want, tol=2e-5):
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")

q, k, v = (torch.randn(37, 5, 13, 40) for _ in range(3))
check("temporal_attention", ops.temporal_attention(q, k, v, backend="cpp"), ops.temporal_attention_reference(q, k, v))
long = [torch.randn(3, 2, 300, 40) for _ in range(3)]  # the streaming-softmax path of long sequences
check("temporal_attention (long)", ops.temporal_attention(*long, backend="cpp"), ops.temporal_attention_reference(*long))

x, w, b = torch.randn(3, 96, 9, 11), torch.randn(96), torch.randn(96)
check("group_norm_silu", ops.group_norm_silu(x, 8, w, b, backend="cpp"), ops.group_norm_silu_reference(x, 8, w, b))
cl = x.to(memory_format=torch.channels_last)
check("group_norm_silu (channels-last)", ops.group_norm_silu(cl, 8, w, b, backend="cpp"),
      ops.group_norm_silu_reference(x, 8, w, b))
frames = torch.randn(2 * 7, 96, 5, 3)
check("temporal_group_norm", ops.temporal_group_norm(frames, 7, 8, w, b, backend="cpp"),
      ops.temporal_group_norm_reference(frames, 7, 8, w, b))
rows = torch.randn(2 * 5 * 3, 7, 96)
check("temporal_unpermute_residual", ops.temporal_unpermute_residual(rows, frames, 7, backend="cpp"),
      ops.temporal_unpermute_residual_reference(rows, frames, 7))

h = torch.randn(301, 2 * 160)
check("geglu", ops.geglu(h, backend="cpp"), ops.geglu_reference(h))
xs, weight = torch.randn(301, 64), torch.randn(2 * 160, 64) / 8
check("linear_geglu", ops.linear_geglu(xs, weight, backend="cpp"), ops.linear_geglu_reference(xs, weight), tol=1e-4)

coefficients = torch.tensor([0.1, 0.9, 0.7, 0.71, 0.8, 0.6])
out, sample, noise = (torch.randn(2, 4, 16, 33, 31) for _ in range(3))
check("consistency_step", ops.consistency_step(out, sample, coefficients, noise, backend="cpp"),
      ops.consistency_step_reference(out, sample, coefficients, noise))
print("ok")
"""


@pytest.mark.skipif(native_unavailable_reason() is not None, reason="the native module is not built")
def test_cpp_kernels_match_the_reference_under_three_threads():
    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
