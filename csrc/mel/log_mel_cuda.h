// Whisper's log-mel frontend as CUDA kernels on the caller's stream: one warp per frame (reflect
// padding, window, the 400-point real FFT of fft.h in shared memory, power, sparse mel, log10),
// 8 frames per block so each block writes 32-byte runs of every mel row; the per-item max is an
// atomic max, and a second kernel applies the max - 8 floor and (x + 4) / 4.
// Device memory is passed as raw pointers (from torch tensors), so there is no torch C++ ABI here.
// ref: audioenc/frontend.py log_mel_spectrogram_ref (run on the same CUDA device).
#pragma once

#include <cstdint>
#include <vector>

#include "mel/fft.h"
#include "mel/mel_filters.h"

namespace audioenc {

// Layout of the constant table the kernels read, as float32: window, stage twiddles, rfft
// twiddles, then per mel filter begin / count / offset (small integers, exact in float32) and
// the packed filter weights. Built on the host; the caller keeps one copy per device.
constexpr int kTabWindow = 0;
constexpr int kTabTwRe = kTabWindow + kNfft;
constexpr int kTabTwIm = kTabTwRe + kTwiddles;
constexpr int kTabPostRe = kTabTwIm + kTwiddles;
constexpr int kTabPostIm = kTabPostRe + kBins;
constexpr int kTabMel = kTabPostIm + kBins;

inline std::vector<float> cuda_mel_tables(const SparseFilters* f) {
  const FftTables& t = fft_tables();
  std::vector<float> tab(t.window, t.window + kNfft);
  tab.insert(tab.end(), t.tw_re, t.tw_re + kTwiddles);
  tab.insert(tab.end(), t.tw_im, t.tw_im + kTwiddles);
  tab.insert(tab.end(), t.post_re, t.post_re + kBins);
  tab.insert(tab.end(), t.post_im, t.post_im + kBins);
  if (f != nullptr) {
    for (int v : f->begin) tab.push_back(static_cast<float>(v));
    for (int v : f->count) tab.push_back(static_cast<float>(v));
    for (int v : f->offset) tab.push_back(static_cast<float>(v));
    tab.insert(tab.end(), f->weights.begin(), f->weights.end());
  }
  return tab;
}

// audio: device (batch, stride) float32 (dtype 0) or int16 (dtype 1, scaled by 2^-15);
// lengths: device int64 (batch); tables: device copy of cuda_mel_tables (n_tables floats);
// kind 0 power (201 rows), 1 log-mel, 2 normalised; out: device (batch, n_out, out_stride) float32,
// item b fills its first (lengths[b] + padding) / 160 columns; item_max: device scratch (batch).
// Every lengths[b] + padding must exceed 200 and max_frames must be their largest frame count.
// device: the CUDA device of all pointers and of stream (made current for the launches).
// Returns nullptr on success, else the CUDA error string.
const char* log_mel_cuda(const void* audio, int dtype, int64_t stride, const int64_t* lengths,
                         int64_t batch, int64_t max_frames, int64_t padding, const float* tables,
                         int n_tables, int n_mels, int kind, float* out, int64_t out_stride,
                         float* item_max, int device, void* stream);

}  // namespace audioenc
