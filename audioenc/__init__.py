"""audioenc: fast inference for pre-trained audio encoders (wav2vec 2.0, HuBERT, WavLM, Whisper).

    enc = audioenc.load("facebook/wav2vec2-base")       # or a local dir / .pt / CTranslate2 dir
    out = enc.encode(audio, sample_rate=16000)           # out.last_hidden_state (B, frames, dim)
    emb = enc.embed(audio, pool="mean")                  # (B, dim)
"""
from audioenc.encoder import AudioEncoder, EncoderOutput
from audioenc.loading import load
from audioenc.streaming import EncoderStream, StreamFrames

__version__ = "0.1.0"
__all__ = ["load", "AudioEncoder", "EncoderOutput", "EncoderStream", "StreamFrames", "__version__"]
