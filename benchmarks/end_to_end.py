"""End-to-end benchmark: diffusers AnimateDiffPipeline (+ LCMScheduler) eager vs patch_pipeline vs
torch.compile(unet) vs patched + compile (on a GPU also patched + CUDA graph; with --backends, patched with one
kernel backend forced; with --channels-last, diffusers and the patch on a channels-last UNet), on random weights,
every provider in the same process.

CPU (default): an SD1.5-topology UNet at a quarter of the width (blocks 80/160/320/320, head dims 40/80/160 as in
SD1.5, 16 GroupNorm groups since 32 does not divide 80), motion modules, a quarter-width VAE, 16 frames at 256x256,
4 steps, guidance 1.0. GPU (--device cuda): full SD1.5 + AnimateLCM shapes, 16 frames at 512x512, fp16.
--host-bound: the SD1.5 topology at toy width (animatelcm.testing.TinyConfig, 32 GroupNorm groups as in SD1.5),
2 frames at 64x64 (--frames 16: the real call's launches, see --frames), whose calls take so little arithmetic that
their time is the host's (Python and kernel launches): what a GPU waits for when the real call is host-bound
(guidance 1 on an H100 without CUDA graphs); results in end_to_end_host[_cuda].{csv,md}.

    python benchmarks/end_to_end.py [--device cpu|cuda] [--runs 3] [--no-compile] [--compile-mode MODE]
                                    [--compile-baseline-only] [--guidance 1 2] [--peak-tflops T] [--backends cuda]
                                    [--channels-last] [--profile] [--host-profile] [--host-bound]
                                    [--frames N] [--decode-alone] [--results-name STEM]

Appends to benchmarks/results/end_to_end.csv and rewrites benchmarks/results/end_to_end.md (on a GPU:
end_to_end_cuda.{csv,md}). Each row: median/min/max seconds per pipeline call, seconds per denoising step (the
latents call over its steps), peak GPU memory, and MFU: the FLOPs of one unpatched call (counted once with
torch.utils.flop_counter, the same arithmetic the patched call does) over its time and the device's peak
(--peak-tflops; on a GPU the dense fp16 peak of the H100/H200 SXM, 989.4 TFLOP/s, when not given). --profile adds a
torch.profiler breakdown of one patched latents call (end_to_end_profile[_cuda].md); --host-profile where the
host's time goes (cProfile, by area and function) in one latents call of diffusers and of the patch
(end_to_end[_host][_cuda]_host_profile.md): on a GPU without CUDA graphs the guidance-1 call waits on the host.
--decode-alone adds rows "VAE decode alone": each provider's ``pipe.decode_latents`` on fixed latents, the decode
without the denoising call before it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from animatelcm import patch_pipeline  # noqa: E402
from animatelcm.ops.dispatch import BACKENDS  # noqa: E402
from benchmarks.harness import append_rows, cpu_model  # noqa: E402
from animatelcm.testing import TinyConfig, tiny_components  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 4
FRAMES = 16  # 2 with --host-bound


def build(device, dtype, host_bound=False):
    import diffusers

    if host_bound:  # toy widths, SD1.5's 32 GroupNorm groups (the GPU kernels' launch choices depend on them)
        config = TinyConfig(block_out_channels=(32, 64, 64, 64), norm_num_groups=32,
                            vae_block_out_channels=(32, 32, 64, 64))
        size = 64
    elif device == "cpu":
        config = TinyConfig(block_out_channels=(80, 160, 320, 320), layers_per_block=2, norm_num_groups=16,
                            attention_head_dim=2, cross_attention_dim=192, text_hidden_size=192, motion_heads=2,
                            vae_block_out_channels=(32, 64, 128, 128), sample_size=32)
        size = 256
    else:  # SD1.5 widths
        config = TinyConfig(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
                            attention_head_dim=8, cross_attention_dim=768, text_hidden_size=768, motion_heads=8,
                            vae_block_out_channels=(128, 256, 512, 512), sample_size=64, text_layers=12)
        size = 512
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        parts = tiny_components(tokenizer_dir, config=config, seed=0)
    pipe = diffusers.AnimateDiffPipeline(**parts, scheduler=diffusers.LCMScheduler(beta_schedule="linear",
                                                                                   original_inference_steps=100))
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, size


def unet_parameters(pipe):
    return sum(p.numel() for p in pipe.unet.parameters())


DECODE_ALONE = "decode"  # run_once's output_type for the VAE decode alone


def run_once(pipe, size, device, guidance, output_type):
    """One timed pipeline call: (seconds, peak GPU memory in GiB or NaN on the CPU). ``output_type`` "latent" or
    "np" is the pipeline's; DECODE_ALONE times only ``pipe.decode_latents`` on fixed latents (all frames a chunk, as
    the pipeline's default decode_chunk_size), which no guidance setting changes."""
    latents = torch.randn(1, 4, FRAMES, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device)
    latents = latents.to(pipe.unet.dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if output_type == DECODE_ALONE:
        with torch.no_grad():
            pipe.decode_latents(latents, FRAMES)
    else:
        pipe(prompt="a red circle moving right", num_frames=FRAMES, height=size, width=size,
             num_inference_steps=STEPS, guidance_scale=guidance, latents=latents,
             generator=torch.Generator().manual_seed(1), output_type=output_type)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"))


PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense fp16/bf16 tensor-core peak of the SXM parts


def device_peak_tflops(device, override):
    """The peak the MFU column is measured against: ``override``, else a known GPU's, else None (no MFU)."""
    if override is not None or device != "cuda":
        return override
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def call_flops(pipe, size, device, guidance):
    """FLOPs of one latents call of the unpatched ``pipe`` (text encoder, every UNet call, the steps)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run_once(pipe, size, device, guidance, "latent")
    return counter.get_total_flops()


def profile_breakdown(pipe, size, device, guidance, rows=15) -> tuple[str, float]:
    """A markdown table of the ops taking the most time in one latents call of ``pipe`` (torch.profiler), and the
    seconds they add up to (on a GPU: the kernels' own time, each counted once)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    run_once(pipe, size, device, guidance, "latent")
    with profile(activities=activities) as prof:
        run_once(pipe, size, device, guidance, "latent")
    # One level only, so nothing is counted twice: on a GPU the kernels themselves (an op's device time would repeat
    # its kernels', and kernels launched from the native module belong to no aten op), on the CPU the ops.
    wanted = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == wanted]
    attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attribute) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:rows]
    lines = [f"| {'kernel' if device == 'cuda' else 'op'} | calls | self time ms | share |", "|---|---|---|---|"]
    for e in top:
        name = e.key if len(e.key) <= 100 else e.key[:97] + "..."
        lines.append(f"| `{name}` | {e.count} | {getattr(e, attribute) / 1e3:.1f} | "
                     f"{100 * getattr(e, attribute) / total:.1f} % |")
    return "\n".join(lines), total / 1e6


HOST_AREAS = (("animatelcm", "/animatelcm/"), ("diffusers", "/diffusers/"), ("triton (launcher, JIT)", "/triton/"),
              ("torch.nn modules", "/torch/nn/"), ("other torch Python", "/torch/"))


def host_area(filename: str, function: str) -> str:
    """Where a cProfile entry's own time belongs: a package's Python, or the C++ it calls (torch ops, whose own time
    is the launch on a GPU and the arithmetic on the CPU; other built-ins)."""
    if filename == "~":
        return "torch C++ ops" if "torch" in function else "other built-ins"
    return next((area for area, marker in HOST_AREAS if marker in filename.replace("\\", "/")), "other Python")


def host_profile(pipes: dict, size, device, guidance, rows=25) -> str:
    """Markdown: where the host's time goes in one latents call of each pipeline (cProfile, after a warm-up call),
    summed by area (animatelcm, diffusers, triton, torch.nn, torch C++ ops, ...), then the functions of the patched
    call with the most own time. cProfile slows Python-heavy code more than C++, so read shares, not seconds."""
    import cProfile
    import pstats

    areas, tops, totals = {}, None, {}
    for name, pipe in pipes.items():
        run_once(pipe, size, device, guidance, "latent")
        profiler = cProfile.Profile()
        profiler.enable()
        run_once(pipe, size, device, guidance, "latent")
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own, cumulative, ...)
        totals[name] = sum(entry[2] for entry in stats.values())
        for (filename, _, function), entry in stats.items():
            area = host_area(filename, function)
            areas.setdefault(area, {}).setdefault(name, 0.0)
            areas[area][name] += entry[2]
        if name == "patched":
            tops = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:rows]
    names = list(pipes)
    lines = ["| area | " + " | ".join(f"{n} ms (share)" for n in names) + " |", "|---|" + "---|" * len(names)]
    for area in sorted(areas, key=lambda a: -max(areas[a].values())):
        cells = [f"{1e3 * areas[area].get(n, 0.0):.1f} ({100 * areas[area].get(n, 0.0) / totals[n]:.0f} %)"
                 for n in names]
        lines.append(f"| {area} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(f"{1e3 * totals[n]:.1f}" for n in names) + " |")
    if tops:
        lines += ["", "Functions of the patched call with the most own time:", "",
                  "| function | calls | own ms | cumulative ms |", "|---|---|---|---|"]
        for (filename, line, function), (calls, _, own, cumulative, _) in tops:
            where = function if filename == "~" else f"{function} ({Path(filename).name}:{line})"
            lines.append(f"| `{where[:100]}` | {calls} | {1e3 * own:.2f} | {1e3 * cumulative:.2f} |")
    return "\n".join(lines)


def time_providers(pipes: dict, size, device, guidance, runs, output_type) -> tuple[dict, dict]:
    """Median/min/max seconds and peak memory per provider, and the providers that failed with their errors. One
    warm-up call each (it also compiles), then `runs` rounds that call every provider once, in alternating order
    (ABBA), so a drift of the machine's speed during the benchmark weighs on every provider alike instead of on
    whichever ran last. A provider whose call raises (out of memory, a kernel's launch limit) is reported as failed
    and left out of the later rounds, so one failure does not lose the other providers' numbers."""
    failures = {}

    def attempt(name):
        try:
            return run_once(pipes[name], size, device, guidance, output_type)
        except (RuntimeError, ValueError) as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            failures[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            print(f"{name}: failed: {failures[name]}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            return None

    for name in pipes:
        attempt(name)
    samples = {name: [] for name in pipes}
    peaks = {name: float("nan") for name in pipes}
    for round_index in range(runs):
        order = list(pipes) if round_index % 2 == 0 else list(reversed(pipes))
        for name in order:
            result = None if name in failures else attempt(name)
            if result is None:
                continue
            seconds, peak = result
            samples[name].append(seconds)
            peaks[name] = peak if peaks[name] != peaks[name] else max(peaks[name], peak)
    timings = {name: (statistics.median(times), min(times), max(times), peaks[name])
               for name, times in samples.items() if name not in failures}
    return timings, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: max-autotune on a GPU, default on the CPU)")
    parser.add_argument("--compile-baseline-only", action="store_true",
                        help="time torch.compile(unet) but not patched + torch.compile (one compile per guidance "
                             "setting fewer: max-autotune compiles of the full UNet take minutes each)")
    parser.add_argument("--results-name", default=None,
                        help="stem of the results files (default end_to_end[_host][_cuda]), so a separate run "
                             "(the max-autotune comparison, say) does not overwrite the main table")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for the MFU column (default: known GPUs' dense fp16 peak; none on a CPU)")
    parser.add_argument("--backends", nargs="*", default=[], choices=BACKENDS,
                        help="also time patch_pipeline(backend=B) for each: every op with a B kernel forced onto it")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time diffusers and the patch with the UNet's weights (and so its activations) "
                             "channels-last")
    parser.add_argument("--profile", action="store_true",
                        help="also write a torch.profiler breakdown of one patched latents call")
    parser.add_argument("--host-profile", action="store_true",
                        help="also write where the host's time goes (cProfile) in one latents call of diffusers and "
                             "of the patch (<results name>_host_profile.md)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per clip (default 16; 2 with --host-bound). On a GPU, --host-bound --frames 16 "
                             "keeps the real call's launches: its GroupNorms then have enough groups for Triton's "
                             "one-launch kernel, as at the real size, where 2 frames take three launches each")
    parser.add_argument("--decode-alone", action="store_true",
                        help="also time the VAE decode alone per provider (pipe.decode_latents on fixed latents, "
                             "once: guidance does not change it), rows 'VAE decode alone'")
    parser.add_argument("--host-bound", action="store_true",
                        help="time the host's share instead: toy widths, 2 frames at 64x64 (see above)")
    args = parser.parse_args(argv)
    global FRAMES
    FRAMES = args.frames or (2 if args.host_bound else 16)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    base, size = build(args.device, dtype, host_bound=True) if args.host_bound else build(args.device, dtype)
    peak = None if args.host_bound else device_peak_tflops(args.device, args.peak_tflops)
    flops = {}
    for guidance in args.guidance if peak else ():
        try:
            flops[guidance] = call_flops(base, size, args.device, guidance)
        except (RuntimeError, ValueError) as error:  # the unpatched call fails here: no MFU at this guidance
            print(f"FLOP count at guidance {guidance} failed: {error}", flush=True)
    providers = {"diffusers eager": lambda p: p, "patched": lambda p: patch_pipeline(p)}
    if args.device == "cuda":
        providers["patched + CUDA graph"] = lambda p: patch_pipeline(p, cuda_graph=True)
    for backend in args.backends:
        providers[f"patched, backend={backend}"] = lambda p, b=backend: patch_pipeline(p, backend=b)
    if args.channels_last:
        def channels_last(p):
            p.unet.to(memory_format=torch.channels_last)
            return p
        providers["diffusers eager, channels-last UNet"] = channels_last
        providers["patched, channels-last UNet"] = lambda p: patch_pipeline(channels_last(p))
        if args.device == "cuda":
            providers["patched + CUDA graph, channels-last UNet"] = lambda p: patch_pipeline(channels_last(p),
                                                                                             cuda_graph=True)
    if not args.no_compile:
        mode = args.compile_mode or ("max-autotune" if args.device == "cuda" else "default")

        def compiled(p):
            p.unet = torch.compile(p.unet, mode=mode)
            return p
        providers[f"torch.compile(unet, {mode})"] = compiled
        if not args.compile_baseline_only:
            providers[f"patched + torch.compile(unet, {mode})"] = lambda p: compiled(patch_pipeline(p))
    pipes = {name: prepare(copy.deepcopy(base)) for name, prepare in providers.items()}
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads" if args.device == "cpu" else \
        torch.cuda.get_device_name()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.results_name or (
        ("end_to_end_host" if args.host_bound else "end_to_end") + ("_cuda" if args.device == "cuda" else ""))
    command = f"python benchmarks/end_to_end.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    rows = []
    outputs = {"latent": "latents", "np": "with VAE decode", DECODE_ALONE: "VAE decode alone"}
    blocks = [(guidance, output_type) for guidance in args.guidance for output_type in ("latent", "np")]
    if args.decode_alone:
        blocks.append((args.guidance[0], DECODE_ALONE))
    for guidance, output_type in blocks:
        timings, failures = time_providers(pipes, size, args.device, guidance, args.runs, output_type)
        latents_only = output_type == "latent"
        block = []
        for provider in pipes:
            row = dict(provider=provider, guidance=guidance, output=outputs[output_type],
                       failed=failures.get(provider, ""))
            median, low, high, peak_gib = timings.get(provider, (float("nan"),) * 4)
            mfu = flops[guidance] / median / (peak * 1e12) if (guidance in flops and latents_only) else float("nan")
            row.update(median_s=median, min_s=low, max_s=high, peak_gib=peak_gib,
                       step_s=median / STEPS if latents_only else float("nan"), mfu=mfu)
            block.append(row)
            if not row["failed"]:
                print(f"{provider:40s} guidance {guidance} {row['output']:16s} {median:8.3f} s "
                      f"[{low:.3f}, {high:.3f}]", flush=True)
        rows += block
        # Written after every block, so a run stopped part-way keeps what it measured.
        append_rows(RESULTS / f"{name}.csv", [{"date": stamp, "device": machine,
                                              "unet_params": unet_parameters(base), **row} for row in block])
        (RESULTS / f"{name}.md").write_text(results_table(rows, size, dtype, machine, base, command, stamp,
                                                          flops, peak))
    if args.host_profile:
        (RESULTS / f"{name}_host_profile.md").write_text(
            f"# Where the host's time goes: one latents call, guidance {args.guidance[0]}, on {machine}\n\n"
            f"Command: `{command}`. Run {stamp}. Own time per area and function under cProfile (which slows Python "
            "more than C++: read the shares).\n\n"
            + host_profile({n: pipes[n] for n in ("diffusers eager", "patched")}, size, args.device, args.guidance[0])
            + "\n")
    if args.profile:
        patched = pipes["patched"]
        breakdown, busy_s = profile_breakdown(patched, size, args.device, args.guidance[0])
        timed = next((r["median_s"] for r in rows if r["provider"] == "patched" and r["output"] == "latents"
                      and r["guidance"] == args.guidance[0] and not r["failed"]), float("nan"))
        busy = "" if args.device != "cuda" or timed != timed else (
            f" The kernels add up to {1e3 * busy_s:.0f} ms, against {1e3 * timed:.0f} ms for the unprofiled call's "
            f"median: the GPU is busy {100 * busy_s / timed:.0f} % of the call (the rest waits on the host's Python "
            "and launches).")
        (RESULTS / f"{name.replace('end_to_end', 'end_to_end_profile')}.md").write_text(
            f"# Where the time goes: one patched latents call, guidance {args.guidance[0]}, on {machine}\n\n"
            f"Command: `{command}`. Run {stamp}. Self time per op ({'GPU' if args.device == 'cuda' else 'CPU'}).{busy}"
            "\n\n" + breakdown + "\n")


def results_table(rows, size, dtype, machine, base, command, stamp, flops, peak) -> str:
    """The markdown results file: header, FLOPs, and one table row per provider, guidance and output."""
    lines = [f"# End-to-end: {FRAMES} frames at {size}x{size}, {STEPS} steps, {str(dtype).replace('torch.', '')}, on {machine}",
             "", f"UNet + motion modules: {unet_parameters(base) / 1e6:.1f} M parameters, random weights. "
             f"Command: `{command}`. Run {stamp}."]
    if flops:
        lines += ["", "FLOPs per latents call (unpatched, counted): " + ", ".join(
            f"guidance {g}: {f / 1e12:.3g} TFLOP" for g, f in flops.items()) + f"; MFU against {peak:g} TFLOP/s."]
    lines += ["", "| provider | guidance | output | median s | min-max s | s per step | peak GiB | MFU | "
              "speed-up vs diffusers eager |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["failed"]:
            lines.append(f"| {row['provider']} | {row['guidance']} | {row['output']} | failed: {row['failed']} "
                         "| | | | | |")
            continue
        base_row = next((r for r in rows if r["provider"] == "diffusers eager" and r["guidance"] == row["guidance"]
                         and r["output"] == row["output"] and not r["failed"]), None)
        speed_up = f"{base_row['median_s'] / row['median_s']:.2f}x" if base_row else "-"
        lines.append(f"| {row['provider']} | {row['guidance']} | {row['output']} | {row['median_s']:.3f} | "
                     f"{row['min_s']:.3f}-{row['max_s']:.3f} | {_number(row['step_s'], '.3f')} | "
                     f"{_number(row['peak_gib'], '.2f')} | {_number(100 * row['mfu'], '.1f', ' %')} | {speed_up} |")
    return "\n".join(lines) + "\n"


def _number(value, spec, suffix=""):
    return "-" if value != value else f"{value:{spec}}{suffix}"


if __name__ == "__main__":
    main()
