"""End-to-end benchmark: diffusers AnimateDiffPipeline (+ LCMScheduler) eager vs patch_pipeline vs
torch.compile(unet) vs patched + compile, on random weights, every provider in the same process.

CPU (default): an SD1.5-topology UNet at a quarter of the width (blocks 80/160/320/320, head dims 40/80/160 as in
SD1.5, 16 GroupNorm groups since 32 does not divide 80), motion modules, a quarter-width VAE, 16 frames at 256x256,
4 steps, guidance 1.0. GPU (--device cuda): full SD1.5 + AnimateLCM shapes, 16 frames at 512x512, fp16.

    python benchmarks/end_to_end.py [--device cpu|cuda] [--runs 3] [--no-compile]

Appends to benchmarks/results/end_to_end.csv and rewrites benchmarks/results/end_to_end.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from animatelcm import patch_pipeline  # noqa: E402
from animatelcm.testing import TinyConfig, tiny_components  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(device, dtype):
    import diffusers

    if device == "cpu":
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


def run_once(pipe, size, device, guidance, output_type):
    """One timed pipeline call: (seconds, peak GPU memory in GiB or NaN on the CPU)."""
    latents = torch.randn(1, 4, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device)
    latents = latents.to(pipe.unet.dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe(prompt="a red circle moving right", num_frames=16, height=size, width=size, num_inference_steps=4,
         guidance_scale=guidance, latents=latents, generator=torch.Generator().manual_seed(1),
         output_type=output_type)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"))


def time_providers(pipes: dict, size, device, guidance, runs, output_type) -> dict:
    """Median/min/max seconds and peak memory per provider. One warm-up call each (it also compiles), then `runs`
    rounds that call every provider once, in alternating order (ABBA), so a drift of the machine's speed during
    the benchmark weighs on every provider alike instead of on whichever ran last."""
    for pipe in pipes.values():
        run_once(pipe, size, device, guidance, output_type)
    samples = {name: [] for name in pipes}
    peaks = {name: float("nan") for name in pipes}
    for round_index in range(runs):
        order = list(pipes) if round_index % 2 == 0 else list(reversed(pipes))
        for name in order:
            seconds, peak = run_once(pipes[name], size, device, guidance, output_type)
            samples[name].append(seconds)
            peaks[name] = peak if peaks[name] != peaks[name] else max(peaks[name], peak)
    return {name: (statistics.median(times), min(times), max(times), peaks[name]) for name, times in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    base, size = build(args.device, dtype)
    providers = {"diffusers eager": lambda p: p, "patched": lambda p: patch_pipeline(p)}
    if not args.no_compile:
        mode = "max-autotune" if args.device == "cuda" else "default"

        def compiled(p):
            p.unet = torch.compile(p.unet, mode=mode)
            return p
        providers["torch.compile(unet)"] = compiled
        providers["patched + torch.compile(unet)"] = lambda p: compiled(patch_pipeline(p))
    pipes = {name: prepare(copy.deepcopy(base)) for name, prepare in providers.items()}
    rows = []
    for guidance in args.guidance:
        for output_type in ("latent", "np"):
            timings = time_providers(pipes, size, args.device, guidance, args.runs, output_type)
            for name, (median, low, high, peak) in timings.items():
                rows.append(dict(provider=name, guidance=guidance, output=("latents" if output_type == "latent"
                                                                         else "with VAE decode"),
                                 median_s=median, min_s=low, max_s=high, peak_gib=peak))
                print(f"{name:32s} guidance {guidance} {rows[-1]['output']:16s} {median:8.3f} s "
                      f"[{low:.3f}, {high:.3f}]", flush=True)
    machine = f"{platform.machine()} {torch.get_num_threads()} threads" if args.device == "cpu" else \
        torch.cuda.get_device_name()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / "end_to_end.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["date", "device", "unet_params", *rows[0]])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"date": stamp, "device": machine, "unet_params": unet_parameters(base), **row})
    lines = [f"# End-to-end: 16 frames at {size}x{size}, 4 steps, {str(dtype).replace('torch.', '')}, on {machine}",
             "", f"UNet + motion modules: {unet_parameters(base) / 1e6:.1f} M parameters, random weights. "
             f"Command: `python benchmarks/end_to_end.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
             f"Run {stamp}.", "",
             "| provider | guidance | output | median s | min-max s | speed-up vs diffusers eager |", "|---|---|---|---|---|---|"]
    for row in rows:
        base_row = next(r for r in rows if r["provider"] == "diffusers eager" and r["guidance"] == row["guidance"]
                        and r["output"] == row["output"])
        lines.append(f"| {row['provider']} | {row['guidance']} | {row['output']} | {row['median_s']:.3f} | "
                     f"{row['min_s']:.3f}-{row['max_s']:.3f} | {base_row['median_s'] / row['median_s']:.2f}x |")
    (RESULTS / "end_to_end.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
