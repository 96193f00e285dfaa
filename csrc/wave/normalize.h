// Waveform input path of the wav2vec2 family: PCM of any supported sample type to float32,
// then per-item zero-mean unit-variance normalisation over the item's own valid samples.
// ref: audioenc/frontend.py normalize_waveforms_ref (itself matching Hugging Face's
// Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm).
#pragma once

#include <cstdint>

namespace audioenc {

// x: batch x stride samples (row-major); lengths[b] valid samples of row b (<= stride).
// out: batch x stride float32; samples past lengths[b] are set to 0.
// The statistics are accumulated in double: biased variance, (x - mean) / sqrt(var + eps).
template <typename T>
void normalize_waveforms(const T* x, const int64_t* lengths, int64_t batch, int64_t stride,
                         float scale, bool normalize, float eps, float* out);

}  // namespace audioenc
