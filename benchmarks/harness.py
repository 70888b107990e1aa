"""Shared benchmark plumbing: rotating input sets (bigger than the caches together), synchronised timing through
pytest-benchmark, robust statistics, the copy floor, the GPU's own time per call (profiler), and the results CSV /
markdown table.

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


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform reports: ratios differ between CPUs."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} x{torch.get_num_threads()} threads"


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
    # GPU only: the kernels' own time per call (no Python, launch or synchronisation cost), its bandwidth and the
    # fraction of the copy's: the roofline comparison. NaN on the CPU.
    device_ms: float = float("nan")
    device_gb_per_s: float = float("nan")
    device_fraction_of_copy: float = float("nan")


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


def device_seconds_per_call(fn, input_sets, device, calls=None) -> float:
    """The GPU's own time per call of ``fn``: the summed duration of the kernels and copies it launches, read from
    the profiler over ``calls`` calls (default: each input set four times); NaN off CUDA. Host time (Python,
    launches, the synchronisation) is not in it, so it is what the copy-bandwidth roofline compares."""
    if device.type != "cuda":
        return float("nan")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    calls = calls or 4 * len(input_sets)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for index in range(calls):
            fn(*input_sets[index % len(input_sets)])
        synchronize(device)
    events = prof.key_averages()
    on_gpu = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    if not on_gpu:  # kernels attributed to the ops that launched them only
        on_gpu = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CPU)
    return on_gpu * 1e-6 / calls


def quantile(ordered, q):
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_row(op, provider, shape, dtype, device, samples, bytes_moved, copy_gb_per_s, device_s=float("nan")) -> Row:
    from animatelcm import __version__

    median = quantile(samples, 0.5)
    rate = bytes_moved / median / 1e9
    return Row(op=op, provider=provider, shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
               device=device_name(device), median_ms=median * 1e3, p20_ms=quantile(samples, 0.2) * 1e3,
               p80_ms=quantile(samples, 0.8) * 1e3, rounds=len(samples), bytes=bytes_moved, gb_per_s=rate,
               copy_gb_per_s=copy_gb_per_s, fraction_of_copy=rate / copy_gb_per_s if copy_gb_per_s else float("nan"),
               version=__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
               machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
               device_ms=device_s * 1e3, device_gb_per_s=bytes_moved / device_s / 1e9)


def append_csv(rows: list[Row], path: Path) -> None:
    """Append benchmark rows (floats to 4 significant digits) to the CSV at ``path``."""
    append_rows(path, [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in asdict(row).items()}
                       for row in rows])


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``; a file written with other columns (older runs) is rewritten with the
    union of both, its old rows left blank in the new columns."""
    fields = list(rows[0])
    old_rows = []
    if path.exists():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != fields:
                old_rows = list(reader)
                fields = list(dict.fromkeys([*(reader.fieldnames or []), *fields]))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w" if old_rows or not path.exists() else "a"
    with path.open(mode, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if mode == "w":
            writer.writeheader()
        writer.writerows(old_rows + rows)


def table_key(row: Row) -> tuple:
    """The rows measured side by side: one op at one shape, dtype and device."""
    return row.op, row.shape, row.dtype, row.device


def markdown_table(rows: list[Row], baselines: dict[str, str]) -> str:
    """One table per op and shape (``table_key``): providers side by side, speed-up over the op's baseline provider, bandwidth and the
    fraction of the measured copy bandwidth (the roofline of these memory-bound ops); on a GPU also the kernels' own
    time per call and the roofline fraction from it."""
    lines = []
    for key in dict.fromkeys(map(table_key, rows)):
        op_rows = [r for r in rows if table_key(r) == key]
        op = op_rows[0].op
        base = next((r for r in op_rows if r.provider == baselines.get(op)), None)
        first = op_rows[0]
        on_gpu = any(r.device_ms == r.device_ms for r in op_rows)
        header = ("| provider | median ms | p20-p80 ms | GB/s | of copy BW | speed-up vs "
                  + (base.provider if base else "-") + " |")
        floor = (f"copy floor: {first.copy_gb_per_s:.1f} GB/s" if first.copy_gb_per_s == first.copy_gb_per_s
                 else "no copy floor (compute-bound)")
        lines += [f"### {op} [{first.shape}] {first.dtype} on {first.device}", "",
                  f"{floor}; bytes moved per call: {first.bytes / 1e6:.1f} MB", "",
                  header + (" GPU time ms | GPU GB/s | of copy BW (GPU time) |" if on_gpu else ""),
                  "|---|---|---|---|---|---|" + ("---|---|---|" if on_gpu else "")]
        for r in op_rows:
            speedup = f"{base.median_ms / r.median_ms:.2f}x" if base else "-"
            fraction = f"{100 * r.fraction_of_copy:.0f}%" if r.fraction_of_copy == r.fraction_of_copy else "-"
            line = (f"| {r.provider} | {r.median_ms:.3f} | {r.p20_ms:.3f}-{r.p80_ms:.3f} | {r.gb_per_s:.1f} | "
                    f"{fraction} | {speedup} |")
            if on_gpu:
                line += (f" {r.device_ms:.3f} | {r.device_gb_per_s:.1f} | {100 * r.device_fraction_of_copy:.0f}% |"
                         if r.device_ms == r.device_ms else " - | - | - |")
            lines.append(line)
        lines.append("")
    if any(r.device_ms == r.device_ms for r in rows):
        lines += ["Median ms: host wall time of one synchronised call (Python, launches and the kernels). GPU time: "
                  "the kernels' and copies' own duration per call, from the profiler; the roofline columns divide "
                  "the bytes moved by it.", ""]
    return "\n".join(lines)
