"""The CPU description that int8 graphs and `audioenc info` depend on, from a fake /proc/cpuinfo."""
import platform

import pytest

import audioenc
from audioenc import cpu, graph_precision
from conftest import speech_like

AVX2 = "fpu sse sse2 avx avx2 fma"
AVX512_VNNI = AVX2 + " avx512f avx512bw avx512_vnni"


@pytest.mark.parametrize("flags,isa,seven_bits", [(AVX2, "AVX2", True), (AVX512_VNNI, "AVX-512 VNNI", False),
                                                  (AVX2 + " avx_vnni", "AVX2 VNNI", False), ("fpu sse sse2", "SSE", True)])
def test_vector_isa_and_int8_range_follow_the_flags(flags, isa, seven_bits, tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(cpu, "CPUINFO", str(info))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert cpu.cpu_name() == "AMD EPYC"
    assert cpu.vector_isa() == isa
    assert graph_precision.int8_reduce_range() is seven_bits


def test_unreadable_cpuinfo_is_the_safe_case(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", str(tmp_path / "missing"))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert cpu.cpu_flags() is None and cpu.vector_isa() == "x86_64"
    assert graph_precision.int8_reduce_range() is True  # 7-bit weights never saturate, with or without VNNI
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert graph_precision.int8_reduce_range() is False


def test_torch_backend_hands_back_the_heap_after_calls_over_30_s(w2v_checkpoints, monkeypatch):
    from audioenc.backends import torch as torch_backend

    trims = []
    monkeypatch.setattr(torch_backend, "return_freed_memory", lambda: trims.append(1))
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    enc.encode(speech_like(16000, 1))
    assert trims == []  # a short call: no 7-20 ms trim
    enc.encode([speech_like(16000 * 16, 2)] * 2)
    assert trims == [1] and not enc.backend.untrimmed


def test_torch_backend_hands_back_the_heap_after_30_s_of_short_calls(w2v_checkpoints, monkeypatch):
    # A service's calls of varying lengths under 30 s grew glibc's heap without bound (wav2vec2-base,
    # 0.5-20 s: 634 MB to 2013 MB over 120 calls) when only single runs over 30 s were trimmed.
    from audioenc.backends import torch as torch_backend

    trims = []
    monkeypatch.setattr(torch_backend, "return_freed_memory", lambda: trims.append(1))
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    for seed in range(3):
        enc.encode(speech_like(16000 * 10, seed))
    assert trims == []  # 30 s so far: the 7-20 ms trim waits
    enc.encode(speech_like(16000 * 10, 3))
    assert trims == [1] and not enc.backend.untrimmed
    enc.encode(speech_like(16000 * 10, 4))
    assert trims == [1]  # counted again from the trim
