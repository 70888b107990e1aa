"""Build script: setuptools drives CMake to build the pybind11 module ``animatelcm._C``.

Environment knobs (see README, "Building"):
    ANIMATELCM_CUDA        0 | 1 | auto (default auto: build the CUDA part when nvcc is found)
    ANIMATELCM_CUDA_ARCHS  semicolon list of SM versions, default "80;90"; each must be supported by the nvcc found
    ANIMATELCM_NATIVE      0 skips the native module entirely (pure-PyTorch install)
    MAX_JOBS               parallel compile jobs (default: CPU count)

The wheel's local version names the build: ``+cpu`` or ``+cuXYZ`` (e.g. ``+cu130`` for CUDA 13.0). torch is not a
build requirement: _C takes raw pointers, so it compiles with pybind11 and CMake alone.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "80;90"
# Oldest and newest SM each nvcc major release can target (the newer arches need at least the listed minor).
ARCH_MIN_NVCC = {75: (10, 0), 80: (11, 0), 86: (11, 1), 87: (11, 4), 89: (11, 8), 90: (11, 8), 100: (12, 8),
                 103: (12, 9), 110: (13, 0), 120: (12, 8), 121: (12, 9)}
ARCH_DROPPED_IN_NVCC = {50: 13, 52: 13, 53: 13, 60: 13, 61: 13, 62: 13, 70: 13, 72: 13}


class BuildError(RuntimeError):
    pass


def find_nvcc():
    """Path to nvcc from CUDA_HOME/CUDA_PATH or PATH, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidate = Path(os.environ[var]) / "bin" / "nvcc"
            if candidate.exists():
                return str(candidate)
    return shutil.which("nvcc")


def nvcc_version(nvcc):
    """(major, minor) of an nvcc binary."""
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise BuildError(f"could not read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def cuda_archs_for(version):
    """Validated list of SM numbers from ANIMATELCM_CUDA_ARCHS for this nvcc version."""
    raw = os.environ.get("ANIMATELCM_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = []
    for item in filter(None, re.split(r"[;, ]+", raw)):
        if not item.isdigit():
            raise BuildError(f"ANIMATELCM_CUDA_ARCHS item {item!r} is not an SM number like 80 or 90")
        arch = int(item)
        if arch in ARCH_DROPPED_IN_NVCC and version[0] >= ARCH_DROPPED_IN_NVCC[arch]:
            raise BuildError(f"sm_{arch} is not supported by nvcc {version[0]}.{version[1]}; drop it from "
                             "ANIMATELCM_CUDA_ARCHS or build with an older CUDA toolkit")
        if version < ARCH_MIN_NVCC.get(arch, (0, 0)):
            need = ARCH_MIN_NVCC[arch]
            raise BuildError(f"sm_{arch} needs nvcc >= {need[0]}.{need[1]} (found {version[0]}.{version[1]}); "
                             "drop it from ANIMATELCM_CUDA_ARCHS or use a newer CUDA toolkit")
        archs.append(arch)
    if not archs:
        raise BuildError("ANIMATELCM_CUDA_ARCHS is empty; give e.g. '80;90'")
    return archs


def cuda_plan():
    """(nvcc, version, archs) when the CUDA part is to be built, else None; honours ANIMATELCM_CUDA."""
    mode = os.environ.get("ANIMATELCM_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise BuildError(f"ANIMATELCM_CUDA={mode!r}: use 0, 1 or auto")
    if mode == "0":
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise BuildError("ANIMATELCM_CUDA=1 but no nvcc was found: put it on PATH or set CUDA_HOME")
        return None
    version = nvcc_version(nvcc)
    return nvcc, version, cuda_archs_for(version)


def native_enabled():
    return os.environ.get("ANIMATELCM_NATIVE", "1") != "0"


CUDA_PLAN = cuda_plan() if native_enabled() else None
LOCAL_VERSION = f"cu{CUDA_PLAN[1][0]}{CUDA_PLAN[1][1]}" if CUDA_PLAN else "cpu"
VERSION = f"{BASE_VERSION}+{LOCAL_VERSION}"


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, placing _C where setuptools expects the extension."""

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_RELEASE={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DANIMATELCM_VERSION={VERSION}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if CUDA_PLAN:
            nvcc, _, archs = CUDA_PLAN
            args += ["-DANIMATELCM_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     "-DCMAKE_CUDA_ARCHITECTURES=" + ";".join(str(a) for a in archs)]
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    version=VERSION,
    ext_modules=[Extension("animatelcm._C", sources=[])] if native_enabled() else [],
    cmdclass={"build_ext": CMakeBuild},
)
