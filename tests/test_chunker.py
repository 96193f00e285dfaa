"""The ring-buffer chunker (native and pure Python): centres rebuild the stream, context is right,
flush is idempotent, bad parameters are rejected, one producer + one consumer thread are safe."""
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from audioenc._native import _C
from audioenc.chunker import Chunker

IMPLS = [False] + ([True] if _C is not None else [])


def run(chunker, x, blocks):
    windows, pos = [], 0
    for size in blocks:
        windows += chunker.push(x[pos : pos + size])
        pos += size
    windows += chunker.push(x[pos:])
    windows += chunker.flush()
    return windows


def check_windows(windows, x, chunk, left, right, complete=True):
    if complete:
        assert np.array_equal(np.concatenate([w.centre for w in windows] or [np.zeros(0, np.float32)]), x)
    for w in windows:
        i = w.index
        assert w.start == i * chunk - left
        assert len(w.samples) == left + chunk + right
        for j, v in enumerate(w.samples):
            pos = w.start + j
            valid = left - w.valid_left <= j < left + w.valid_centre + w.valid_right
            assert v == (x[pos] if valid else 0.0)
        assert w.valid_left == min(left, i * chunk)
        assert w.valid_centre == min(chunk, len(x) - i * chunk)


@settings(max_examples=150, deadline=None)
@given(chunk=st.integers(1, 64), left=st.integers(0, 40), right=st.integers(0, 40),
       extra=st.integers(0, 20), n=st.integers(0, 600), seed=st.integers(0, 2**31 - 1),
       blocks=st.lists(st.integers(0, 200), max_size=12), native=st.sampled_from(IMPLS))
def test_centres_rebuild_the_stream(chunk, left, right, extra, n, seed, blocks, native):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    capacity = left + chunk + right + extra if extra else 0
    c = Chunker(chunk, left, right, capacity, native=native)
    windows = run(c, x, blocks)
    check_windows(windows, x, chunk, left, right)
    assert c.flush() == [] and c.flush() == []


@pytest.mark.skipif(_C is None, reason="audioenc._C is not built")
@settings(max_examples=80, deadline=None)
@given(chunk=st.integers(1, 40), left=st.integers(0, 30), right=st.integers(0, 30), n=st.integers(0, 400),
       blocks=st.lists(st.integers(0, 150), max_size=10), seed=st.integers(0, 2**31 - 1))
def test_native_matches_python_reference(chunk, left, right, n, blocks, seed):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    a = run(Chunker(chunk, left, right, native=True), x, blocks)
    b = run(Chunker(chunk, left, right, native=False), x, blocks)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert (u.index, u.start, u.valid_left, u.valid_centre, u.valid_right) == \
               (v.index, v.start, v.valid_left, v.valid_centre, v.valid_right)
        assert np.array_equal(u.samples, v.samples)


@pytest.mark.parametrize("native", IMPLS)
def test_accept_takes_only_what_fits(native):
    c = Chunker(10, 5, 5, capacity=20, native=native)
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    assert c.accept_waveform(x) == 20  # the rest waits until windows are popped
    assert c.accept_waveform(x[20:]) == 0
    assert c.pop().index == 0
    assert c.accept_waveform(x[20:]) == 5  # window 1 still needs samples 5..9 as left context


@pytest.mark.parametrize("native", IMPLS)
@pytest.mark.parametrize("args", [(0, 0, 0, 0), (-1, 0, 0, 0), (4, -1, 0, 0), (4, 0, -2, 0), (4, 2, 2, 7),
                                  (2**40, 0, 0, 0), (2**62, 2**62, 0, 0)])
def test_bad_parameters(native, args):
    with pytest.raises(ValueError):
        Chunker(*args, native=native)
    for bad in (3.7, "5", True):  # whole numbers of samples only: nothing is silently rounded
        with pytest.raises(TypeError, match="whole number of samples"):
            Chunker(bad, native=native)
    assert Chunker(np.int64(4), native=native).chunk == 4


@pytest.mark.parametrize("native", IMPLS)
def test_input_after_flush_and_reset(native):
    c = Chunker(4, 1, 1, native=native)
    c.push(np.ones(10, np.float32))
    c.flush()
    with pytest.raises(RuntimeError):
        c.accept_waveform(np.ones(3, np.float32))
    c.reset()
    x = np.random.default_rng(1).standard_normal(9).astype(np.float32)
    check_windows(c.push(x) + c.flush(), x, 4, 1, 1)


def test_int16_and_2d_blocks():
    c = Chunker(4)
    w = c.push(np.array([16384, -32768, 0, 8192], np.int16))
    assert np.array_equal(w[0].centre, [0.5, -1.0, 0.0, 0.25])
    with pytest.raises(ValueError):
        c.push(np.zeros((2, 2), np.float32))


@pytest.mark.skipif(_C is None, reason="audioenc._C is not built")
def test_one_producer_one_consumer_thread():
    x = np.random.default_rng(2).standard_normal(300_000).astype(np.float32)
    c = Chunker(1600, 320, 480, capacity=5000)
    got, errors = [], []

    def producer():
        rng = np.random.default_rng(3)
        pos = 0
        while pos < len(x):
            size = int(rng.integers(1, 3000))
            pos += c.accept_waveform(x[pos : pos + size])
        c.input_finished()

    def consumer():
        try:
            while True:
                finished = c._impl.finished
                while (w := c.pop()) is not None:
                    got.append(w)
                if finished and not c.ready():
                    return
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    check_windows(got[:3] + got[-2:], x, 1600, 320, 480, complete=False)
    assert np.array_equal(np.concatenate([w.centre for w in got]), x)
    assert [w.index for w in got] == list(range(len(got)))


@pytest.mark.skipif(_C is None, reason="audioenc._C is not built")
@pytest.mark.parametrize("args", [(2**63 - 1, 2**63 - 1, 3), (2**62, 2**62, 2**62), (1, 2**63 - 1, 2**63 - 1)])
def test_native_rejects_windows_whose_size_overflows(args):
    # The wrapped window was 1 sample: pop() then zero-filled far past its 1-float buffer.
    with pytest.raises(ValueError):
        _C.Chunker(*args)


@pytest.mark.parametrize("native", IMPLS)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.bool_, np.complex64, np.float16, np.int64, np.uint16])
def test_blocks_of_other_sample_types_are_refused(native, dtype):
    # uint8 PCM taken as 0..255, complex without its imaginary part: refused, not taken unscaled.
    c = Chunker(4, native=native)
    with pytest.raises(TypeError, match="unsupported sample type"):
        c.push(np.ones(8, dtype))
    with pytest.raises(TypeError, match="unsupported sample type"):
        c.accept_waveform(np.ones(8, dtype))
    assert c.received == 0
    assert [w.samples.tolist() for w in c.push(np.array([1, 2, 3, 4], np.int32) << 20)]  # int32 PCM still fine
