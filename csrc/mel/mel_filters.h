// Sparse form of a mel filterbank: each Slaney triangle is nonzero on a few adjacent bins only,
// so every filter keeps [begin, begin + count) and its weights (80 filters: ~400 weights, not 16k).
// ref: audioenc/frontend.py mel_filters (the dense matrix, equal to librosa.filters.mel).
#pragma once

#include <cstdint>
#include <vector>

namespace audioenc {

struct SparseFilters {
  int n_mels = 0;
  int n_bins = 0;
  std::vector<int> begin, count, offset;  // per filter; weights[offset[m] + j] is bin begin[m] + j
  std::vector<float> weights;
};

// dense: n_mels x n_bins, row-major. Zeros inside a filter's span are kept, so any matrix works.
SparseFilters sparsify_filters(const float* dense, int n_mels, int n_bins);

}  // namespace audioenc
