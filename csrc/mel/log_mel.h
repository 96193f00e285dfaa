// Whisper's log-mel frontend on the CPU in one pass per block of frames: reflect padding,
// framing, periodic Hann window, 400-point real FFT, power, sparse Slaney mel, log10 clamp; then
// the per-item max - 8 floor and (x + 4) / 4 scaling as a second cheap pass.
// Frames are processed 16 (AVX-512), 8 (AVX2 + FMA; both chosen at run time) or 4 (SSE2) at a
// time, one frame per vector lane, which lays the results out as (bins, frames) rows for free.
// ref: audioenc/frontend.py log_mel_spectrogram_ref (openai-whisper's log_mel_spectrogram).
#pragma once

#include <cstdint>

#include "mel/mel_filters.h"

namespace audioenc {

enum class MelOutput { kPower, kLogMel, kNormalized };

// Frames of an item of `samples` samples (after padding): the centred STFT without its last frame.
inline int64_t mel_frames(int64_t samples) { return samples / 160; }

// audio: batch rows of `stride` samples of type T (float, double, int16_t), each value scaled by
//   `scale`; row b has lengths[b] valid samples, followed by `padding` virtual zeros; every
//   lengths[b] + padding must exceed 200 (reflect padding).
// out: batch x n_out x out_stride floats, n_out = 201 (kPower) or filters->n_mels; item b fills
//   the first mel_frames(lengths[b] + padding) columns of its rows; the rest is left untouched.
// nonfinite: batch flags (its output is then meaningless): bit 0 where the item's samples contain
//   NaN or Inf (or, for double, values beyond float32's range), bit 1 where its power or mel values
//   overflow float32 (finite samples too large to square). threads <= 0: all cores. Thread-safe; allocates only per-thread scratch.
template <typename T>
void log_mel_cpu(const T* audio, int64_t stride, const int64_t* lengths, int64_t batch,
                 int64_t padding, float scale, const SparseFilters* filters, MelOutput kind,
                 float* out, int64_t out_stride, int threads, uint8_t* nonfinite);

// Which vector path log_mel_cpu takes on this CPU: "avx512", "avx2" or "sse2" (or "scalar").
const char* log_mel_cpu_isa();

}  // namespace audioenc
