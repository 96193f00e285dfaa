#include "wave/normalize.h"

#include <cmath>

namespace audioenc {

template <typename T>
void normalize_waveforms(const T* x, const int64_t* lengths, int64_t batch, int64_t stride,
                         float scale, bool normalize, float eps, float* out) {
  for (int64_t b = 0; b < batch; ++b) {
    const T* row = x + b * stride;
    float* dst = out + b * stride;
    const int64_t n = lengths[b];
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(row[i]) * scale;
    for (int64_t i = n; i < stride; ++i) dst[i] = 0.0f;
    if (!normalize || n == 0) continue;
    // Two passes over float32 values (the same values Hugging Face normalises), sums in double.
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += dst[i];
    const double mean = sum / static_cast<double>(n);
    double sq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = dst[i] - mean;
      sq += d * d;
    }
    const double var = sq / static_cast<double>(n);
    const float inv = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < n; ++i) dst[i] = (dst[i] - m) * inv;
  }
}

template void normalize_waveforms<float>(const float*, const int64_t*, int64_t, int64_t, float,
                                         bool, float, float*);
template void normalize_waveforms<double>(const double*, const int64_t*, int64_t, int64_t, float,
                                          bool, float, float*);
template void normalize_waveforms<int16_t>(const int16_t*, const int64_t*, int64_t, int64_t,
                                           float, bool, float, float*);
template void normalize_waveforms<int32_t>(const int32_t*, const int64_t*, int64_t, int64_t,
                                           float, bool, float, float*);

}  // namespace audioenc
