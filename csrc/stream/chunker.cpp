// ref: audioenc/chunker.py _PyChunker.
#include "stream/chunker.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace audioenc {

namespace {

int64_t checked_capacity(int64_t chunk, int64_t left, int64_t right, int64_t capacity) {
  if (chunk <= 0) throw std::invalid_argument("chunk must be > 0, got " + std::to_string(chunk));
  if (left < 0 || right < 0)
    throw std::invalid_argument("left and right context must be >= 0, got " + std::to_string(left) +
                                " and " + std::to_string(right));
  // Positions (next * chunk + chunk + right, start + window) are int64 sums: bound the window so
  // none of them, nor the default capacity, can overflow (an overflowed window sizes the buffers
  // Pop writes to smaller than what it writes).
  constexpr int64_t kMaxWindow = int64_t{1} << 60;
  if (chunk > kMaxWindow || left > kMaxWindow || right > kMaxWindow || left + chunk + right > kMaxWindow)
    throw std::invalid_argument("left + chunk + right must be at most 2^60 samples");
  const int64_t window = left + chunk + right;
  if (capacity == 0) return 2 * window;
  if (capacity < window)
    throw std::invalid_argument("capacity " + std::to_string(capacity) +
                                " is smaller than one window (left + chunk + right = " +
                                std::to_string(window) + ")");
  return capacity;
}

}  // namespace

Chunker::Chunker(int64_t chunk, int64_t left, int64_t right, int64_t capacity)
    : chunk_(chunk), left_(left), right_(right),
      ring_(checked_capacity(chunk, left, right, capacity)) {}

int64_t Chunker::AcceptWaveform(const float* x, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) throw std::logic_error("accept_waveform after input_finished; call reset() first");
  return ring_.Write(x, n);
}

void Chunker::InputFinished() {
  std::lock_guard<std::mutex> lock(mu_);
  finished_ = true;
}

bool Chunker::ReadyLocked() const {
  const int64_t centre = next_ * chunk_;
  if (finished_) return centre < ring_.end();
  return ring_.end() >= centre + chunk_ + right_;
}

bool Chunker::Ready() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ReadyLocked();
}

bool Chunker::Pop(float* out, WindowInfo* info) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!ReadyLocked()) return false;
  const int64_t centre = next_ * chunk_, start = centre - left_, size = window_size();
  const int64_t lo = std::max<int64_t>(0, start), hi = std::min(ring_.end(), start + size);
  std::fill(out, out + (lo - start), 0.0f);
  ring_.Read(lo, hi - lo, out + (lo - start));
  std::fill(out + (hi - start), out + size, 0.0f);
  info->index = next_;
  info->start = start;
  info->valid_left = centre - lo;
  info->valid_centre = std::min(chunk_, ring_.end() - centre);
  info->valid_right = std::max<int64_t>(0, hi - (centre + chunk_));
  ++next_;
  ring_.Discard(next_ * chunk_ - left_);  // what no later window needs
  return true;
}

void Chunker::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  ring_.Clear();
  next_ = 0;
  finished_ = false;
}

int64_t Chunker::received() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ring_.end();
}

bool Chunker::finished() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_;
}

}  // namespace audioenc
