"""audioenc.log_mel_spectrogram / power_spectrogram against openai-whisper, torch.stft and librosa,
on the native CPU path, the torch fallback and (marker gpu) the CUDA kernels."""
import warnings

import numpy as np
import pytest
import torch

import audioenc.frontend as fe
from audioenc._native import _C
from audioenc.frontend import log_mel_spectrogram, log_mel_spectrogram_ref, mel_filters, power_spectrogram

whisper = pytest.importorskip("whisper")


def speech_like(n, rng):
    """Harmonics of a wandering f0 under a syllable-rate envelope, plus noise bursts."""
    t = np.arange(n) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(h * phase) / h for h in range(1, 25))
    env = np.clip(np.sin(2 * np.pi * 3.3 * t + rng.uniform(0, 6)), 0, None) ** 2
    noise = rng.standard_normal(n) * (np.sin(2 * np.pi * 1.1 * t) > 0.8)
    return (0.1 * env * voiced + 0.02 * noise + 1e-4 * rng.standard_normal(n)).astype(np.float32)


def signal(kind, n, rng):
    return speech_like(n, rng) if kind == "speech" else (0.1 * rng.standard_normal(n)).astype(np.float32)


def whisper_ref(x, n_mels=80, padding=0):
    return whisper.log_mel_spectrogram(torch.from_numpy(x), n_mels=n_mels, padding=padding).numpy()


def assert_close(out, ref):
    d = np.abs(np.asarray(out) - ref)
    assert d.max() <= 1e-3 and d.mean() <= 1e-5, (d.max(), d.mean())


@pytest.mark.parametrize("kind", ["speech", "noise"])
@pytest.mark.parametrize("n", [201, 399, 400, 401, 4321, 480_000])
def test_matches_openai_whisper(kind, n):
    rng = np.random.default_rng()
    x = signal(kind, n, rng)
    out = log_mel_spectrogram(x)
    assert out.dtype == torch.float32 and out.shape == (80, n // 160)
    assert_close(out, whisper_ref(x))


def test_ten_minutes_once():
    x = signal("speech", 600 * 16000, np.random.default_rng())
    assert_close(log_mel_spectrogram(x), whisper_ref(x))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_librosa_and_128_bins(n_mels):
    assert not mel_filters(n_mels).flags.writeable  # cached and shared by every call
    librosa = pytest.importorskip("librosa")
    np.testing.assert_allclose(mel_filters(n_mels), librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels),
                               rtol=1e-6, atol=1e-8)
    x = signal("speech", 32000, np.random.default_rng())
    assert_close(log_mel_spectrogram(x, n_mels=n_mels), whisper_ref(x, n_mels))


@pytest.mark.parametrize("n", [201, 401, 48_000])
def test_power_matches_torch_stft(n):
    x = signal("noise", n, np.random.default_rng())
    ref = fe.power_spectrogram_ref(torch.from_numpy(x)).numpy()
    out = power_spectrogram(x).numpy()
    assert out.shape == (201, n // 160)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-5


def test_unnormalized_and_padding():
    rng = np.random.default_rng()
    x = signal("speech", 5000, rng)
    ref = log_mel_spectrogram_ref(torch.from_numpy(x), 80, padding=1234, normalize=False).numpy()
    out = log_mel_spectrogram(x, padding=1234, normalize=False)
    assert out.shape == (80, 6234 // 160)
    assert np.abs(out.numpy() - ref).max() <= 4e-3
    assert_close(log_mel_spectrogram(x, padding=480_000 - 5000), whisper_ref(x, padding=480_000 - 5000))


def test_batch_max_is_per_item_and_threads_agree():
    rng = np.random.default_rng()
    x = np.stack([signal("speech", 48000, rng), 1e-3 * signal("noise", 48000, rng)])
    out = log_mel_spectrogram(torch.from_numpy(x))
    assert out.shape == (2, 80, 300)
    for b in range(2):
        assert_close(out[b], whisper_ref(x[b]))
    assert torch.equal(log_mel_spectrogram(x, threads=1), log_mel_spectrogram(x, threads=2))


def test_list_of_lengths_and_dtypes():
    rng = np.random.default_rng()
    items = [signal("speech", n, rng) for n in (3000, 201, 16000)]
    outs = log_mel_spectrogram(items)
    assert [o.shape for o in outs] == [(80, 18), (80, 1), (80, 100)]
    for o, x in zip(outs, items):
        assert_close(o, whisper_ref(x))
    pcm = (rng.standard_normal(8000) * 3000).astype(np.int16)
    assert_close(log_mel_spectrogram(pcm), whisper_ref(pcm.astype(np.float32) / 32768))
    assert_close(log_mel_spectrogram(torch.from_numpy(items[2].astype(np.float64))), whisper_ref(items[2]))
    mixed = log_mel_spectrogram([pcm, items[0]])  # int16 and float32 items in one list
    assert_close(mixed[0], whisper_ref(pcm.astype(np.float32) / 32768))
    assert_close(mixed[1], whisper_ref(items[0]))
    for dtype in (">f4", ">f8", ">i2"):  # big-endian samples: the same values in another byte order
        x = pcm if dtype == ">i2" else items[2]
        assert torch.equal(log_mel_spectrogram(x.astype(dtype)), log_mel_spectrogram(x.astype(dtype[1:])))


def expected_isa(flags, env):
    """The vector path log_mel_cpu should pick on a CPU with these /proc/cpuinfo flags under env."""
    if "AUDIOENC_NO_AVX2" in env or not {"avx2", "fma"} <= flags:
        return "sse2"
    if "AUDIOENC_NO_AVX512" in env or not {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags:
        return "avx2"
    return "avx512"


@pytest.mark.skipif(_C is None, reason="audioenc._C is not built")
@pytest.mark.parametrize("env", [{"AUDIOENC_NO_AVX2": "1"}, {"AUDIOENC_NO_AVX512": "1"}, {}])
def test_each_vector_path_matches_whisper(env):
    import os
    import subprocess
    import sys
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        flags = set()
    isa = expected_isa(flags, env)
    code = ("import numpy as np, torch, whisper, audioenc.frontend as fe; from audioenc._native import _C; "
            f"assert _C.log_mel_cpu_isa == {isa!r}, _C.log_mel_cpu_isa; x = (0.1 * np.random.randn(2, 48003)).astype(np.float32); "
            "o = fe.log_mel_spectrogram(x); d = max((o[b] - whisper.log_mel_spectrogram(torch.from_numpy(x[b]))).abs().max().item() for b in range(2)); "
            "assert d < 1e-3, d")
    clean = {k: v for k, v in os.environ.items() if k not in ("AUDIOENC_NO_AVX2", "AUDIOENC_NO_AVX512")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_torch_fallback_matches_native(monkeypatch):
    rng = np.random.default_rng()
    x = [signal("speech", 3000, rng), signal("noise", 900, rng)]
    native = log_mel_spectrogram(x)
    monkeypatch.setattr(fe, "_C", None)
    fallback = log_mel_spectrogram(x)
    for a, b in zip(native, fallback):
        assert_close(a, b.numpy())
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # a caller's default: the STFT window must not follow it
    try:
        under_float64 = log_mel_spectrogram(x)
    finally:
        torch.set_default_dtype(dtype)
    for a, b in zip(fallback, under_float64):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    with pytest.raises(ValueError, match="NaN"):
        log_mel_spectrogram(np.full(500, np.nan, np.float32))


@pytest.mark.parametrize("native", [True, False])
def test_window_log_mel_equals_the_zero_padded_window(native, monkeypatch):
    """Whisper's 30 s window computed only where it has audio, then its zero frame copied: the same
    values as the whole padded window (bit for bit on the native path), for items that end anywhere."""
    if native and _C is None:
        pytest.skip("native core not built")
    if not native:
        monkeypatch.setattr(fe, "_C", None)
    rng = np.random.default_rng(5)
    window = 480_000
    for n in (1, 160, 401, 16_000, 479_200, 479_601, window):
        items = [signal("speech", n, rng), np.zeros(max(1, n // 3), np.float32), signal("noise", max(1, n - 999), rng)]
        padded = np.zeros((len(items), window), np.float32)
        for row, w in zip(padded, items):
            row[: len(w)] = w
        got, want = fe.window_log_mel(items, window, 80, "cpu"), log_mel_spectrogram(padded)
        assert got.shape == want.shape == (3, 80, 3000)
        if native:
            assert torch.equal(got, want), n
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bad_input():
    x = signal("noise", 1000, np.random.default_rng())
    with pytest.raises(ValueError, match="16000"):
        log_mel_spectrogram(x, sample_rate=8000)
    with pytest.raises(ValueError, match="201"):
        log_mel_spectrogram(x[:200])
    assert log_mel_spectrogram(x[:100], padding=101).shape == (80, 1)
    with pytest.raises(ValueError, match="1-D"):
        log_mel_spectrogram(x.reshape(1, 2, 500))
    with pytest.raises(TypeError):
        log_mel_spectrogram(x.astype(np.int32))
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[-1] = bad  # the last samples feed no frame, and are still checked
        with pytest.raises(ValueError, match="NaN or Inf"):
            log_mel_spectrogram(y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [201, 401, 480_000])
def test_cuda_matches_reference(n):
    assert _C is not None and _C.cuda_compiled, "the CUDA kernels were not compiled"
    rng = np.random.default_rng()
    x = torch.from_numpy(np.stack([signal("speech", n, rng), 1e-2 * signal("noise", n, rng)])).cuda()
    out = log_mel_spectrogram(x)
    assert out.device == x.device
    for b in range(2):
        d = (out[b] - log_mel_spectrogram_ref(x[b])).abs()
        assert d.max().item() <= 1e-3 and d.mean().item() <= 1e-5
    ref_power = fe.power_spectrogram_ref(x)
    p = power_spectrogram(x)
    assert ((p - ref_power).norm() / ref_power.norm()).item() <= 1e-5
    lens = [n, max(201, n // 3)]
    outs = log_mel_spectrogram([x[0], x[1, : lens[1]]], padding=77)
    for o, xi in zip(outs, [x[0], x[1, : lens[1]]]):
        d = (o - log_mel_spectrogram_ref(xi, padding=77)).abs()
        assert d.max().item() <= 1e-3
    pcm = (x[0] * 20000).to(torch.int16)
    d = (log_mel_spectrogram(pcm) - log_mel_spectrogram_ref(pcm.float() / 32768)).abs()
    assert d.max().item() <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batch_past_the_grid_limit_and_overflowing_audio(monkeypatch):
    """Items are the kernel grid's y dimension (at most 65,535 per launch); audio whose power passes
    float32's range raises, as on the CPU, instead of returning Inf."""
    monkeypatch.setattr(fe, "_cuda_kernel_failed", set())
    rng = np.random.default_rng(0)
    x = torch.from_numpy(signal("speech", 400, rng)).cuda().repeat(fe.CUDA_MAX_GRID_Y + 2, 1)
    x[-1] *= 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the reference
        out = log_mel_spectrogram(x)
    for row in (0, -2, -1):
        assert (out[row] - log_mel_spectrogram_ref(x[row])).abs().max().item() <= 1e-3
    for kind in ("power", "log", "normalized"):
        f = power_spectrogram if kind == "power" else (lambda a: log_mel_spectrogram(a, normalize=kind == "normalized"))
        with pytest.raises(ValueError, match="overflows float32"):
            f(x[:2] * 1e20)
    assert not fe._cuda_kernel_failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_that_cannot_run_gives_way_to_the_reference(monkeypatch):
    """E.g. a GPU that the native core has no binary or PTX for."""
    def no_kernel_image(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(_C, "log_mel_cuda", no_kernel_image)
    monkeypatch.setattr(fe, "_cuda_kernel_failed", set())
    x = torch.from_numpy(signal("speech", 4000, np.random.default_rng(0))).cuda()
    with pytest.warns(UserWarning, match="cannot run on cuda"):
        out = log_mel_spectrogram(x)
    assert out.device == x.device
    assert (out - log_mel_spectrogram_ref(x)).abs().max().item() <= 1e-3
    with pytest.raises(ValueError, match="NaN or Inf"):  # bad audio is still an error, not a fallback
        log_mel_spectrogram(torch.full((4000,), float("nan"), device="cuda"))


@pytest.mark.skipif(_C is None, reason="audioenc._C is not built")
@pytest.mark.parametrize("layout", ["fortran", "strided", "float64", "big-endian"])
def test_native_out_must_be_the_callers_own_buffer(layout):
    # out is written in place: a converted copy would take the results and leave out untouched.
    x = signal("noise", 1600, np.random.default_rng())[None]
    shape = (1, 80, 10)
    out = {"fortran": lambda: np.zeros(shape, np.float32, order="F"),
           "strided": lambda: np.zeros((1, 80, 20), np.float32)[:, :, ::2],
           "float64": lambda: np.zeros(shape, np.float64),
           "big-endian": lambda: np.zeros(shape, ">f4")}[layout]()
    with pytest.raises((ValueError, TypeError), match="out must be"):
        _C.log_mel_cpu(x, np.array([1600]), out, mel_filters(80), 0, "normalized", 0)


@pytest.mark.skipif(_C is None, reason="audioenc._C is not built")
@pytest.mark.parametrize("kind", ["power", "log", "normalized"])
@pytest.mark.parametrize("case", ["float32 1e20", "float32 3e38", "float64 1e300"])
def test_samples_that_overflow_the_spectrogram_raise(kind, case):
    # The 1e-10 clamp (NaN-dropping) and a log of Inf once turned these into finite, plausible
    # spectrograms, where the reference gives Inf/NaN and the encoder then raises.
    dtype, scale = case.split()
    x = signal("noise", 4000, np.random.default_rng()).astype(dtype) * float(scale)
    f = power_spectrogram if kind == "power" else (lambda a: log_mel_spectrogram(a, normalize=kind == "normalized"))
    with pytest.raises(ValueError, match="overflow|NaN or Inf"):
        f(x)
    f(x / float(scale) * 1e15)  # loud but representable: fine


@pytest.mark.skipif(_C is None, reason="audioenc._C is not built")
def test_unaligned_input_gives_the_same_result():
    x = signal("noise", 3000, np.random.default_rng())
    buf = bytearray(x.nbytes + 1)
    odd = np.frombuffer(buf, np.float32, count=x.size, offset=1)
    odd[:] = x
    assert not odd.flags.aligned
    assert torch.equal(log_mel_spectrogram(odd), log_mel_spectrogram(x))


@pytest.mark.skipif(_C is None, reason="audioenc._C is not built")
def test_threads_that_cannot_start_do_not_abort_the_process():
    """With no address space left for thread stacks, the call still finishes (on fewer threads)
    instead of std::terminate from a joinable std::thread destroyed while unwinding."""
    import subprocess
    import sys
    if "asan" in open("/proc/self/maps").read():
        pytest.skip("AddressSanitizer reserves address space up front: RLIMIT_AS cannot be used")
    code = (
        "import resource, numpy as np, audioenc.frontend as fe; from audioenc._native import _C\n"
        "x = (0.1 * np.random.randn(1, 16000 * 600)).astype(np.float32)\n"
        "a = np.empty((1, 80, 60000), np.float32); b = np.empty_like(a); f = fe.mel_filters(80)\n"
        "_C.log_mel_cpu(x, np.array([x.shape[1]]), b, f, 0, 'normalized', 1)\n"
        "vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, resource.RLIM_INFINITY))\n"
        "_C.log_mel_cpu(x, np.array([x.shape[1]]), a, f, 0, 'normalized', 1000)\n"
        "assert np.array_equal(a, b)\n"
        "print('finished')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "finished" in run.stdout, (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("native", [True, False])
def test_empty_audio_padded_to_a_window_matches_whisper(native, monkeypatch):
    # openai-whisper pads every input by 30 s (padding=N_SAMPLES), empty audio included
    if not native:
        monkeypatch.setattr(fe, "_C", None)
    empty = np.zeros(0, np.float32)
    assert_close(log_mel_spectrogram(empty, padding=480_000), whisper_ref(empty, padding=480_000))
    assert log_mel_spectrogram(np.zeros((3, 0), np.float32), padding=1000).shape == (3, 80, 6)
