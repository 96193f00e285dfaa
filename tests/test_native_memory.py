"""Builds the C++ core (csrc/mel, csrc/stream) with its unit tests (csrc/tests) under
AddressSanitizer + UndefinedBehaviorSanitizer and runs them; any report or leak fails."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_cpp_unit_tests_under_asan(tmp_path):
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", d, "*.cpp")) for d in ("mel", "stream", "tests"))
    sources = [s for group in sources for s in group]
    binary = tmp_path / "audioenc_cpp_tests"
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=all", "-I", os.path.join(ROOT, "csrc"), *sources, "-o", str(binary), "-pthread"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    # the AVX-512 and AVX2 paths (where the CPU has them) and the baseline
    for isa_env in ({}, {"AUDIOENC_NO_AVX512": "1"}, {"AUDIOENC_NO_AVX2": "1"}):
        run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120, env={**env, **isa_env})
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-4000:]
        assert "ERROR: AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]
        assert "all passed" in log
