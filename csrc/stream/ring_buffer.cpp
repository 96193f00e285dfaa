// ref: audioenc/chunker.py _PyChunker.
#include "stream/ring_buffer.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace audioenc {

RingBuffer::RingBuffer(int64_t capacity) {
  if (capacity <= 0) throw std::invalid_argument("ring buffer capacity must be positive");
  buf_.resize(static_cast<size_t>(capacity));
}

int64_t RingBuffer::Write(const float* x, int64_t n) {
  n = std::max<int64_t>(0, std::min(n, free()));
  const int64_t cap = capacity();
  int64_t done = 0;
  while (done < n) {  // at most two pieces: up to the end of the storage, then from its start
    const int64_t at = (end_ + done) % cap;
    const int64_t piece = std::min(n - done, cap - at);
    std::memcpy(buf_.data() + at, x + done, piece * sizeof(float));
    done += piece;
  }
  end_ += n;
  return n;
}

void RingBuffer::Read(int64_t pos, int64_t n, float* dst) const {
  if (pos < begin_ || n < 0 || pos + n > end_) throw std::out_of_range("ring buffer read outside [begin, end)");
  const int64_t cap = capacity();
  int64_t done = 0;
  while (done < n) {
    const int64_t at = (pos + done) % cap;
    const int64_t piece = std::min(n - done, cap - at);
    std::memcpy(dst + done, buf_.data() + at, piece * sizeof(float));
    done += piece;
  }
}

void RingBuffer::Discard(int64_t pos) { begin_ = std::max(begin_, std::min(pos, end_)); }

}  // namespace audioenc
