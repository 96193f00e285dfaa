// ref: audioenc/frontend.py mel_filters.
#include "mel/mel_filters.h"

namespace audioenc {

SparseFilters sparsify_filters(const float* dense, int n_mels, int n_bins) {
  SparseFilters f;
  f.n_mels = n_mels;
  f.n_bins = n_bins;
  for (int m = 0; m < n_mels; ++m) {
    const float* row = dense + static_cast<int64_t>(m) * n_bins;
    int lo = 0, hi = n_bins;
    while (lo < n_bins && row[lo] == 0.0f) ++lo;
    while (hi > lo && row[hi - 1] == 0.0f) --hi;
    f.begin.push_back(lo);
    f.count.push_back(hi - lo);
    f.offset.push_back(static_cast<int>(f.weights.size()));
    f.weights.insert(f.weights.end(), row + lo, row + hi);
  }
  return f;
}

}  // namespace audioenc
