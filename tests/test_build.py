import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from animatelcm import ops

ROOT = Path(__file__).resolve().parent.parent


def built_module() -> Path:
    spec = importlib.util.find_spec("animatelcm._C")
    if spec is None or spec.origin is None:
        pytest.skip("animatelcm._C is not built")
    return Path(spec.origin)


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, CUDA_HOME, or the copy Triton's wheel ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    import os

    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.exists()), None)


def elf_archs(path: Path) -> set[str]:
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install triton or put the CUDA toolkit's bin on PATH)")
    listing = subprocess.run([tool, "--list-elf", str(path)], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"sm_(\d+)", listing))


def test_cuda_build_has_device_code_for_every_listed_arch():
    info = ops.build_info()
    if not info.get("cuda"):
        pytest.skip("built without CUDA")
    archs = set(info["cuda_archs"].split(","))
    assert archs and archs <= elf_archs(built_module())
    assert info["version"].split("+")[1] == "cu" + "".join(info["cuda_version"].split(".")[:2])


def test_cpu_isa_builds_are_compiled_in():
    info = ops.build_info()
    if not info.get("native"):
        pytest.skip(info.get("reason"))
    assert info["cpu_isas"].split(",")[0] == "baseline"
    from animatelcm import _C

    assert _C.cpu_isa() in info["cpu_isas"].split(",")


def test_every_package_of_the_source_tree_is_installed():
    """pyproject lists the packages by hand (kernels/ installs as animatelcm.kernels): each folder of animatelcm/
    with an __init__.py must be among them, or `pip install .` (not the editable install) leaves it out."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    sources = {package: ROOT / folder for package, folder in setuptools.get("package-dir", {}).items()}
    packages = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "animatelcm").rglob("__init__.py")}
    assert packages | set(sources) == set(setuptools["packages"])
    assert all((folder / "__init__.py").is_file() for folder in sources.values())


@pytest.mark.slow
def test_wheel_names_its_cuda_version(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc")
    env = {"ANIMATELCM_CUDA": "1", "ANIMATELCM_CUDA_ARCHS": "80;90", "PATH": __import__("os").environ["PATH"]}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path),
                    str(ROOT)], check=True, env=env, capture_output=True)
    wheel = next(tmp_path.glob("animatelcm-*.whl"))
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    major, minor = re.search(r"release (\d+)\.(\d+)", version).groups()
    assert f"+cu{major}{minor}-" in wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        module = next(n for n in names if re.match(r"animatelcm/_C.*\.so$", n))
        assert "animatelcm/assets/default_model/default_model.json" in names
        assert "animatelcm/kernels/temporal_attention.py" in names
        package = ROOT / "animatelcm"
        sources = {f"animatelcm/{path.relative_to(package).as_posix()}" for path in package.rglob("*.py")}
        assert sources <= set(names), sorted(sources - set(names))
        archive.extract(module, tmp_path)
    assert {"80", "90"} <= elf_archs(tmp_path / module)
