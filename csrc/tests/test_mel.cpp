// ref: audioenc/frontend.py log_mel_spectrogram_ref; here checked against a double-precision DFT.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "mel/fft.h"
#include "mel/log_mel.h"
#include "mel/mel_filters.h"
#include "tests/check.h"

using namespace audioenc;

namespace {

std::vector<double> dft_power(const float* frame) {
  const double pi = 3.14159265358979323846;
  std::vector<double> p(kBins);
  for (int k = 0; k < kBins; ++k) {
    double re = 0, im = 0;
    for (int n = 0; n < kNfft; ++n) {
      const double w = 0.5 - 0.5 * std::cos(2 * pi * n / kNfft);
      re += frame[n] * w * std::cos(2 * pi * k * n / kNfft);
      im -= frame[n] * w * std::sin(2 * pi * k * n / kNfft);
    }
    p[k] = re * re + im * im;
  }
  return p;
}

// Reference log-mel of one item, straight from the definition (reflect padding, DFT, dense mel).
std::vector<double> ref_log_mel(const std::vector<float>& x, const std::vector<float>& dense, int n_mels) {
  const int64_t len = x.size(), frames = mel_frames(len);
  std::vector<double> out(n_mels * frames);
  std::vector<float> frame(kNfft);
  for (int64_t f = 0; f < frames; ++f) {
    for (int n = 0; n < kNfft; ++n) {
      int64_t j = f * kHop - kNfft / 2 + n;
      if (j < 0) j = -j;
      if (j >= len) j = 2 * (len - 1) - j;
      frame[n] = x[j];
    }
    const auto p = dft_power(frame.data());
    for (int m = 0; m < n_mels; ++m) {
      double acc = 0;
      for (int k = 0; k < kBins; ++k) acc += dense[m * kBins + k] * p[k];
      out[m * frames + f] = std::log10(std::max(acc, 1e-10));
    }
  }
  return out;
}

std::vector<float> triangle_filters(int n_mels) {  // any nonnegative sparse bank will do here
  std::vector<float> d(n_mels * kBins, 0.0f);
  for (int m = 0; m < n_mels; ++m)
    for (int k = 2 * m; k < 2 * m + 5 && k < kBins; ++k) d[m * kBins + k] = 0.01f * (1 + k % 3);
  return d;
}

}  // namespace

TEST(fft_matches_double_dft) {
  std::mt19937 rng(1);
  std::normal_distribution<float> g;
  std::vector<float> frame(kNfft), power(kBins);
  for (int trial = 0; trial < 5; ++trial) {
    for (auto& v : frame) v = g(rng);
    power_spectrum_frame(frame.data(), power.data());
    const auto ref = dft_power(frame.data());
    double num = 0, den = 0;
    for (int k = 0; k < kBins; ++k) {
      num += (power[k] - ref[k]) * (power[k] - ref[k]);
      den += ref[k] * ref[k];
    }
    CHECK(std::sqrt(num / den) < 1e-6);
  }
}

TEST(log_mel_cpu_matches_definition) {
  std::mt19937 rng(2);
  std::normal_distribution<float> g;
  const int n_mels = 40;
  const auto dense = triangle_filters(n_mels);
  const auto sparse = sparsify_filters(dense.data(), n_mels, kBins);
  for (int64_t len : {201, 399, 401, 2000, 3333}) {
    std::vector<float> x(len);
    for (auto& v : x) v = 0.1f * g(rng);
    const auto ref = ref_log_mel(x, dense, n_mels);
    const int64_t frames = mel_frames(len);
    for (int threads : {1, 3}) {
      std::vector<float> out(n_mels * frames, -99.0f);
      uint8_t bad = 7;
      log_mel_cpu<float>(x.data(), len, &len, 1, 0, 1.0f, &sparse, MelOutput::kLogMel, out.data(),
                         frames, threads, &bad);
      CHECK(bad == 0);
      double worst = 0;
      for (size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::fabs(out[i] - ref[i]));
      CHECK(worst < 1e-4);
    }
  }
}

TEST(log_mel_cpu_types_batch_and_nonfinite) {
  // int16 rows of different lengths in one buffer, with padding; each row as float gives the same.
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> u(-20000, 20000);
  const int n_mels = 16;
  const auto dense = triangle_filters(n_mels);
  const auto sparse = sparsify_filters(dense.data(), n_mels, kBins);
  const int64_t stride = 1700, padding = 37;
  std::vector<int16_t> pcm(2 * stride);
  for (auto& v : pcm) v = static_cast<int16_t>(u(rng));
  const int64_t lengths[2] = {1700, 950};
  const int64_t out_stride = mel_frames(stride + padding);
  std::vector<float> out(2 * n_mels * out_stride, 0.0f);
  uint8_t bad[2];
  log_mel_cpu<int16_t>(pcm.data(), stride, lengths, 2, padding, 1.0f / 32768.0f, &sparse,
                       MelOutput::kNormalized, out.data(), out_stride, 2, bad);
  for (int b = 0; b < 2; ++b) {
    std::vector<double> row(lengths[b]);
    for (int64_t i = 0; i < lengths[b]; ++i) row[i] = pcm[b * stride + i] / 32768.0;
    const int64_t len = lengths[b] + padding;
    row.resize(len, 0.0);
    std::vector<float> one(n_mels * mel_frames(len));
    uint8_t flag;
    log_mel_cpu<double>(row.data(), len, &len, 1, 0, 1.0f, &sparse, MelOutput::kNormalized,
                        one.data(), mel_frames(len), 1, &flag);
    double worst = 0;
    for (int m = 0; m < n_mels; ++m)
      for (int64_t f = 0; f < mel_frames(len); ++f)
        worst = std::max<double>(worst, std::fabs(one[m * mel_frames(len) + f] -
                                          out[(b * n_mels + m) * out_stride + f]));
    CHECK(worst < 1e-6);
  }
  std::vector<float> x(3000, 0.25f), p(kBins * mel_frames(3000));
  x[2999] = NAN;  // past the last frame's window: still reported
  int64_t len = 3000;
  uint8_t flag = 0;
  log_mel_cpu<float>(x.data(), len, &len, 1, 0, 1.0f, nullptr, MelOutput::kPower, p.data(),
                     mel_frames(3000), 2, &flag);
  CHECK(flag == 1);
}
