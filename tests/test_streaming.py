"""Streaming and long audio: frames on the offline grid, exact conv features once the context
covers the receptive field, clean errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import audioenc
from conftest import TINY_W2V, randomize, rel_err, speech_like


def stream_all(stream, wave, seed=0, max_block=7000):
    rng = np.random.default_rng(seed)
    pieces, pos = [], 0
    while pos < len(wave):
        n = int(rng.integers(1, max_block))
        pieces.append(stream.push(wave[pos : pos + n]))
        pos += n
    pieces.append(stream.flush())
    return pieces


def collect(pieces):
    frames = torch.cat([p.frames for p in pieces if len(p)])
    times = np.concatenate([p.times for p in pieces])
    return frames, times


@pytest.mark.parametrize("variant", ["wav2vec2-group", "wavlm-stable"])
def test_stream_frames_sit_on_the_offline_grid(variant, w2v_checkpoints):
    enc = audioenc.load(w2v_checkpoints[variant][0], backend="torch")
    wave = speech_like(16000 * 5 + 777, 1)
    offline = enc.encode(wave)
    stream = enc.stream(chunk_s=0.5, left_context_s=1.0, right_context_s=0.2)
    pieces = stream_all(stream, wave)
    frames, times = collect(pieces)
    assert frames.shape == offline.last_hidden_state[0].shape
    np.testing.assert_allclose(times, np.arange(len(frames)) * 0.02)
    assert [p.first for p in pieces] == list(np.cumsum([0] + [len(p) for p in pieces[:-1]]))
    cos = torch.nn.functional.cosine_similarity(frames, offline.last_hidden_state[0], dim=-1)
    assert cos.min() > 0.5  # limited context differs from offline; the benchmark measures how much


def test_layer_norm_conv_features_are_exact_with_enough_context(w2v_checkpoints):
    """Layer-norm conv stacks have no statistics over time: with the receptive field covered, the
    streamed conv features equal the offline ones."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-layer-postln-oddpos"][0], backend="torch")  # do_normalize False
    model = enc.backend.model

    def conv_features(samples):
        x = torch.from_numpy(np.ascontiguousarray(samples))[None]
        with torch.no_grad():
            feats, _ = model.feature_extractor(x, torch.tensor([x.shape[1]]))
        return feats[0].T

    def conv_features_of_windows(windows):
        return [conv_features(w) for w in windows]

    wave = speech_like(16000 * 3 + 411, 2)
    offline = conv_features(wave)
    for left, right in ((0.0, 0.0), (0.04, 0.0), (1.0, 0.3)):
        stream = enc.stream(chunk_s=0.3, left_context_s=left, right_context_s=right)
        stream.encode_samples = conv_features_of_windows
        frames, _ = collect(stream_all(stream, wave, seed=3))
        assert frames.shape == offline.shape
        assert rel_err(frames, offline) <= 1e-5


def test_whisper_stream_keeps_offline_positions(whisper_checkpoints):
    """Windows never cross a 30 s block, so with the default left context (the whole block) and a
    right context that reaches the block's end, streamed frames equal the offline ones."""
    enc = audioenc.load(whisper_checkpoints[80][0], backend="torch")
    wave = speech_like(16000 * 33 + 99, 3)
    offline = enc.encode(wave)
    frames, times = collect(stream_all(enc.stream(chunk_s=1.0, right_context_s=0.5), wave, max_block=40000))
    assert frames.shape == (offline.lengths.item(), enc.hidden_size)
    np.testing.assert_allclose(times[-1], (len(frames) - 1) * 0.02)
    exact, _ = collect(stream_all(enc.stream(chunk_s=3.0, right_context_s=30.0), wave, max_block=40000))
    assert rel_err(exact, offline.last_hidden_state[0]) <= 1e-5
    with pytest.raises(ValueError, match="chunk_s of whole 20 ms frames that divides 30 s"):
        enc.stream(chunk_s=7)
    assert enc.stream(chunk_s=0.5, left_context_s=0)._windows_per_run == 1  # each window runs as its 30 s block
    for right in (0.1, 30.0, 300.0):  # a block's frames are final once its 30 s are in: no context reaches past it
        stream = enc.stream(chunk_s=3.0, right_context_s=right)
        assert stream.latency_s == pytest.approx(3.0 + min(right, 27.0) + 200 / 16000)
        assert len(stream.push(wave[: 16000 * 30])) == 1500
        stream.push(wave[16000 * 30 :])
        assert rel_err(stream.flush().frames, offline.last_hidden_state[0, 1500:]) <= 1e-5


def test_whisper_stream_with_a_short_left_context_keeps_positions(whisper_checkpoints):
    """A window that starts inside its 30 s block sits behind silence at its place in the block: each
    chunk's frames equal the offline encode of the audio with everything before its left context
    silenced, which has every frame at its offline position."""
    enc = audioenc.load(whisper_checkpoints[80][0], backend="torch")
    wave = speech_like(16000 * 5, 4)
    chunk, left, right = 16000, 32000, 8000
    stream = enc.stream(chunk_s=1.0, left_context_s=2.0, right_context_s=0.5)
    frames, _ = collect(stream_all(stream, wave))
    for start in range(left, len(wave) - chunk - right - 200, chunk):  # chunks with their whole context
        heard = wave.copy()
        heard[: start - left] = 0  # what the stream's window holds
        heard = heard[: start + chunk + right + 200]
        want = enc.encode(heard).last_hidden_state[0, start // 320 : (start + chunk) // 320]
        assert rel_err(frames[start // 320 : (start + chunk) // 320], want) <= 1e-5, start


def test_stream_at_another_rate_and_pcm_types(w2v_checkpoints):
    enc = audioenc.load(w2v_checkpoints["wav2vec2-stable"][0], backend="torch")
    wave48 = speech_like(48000 * 3, 4)
    pcm = np.round(wave48 * 30000).astype(np.int16)
    offline = enc.encode(pcm, sample_rate=48000).last_hidden_state[0]
    frames, _ = collect(stream_all(enc.stream(sample_rate=48000, chunk_s=1.0, left_context_s=3.0,
                                              right_context_s=3.0), pcm))
    assert abs(frames.shape[0] - offline.shape[0]) <= 1
    n = min(len(frames), len(offline)) - 2  # the resampler's tail may shift the very last frame
    cos = torch.nn.functional.cosine_similarity(frames[:n], offline[:n], dim=-1)
    assert cos.mean() > 0.99
    # interleaved stereo blocks, (samples, channels) as sound cards deliver them, are mixed to mono
    stereo = np.stack([pcm, np.round(speech_like(48000 * 3, 5) * 30000).astype(np.int16)], axis=1)
    mono = stereo.astype(np.float32).mean(axis=1) / 32768
    settings = dict(sample_rate=48000, chunk_s=1.0)
    mixed, _ = collect(stream_all(enc.stream(**settings), stereo, seed=1))
    want, _ = collect(stream_all(enc.stream(**settings), mono, seed=1))
    assert rel_err(mixed, want) <= 1e-6


def test_stream_errors_and_flush(w2v_checkpoints):
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    for chunk_s in (0.0, -1.0):  # not ">= 0" for a negative one: 0 is refused too
        with pytest.raises(ValueError, match="chunk_s must be at least 0.02 s"):
            enc.stream(chunk_s=chunk_s)
    with pytest.raises(ValueError, match="left_context_s must be >= 0"):
        enc.stream(left_context_s=-1)
    with pytest.raises(TypeError, match="right_context_s must be a number"):
        enc.stream(right_context_s="1")
    with pytest.raises(ValueError, match="chunk_s must be a finite number"):
        enc.stream(chunk_s=float("inf"))
    assert enc.stream(chunk_s=0.05, left_context_s=0.03).chunk == 3 * 320  # halves round up, as people round
    assert enc.stream(chunk_s=2.01).chunk == 101 * 320  # 100.4999... frames in binary: still a half
    assert enc.stream(chunk_s=np.float32(0.39)).chunk == 20 * 320  # 0.38999998 as a float32: still 0.39
    assert enc.stream(chunk_s=0.05, left_context_s=0.03).left == 2 * 320
    enc.backend.max_samples = 16000 * 3  # as a TensorRT engine declares its profile's longest input
    with pytest.raises(ValueError, match="must fit the backend's longest input, 3 s"):
        enc.stream(chunk_s=1, left_context_s=2, right_context_s=0.5)
    del enc.backend.max_samples
    with pytest.raises(ValueError, match="sample_rate"):
        enc.stream(sample_rate=100)
    with pytest.raises(ValueError, match="output_layer"):
        enc.stream(output_layer=99)
    stream = enc.stream()
    with pytest.raises(ValueError, match="1-D"):
        stream.push(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        stream.push(np.full(100, np.nan, np.float32))
    with pytest.raises(ValueError, match="beyond float32's range"):
        stream.push(np.full(100, 1e300))
    with pytest.raises(TypeError, match="unsupported sample type"):
        stream.push(np.zeros(100, np.int8))
    with pytest.raises(TypeError, match="expected a numpy array or a torch tensor, got float32"):
        stream.push(np.float32(0.1))
    assert len(stream.push(np.zeros(0, np.float32))) == 0
    assert len(stream.push(speech_like(300))) == 0
    assert len(stream.flush()) == 0  # 300 samples make no frame (receptive field 400)
    assert len(stream.flush()) == 0
    with pytest.raises(RuntimeError, match="after flush"):
        stream.push(speech_like(100))


def test_an_interrupted_push_loses_no_frame(w2v_checkpoints):
    """Ctrl-C during a push's encoder call: the next push or flush goes on where it stopped, so
    the stream's frames and their positions are those of an uninterrupted one."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    wave = speech_like(16000 * 4, 7)
    expected, _ = collect(stream_all(enc.stream(chunk_s=0.2, left_context_s=0.4, right_context_s=0.2), wave))
    stream = enc.stream(chunk_s=0.2, left_context_s=0.4, right_context_s=0.2)
    stream._windows_per_run, stream._feed = 3, 3 * stream.chunk  # several encoder calls per push
    encode, calls, interrupt_at = stream.encode_samples, [], [None]

    def interrupted_once(windows):
        calls.append(len(windows))
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return encode(windows)

    stream.encode_samples = interrupted_once
    first = stream.push(wave[:16000 * 2])
    interrupt_at[0] = len(calls) + 2  # the second encoder call of the next push
    buffer = wave[16000 * 2 :].copy()
    with pytest.raises(KeyboardInterrupt):
        stream.push(buffer)
    buffer[:] = 0  # the caller reuses its buffer: the stream kept its own copy of what it holds
    interrupt_at[0] = len(calls) + 1  # and the flush is interrupted too
    with pytest.raises(KeyboardInterrupt):
        stream.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        stream.push(wave[:100])
    rest = stream.flush()
    frames = torch.cat([first.frames, rest.frames])
    assert max(calls) <= 3 and rest.first == len(first)
    np.testing.assert_allclose(rest.times, (len(first) + np.arange(len(rest))) * 0.02)
    assert rel_err(frames, expected) <= 1e-6


def test_an_interrupted_flush_at_another_rate_goes_on_when_called_again(w2v_checkpoints):
    """The resampler's last samples complete a window whose encoder call is interrupted: the next
    flush encodes it (soxr takes no second last call), and a push still raises."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    wave = speech_like(48000 * 3 + 101, 2)  # soxr holds back 568 samples at 16 kHz: more than a window
    settings = dict(sample_rate=48000, chunk_s=0.02, left_context_s=0.0, right_context_s=0.0)
    expected, _ = collect(stream_all(enc.stream(**settings), wave))
    stream = enc.stream(**settings)
    first = stream.push(wave)
    encode = stream.encode_samples

    def interrupted(windows):
        raise KeyboardInterrupt

    stream.encode_samples = interrupted
    with pytest.raises(KeyboardInterrupt):
        stream.flush()
    stream.encode_samples = encode
    with pytest.raises(RuntimeError, match="after flush"):
        stream.push(wave[:100])
    rest = stream.flush()
    assert rest.first == len(first) and len(rest) > 0
    assert rel_err(torch.cat([first.frames, rest.frames]), expected) <= 1e-6


def test_ctrl_c_at_any_step_of_a_push_or_flush(w2v_checkpoints):
    """A real SIGINT at each line the stream runs, one per stream: nothing hangs (the stream's lock
    was left held when one landed as a ``with`` ended), no frame is repeated or misplaced, a push
    took its block whole or not at all (samples_taken says which), and frames are lost only where
    the interrupt lands on their way back to the caller (after the stream let go of them: a Python
    limit). Before, 38 of the 650 steps lost or repeated frames and some hung."""
    import signal

    from audioenc import streaming

    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    wave = speech_like(16000, 3)
    settings = dict(chunk_s=0.2, left_context_s=0.2, right_context_s=0.2)
    expected = torch.cat([p.frames for p in stream_all(enc.stream(**settings), wave, max_block=4000)])

    def run(interrupt_at):
        stream, got, steps = enc.stream(**settings), [], [0]
        stream._windows_per_run, stream._feed = 2, 2 * stream.chunk  # several encoder calls per push

        def tracer(frame, event, arg):
            if frame.f_code.co_filename != streaming.__file__:
                return None
            if event == "line":
                steps[0] += 1
                if steps[0] == interrupt_at:
                    signal.raise_signal(signal.SIGINT)
            return tracer

        sys.settrace(tracer)
        try:
            for start in range(0, len(wave), 4000):
                taken = stream.samples_taken
                while True:
                    try:
                        got.append(stream.push(wave[start : start + 4000]))
                        break
                    except KeyboardInterrupt:
                        if stream.samples_taken > taken:  # the block went in
                            break
            while True:
                try:
                    got.append(stream.flush())
                    break
                except KeyboardInterrupt:
                    pass
        finally:
            sys.settrace(None)
        return [p for p in got if len(p)], steps[0]

    def hung(signum, frame):
        raise AssertionError(f"the stream hung after a Ctrl-C at step {interrupt_at}")

    _, steps = run(0)
    lossy = 0
    previous = signal.signal(signal.SIGALRM, hung)  # a wait on a lock takes signals: a hang fails the test
    try:
        for interrupt_at in range(1, steps + 1):
            signal.setitimer(signal.ITIMER_REAL, 30)
            pieces, _ = run(interrupt_at)
            signal.setitimer(signal.ITIMER_REAL, 0)
            for p in pieces:  # each frame at its place, none twice
                assert torch.allclose(p.frames, expected[p.first : p.first + len(p)], atol=1e-6)
            starts = [p.first for p in pieces]
            assert starts == sorted(starts) and all(a.first + len(a) <= b.first for a, b in zip(pieces, pieces[1:]))
            lossy += sum(len(p) for p in pieces) < len(expected)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert lossy <= steps // 50, f"{lossy} of {steps} interrupts lost frames"


def test_a_big_push_holds_a_bounded_number_of_windows(w2v_checkpoints):
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    stream = enc.stream(chunk_s=0.1, left_context_s=0.1, right_context_s=0.1)
    stream._windows_per_run, stream._feed = 4, 4 * stream.chunk
    encode, held = stream.encode_samples, []
    stream.encode_samples = lambda windows: held.append(len(stream._windows)) or encode(windows)
    out = stream.push(speech_like(16000 * 3, 8))
    assert len(out) == 140 and max(held) <= 5  # 28 windows ready; never more than about one call's held


def test_a_stream_whose_output_overflows_fails_for_good_and_keeps_its_frames(w2v_checkpoints):
    """Finite audio whose frames overflow stays in later windows' context: the stream refuses
    further pushes, and flush returns the frames finished before, at their positions."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-layer-postln-oddpos"][0], backend="torch")  # no waveform norm
    wave = speech_like(16000 * 3, 9)
    stream = enc.stream(chunk_s=0.5, left_context_s=0.5, right_context_s=0.0)
    good = stream.push(wave[:16000])
    bad = wave[16000:48000].copy()
    bad[16000:] *= np.float32(1e30)  # one push: a clean second, then the overflowing one
    with pytest.raises(ValueError, match="NaN or Inf"):
        stream.push(bad)
    with pytest.raises(RuntimeError, match="failed earlier"):
        stream.push(wave[32000:])
    rest = stream.flush()
    assert rest.first == len(good) and len(good) + len(rest) == 75  # the clean second's frames are kept
    resampled = enc.stream(sample_rate=44100, chunk_s=0.5, left_context_s=0.5, right_context_s=0.0)
    with pytest.raises(ValueError, match="resampling to 16 kHz overflows"):
        resampled.push(np.concatenate([speech_like(44100 * 2, 3), np.full(44100, 3e38, np.float32)]))
    assert len(resampled.flush()) >= 75  # the frames of the audio before it


def test_a_whisper_stream_whose_spectrogram_overflows_fails_for_good_and_keeps_its_frames(whisper_checkpoints):
    """Whisper's frontend refuses finite samples whose spectrogram overflows float32. The window that
    holds them was kept for a retry that meets the same error: every later push and flush raised it,
    and the frames finished before it in that push were never returned."""
    enc = audioenc.load(whisper_checkpoints[80][0], backend="torch")
    wave = speech_like(16000 * 4, 9)
    stream = enc.stream(chunk_s=1.0)
    good = stream.push(wave[:16000])
    bad = wave[16000:56000].copy()
    bad[24000] = 1e30  # at 2.5 s: one push finishes the first two seconds, then meets it
    with pytest.raises(ValueError, match=r"^the stream's audio from \d\.\d\d s to \d\.\d\d s: its spectrogram overflows float32"):
        stream.push(bad)
    with pytest.raises(RuntimeError, match="failed earlier .*spectrogram overflows"):
        stream.push(wave[56000:])
    rest = stream.flush()
    assert rest.first == len(good) and len(good) + len(rest) == 100  # the first two seconds' frames are kept
    assert len(stream.flush()) == 0


def test_long_audio_goes_through_windows(w2v_checkpoints):
    enc = audioenc.load(w2v_checkpoints["wav2vec2-layer-postln-oddpos"][0], backend="torch")  # layer norm, no waveform norm
    wave = speech_like(16000 * 6 + 5, 5)
    offline = enc.encode(wave).last_hidden_state[0]
    enc.long_audio_threshold_s = 2.0
    # Contexts that cover the whole item: every window sees all of it, so the frames are exact.
    enc.long_audio_chunk_s, enc.long_audio_left_s, enc.long_audio_right_s = 1.0, 7.0, 7.0
    out = enc.encode([wave, wave[:16000]])
    assert out.lengths.tolist() == [offline.shape[0], 49]
    assert rel_err(out.last_hidden_state[0], offline) <= 1e-5
    # Short contexts: bounded windows, same grid.
    enc.long_audio_left_s, enc.long_audio_right_s = 1.0, 0.5
    assert enc.encode(wave).last_hidden_state.shape[1] == offline.shape[0]
    with pytest.raises(ValueError, match="output_hidden_states is not available"):
        enc.encode(wave, output_hidden_states=True)


def test_an_item_as_long_as_the_threshold_is_encoded_whole(w2v_checkpoints):
    """verify raises the threshold to its longest item's duration: that item must not go to windows,
    though 16005 / 16000 * 16000 rounds below 16005."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    wave = speech_like(16005, 3)
    enc.long_audio_threshold_s = len(wave) / 16000
    out = enc.encode(wave, output_hidden_states=True)
    assert len(out.hidden_states) == enc.num_layers + 1 and out.lengths.item() == enc.dims.num_frames(len(wave))


def test_a_backend_with_a_longest_input_gets_long_items_in_windows_that_fit(w2v_checkpoints, monkeypatch):
    """A TensorRT engine takes inputs up to its profile's longest (max_samples): longer items go
    through long-audio windows that fit it."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    longest = int(20.5 * 16000)
    enc._fit_long_audio_to(longest)
    assert (enc.long_audio_threshold_s, enc.long_audio_chunk_s) == (20.5, 4.0)  # windows of 8 + 4 + 8 s
    sizes = []
    run = enc.backend.run
    monkeypatch.setattr(enc.backend, "run", lambda inputs, *args: sizes.append(inputs.shape[-1]) or run(inputs, *args))
    wave = speech_like(16000 * 25, 7)
    assert enc.encode(wave).lengths.item() == enc.dims.num_frames(len(wave))
    assert len(sizes) > 1 and max(sizes) <= longest
    enc._fit_long_audio_to(3 * 16000)  # shorter than the contexts: all three shrink alike
    assert (enc.long_audio_chunk_s, enc.long_audio_left_s, enc.long_audio_right_s) == (0.58, 1.18, 1.18)
    sizes.clear()
    assert enc.encode(wave).lengths.item() == enc.dims.num_frames(len(wave))
    assert max(sizes) <= 3 * 16000
    with pytest.raises(ValueError, match="at most 500 samples: too short for long-audio windows"):
        enc._fit_long_audio_to(500)  # AUDIOENC_TRT_PROFILE="seconds=0.03"
    assert enc.long_audio_chunk_s == 0.58  # as it was


def test_long_items_come_back_like_short_ones(w2v_checkpoints):
    """Long items alone have the dtype and device of the backend's outputs, as short items have."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch", dtype="bfloat16")
    enc.long_audio_threshold_s = 2.0
    wave = speech_like(16000 * 3, 6)
    long, short = enc.encode(wave).last_hidden_state, enc.encode(wave[:16000]).last_hidden_state
    assert (long.dtype, long.device) == (short.dtype, short.device) == (torch.bfloat16, torch.device("cpu"))
    stream = enc.stream()
    assert torch.cat([stream.push(wave).frames, stream.flush().frames]).dtype == torch.float32  # streams: float32


@pytest.mark.parametrize("kernel,stride", [((10, 3, 3), (5, 2, 2)),  # 20 samples per frame
                                           ((4, 2), (5, 2))])  # a receptive field (9) shorter than the hop (10)
def test_streams_and_long_windows_keep_any_conv_stacks_grid(kernel, stride, tmp_path):
    transformers = pytest.importorskip("transformers")

    config = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                         conv_dim=(8,) * len(kernel), conv_kernel=kernel, conv_stride=stride,
                                         num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    transformers.Wav2Vec2Model(config).save_pretrained(tmp_path)
    enc = audioenc.load(str(tmp_path), backend="torch", preprocessor={"do_normalize": False})
    hop = enc.frame_hop
    assert enc.frame_rate == 16000 / hop
    wave = speech_like(16000 + 37, 2)
    want = enc.dims.num_frames(len(wave))
    frames, times = collect(stream_all(enc.stream(chunk_s=0.1, left_context_s=0.1, right_context_s=0.0), wave))
    assert len(frames) == want
    np.testing.assert_allclose(times, np.arange(want) * hop / 16000)
    enc.long_audio_threshold_s = 0.5
    assert enc.encode(wave).lengths.item() == want


def make_hubert_25hz(path) -> str:
    """A tiny random HuBERT with a 25 Hz conv stack, as slprl/mhubert-base-25hz has (the standard one with
    one more stride-2 layer: 640 samples per frame), and its BatchNorm before the positional conv."""
    transformers = pytest.importorskip("transformers")

    config = transformers.HubertConfig(**{**TINY_W2V, "conv_dim": (24,) * 8, "conv_kernel": (10, 3, 3, 3, 3, 2, 2, 2),
                                          "conv_stride": (5, 2, 2, 2, 2, 2, 2, 2)},
                                       feat_extract_norm="group", conv_pos_batch_norm=True)
    randomize(transformers.HubertModel(config)).save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hubert_25hz(tmp_path_factory):
    return make_hubert_25hz(tmp_path_factory.mktemp("hubert-25hz"))


def test_a_25_hz_stream_equals_the_offline_encode_of_its_windows(hubert_25hz):
    """Chunk and contexts round to whole 40 ms frames; each chunk's frames are the offline encode of
    the window the stream cuts for it, at their offline positions."""
    enc = audioenc.load(hubert_25hz, backend="torch")
    assert (enc.frame_hop, enc.frame_rate) == (640, 25.0)
    wave = speech_like(16000 * 5 + 777, 1)
    offline = enc.encode(wave).last_hidden_state[0]
    stream = enc.stream(chunk_s=0.5, left_context_s=1.0, right_context_s=0.2)
    assert (stream.chunk, stream.left, stream.right, stream.tail) == (13 * 640, 25 * 640, 5 * 640, 720 - 640)
    assert stream.latency_s == pytest.approx((13 * 640 + 5 * 640 + 80) / 16000)
    pieces = stream_all(stream, wave)
    frames, times = collect(pieces)
    assert frames.shape == offline.shape
    np.testing.assert_allclose(times, np.arange(len(frames)) * 0.04)
    assert [p.first for p in pieces] == list(np.cumsum([0] + [len(p) for p in pieces[:-1]]))
    want = []
    for start in range(0, len(wave), stream.chunk):
        begin = max(0, start - stream.left)
        window = wave[begin : start + stream.chunk + stream.right + stream.tail]
        if len(window) >= enc.min_samples:
            first = (start - begin) // 640
            want.append(enc.encode(window).last_hidden_state[0, first : first + stream.chunk // 640])
    assert rel_err(frames, torch.cat(want)) <= 1e-5
    with pytest.raises(ValueError, match="chunk_s must be at least 0.04 s"):
        enc.stream(chunk_s=0)


def test_a_25_hz_model_encodes_long_audio_in_windows(hubert_25hz, monkeypatch):
    enc = audioenc.load(hubert_25hz, backend="torch")
    wave = speech_like(16000 * 6 + 5, 5)
    offline = enc.encode(wave).last_hidden_state[0]
    enc.long_audio_threshold_s = 1.0
    # Contexts that cover the whole item: every window sees all of it, so the frames are exact.
    enc.long_audio_chunk_s, enc.long_audio_left_s, enc.long_audio_right_s = 1.0, 7.0, 7.0
    out = enc.encode([wave, wave[:16000]])
    assert out.lengths.tolist() == [offline.shape[0], enc.dims.num_frames(16000)]
    assert rel_err(out.last_hidden_state[0], offline) <= 1e-5
    enc.long_audio_left_s, enc.long_audio_right_s = 1.0, 0.5  # short contexts: bounded windows, same grid
    assert enc.encode(wave, progress=True).lengths.item() == offline.shape[0]
    # A TensorRT profile of 2 s: the default windows shrink to whole 40 ms frames (20 ms ones rounded up past it)
    enc.long_audio_chunk_s, enc.long_audio_left_s, enc.long_audio_right_s = 30.0, 8.0, 8.0
    enc._fit_long_audio_to(2 * 16000)
    enc.backend.max_samples = 2 * 16000  # as a TensorRT engine declares its profile's longest input
    sizes, run = [], enc.backend.run
    monkeypatch.setattr(enc.backend, "run", lambda inputs, *args: sizes.append(inputs.shape[-1]) or run(inputs, *args))
    assert enc.encode(wave).lengths.item() == offline.shape[0]
    assert max(sizes) <= 2 * 16000
    assert (enc.long_audio_chunk_s, enc.long_audio_left_s, enc.long_audio_right_s) == (1.24, 0.32, 0.32)


def test_the_stream_command_prints_a_25_hz_models_times(hubert_25hz, tmp_path, capsys):
    """Each line spans its frames: from the first one's start to the last one's end, 40 ms later."""
    from audioenc.cli import main

    sf = pytest.importorskip("soundfile")
    sf.write(tmp_path / "a.wav", speech_like(16000 * 3, 6), 16000)
    out = tmp_path / "frames.npy"
    assert main(["stream", "--model", hubert_25hz, "--backend", "torch", "--file", str(tmp_path / "a.wav"),
                 "--chunk-s", "1", "--out", str(out)]) == 0
    spans = [tuple(map(float, line.split(" s ")[0].split("-"))) for line in capsys.readouterr().out.splitlines()]
    frames = np.load(out)
    assert spans[0] == (0.0, 1.0) and spans[-1][1] == pytest.approx(len(frames) * 0.04)
    assert all(end == pytest.approx(start) for (_, end), (start, _) in zip(spans, spans[1:]))  # no gap, no overlap


def test_stream_takes_numpy_numbers_as_seconds(w2v_checkpoints):
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    assert enc.frame_rate == 50.0
    stream = enc.stream(chunk_s=np.float32(0.5), left_context_s=np.int64(1), right_context_s=np.float64(0.2))
    assert (stream.chunk, stream.left, stream.right) == (8000, 16000, 3200)


NO_BAR_ASKED = """
import multiprocessing, sys, threading, numpy as np, audioenc
from multiprocessing import resource_tracker
multiprocessing.set_start_method("spawn")  # as CUDA services set it
wave = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1
whisper = audioenc.load(sys.argv[1], backend="torch")
whisper.encode([wave, np.tile(wave, 12)])  # one 30 s window and two
w2v = audioenc.load(sys.argv[2], backend="onnx")  # exports its graph, stderr not a terminal
w2v.long_audio_threshold_s = 2.0
w2v.encode(wave)  # through the long-audio windows
print([t.name for t in threading.enumerate()], resource_tracker._resource_tracker._pid)
"""


def test_encodes_that_show_no_bar_start_no_thread_or_process(w2v_checkpoints, whisper_checkpoints, tmp_path):
    """A hidden tqdm bar still starts tqdm's monitor thread, and its multiprocessing lock starts a
    resource-tracker process under "spawn": a service's encodes and exports must leave neither."""
    script = tmp_path / "no_bar.py"
    script.write_text(NO_BAR_ASKED)
    result = subprocess.run([sys.executable, str(script), whisper_checkpoints[80][0], w2v_checkpoints["wav2vec2-group"][0]],
                            env=dict(os.environ, AUDIOENC_CACHE=str(tmp_path / "cache")),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['MainThread'] None"
    assert result.stderr == ""


def test_progress_bars_for_long_items_of_both_kinds(w2v_checkpoints, whisper_checkpoints, capsys):
    """A bar per long item: the wav2vec2 family's windows (by seconds), Whisper's 30 s windows."""
    w2v = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    w2v.long_audio_threshold_s = 2.0
    w2v.encode(speech_like(16000 * 3, 1), progress=True)
    assert "encode: 100%" in capsys.readouterr().err
    whisper = audioenc.load(whisper_checkpoints[80][0], backend="torch")
    whisper.encode(speech_like(16000 * 5, 2), progress=True)
    assert capsys.readouterr().err == ""  # one window: no bar
    whisper.encode([speech_like(16000 * 5, 2), speech_like(16000 * 65, 3)], progress=True)
    assert "4/4 [" in capsys.readouterr().err  # 1 + 3 windows
