"""Tune the GroupNorm(+SiLU) kernels on a GPU: for the GroupNorm shapes of SD1.5's UNet and VAE at 512x512 (16
frames, guidance 1 and 2), the GPU time of the Triton one-launch kernel at several (block, warps), with the group
kept in registers, on a persistent grid (one or two programs per SM looping over the groups), without its default
backward second pass and cache eviction hints, with its loads software-pipelined; the Triton three-launch path; the CUDA C++ kernel as dispatched (a
group held by a cluster of blocks on sm_90, or in one block's shared memory, read once), with other cluster sizes,
without clusters and as three launches; PyTorch's ops; against a same-size copy. It sets
``FUSED_MIN_GROUPS`` and the one-launch defaults in animatelcm/ops/triton_backend.py.

    python benchmarks/tune_group_norm.py [--out benchmarks/results/tune_group_norm_cuda.md] [--dtype float16]
                                         [--shapes 32x320x64x64 ...] [--providers NAME ...] [--ncu]

--ncu runs each selected call once for Nsight Compute instead (gpu_check.sh's `ncu` step: the hardware counters
that say what bounds the kernels short of the copy's bandwidth).

GPU time per call: ``triton.testing.do_bench`` (CUDA events around repeated calls, L2 flushed between them), so
host overhead is left out where the GPU is the bottleneck; the roofline column is the bytes a call must move (read
x, write the output) over that time, as a fraction of the copy's.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from animatelcm import ops  # noqa: E402
from animatelcm.ops import group_norm, triton_backend  # noqa: E402
from animatelcm.ops.native import cuda_kernels_unavailable_reason  # noqa: E402

# (batch, channels, height, width): batch 16 = 16 frames at guidance 1, 32 at guidance 2; UNet widths
# 320/640/1280 at latents 64/32/16/8 and the up blocks' concatenations; the VAE decoder at 64..512.
# The kernel benchmark's roofline shape first: a step cut short by its time limit has printed the rows it finished.
SHAPES = [(n, c, s, s) for n in (32, 16) for c, s in ((320, 64), (640, 32), (1280, 16), (1280, 8), (960, 64),
                                                        (1920, 32), (2560, 16))]
SHAPES += [(16, 512, 64, 64), (16, 512, 128, 128), (16, 256, 256, 256), (16, 128, 512, 512)]
GROUPS = 32
ONE_LAUNCH_CONFIGS = [(block, warps) for block in (1024, 2048, 4096) for warps in (4, 8, 16)
                      if block // (32 * warps) >= 4]
PERSISTENT_PROGRAMS_PER_SM = (1, 2)
PIPELINE_STAGES = [(2, None), (3, None), (4, None), (3, 2)]  # (first pass, second pass) steps in flight
MAX_TILE = 65536  # the largest group kept in registers (a power of two: 64 fp32 values a thread at 32 warps)


def gpu_ms(fn) -> float:
    """The better of two medians of ``do_bench`` (run 9's single means had 2-10x outliers in about one cell in 15)."""
    import triton.testing

    fn()  # compile and warm up
    return min(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") for _ in range(2))


def providers(x, weight, bias, out):
    """name -> a call writing GroupNorm+SiLU of x (into out where the provider takes one)."""
    calls = {
        "F.group_norm + F.silu": lambda: F.silu(F.group_norm(x, GROUPS, weight, bias, 1e-5)),
        "three launches": lambda: triton_backend.group_norm_three_launches(x, out, GROUPS, weight, bias, 1e-5, True),
    }
    group_tile = 1 << (x[0, :x.shape[1] // GROUPS].numel() - 1).bit_length()  # the group, rounded up to a power of 2
    configs = [(f"one launch {block}/{warps}w", block, warps) for block, warps in ONE_LAUNCH_CONFIGS]
    configs += [(f"group in registers, {warps}w", group_tile if group_tile <= MAX_TILE else None, warps)
                for warps in (8, 16, 32)]
    for name, block, warps in configs:
        calls[name] = None if block is None else (
            lambda b=block, w=warps: triton_backend.group_norm_one_launch(x, out, GROUPS, weight, bias, 1e-5, True,
                                                                         block=b, num_warps=w))
    # the default step and warps on a persistent grid: fewer groups in flight at once, so that a group's second
    # read more likely finds it in L2 (all groups in flight at 64x64 latents: about 42 MB against 50 MB of L2)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2  # 2: the interpreter
    for per_sm in PERSISTENT_PROGRAMS_PER_SM:
        calls[f"persistent, {per_sm}/SM"] = (
            lambda p=per_sm * sms: triton_backend.group_norm_one_launch(x, out, GROUPS, weight, bias, 1e-5, True,
                                                                       programs=p))
    # the default step and warps without the default's steering of a group's second read toward L2 (the second
    # pass backwards from the group's end, its most recently read steps first; eviction hints: first read kept,
    # second read and output streamed), one or both off
    for name, reverse, l2_hints in (("forward second pass", False, True), ("no L2 hints", True, False),
                                    ("forward, no L2 hints", False, False)):
        calls[name] = (lambda r=reverse, h=l2_hints: triton_backend.group_norm_one_launch(
            x, out, GROUPS, weight, bias, 1e-5, True, reverse=r, l2_hints=h))
    # the default step and warps with the loads software-pipelined through shared memory (asynchronous copies
    # several steps deep: more bytes in flight per program than the default's one step): the first pass, both
    for stats, apply in PIPELINE_STAGES:
        calls[f"pipelined {stats}" + (f"+{apply}" if apply else "") + " stages"] = (
            lambda s=stats, a=apply: triton_backend.group_norm_one_launch(x, out, GROUPS, weight, bias, 1e-5, True,
                                                                         stats_stages=s, apply_stages=a))
    # run 10's fastest choice (two persistent programs an SM) with the first pass's loads pipelined too
    calls["persistent, 2/SM, pipelined 3 stages"] = (
        lambda p=2 * sms: triton_backend.group_norm_one_launch(x, out, GROUPS, weight, bias, 1e-5, True, programs=p,
                                                               stats_stages=3))
    calls["triton (as dispatched)"] = lambda: ops.group_norm_silu(x, GROUPS, weight, bias, 1e-5, backend="triton")
    if cuda_kernels_unavailable_reason() is None:
        # the CUDA C++ kernel as dispatched (a group that fits in shared memory is read once), on sm_90 with thread
        # block clusters holding a group in registers instead, and its three launches
        calls["cuda"] = lambda: ops.group_norm_silu(x, GROUPS, weight, bias, 1e-5, backend="cuda")
        for name, options in (("cuda, cluster 2 packs", dict(cluster_packs=2)),
                              ("cuda, cluster 4 packs", dict(cluster_packs=4)),
                              ("cuda, cluster 8 packs", dict(cluster_packs=8)),
                              ("cuda, three launches", dict(cluster_packs=0, resident_groups=False))):
            calls[name] = lambda o=options: group_norm._native_group_norm(
                "group_norm_cuda", group_norm._cuda_extra, x, x.shape[0], 1, GROUPS, weight, bias, 1e-5, True, False,
                **o)
    calls["copy (floor)"] = lambda: out.copy_(x)
    return calls


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x320x64x64"`` -> ``(32, 320, 64, 64)``."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 3 or min(shape) < 1 or shape[1] % GROUPS:
        raise argparse.ArgumentTypeError(f"{text!r}: give N x C x spatial sizes, e.g. 32x320x64x64, with C a "
                                         f"multiple of {GROUPS}")
    return shape


def inputs(shape, dtype):
    """x [shape], weight and bias [C], and an output like x, on the GPU."""
    x = torch.randn(shape, device="cuda", dtype=dtype)
    weight = torch.randn(shape[1], device="cuda", dtype=dtype)
    bias = torch.randn(shape[1], device="cuda", dtype=dtype)
    return x, weight, bias, torch.empty_like(x)


def selected(calls: dict, names) -> dict:
    """``calls`` limited to ``names`` (None: all) and the copy floor; an unknown name is an error listing the known."""
    if names is None:
        return calls
    unknown = sorted(set(names) - set(calls))
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known: {list(calls)}")
    return {name: call for name, call in calls.items() if name in names or name == "copy (floor)"}


def profile_once(shapes, dtype, names):
    """Every selected call of every shape once between cudaProfilerStart and Stop (after a warm-up that compiles),
    for ``ncu --profile-from-start off``; prints the order, which is the order of the profiled kernels' groups."""
    runs = []
    for shape in shapes:
        x, weight, bias, out = inputs(shape, dtype)
        for name, call in selected(providers(x, weight, bias, out), names).items():
            if call is not None:
                call()
                runs.append((f"{'x'.join(map(str, shape))} {name}", call))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for label, call in runs:
        torch.cuda.nvtx.range_push(label)
        call()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled, in order:", "; ".join(label for label, _ in runs), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "tune_group_norm_cuda.md")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=SHAPES, metavar="NxCxHxW",
                        help="the shapes to time (default: SD1.5's UNet and VAE GroupNorms, see SHAPES)")
    parser.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                        help="time only these columns (names as in the table; the copy floor is always kept)")
    parser.add_argument("--ncu", action="store_true",
                        help="for Nsight Compute instead of timing: warm every call up, then run each once between "
                             "cudaProfilerStart and Stop, in column order (ncu --profile-from-start off)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    if args.ncu:
        profile_once(args.shapes, dtype, args.providers)
        return
    lines = [f"# Triton GroupNorm+SiLU launch tuning, {args.dtype}, {GROUPS} groups, on {torch.cuda.get_device_name()}",
             "", f"Command: `python benchmarks/tune_group_norm.py {' '.join(argv if argv is not None else sys.argv[1:])}`."
             f" Run {datetime.datetime.now().isoformat(timespec='seconds')}. GPU ms per call (triton do_bench); "
             "% of the copy's bandwidth in brackets; best GroupNorm in bold.", ""]
    header = None
    for shape in args.shapes:
        x, weight, bias, out = inputs(shape, dtype)
        calls = selected(providers(x, weight, bias, out), args.providers)
        times = {}
        for name, call in calls.items():
            if call is None:  # a choice that does not apply to this shape
                times[name] = float("nan")
                continue
            try:
                times[name] = gpu_ms(call)
            except Exception as error:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"{shape} {name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
                times[name] = float("nan")
        if header is None:
            header = list(calls)
            lines += ["| shape | groups in all | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
        floor = times["copy (floor)"]
        best = min(((t, n) for n, t in times.items() if n != "copy (floor)" and t == t), default=(0, None))[1]
        cells = []
        for name in header:
            t = times.get(name, float("nan"))
            cell = "-" if t != t else f"{t:.3f} ({100 * floor / t:.0f} %)"
            cells.append(f"**{cell}**" if name == best else cell)
        lines.append(f"| {'x'.join(map(str, shape))} | {shape[0] * GROUPS} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        del x, out
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
