"""Build of dpo_kernels: setuptools hands the extension dpo_kernels._C to CMake (Ninja generator).

Environment:
  DPO_KERNELS_CUDA        auto (default: build the CUDA kernels when nvcc is found), 0 or 1
  DPO_KERNELS_CUDA_ARCHS  CUDA compute capabilities, default "80;90"
  DPO_KERNELS_BUILD_TYPE  CMake build type, default Release
  MAX_JOBS                parallel compile jobs (default: CPU count)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _tool(module_name: str, attr: str, exe: str) -> str:
    """The executable shipped by the `cmake` / `ninja` Python packages, else the one on PATH."""
    try:
        module = __import__(module_name)
        path = Path(getattr(module, attr)) / exe
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(exe)
    if found is None:
        raise RuntimeError(f"dpo_kernels build: `{exe}` not found; `pip install {module_name}` provides it")
    return found


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('DPO_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDPO_KERNELS_CUDA={os.environ.get('DPO_KERNELS_CUDA', 'auto')}",
            f"-DDPO_KERNELS_CUDA_ARCHS={os.environ.get('DPO_KERNELS_CUDA_ARCHS', '80;90')}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        if not output.exists():
            raise RuntimeError(f"dpo_kernels build: CMake did not produce {output}")


setup(ext_modules=[CMakeExtension("dpo_kernels._C")], cmdclass={"build_ext": CMakeBuild})
