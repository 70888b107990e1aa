"""``python -m animatelcm.info``: version, how the native module was built, and which backends are usable here."""

from __future__ import annotations

import platform


def collect() -> dict:
    """Version, torch, native build info and {backend: reason or None} as one dict."""
    import torch

    from . import __version__
    from .ops import backend_report, build_info, cpu_gemm_library

    return {
        "animatelcm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "build": build_info(),
        "backends": backend_report(),
        "cpu_gemm": cpu_gemm_library(),
    }


def format_report(info: dict) -> str:
    """Human-readable multi-line report of :func:`collect`."""
    build = info["build"]
    lines = [
        f"animatelcm {info['animatelcm']}  (python {info['python']}, torch {info['torch']}, "
        f"torch CUDA {info['torch_cuda'] or 'none'}, CUDA device {'yes' if info['cuda_available'] else 'no'})",
    ]
    if build.get("native"):
        cuda = f"CUDA {build['cuda_version']} archs {build['cuda_archs']}" if build["cuda"] else "no CUDA"
        lines.append(f"native module: built with {build['compiler']}, OpenMP {'on' if build['openmp'] else 'off'}, {cuda}")
    else:
        lines.append(f"native module: not available ({build['reason']})")
    lines.append("backends:")
    for name, reason in info["backends"].items():
        lines.append(f"  {name:<7} {'usable' if reason is None else 'unusable: ' + reason}")
    lines.append(f"large float32 CPU matrix products (patched nn.Linear, linear_geglu): {info['cpu_gemm']} "
                 "(ANIMATELCM_CPU_GEMM)")
    return "\n".join(lines)


def main() -> None:
    print(format_report(collect()))


if __name__ == "__main__":
    main()
