"""The config.json and preprocessor_config.json of checkpoints users point audioenc at, key for key as
the hub has them, sizes shrunk: each saved from its own task class, loaded by audioenc, and compared
with transformers' base model on a batch of unequal lengths, fed as a transformers user feeds it.

Padding (DESIGN.md): audioenc gives each item the frames it gets alone. transformers agrees on a
padded batch only for layer-norm models given the feature extractor's attention_mask; group-norm
models (and any model without a mask) change under padding there, so their reference is each item
run alone through transformers."""
import json

import pytest
import safetensors.torch
import torch

import audioenc
from ckpt_factory import save_pretrained_bin
from conftest import randomize, rel_err, speech_like

T = pytest.importorskip("transformers")

TOL = 1e-4


def merged(*parts: dict, **overrides) -> dict:
    """One config from several, later keys winning."""
    return {key: value for part in (*parts, overrides) for key, value in part.items()}


CONV = dict(conv_dim=[8] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2])
MASKS = dict(mask_feature_length=10, mask_feature_prob=0.0, mask_time_length=10, mask_time_prob=0.05)
# The keys every wav2vec2-family config.json on the hub carries (values of facebook/wav2vec2-base-960h).
W2V = dict(activation_dropout=0.1, apply_spec_augment=True, attention_dropout=0.1, bos_token_id=1, conv_bias=False,
           **CONV, ctc_loss_reduction="sum", ctc_zero_infinity=False, do_stable_layer_norm=False, eos_token_id=2,
           feat_extract_activation="gelu", feat_extract_dropout=0.0, feat_extract_norm="group", feat_proj_dropout=0.1,
           final_dropout=0.1, gradient_checkpointing=False, hidden_act="gelu", hidden_dropout=0.1,
           hidden_dropout_prob=0.1, hidden_size=32, initializer_range=0.02, intermediate_size=48, layer_norm_eps=1e-05,
           layerdrop=0.1, **MASKS, model_type="wav2vec2", num_attention_heads=2, num_conv_pos_embedding_groups=16,
           num_conv_pos_embeddings=128, num_feat_extract_layers=7, num_hidden_layers=2, pad_token_id=0,
           transformers_version="4.7.0.dev0", vocab_size=32)
PRETRAINING = dict(codevector_dim=256, contrastive_logits_temperature=0.1, diversity_loss_weight=0.1,
                   feat_quantizer_dropout=0.0, freeze_feat_extract_train=True, mask_channel_length=10,
                   mask_channel_min_space=1, mask_channel_other=0.0, mask_channel_prob=0.0,
                   mask_channel_selection="static", mask_time_min_space=1, mask_time_other=0.0,
                   mask_time_selection="static", no_mask_channel_overlap=False, no_mask_time_overlap=False,
                   num_codevector_groups=2, num_codevectors_per_group=320, num_negatives=100, proj_codevector_dim=256)
# transformers >= 4.10 configs: adapter, classifier and x-vector keys (their heads unused here)
HEADS = dict(adapter_kernel_size=3, adapter_stride=2, add_adapter=False, classifier_proj_size=256,
             mask_feature_min_masks=0, mask_time_min_masks=2, num_adapter_layers=3, output_hidden_size=32,
             tdnn_dilation=[1, 2, 3, 1, 1], tdnn_dim=[16, 16, 16, 16, 24], tdnn_kernel=[5, 3, 3, 1, 1],
             torch_dtype="float32", use_weighted_layer_sum=False, xvector_output_dim=16)
STABLE = dict(conv_bias=True, do_stable_layer_norm=True, feat_extract_norm="layer")
WAVLM = merged(W2V, PRETRAINING, HEADS, model_type="wavlm", max_bucket_distance=800, num_buckets=320,
               num_ctc_classes=80, replace_prob=0.5, tokenizer_class="Wav2Vec2CTCTokenizer",
               transformers_version="4.13.0.dev0", layerdrop=0.05, final_dropout=0.0, activation_dropout=0.0)


def w2v_pre(do_normalize: bool, mask: bool) -> dict:
    return dict(do_normalize=do_normalize, feature_extractor_type="Wav2Vec2FeatureExtractor", feature_size=1,
                padding_side="right", padding_value=0.0, return_attention_mask=mask, sampling_rate=16000)


WHISPER = dict(activation_dropout=0.0, activation_function="gelu", apply_spec_augment=False, attention_dropout=0.0,
               begin_suppress_tokens=[220, 50257], bos_token_id=50257, classifier_proj_size=256, d_model=32,
               decoder_attention_heads=2, decoder_ffn_dim=48, decoder_layerdrop=0.0, decoder_layers=1,
               decoder_start_token_id=50258, dropout=0.0, encoder_attention_heads=2, encoder_ffn_dim=48,
               encoder_layerdrop=0.0, encoder_layers=2, eos_token_id=50257, init_std=0.02, is_encoder_decoder=True,
               mask_feature_length=10, mask_feature_min_masks=0, mask_feature_prob=0.0, mask_time_length=10,
               mask_time_min_masks=2, mask_time_prob=0.05, max_length=448, max_source_positions=1500,
               max_target_positions=448, median_filter_width=7, model_type="whisper", num_hidden_layers=2,
               num_mel_bins=80, pad_token_id=50257, scale_embedding=False, torch_dtype="float32",
               transformers_version="4.27.0.dev0", use_cache=True, use_weighted_layer_sum=False, vocab_size=51865,
               architectures=["WhisperForConditionalGeneration"])
WHISPER_V3 = merged(WHISPER, num_mel_bins=128, vocab_size=51866, pad_token_id=50256, torch_dtype="float16",
                    transformers_version="4.36.0.dev0")


def whisper_pre(n_mels: int, mel_filters: bool = False) -> dict:
    pre = dict(chunk_length=30, feature_extractor_type="WhisperFeatureExtractor", feature_size=n_mels, hop_length=160,
               n_fft=400, n_samples=480000, nb_max_frames=3000, padding_side="right", padding_value=0.0,
               processor_class="WhisperProcessor", return_attention_mask=False, sampling_rate=16000)
    if mel_filters:  # preprocessor_config.json of the first Whisper repos carries the filter bank
        pre["mel_filters"] = T.WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T.tolist()
    return pre


KS_LABELS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_silence_", "_unknown_"]
LANGS = ["Afrikaans", "Amharic", "Arabic", "Assamese", "Asturian", "Azerbaijani", "Belarusian", "Bengali"]


def labels(names):
    return dict(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: str(i) for i, n in enumerate(names)})


# name -> (config.json, preprocessor_config.json, how it is saved: "safetensors" | "bin" | "v5": a
# fine-tune saved by transformers 5 itself, its config.json as it writes it: "dtype", not "torch_dtype")
HUB = {
    "facebook/wav2vec2-base": (
        merged(W2V, PRETRAINING, architectures=["Wav2Vec2ForPreTraining"], activation_dropout=0.0, final_dropout=0.0,
               gradient_checkpointing=True, layerdrop=0.05, torch_dtype="float32", use_weighted_layer_sum=False),
        w2v_pre(True, False), "safetensors"),
    "facebook/wav2vec2-base-960h": (merged(W2V, architectures=["Wav2Vec2ForCTC"]), w2v_pre(True, False), "bin"),
    "facebook/wav2vec2-large-960h-lv60-self": (
        merged(W2V, STABLE, architectures=["Wav2Vec2ForCTC"]), w2v_pre(True, True), "safetensors"),
    "facebook/wav2vec2-xls-r-300m": (
        merged(W2V, PRETRAINING, HEADS, STABLE, architectures=["Wav2Vec2ForPreTraining"], activation_dropout=0.0,
               codevector_dim=768, proj_codevector_dim=768, feat_proj_dropout=0.0, final_dropout=0.0,
               mask_time_prob=0.075, transformers_version="4.10.0.dev0"),
        w2v_pre(True, True), "safetensors"),
    "jonatasgrosman/wav2vec2-large-xlsr-53-english": (
        merged(W2V, PRETRAINING, HEADS, STABLE, architectures=["Wav2Vec2ForCTC"], activation_dropout=0.05,
               ctc_loss_reduction="mean", feat_proj_dropout=0.05, hidden_dropout=0.05, layerdrop=0.05,
               transformers_version="4.14.0.dev0", vocab_size=33),
        w2v_pre(True, True), "safetensors"),
    "superb/wav2vec2-base-superb-ks": (
        merged(W2V, HEADS, architectures=["Wav2Vec2ForSequenceClassification"], use_weighted_layer_sum=True,
               **labels(KS_LABELS)),
        w2v_pre(True, False), "safetensors"),
    "facebook/hubert-base-ls960": (
        merged(W2V, architectures=["HubertModel"], model_type="hubert", tokenizer_class="Wav2Vec2CTCTokenizer",
               transformers_version="4.10.0.dev0"),
        w2v_pre(True, False), "safetensors"),
    "ntu-spml/distilhubert": (
        merged(W2V, architectures=["HubertModel"], model_type="hubert", feat_proj_layer_norm=False,
               conv_pos_batch_norm=False, transformers_version="4.12.0"),
        w2v_pre(False, False), "safetensors"),
    "facebook/hubert-large-ll60k": (
        merged(W2V, STABLE, architectures=["HubertModel"], model_type="hubert", feat_proj_layer_norm=True,
               transformers_version="4.10.0.dev0"),
        w2v_pre(True, True), "safetensors"),
    "facebook/hubert-large-ls960-ft": (
        merged(W2V, STABLE, architectures=["HubertForCTC"], model_type="hubert", transformers_version="4.10.0.dev0"),
        w2v_pre(True, True), "bin"),
    "superb/hubert-large-superb-er+float16-v5": (
        merged(W2V, STABLE, architectures=["HubertForSequenceClassification"], model_type="hubert",
               use_weighted_layer_sum=True, classifier_proj_size=256, torch_dtype="float16",
               **labels(["neu", "hap", "ang", "sad"])),
        w2v_pre(True, True), "v5"),
    "microsoft/wavlm-base": (merged(WAVLM, architectures=["WavLMModel"]), w2v_pre(False, True), "safetensors"),
    "microsoft/wavlm-base-plus": (merged(WAVLM, architectures=["WavLMModel"]), w2v_pre(False, True), "safetensors"),
    "microsoft/wavlm-base-plus-sv": (
        merged(WAVLM, architectures=["WavLMForXVector"], use_weighted_layer_sum=True),
        w2v_pre(False, True), "safetensors"),
    "microsoft/wavlm-base-plus-sd": (
        merged(WAVLM, architectures=["WavLMForAudioFrameClassification"], use_weighted_layer_sum=True,
               **labels(["LABEL_0", "LABEL_1"])),
        w2v_pre(False, True), "safetensors"),
    "microsoft/wavlm-large": (
        merged(WAVLM, STABLE, conv_bias=False, architectures=["WavLMModel"]), w2v_pre(True, True), "safetensors"),
    "openai/whisper-tiny": (WHISPER, whisper_pre(80, mel_filters=True), "safetensors"),
    "openai/whisper-base.en": (
        merged(WHISPER, vocab_size=51864, begin_suppress_tokens=[220, 50256], bos_token_id=50256,
               decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256),
        whisper_pre(80, mel_filters=True), "bin"),
    "openai/whisper-large-v3": (WHISPER_V3, whisper_pre(128), "safetensors"),
    "openai/whisper-large-v3-turbo": (
        merged(WHISPER_V3, decoder_layers=4, transformers_version="4.46.0.dev0"), whisper_pre(128), "safetensors"),
    "distil-whisper/distil-large-v3": (
        merged(WHISPER_V3, decoder_layers=2, _name_or_path="./distil-large-v3", transformers_version="4.38.2"),
        whisper_pre(128), "safetensors"),
    "sanchit-gandhi/whisper-medium-fleurs-lang-id": (
        merged(WHISPER, architectures=["WhisperForAudioClassification"], **labels(LANGS)),
        whisper_pre(80), "safetensors"),
}
# also loaded with backend "auto" (onnx on the CPU)
AUTO_BACKEND = ("facebook/wav2vec2-large-960h-lv60-self", "microsoft/wavlm-base-plus", "openai/whisper-large-v3")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """name -> its directory, saved as the hub has it (the model saved from its own task class, then
    config.json and preprocessor_config.json overwritten with the hub's)."""
    def make(name):
        config, pre, weights = HUB[name]
        path = tmp_path_factory.mktemp(name.replace("/", "--"))
        (path / "config.json").write_text(json.dumps(config))
        model = randomize(getattr(T, config["architectures"][0])(T.AutoConfig.from_pretrained(path)), seed=len(name))
        if config.get("torch_dtype") == "float16":
            model = model.half()
        if weights == "bin":  # what transformers 4 wrote; transformers 5 writes only safetensors
            save_pretrained_bin(model, path)
        else:
            model.save_pretrained(path)
        if weights == "v5":
            assert json.loads((path / "config.json").read_text())["dtype"] == "float16"
        else:
            legacy_weight_norm(path)
            (path / "config.json").write_text(json.dumps(config, indent=2))
        (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        return str(path)
    return {name: make(name) for name in HUB}


def legacy_weight_norm(path) -> None:
    """The positional conv's weight norm under the names hub files have (weight_g, weight_v): they
    were saved before torch's parametrizations, and the hub's safetensors were converted from them."""
    old = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    for file in path.glob("*.safetensors"):
        tensors = safetensors.torch.load_file(file)
        safetensors.torch.save_file({rename(k, old): v for k, v in tensors.items()}, file, metadata={"format": "pt"})
    for file in path.glob("*.bin"):
        torch.save({rename(k, old): v for k, v in torch.load(file, weights_only=True).items()}, file)


def rename(name: str, table: dict) -> str:
    for a, b in table.items():
        name = name.replace(a, b)
    return name


def transformers_encoder(path: str, family: str):
    """The base model as a transformers user loads it from the directory, in float32."""
    model = T.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return model.encoder if family == "whisper" else model


def assert_frames(out, i: int, ref, j: int, n: int) -> None:
    assert rel_err(out.last_hidden_state[i, :n], ref.last_hidden_state[j, :n]) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(ours[i, :n], theirs[j, :n]) <= TOL


@pytest.mark.parametrize("name", list(HUB))
def test_hub_checkpoint_matches_transformers(hub, name):
    config = HUB[name][0]
    path = hub[name]
    enc = audioenc.load(path, backend="torch")
    assert enc.family == config["model_type"]
    hf = transformers_encoder(path, enc.family)
    fe = T.AutoFeatureExtractor.from_pretrained(path)
    waves = [speech_like(n, seed) for seed, n in enumerate((12000 + 37, 7001, 4003))]
    encoders = [enc] + [audioenc.load(path) for _ in range(name in AUTO_BACKEND)]
    for e in encoders:
        e.cpu_max_padding = float("inf")  # one padded batch, not groups of similar length
    outs = [e.encode(waves, output_hidden_states=True) for e in encoders]
    key = "input_features" if enc.family == "whisper" else "input_values"
    with torch.no_grad():
        # as users call them: Whisper's pads to 30 s by default, Wav2Vec2's is asked to pad
        padding = {} if enc.family == "whisper" else {"padding": True}
        batch = fe(waves, sampling_rate=16000, return_tensors="pt", **padding)
        ref = hf(batch[key], attention_mask=batch.get("attention_mask"), output_hidden_states=True)
        alone = [hf(fe([w], sampling_rate=16000, return_tensors="pt")[key], output_hidden_states=True)
                 for w in waves if enc.family != "whisper"]
    for out in outs:
        for i, n in enumerate(out.lengths.tolist()):
            if enc.family == "whisper":  # every item padded to its own 30 s window
                assert n == (len(waves[i]) // 160 + 1) // 2
                assert_frames(out, i, ref, i, n)
                continue
            assert n == alone[i].last_hidden_state.shape[1]
            assert_frames(out, i, alone[i], 0, n)
            if "attention_mask" in batch and config["feat_extract_norm"] == "layer":
                assert_frames(out, i, ref, i, n)  # what the user's padded batch gives
