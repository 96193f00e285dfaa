"""Builds the native core audioenc._C (pybind11, C++17).

AUDIOENC_NO_EXT=1   install without the extension (pure Python paths)
AUDIOENC_CUDA=auto  compile csrc/**/*.cu with nvcc when it is found (default)
AUDIOENC_CUDA=0|1   never / always (1 fails when nvcc is missing)

CUDA objects link against the static CUDA runtime, so the extension imports on
machines without a GPU or a CUDA toolkit; kernels only need the driver when called.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    mode = os.environ.get("AUDIOENC_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"AUDIOENC_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or (os.path.join(cuda_home, "bin", "nvcc") if os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) else None)
    if nvcc is None and mode == "1":
        sys.exit("AUDIOENC_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return nvcc


def cuda_root(nvcc):
    # nvcc may be a wrapper script; ask it where its own toolkit lives.
    out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return line.split("TOP=", 1)[1].strip().strip('"')
    # A wrapper script without TOP= (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda/bin/nvcc).
    for top in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if top and os.path.exists(os.path.join(top, "bin", "nvcc")):
            return top
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc first, then links them into the pybind11 module."""

    def build_extension(self, ext):
        nvcc = find_nvcc()
        cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        if nvcc and cu_sources:
            top = cuda_root(nvcc)
            arch = os.environ.get(
                "AUDIOENC_CUDA_ARCH",
                # Binaries for Ampere/Ada (sm_80 runs on sm_86/89 too) and Hopper; PTX the driver compiles
                # for Turing (T4: compute_75) and for GPUs newer than Hopper (compute_90).
                "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 "
                "-gencode=arch=compute_75,code=compute_75 -gencode=arch=compute_90,code=compute_90",
            ).split()
            objects = []
            os.makedirs(self.build_temp, exist_ok=True)
            for src in cu_sources:
                obj = os.path.join(self.build_temp, src.replace(os.sep, "_") + ".o")
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "-Icsrc", *arch]
                print(" ".join(cmd))
                if subprocess.call(cmd) != 0:
                    # e.g. an nvcc older than 11.8 (no sm_90) or a host compiler it does not support
                    sys.exit(f"nvcc ({nvcc}) failed to compile {src}; set AUDIOENC_CUDA=0 to build without the "
                             "CUDA kernels, or AUDIOENC_CUDA_ARCH to the -gencode flags this nvcc supports")
                objects.append(obj)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            ext.define_macros = list(ext.define_macros or []) + [("AUDIOENC_WITH_CUDA", "1")]
            ext.include_dirs = list(ext.include_dirs) + [os.path.join(top, "include")]
            libdir = next((d for d in (os.path.join(top, "lib64"), os.path.join(top, "lib"))
                           if os.path.exists(os.path.join(d, "libcudart_static.a"))), None)
            if libdir is None:
                sys.exit(f"nvcc found at {nvcc} but libcudart_static.a is missing under {top}")
            ext.library_dirs = list(ext.library_dirs or []) + [libdir]
            ext.libraries = list(ext.libraries or []) + ["cudart_static", "dl", "rt", "pthread"]
        super().build_extension(ext)


def extensions():
    if os.environ.get("AUDIOENC_NO_EXT", "0") == "1":
        return []
    from pybind11.setup_helpers import Pybind11Extension

    # csrc/tests/ holds the C++ unit tests (their own main); tests/test_native_memory.py builds them.
    sources = sorted(p for p in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                     if not p.startswith(os.path.join("csrc", "tests", "")))
    flags = ["-O3", "-fvisibility=hidden"]
    if os.environ.get("AUDIOENC_SANITIZE") == "address":
        flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address"]
    return [
        Pybind11Extension(
            "audioenc._C",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=flags,
            extra_link_args=["-fsanitize=address"] if "-fsanitize=address" in flags else [],
            libraries=["pthread"],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
