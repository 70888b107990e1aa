"""Shared benchmark plumbing: rotating input sets (bigger than the caches together), synchronised timing through
pytest-benchmark, robust statistics, the copy floor, and the results CSV / markdown table.

On a CPU, fresh large allocations make timings bimodal (page faults): run with glibc's allocator pinned, as
`make bench` does (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824).
"""

from __future__ import annotations

import csv
import datetime
import itertools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CSV_FIELDS = ["op", "provider", "shape", "dtype", "device", "median_ms", "p20_ms", "p80_ms", "rounds", "bytes",
              "gb_per_s", "copy_gb_per_s", "fraction_of_copy", "version", "date", "machine"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    op: str
    provider: str
    shape: str
    dtype: str
    device: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    rounds: int
    bytes: int
    gb_per_s: float
    copy_gb_per_s: float
    fraction_of_copy: float
    version: str
    date: str
    machine: str


def time_with_pytest_benchmark(benchmark, fn, input_sets, device, rounds, warmup=3):
    """Run ``fn(*inputs)`` under pytest-benchmark, rotating through ``input_sets`` (one per round) and
    synchronising the device around each call; returns the sorted per-call seconds."""
    cycle = itertools.cycle(input_sets)

    def setup():
        synchronize(device)
        return next(cycle), {}

    def call(*inputs):
        fn(*inputs)
        synchronize(device)

    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=warmup)
    return sorted(benchmark.stats.stats.data)


def quantile(ordered, q):
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_row(op, provider, shape, dtype, device, samples, bytes_moved, copy_gb_per_s) -> Row:
    from animatelcm import __version__

    median = quantile(samples, 0.5)
    rate = bytes_moved / median / 1e9
    return Row(op=op, provider=provider, shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
               device=device_name(device), median_ms=median * 1e3, p20_ms=quantile(samples, 0.2) * 1e3,
               p80_ms=quantile(samples, 0.8) * 1e3, rounds=len(samples), bytes=bytes_moved, gb_per_s=rate,
               copy_gb_per_s=copy_gb_per_s, fraction_of_copy=rate / copy_gb_per_s if copy_gb_per_s else float("nan"),
               version=__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
               machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus")


def append_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in asdict(row).items()})


def markdown_table(rows: list[Row], baselines: dict[str, str]) -> str:
    """One table per op: providers side by side, speed-up over the op's baseline provider, bandwidth and the
    fraction of the measured copy bandwidth (the roofline of these memory-bound ops)."""
    lines = []
    for op in dict.fromkeys(r.op for r in rows):
        op_rows = [r for r in rows if r.op == op]
        base = next((r for r in op_rows if r.provider == baselines.get(op)), None)
        first = op_rows[0]
        lines += [f"### {op} [{first.shape}] {first.dtype} on {first.device}", "",
                  f"copy floor: {first.copy_gb_per_s:.1f} GB/s; bytes moved per call: {first.bytes / 1e6:.1f} MB", "",
                  "| provider | median ms | p20-p80 ms | GB/s | of copy BW | speed-up vs " + (base.provider if base else "-") + " |",
                  "|---|---|---|---|---|---|"]
        for r in op_rows:
            speedup = f"{base.median_ms / r.median_ms:.2f}x" if base else "-"
            lines.append(f"| {r.provider} | {r.median_ms:.3f} | {r.p20_ms:.3f}-{r.p80_ms:.3f} | {r.gb_per_s:.1f} | "
                         f"{100 * r.fraction_of_copy:.0f}% | {speedup} |")
        lines.append("")
    return "\n".join(lines)
