"""The torch reference against Hugging Face transformers: every family and config switch, all
hidden states, single items and padded batches."""
import numpy as np
import pytest
import torch

import audioenc
from audioenc.encoder import cheapest_groups, length_groups
from conftest import TINY_W2V, TINY_WHISPER, W2V_VARIANTS, randomize, rel_err, speech_like

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_w2v_inputs(path, waves):
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(path)
    batch = fe(waves, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
    return batch["input_values"], batch["attention_mask"]


@pytest.mark.parametrize("variant", list(W2V_VARIANTS))
def test_wav2vec2_family_single_item(variant, w2v_checkpoints):
    path, hf = w2v_checkpoints[variant]
    enc = audioenc.load(path, backend="torch")
    assert enc.family == W2V_VARIANTS[variant][0]
    for n, seed in ((400, 1), (4001, 2), (16000 * 2 + 7, 3)):
        wave = speech_like(n, seed)
        values, _ = hf_w2v_inputs(path, [wave])
        with torch.no_grad():
            ref = hf(values, output_hidden_states=True)
        out = enc.encode(wave, output_hidden_states=True)
        assert out.lengths.tolist() == [ref.last_hidden_state.shape[1]]
        assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
        assert len(out.hidden_states) == len(ref.hidden_states) == enc.num_layers + 1
        for ours, theirs in zip(out.hidden_states, ref.hidden_states):
            assert rel_err(ours, theirs) <= TOL


def test_reference_models_are_frozen(w2v_checkpoints, whisper_checkpoints):
    """A forward pass outside no_grad (torch.onnx.export's tracing, a user's call) records no autograd
    graph: that graph kept every activation of whisper-large-v3's export alive (14 GB)."""
    for path in (w2v_checkpoints["wav2vec2-group"][0], whisper_checkpoints[80][0]):
        model = audioenc.load(path, backend="torch").backend.model
        assert not any(p.requires_grad for p in model.parameters())
        inputs = (torch.randn(1, 4000), torch.tensor([4000])) if model.dims.family != "whisper" else (torch.randn(1, 80, 3000),)
        assert model(*inputs)[0].grad_fn is None


@pytest.mark.parametrize("variant", [v for v in W2V_VARIANTS if "group" not in v])
def test_layer_norm_models_padded_batch_match_hf_with_attention_mask(variant, w2v_checkpoints):
    path, hf = w2v_checkpoints[variant]
    enc = audioenc.load(path, backend="torch")
    waves = [speech_like(n, seed) for seed, n in enumerate((16000, 5000, 9999))]
    values, mask = hf_w2v_inputs(path, waves)
    with torch.no_grad():
        ref = hf(values, attention_mask=mask, output_hidden_states=True)
    out = enc.encode(waves, output_hidden_states=True)
    for i, n in enumerate(out.lengths.tolist()):
        assert rel_err(out.last_hidden_state[i, :n], ref.last_hidden_state[i, :n]) <= TOL
        for ours, theirs in zip(out.hidden_states, ref.hidden_states):
            assert rel_err(ours[i, :n], theirs[i, :n]) <= TOL


@pytest.mark.parametrize("variant", list(W2V_VARIANTS))
def test_batch_items_equal_items_alone(variant, w2v_checkpoints):
    """Group-norm models too: each item's statistics come from its own valid samples only."""
    path, _ = w2v_checkpoints[variant]
    enc = audioenc.load(path, backend="torch")
    enc.cpu_max_padding = float("inf")  # one padded batch, not groups of similar length
    waves = [speech_like(n, 10 + i) for i, n in enumerate((401, 12000, 7321))]
    batch = enc.encode(waves, output_hidden_states=True)
    for i, wave in enumerate(waves):
        alone = enc.encode(wave, output_hidden_states=True)
        n = alone.lengths[0]
        assert batch.lengths[i] == n
        assert rel_err(batch.last_hidden_state[i, :n], alone.last_hidden_state[0]) <= 1e-5
        assert torch.all(batch.last_hidden_state[i, n:] == 0)
        for ours, single in zip(batch.hidden_states, alone.hidden_states):
            assert rel_err(ours[i, :n], single[0]) <= 1e-5


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_attention_adapters_of_a_ctc_checkpoint_match_transformers(family, tmp_path):
    """MMS (facebook/mms-1b-all) is a Wav2Vec2ForCTC with an adapter in every pre-LN layer, held in
    its model.safetensors: transformers' base model loaded from it, and the ForCTC's own encoder, give
    audioenc's frames (padded batch, every hidden state). HuBERT's pre-LN layers take the adapter too."""
    names = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert"}[family]
    config = getattr(transformers, f"{names}Config")(**TINY_W2V, feat_extract_norm="layer", do_stable_layer_norm=True,
                                                     conv_bias=True, adapter_attn_dim=8, layer_norm_eps=1e-2,
                                                     vocab_size=12)
    ctc = randomize(getattr(transformers, f"{names}ForCTC")(config))
    ctc.save_pretrained(tmp_path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path)
    base = getattr(transformers, f"{names}Model").from_pretrained(tmp_path).eval()
    enc = audioenc.load(str(tmp_path), backend="torch")
    waves = [speech_like(n, seed) for seed, n in enumerate((12000, 5001))]
    values, mask = hf_w2v_inputs(str(tmp_path), waves)
    out = enc.encode(waves, output_hidden_states=True)
    for model in (base, getattr(ctc, family)):
        with torch.no_grad():
            ref = model(values, attention_mask=mask, output_hidden_states=True)
        for i, n in enumerate(out.lengths.tolist()):
            assert rel_err(out.last_hidden_state[i, :n], ref.last_hidden_state[i, :n]) <= TOL
            for ours, theirs in zip(out.hidden_states, ref.hidden_states):
                assert rel_err(ours[i, :n], theirs[i, :n]) <= TOL


@pytest.mark.parametrize("family,stable", [("wav2vec2", False), ("wavlm", True)])
def test_adapter_attn_dim_builds_no_adapter_where_transformers_builds_none(family, stable, tmp_path):
    """transformers builds the adapter in wav2vec2's and HuBERT's pre-LN layers only: with a post-LN
    config, or WavLM's, adapter_attn_dim changes nothing."""
    names = {"wav2vec2": "Wav2Vec2", "wavlm": "WavLM"}[family]
    extra = dict(num_buckets=32, max_bucket_distance=60) if family == "wavlm" else {}
    config = getattr(transformers, f"{names}Config")(**TINY_W2V, **extra, feat_extract_norm="layer",
                                                     do_stable_layer_norm=stable, adapter_attn_dim=8)
    hf = randomize(getattr(transformers, f"{names}Model")(config))
    assert not any("adapter" in name for name in hf.state_dict())
    hf.save_pretrained(tmp_path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path)
    wave = speech_like(8000, 4)
    values, _ = hf_w2v_inputs(str(tmp_path), [wave])
    with torch.no_grad():
        ref = hf(values).last_hidden_state
    assert rel_err(audioenc.load(str(tmp_path), backend="torch").encode(wave).last_hidden_state, ref) <= TOL


def test_length_groups_bound_padding_and_size():
    groups = length_groups([100, 20, 90, 25, 100, 25], max_padding=0.25, max_samples=1000)
    assert groups == [[0, 4, 2], [3, 5, 1]]
    assert length_groups([100, 20, 90], max_padding=float("inf"), max_samples=1000) == [[0, 2, 1]]
    assert length_groups([100, 100, 100, 100], max_padding=0.0, max_samples=250) == [[0, 1], [2, 3]]
    assert length_groups([5000], max_padding=0.0, max_samples=10) == [[0]]  # one item always runs


def power_of_two_batches(batch, samples):
    """The triton backend's CUDA-graph cost: batches padded to a power of two."""
    return (1 << (batch - 1).bit_length()) * samples


def test_cheapest_groups_weigh_padding_against_calls():
    sizes = lambda groups: sorted(len(g) for g in groups)  # noqa: E731
    assert sizes(cheapest_groups([10] * 17, power_of_two_batches, 5, 64)) == [1, 16]  # not a batch of 32
    assert cheapest_groups([10] * 16, power_of_two_batches, 5, 64) == [list(range(16))]
    plain = lambda batch, samples: batch * samples  # noqa: E731
    assert cheapest_groups([30, 1, 1, 1], plain, 5, 64) == [[0], [1, 2, 3]]   # 30 s items split from 1 s ones...
    assert cheapest_groups([30, 29, 28], plain, 5, 64) == [[0, 1, 2]]          # ...not from 29 s ones
    assert cheapest_groups([30, 1, 1, 1], plain, 1e9, 64) == [[0, 1, 2, 3]]   # calls dearer than any padding
    groups = cheapest_groups(list(range(100, 0, -1)), plain, 1e9, 7)
    assert len(groups) == 15 and max(sizes(groups)) == 7 and sorted(sum(groups, [])) == list(range(100))
    assert cheapest_groups([], plain, 5, 64) == []
    assert sizes(cheapest_groups([10] * 8, plain, 1e9, 64, max_samples=30)) == [2, 3, 3]  # memory bound
    assert cheapest_groups([50, 10], plain, 1e9, 64, max_samples=30) == [[0], [1]]     # one item always runs


class OnAGpu:
    """The torch backend dressed as a GPU backend with power-of-two batches and a batch limit, as
    the triton and TensorRT backends have: the encoder then groups a list by the cost of a call."""
    device = torch.device("cuda")
    computed_samples = staticmethod(power_of_two_batches)

    def __init__(self, backend, max_batch):
        self.backend, self.max_batch, self.calls = backend, max_batch, []

    def run(self, inputs, *args):
        self.calls.append(tuple(inputs.shape))
        return self.backend.run(inputs, *args)


def test_gpu_lists_run_in_the_cheapest_groups(w2v_checkpoints):
    path, _ = w2v_checkpoints["wav2vec2-group"]
    enc = audioenc.load(path, backend="torch")
    waves = [speech_like(n, 60 + i) for i, n in enumerate((3000, 48000, 47500, 2600, 47000, 46500, 40000))]
    one_batch = enc.encode(waves)
    enc.backend = OnAGpu(enc.backend, max_batch=4)
    enc.gpu_call_cost_s = 0.5
    grouped = enc.encode(waves)
    # Four long items fill a batch of 4; the fifth runs alone rather than pad the short ones' batch to 4 x 40000.
    assert enc.backend.calls == [(4, 48000), (1, 40000), (2, 3000)]
    assert torch.equal(grouped.lengths, one_batch.lengths)
    for i, n in enumerate(one_batch.lengths.tolist()):
        assert rel_err(grouped.last_hidden_state[i, :n], one_batch.last_hidden_state[i, :n]) <= 1e-5
        assert torch.all(grouped.last_hidden_state[i, n:] == 0)


def test_cpu_lists_run_in_groups_of_similar_length(w2v_checkpoints, monkeypatch):
    """A list of mixed lengths runs in groups (less padding), and gives what one padded batch gives,
    in the caller's order, hidden states included."""
    path, _ = w2v_checkpoints["wav2vec2-group"]
    enc = audioenc.load(path, backend="torch")
    waves = [speech_like(n, 30 + i) for i, n in enumerate((16000, 3000, 15000, 2600, 400))]
    calls = []
    run = enc.backend.run
    monkeypatch.setattr(enc.backend, "run", lambda inputs, *args: calls.append(inputs.shape) or run(inputs, *args))
    grouped = enc.encode(waves, output_hidden_states=True)
    assert [tuple(c) for c in calls] == [(2, 16000), (1, 3000), (1, 2600), (1, 400)]  # within 5% padding
    enc.cpu_max_padding = float("inf")
    batch = enc.encode(waves, output_hidden_states=True)
    assert torch.equal(grouped.lengths, batch.lengths)
    assert grouped.last_hidden_state.shape == batch.last_hidden_state.shape
    for i, n in enumerate(batch.lengths.tolist()):
        assert rel_err(grouped.last_hidden_state[i, :n], batch.last_hidden_state[i, :n]) <= 1e-5
        assert torch.all(grouped.last_hidden_state[i, n:] == 0)
        for ours, theirs in zip(grouped.hidden_states, batch.hidden_states, strict=True):
            assert rel_err(ours[i, :n], theirs[i, :n]) <= 1e-5
            assert torch.all(ours[i, n:] == 0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_matches_hf(n_mels, whisper_checkpoints):
    path, hf = whisper_checkpoints[n_mels]
    enc = audioenc.load(path, backend="torch")
    waves = [speech_like(16000 * 3, 1), speech_like(16000 * 30, 2)]
    fe = transformers.WhisperFeatureExtractor.from_pretrained(path)
    features = fe(waves, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ref = hf(features, output_hidden_states=True)
    out = enc.encode(waves, output_hidden_states=True)
    assert out.lengths.tolist() == [150, 1500]
    for i, n in enumerate(out.lengths.tolist()):
        assert rel_err(out.last_hidden_state[i, :n], ref.last_hidden_state[i, :n]) <= TOL
        for ours, theirs in zip(out.hidden_states, ref.hidden_states):
            assert rel_err(ours[i, :n], theirs[i, :n]) <= TOL


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_valid_frames_are_openai_whispers_on_pad_or_trim(n_mels, tmp_path):
    """The README's valid frames: ceil(floor(samples / 160) / 2) per window, each equal to openai-whisper's
    encoder output on the log-mel of the pad_or_trim'med window; a tail under 160 samples adds none."""
    whisper = pytest.importorskip("whisper")
    from audioenc.peer_openai_whisper import openai_whisper_encoder

    config = transformers.WhisperConfig(**{**TINY_WHISPER, "num_mel_bins": n_mels, "encoder_ffn_dim": 128})  # openai's 4x
    randomize(transformers.WhisperForConditionalGeneration(config)).save_pretrained(tmp_path)
    enc = audioenc.load(str(tmp_path), backend="torch")
    theirs = openai_whisper_encoder(enc.backend.model)
    for samples, frames in ((160, 1), (16000 * 7 + 37, 350), (480000, 1500), (480001, 1500), (480000 + 160, 1501)):
        wave = speech_like(samples, samples)
        out = enc.encode(wave)
        assert out.lengths.tolist() == [frames]
        for start in range(0, samples, 480000):
            window = torch.from_numpy(wave[start : start + 480000])
            n = min(frames - start // 320, 1500)
            if n == 0:  # the tail that adds no frame
                continue
            with torch.no_grad():
                want = theirs(whisper.log_mel_spectrogram(whisper.pad_or_trim(window), n_mels)[None])[0, :n]
            assert rel_err(out.last_hidden_state[0, start // 320 : start // 320 + n], want) <= TOL


def test_whisper_with_a_shorter_window_matches_hf(tmp_path):
    """max_source_positions 750: a 15 s window (its feature extractor's chunk_length), and longer audio
    in consecutive windows of that length."""
    config = transformers.WhisperConfig(**{**TINY_WHISPER, "max_source_positions": 750})
    hf = randomize(transformers.WhisperForConditionalGeneration(config))
    hf.save_pretrained(tmp_path)
    fe = transformers.WhisperFeatureExtractor(chunk_length=15)
    fe.save_pretrained(tmp_path)
    enc = audioenc.load(str(tmp_path), backend="torch")
    waves = [speech_like(16000 * 4, 1), speech_like(16000 * 15, 2)]
    with torch.no_grad():
        ref = hf.model.encoder(fe(waves, sampling_rate=16000, return_tensors="pt").input_features,
                               output_hidden_states=True)
    out = enc.encode(waves, output_hidden_states=True)
    assert out.lengths.tolist() == [200, 750]
    for i, n in enumerate(out.lengths.tolist()):
        assert rel_err(out.last_hidden_state[i, :n], ref.last_hidden_state[i, :n]) <= TOL
        for ours, theirs in zip(out.hidden_states, ref.hidden_states):
            assert rel_err(ours[i, :n], theirs[i, :n]) <= TOL
    longer = enc.encode(np.concatenate([waves[1], waves[0]]))
    assert longer.lengths.tolist() == [950]
    assert rel_err(longer.last_hidden_state[0, :750], ref.last_hidden_state[1]) <= TOL


def test_whisper_long_audio_is_consecutive_windows(whisper_checkpoints):
    path, _ = whisper_checkpoints[80]
    enc = audioenc.load(path, backend="torch")
    wave = speech_like(16000 * 65 + 1234, 5)
    out = enc.encode(wave)
    windows = [wave[:480000], wave[480000:960000], wave[960000:]]
    parts = [enc.encode(w) for w in windows]
    assert out.lengths.item() == sum(p.lengths.item() for p in parts) == 1500 + 1500 + (81234 // 160 + 1) // 2
    expected = torch.cat([p.last_hidden_state[0, : p.lengths[0]] for p in parts])
    assert rel_err(out.last_hidden_state[0], expected) <= 1e-6


def test_whisper_batch_items_equal_items_alone(whisper_checkpoints):
    path, _ = whisper_checkpoints[80]
    enc = audioenc.load(path, backend="torch")
    waves = [speech_like(n, 20 + i) for i, n in enumerate((160, 16000 * 4, 16000 * 31))]
    batch = enc.encode(waves)
    for i, wave in enumerate(waves):
        alone = enc.encode(wave)
        n = alone.lengths[0]
        assert batch.lengths[i] == n
        assert rel_err(batch.last_hidden_state[i, :n], alone.last_hidden_state[0]) <= 1e-5


@pytest.mark.parametrize("variant", ["wav2vec2-stable", "wavlm-group"])
def test_output_layer_equals_hidden_state(variant, w2v_checkpoints):
    path, _ = w2v_checkpoints[variant]
    enc = audioenc.load(path, backend="torch")
    wave = speech_like(8000, 3)
    full = enc.encode(wave, output_hidden_states=True)
    for layer in range(enc.num_layers):
        out = enc.encode(wave, output_layer=layer)
        assert rel_err(out.last_hidden_state, full.hidden_states[layer]) <= 1e-6
    last = enc.encode(wave, output_layer=enc.num_layers)
    assert rel_err(last.last_hidden_state, full.last_hidden_state) <= 1e-6


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_whisper_output_layer_equals_hidden_state(backend, whisper_checkpoints):
    """A middle layer has no final LayerNorm; the last one, like hidden_states[-1], has it."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    enc = audioenc.load(whisper_checkpoints[80][0], backend=backend)
    waves = [speech_like(16000 * 3, 6), speech_like(9000, 7)]
    full = enc.encode(waves, output_hidden_states=True)
    for layer in range(enc.num_layers + 1):
        out = enc.encode(waves, output_layer=layer)
        assert torch.equal(out.lengths, full.lengths)
        assert rel_err(out.last_hidden_state, full.hidden_states[layer]) <= 1e-6
    assert rel_err(full.hidden_states[-1], full.last_hidden_state) == 0


def test_embed_pools_valid_frames(w2v_checkpoints):
    path, _ = w2v_checkpoints["wav2vec2-group"]
    enc = audioenc.load(path, backend="torch")
    waves = [speech_like(16000, 1), speech_like(5000, 2)]
    out = enc.encode(waves)
    mean = enc.embed(waves)
    top = enc.embed(waves, pool="max")
    for i, n in enumerate(out.lengths.tolist()):
        assert torch.allclose(mean[i], out.last_hidden_state[i, :n].mean(0), atol=1e-6)
        assert torch.allclose(top[i], out.last_hidden_state[i, :n].amax(0))


def test_pcm_types_give_the_same_frames(w2v_checkpoints):
    path, _ = w2v_checkpoints["wav2vec2-stable"]
    enc = audioenc.load(path, backend="torch")
    wave = speech_like(6000, 4)
    pcm16 = np.round(wave * 32767).astype(np.int16)
    ref = enc.encode(pcm16.astype(np.float32) / 32768).last_hidden_state
    for variant in (pcm16, pcm16.astype(np.int32) << 16, pcm16.astype(np.float64) / 32768, torch.from_numpy(pcm16)):
        assert rel_err(enc.encode(variant).last_hidden_state, ref) <= 1e-5


def test_resampled_input_has_the_frames_of_its_duration(w2v_checkpoints):
    path, _ = w2v_checkpoints["wav2vec2-group"]
    enc = audioenc.load(path, backend="torch")
    for rate in (8000, 22050, 44100, 48000, 192000):
        out = enc.encode(np.random.default_rng(rate).standard_normal(rate).astype(np.float32) * 0.1, sample_rate=rate)
        assert out.lengths.item() == 49


def test_threads_share_one_encoder(w2v_checkpoints):
    from concurrent.futures import ThreadPoolExecutor

    path, _ = w2v_checkpoints["wavlm-stable"]
    enc = audioenc.load(path, backend="torch")
    waves = [speech_like(4000 + 1000 * i, 30 + i) for i in range(8)]
    expected = [enc.encode(w).last_hidden_state for w in waves]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda w: enc.encode(w).last_hidden_state, waves * 2))
    for got, want in zip(results, expected * 2):
        assert torch.equal(got, want)


@pytest.mark.parametrize("variant", ["wav2vec2-stable", "wavlm-group"])
def test_torch_backend_bfloat16_tracks_float32(variant, w2v_checkpoints):
    """The reference in bfloat16 on the CPU: finite, and within bfloat16's rounding of float32."""
    path, _ = w2v_checkpoints[variant]
    wave = speech_like(8000, 6)
    ref = audioenc.load(path, backend="torch", dtype="float32").encode(wave).last_hidden_state
    half = audioenc.load(path, backend="torch", dtype="bfloat16").encode(wave).last_hidden_state
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert rel_err(half.float(), ref) <= 0.05
