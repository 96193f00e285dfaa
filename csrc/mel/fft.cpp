// ref: audioenc/frontend.py log_mel_spectrogram_ref (the torch.stft power spectrum).
#include "mel/fft.h"

#include <cmath>

namespace audioenc {

namespace {

FftTables make_tables() {
  FftTables t;
  const double pi = 3.14159265358979323846;
  for (int n = 0; n < kNfft; ++n) t.window[n] = static_cast<float>(0.5 - 0.5 * std::cos(2 * pi * n / kNfft));
  for (int i = 0; i < kStages; ++i) {
    const int r = kRadix[i], n = kStageN[i], m = n / r;
    if (m == 1) continue;
    for (int p = 0; p < m; ++p)
      for (int k = 1; k < r; ++k) {
        const double a = -2 * pi * p * k / n;
        t.tw_re[kTwOffset[i] + p * (r - 1) + k - 1] = static_cast<float>(std::cos(a));
        t.tw_im[kTwOffset[i] + p * (r - 1) + k - 1] = static_cast<float>(std::sin(a));
      }
  }
  for (int k = 0; k < kBins; ++k) {
    const double a = -2 * pi * k / kNfft;
    t.post_re[k] = static_cast<float>(std::cos(a));
    t.post_im[k] = static_cast<float>(std::sin(a));
  }
  return t;
}

template <int R>
void stage(int i, const float* xr, const float* xi, float* yr, float* yi, const FftTables& t) {
  const int s = kStageS[i], m = kStageN[i] / R;
  for (int p = 0; p < m; ++p)
    for (int q = 0; q < s; ++q)
      fft_butterfly<R>(xr, xi, yr, yi, s, m, p, q, t.tw_re + kTwOffset[i], t.tw_im + kTwOffset[i]);
}

}  // namespace

const FftTables& fft_tables() {
  static const FftTables tables = make_tables();
  return tables;
}

void power_spectrum_frame(const float* frame, float* power) {
  const FftTables& t = fft_tables();
  float ar[kHalf], ai[kHalf], br[kHalf], bi[kHalf];
  for (int n = 0; n < kHalf; ++n) {
    ar[n] = frame[2 * n] * t.window[2 * n];
    ai[n] = frame[2 * n + 1] * t.window[2 * n + 1];
  }
  stage<4>(0, ar, ai, br, bi, t);
  stage<2>(1, br, bi, ar, ai, t);
  stage<5>(2, ar, ai, br, bi, t);
  stage<5>(3, br, bi, ar, ai, t);
  for (int k = 0; k < kBins; ++k) rfft_power(ar, ai, k, t.post_re[k], t.post_im[k], power + k);
}

}  // namespace audioenc
