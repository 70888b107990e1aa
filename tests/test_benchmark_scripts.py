"""benchmarks/end_to_end.py on a tiny pipeline: the table's columns (per-step time, MFU), the profile, and the CSV
kept readable when its columns change; benchmarks/tune_group_norm.py's candidates (run on the CPU interpreter)."""

import csv
import sys
from pathlib import Path

import diffusers
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import end_to_end  # noqa: E402
import tune_group_norm  # noqa: E402


@pytest.fixture
def tiny_benchmark(components, tmp_path, monkeypatch):
    def build(device, dtype):
        pipe = diffusers.AnimateDiffPipeline(**components, scheduler=diffusers.LCMScheduler(
            beta_schedule="linear", original_inference_steps=100))
        pipe.set_progress_bar_config(disable=True)
        return pipe, 64

    monkeypatch.setattr(end_to_end, "build", build)
    monkeypatch.setattr(end_to_end, "RESULTS", tmp_path)
    return tmp_path


def test_end_to_end_table_profile_and_csv(tiny_benchmark):
    results = tiny_benchmark
    with (results / "end_to_end.csv").open("w", newline="") as handle:  # a file from before the new columns
        writer = csv.DictWriter(handle, fieldnames=["date", "provider", "median_s"])
        writer.writeheader()
        writer.writerow({"date": "earlier", "provider": "diffusers eager", "median_s": "1.0"})
    end_to_end.main(["--runs", "1", "--no-compile", "--peak-tflops", "0.001", "--profile", "--guidance", "1", "2",
                     "--decode-alone"])

    table = (results / "end_to_end.md").read_text()
    assert "| provider | guidance | output | median s | min-max s | s per step | peak GiB | MFU |" in table
    rows = [line for line in table.splitlines() if line.startswith("| diffusers eager") or line.startswith("| patched")]
    assert len(rows) == 2 * 2 * 2 + 2  # providers x guidance x (latents, with VAE decode), + the decode alone
    decode = [r.split(" | ") for r in rows if "| VAE decode alone |" in r]
    assert len(decode) == 2 and all(float(r[3]) > 0 and r[5] == "-" and r[7] == "-" for r in decode)
    latents = [r.split(" | ") for r in rows if "| latents |" in r]
    assert all(float(r[5]) > 0 and r[7].endswith("%") for r in latents)  # seconds per step, MFU
    assert "FLOPs per latents call (unpatched, counted): guidance 1.0:" in table

    profile = (results / "end_to_end_profile.md").read_text()
    assert "| op | calls | self time ms | share |" in profile and "aten::" in profile

    with (results / "end_to_end.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        records = list(reader)
    assert {"date", "provider", "median_s", "step_s", "mfu", "guidance"} <= set(reader.fieldnames)
    assert records[0]["date"] == "earlier" and records[0]["mfu"] == ""
    assert len(records) == 1 + 8 + 2


def test_end_to_end_host_bound_mode_and_host_profile(tmp_path, monkeypatch):
    """--host-bound: the toy-width SD1.5 topology, 2 frames at 64x64, its own results file, no MFU. --host-profile:
    the host's own time by area for diffusers and the patch, each column adding up to its call's total."""
    monkeypatch.setattr(end_to_end, "RESULTS", tmp_path)
    monkeypatch.setattr(end_to_end, "FRAMES", end_to_end.FRAMES)  # main rebinds it
    end_to_end.main(["--host-bound", "--runs", "1", "--no-compile", "--host-profile"])
    table = (tmp_path / "end_to_end_host.md").read_text()
    assert table.startswith("# End-to-end: 2 frames at 64x64")
    rows = [line for line in table.splitlines() if line.startswith("| diffusers eager") or line.startswith("| patched")]
    assert len(rows) == 2 * 2 and all(" | - | " in row for row in rows)  # no peak memory or MFU on the CPU

    profile = (tmp_path / "end_to_end_host_host_profile.md").read_text()
    areas = {}
    for line in profile.split("Functions of the patched call")[0].splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("area", "---"):
            areas[cells[0]] = [float(cell.split()[0]) for cell in cells[1:]]
    total = areas.pop("all")
    assert {"animatelcm", "diffusers", "torch.nn modules", "torch C++ ops"} <= set(areas)
    assert areas["animatelcm"][0] == 0 < areas["animatelcm"][1]  # diffusers' call runs none of the patch
    for column in (0, 1):
        assert abs(sum(values[column] for values in areas.values()) - total[column]) < 0.01 * total[column] + 0.5
    assert "| `fused_resnet_forward (patching.py:" in profile


def test_end_to_end_reports_a_failing_provider_and_keeps_the_others(tiny_benchmark, monkeypatch):
    def patch_that_breaks(pipe):
        def forward(*args, **kwargs):
            raise RuntimeError("CUDA error: invalid configuration argument\nsecond line")
        pipe.unet.forward = forward
        return pipe

    monkeypatch.setattr(end_to_end, "patch_pipeline", patch_that_breaks)
    end_to_end.main(["--runs", "2", "--no-compile", "--guidance", "1"])

    table = (tiny_benchmark / "end_to_end.md").read_text().splitlines()
    failed = [line for line in table if line.startswith("| patched |")]
    assert len(failed) == 2 and all(
        "failed: RuntimeError: CUDA error: invalid configuration argument |" in line for line in failed)
    eager = [line.split(" | ") for line in table if line.startswith("| diffusers eager |")]
    assert len(eager) == 2 and all(float(row[3]) > 0 and row[-1] == "1.00x |" for row in eager)
    with (tiny_benchmark / "end_to_end.csv").open(newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [r["failed"] != "" for r in records] == [False, True, False, True]


def test_end_to_end_times_a_forced_backend_as_its_own_provider(tiny_benchmark, monkeypatch):
    backends_patched = []

    def recording_patch(pipe, **options):
        backends_patched.append(options.get("backend", "auto"))
        return pipe

    monkeypatch.setattr(end_to_end, "patch_pipeline", recording_patch)
    end_to_end.main(["--runs", "1", "--no-compile", "--guidance", "1", "--backends", "eager"])
    table = (tiny_benchmark / "end_to_end.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| patched, backend=eager | 1.0 |")]) == 2
    assert sorted(backends_patched) == ["auto", "eager"]


def test_tune_group_norm_candidates_compute_the_group_norm():
    """Every candidate the tuning script times writes GroupNorm+SiLU of x (it times them on a GPU, where the output
    is not checked), and the groups-in-registers choice is left out where a group is longer than MAX_TILE."""
    import torch

    from animatelcm import ops

    if "triton" not in ops.available_backends():
        pytest.skip("the triton backend is not usable here")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 6, 5, generator=generator)
    weight, bias = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    want = ops.group_norm_silu_reference(x, tune_group_norm.GROUPS, weight, bias, 1e-5)
    out = torch.empty_like(x)
    calls = tune_group_norm.providers(x, weight, bias, out)
    assert any(name.startswith("group in registers") for name in calls) and "three launches" in calls
    assert any(name.startswith("persistent") for name in calls) and "forward, no L2 hints" in calls
    assert any(name.startswith("pipelined") for name in calls) and "persistent, 2/SM, pipelined 3 stages" in calls
    for name, call in calls.items():
        if name == "copy (floor)":
            continue
        out.fill_(float("nan"))
        result = call()
        got = result if isinstance(result, torch.Tensor) else out  # the ops return theirs, the kernels write out
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    long_groups = torch.empty(1, 32, 300, 300)  # 90,000 elements a group
    assert all(call is None for name, call in tune_group_norm.providers(long_groups, weight[:32], bias[:32],
                                                                        long_groups).items()
               if name.startswith("group in registers"))


def test_tune_group_norm_shape_and_provider_selection():
    """--shapes parses NxCxHxW (C a multiple of the groups); --providers keeps the named columns and the copy floor,
    and an unknown name stops with the known ones."""
    import argparse

    assert tune_group_norm.parse_shape("32x320x64x64") == (32, 320, 64, 64)
    for bad in ("32x320", "32x33x8x8", "axb", "0x320x8x8"):
        with pytest.raises(argparse.ArgumentTypeError):
            tune_group_norm.parse_shape(bad)
    calls = {"cuda": 1, "three launches": 2, "copy (floor)": 3}
    assert tune_group_norm.selected(calls, None) is calls
    assert tune_group_norm.selected(calls, ["cuda"]) == {"cuda": 1, "copy (floor)": 3}
    with pytest.raises(SystemExit, match="known"):
        tune_group_norm.selected(calls, ["cuda", "nonsense"])
