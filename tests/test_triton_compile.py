"""The Triton kernels compile for real GPUs (sm_80 and sm_90) here, without one. CI runs them in the interpreter,
which accepts code the GPU compiler would reject, so this compiles every kernel ahead of time for both archs."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in a fresh interpreter: conftest sets TRITON_INTERPRET=1, under which @triton.jit kernels cannot be compiled.
SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from animatelcm.kernels import group_norm, layer_norm, linear_geglu, temporal_attention

FP32_POINTERS = {"partials_ptr", "w_ptr", "b_ptr", "scale_ptr", "shift_ptr"}
FLOAT_SCALARS = {"eps", "scale"}
CONSTEXPRS = [
    (group_norm.group_partials_kernel, dict(SEGMENTED=True, BLOCK=1024)),
    (group_norm.group_partials_kernel, dict(SEGMENTED=False, BLOCK=1024)),
    (group_norm.channel_partials_kernel, dict(BLOCK_POSITIONS=32, BLOCK_CHANNELS=128)),
    (group_norm.channel_partials_kernel, dict(BLOCK_POSITIONS=1, BLOCK_CHANNELS=64)),
    (group_norm.group_affine_kernel, dict(HAS_WEIGHT=True, HAS_BIAS=False, BLOCK_CHANNELS=64, BLOCK_SPLIT=16)),
    (group_norm.group_apply_rows_kernel, dict(CHANNEL_IS_COL=False, SILU=True, BLOCK_ROWS=2, BLOCK_COLS=1024)),
    (group_norm.group_apply_rows_kernel, dict(CHANNEL_IS_COL=True, SILU=False, BLOCK_ROWS=4, BLOCK_COLS=512)),
    (group_norm.group_apply_permute_kernel, dict(SILU=False, BLOCK_C=64, BLOCK_S=64)),
    (group_norm.unpermute_residual_kernel, dict(BLOCK_C=64, BLOCK_S=64)),
    (group_norm.group_norm_fused_kernel, dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, BLOCK=2048, ONE_TILE=False,
                                              PERSISTENT=False, REVERSE=True, L2_HINTS=True)),
    (group_norm.group_norm_fused_kernel, dict(HAS_WEIGHT=False, HAS_BIAS=True, SILU=True, BLOCK=16384, ONE_TILE=True,
                                              PERSISTENT=False, REVERSE=False, L2_HINTS=False)),
    (group_norm.group_norm_fused_kernel, dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, BLOCK=4096, ONE_TILE=False,
                                              PERSISTENT=True, REVERSE=False, L2_HINTS=False)),
    (group_norm.group_norm_fused_kernel, dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, BLOCK=4096, ONE_TILE=False,
                                              PERSISTENT=False, REVERSE=False, L2_HINTS=False)),
    (group_norm.group_norm_fused_kernel, dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, BLOCK=4096, ONE_TILE=False,
                                              PERSISTENT=False, REVERSE=True, L2_HINTS=True, STATS_STAGES=3,
                                              APPLY_STAGES=2)),
    (group_norm.group_norm_fused_kernel, dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, BLOCK=4096, ONE_TILE=False,
                                              PERSISTENT=True, REVERSE=True, L2_HINTS=True, STATS_STAGES=3)),
    (temporal_attention.temporal_attention_kernel, dict(BLOCK_F=16, BLOCK_D=64, FP32_DOT=False)),
    (temporal_attention.temporal_attention_kernel, dict(BLOCK_F=32, BLOCK_D=256, FP32_DOT=True)),
    (layer_norm.layer_norm_kernel, dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, HAS_ADDEND=True,
                                        BLOCK_M=8, BLOCK_C=512)),
    (layer_norm.layer_norm_kernel, dict(HAS_RESIDUAL=False, HAS_WEIGHT=False, HAS_BIAS=False, HAS_ADDEND=False,
                                        BLOCK_M=1, BLOCK_C=8192)),
    (linear_geglu.linear_geglu_kernel, dict(HAS_BIAS=True, FP32_DOT=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64,
                                            GROUP_M=8)),
    (linear_geglu.linear_geglu_kernel, dict(HAS_BIAS=False, FP32_DOT=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64,
                                            GROUP_M=8)),
]
# launch options where the ops launch with other than Triton's defaults
OPTIONS = {linear_geglu.linear_geglu_kernel: dict(num_warps=8, num_stages=3)}
# kernels also compiled as a launch specialises them when every pointer and integer is a multiple of 16 (SD1.5's
# widths): the matrix product then takes another path (asynchronous copies, software pipelining)
SPECIALISED = {linear_geglu.linear_geglu_kernel}


def signature(fn, dtype, constexprs):
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name in FP32_POINTERS else "*" + dtype
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return types


for arch, dtypes in ((90, ("fp16", "bf16", "fp32")), (80, ("bf16",))):
    for dtype in dtypes:
        for fn, constexprs in CONSTEXPRS:
            # constexpr parameters left at their defaults, as a launch leaves them
            constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
            if constexprs.get("FP32_DOT") is False and dtype == "fp32":
                continue  # fp32 inputs always take the FP32_DOT path
            divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                         if name not in constexprs and name not in FLOAT_SCALARS}
            for attrs in ([None, divisible] if fn in SPECIALISED else [None]):
                compiled = triton.compile(ASTSource(fn, signature(fn, dtype, constexprs), constexprs, attrs),
                                          target=GPUTarget("cuda", arch, 32), options=OPTIONS.get(fn))
                assert compiled.asm["cubin"], (fn.__name__, arch, dtype)
print("compiled")
"""


# The installed Triton, and the older releases `make setup` puts in folders of the venv (TRITON_COMPAT in the
# Makefile), each compiling every kernel in its own interpreter.
COMPAT_RELEASES = sorted(Path(sys.prefix).glob("triton-[0-9]*"))


def test_triton_kernels_compile_for_sm80_and_sm90():
    """Every release at once, each in its own interpreter (compiling is single-threaded: on two cores, the wall
    time of the slowest instead of the sum)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    runs = {}
    for release in [None, *COMPAT_RELEASES]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if release is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(release), *filter(None, [env.get("PYTHONPATH")])])
        runs[release] = subprocess.Popen([sys.executable, "-c", "import triton; print(triton.__version__)\n" + SCRIPT],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for release, process in runs.items():
            stdout, stderr = process.communicate(timeout=900)
            name = release.name if release else "the installed triton"
            assert process.returncode == 0 and "compiled" in stdout, (name, stderr[-3000:])
            if release is not None:
                assert stdout.split()[0] == release.name.removeprefix("triton-"), stdout
    finally:
        for process in runs.values():
            process.kill()


def test_ci_compiles_under_the_older_triton_releases_too():
    """CI must not skip the older releases silently: `make setup` installs them (TRITON_COMPAT)."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI the older releases are optional")
    assert COMPAT_RELEASES, f"no triton-* folder in {sys.prefix}: run `make setup` (it installs TRITON_COMPAT)"
