// Fixed-capacity ring of float32 samples addressed by absolute stream position: it holds the
// samples [begin, end) of the stream; writes append at end, Discard moves begin forward.
// Allocates once, in the constructor. Not synchronised: the owner (Chunker) locks around it.
// ref: audioenc/chunker.py _PyChunker (the same bookkeeping over a plain numpy buffer).
#pragma once

#include <cstdint>
#include <vector>

namespace audioenc {

class RingBuffer {
 public:
  explicit RingBuffer(int64_t capacity);

  int64_t capacity() const { return static_cast<int64_t>(buf_.size()); }
  int64_t begin() const { return begin_; }
  int64_t end() const { return end_; }
  int64_t free() const { return capacity() - (end_ - begin_); }

  // Appends min(n, free()) samples and returns how many.
  int64_t Write(const float* x, int64_t n);
  // Copies [pos, pos + n), which must lie inside [begin, end).
  void Read(int64_t pos, int64_t n, float* dst) const;
  // Drops samples before pos (clamped to [begin, end]).
  void Discard(int64_t pos);
  void Clear() { begin_ = end_ = 0; }

 private:
  std::vector<float> buf_;
  int64_t begin_ = 0, end_ = 0;
};

}  // namespace audioenc
