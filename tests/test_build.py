"""setup.py's build of the native core: what a user sees when nvcc cannot build the CUDA sources."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nvcc_that_fails_names_the_way_out(tmp_path):
    # An nvcc older than 11.8 rejects the default sm_90 target: the build must say how to go on.
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "k.cu").write_text("__global__ void k() {}\n")
    (tmp_path / "csrc" / "m.cpp").write_text("#include <pybind11/pybind11.h>\nPYBIND11_MODULE(_C, m) {}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\necho \"nvcc fatal   : Unsupported gpu architecture 'compute_90'\" >&2\nexit 1\n")
    nvcc.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", AUDIOENC_CUDA="auto")
    env.pop("AUDIOENC_NO_EXT", None)
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "tmp")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    log = run.stdout + run.stderr
    assert run.returncode != 0, log[-2000:]
    assert "failed to compile csrc/k.cu" in log and "AUDIOENC_CUDA=0" in log, log[-2000:]
