// Streaming chunker: PCM blocks of any size in, windows of left + chunk + right samples out.
// Window i has its centre at stream positions [i * chunk, (i + 1) * chunk) and starts at
// i * chunk - left. Context that does not exist (before position 0, after the end of a finished
// stream) is zero-filled and reported through valid_left / valid_right; the last window's centre
// may be short (valid_centre < chunk). A window is ready once its right context has arrived,
// or, after InputFinished, as long as its centre starts before the end of the stream.
// One producer (AcceptWaveform, InputFinished) and one consumer (Ready, Pop) may run on two
// threads at once: every call holds a mutex. No allocation after construction.
// ref: audioenc/chunker.py _PyChunker.
#pragma once

#include <cstdint>
#include <mutex>

#include "stream/ring_buffer.h"

namespace audioenc {

struct WindowInfo {
  int64_t index = 0;
  int64_t start = 0;  // stream position of the window's first sample (negative for early windows)
  int64_t valid_left = 0, valid_centre = 0, valid_right = 0;
};

class Chunker {
 public:
  // capacity 0: 2 * window_size(); otherwise it must be at least window_size().
  Chunker(int64_t chunk, int64_t left, int64_t right, int64_t capacity = 0);

  int64_t chunk() const { return chunk_; }
  int64_t left() const { return left_; }
  int64_t right() const { return right_; }
  int64_t window_size() const { return left_ + chunk_ + right_; }
  int64_t capacity() const { return ring_.capacity(); }

  // Takes as many samples as fit (the ring keeps only what the next windows need) and returns
  // how many; pop ready windows to make room for the rest. Throws after InputFinished.
  int64_t AcceptWaveform(const float* x, int64_t n);
  // Marks the end of the stream; the remaining windows become ready. Idempotent.
  void InputFinished();
  bool Ready() const;
  // Writes the next ready window (window_size() floats) to out; false when none is ready.
  bool Pop(float* out, WindowInfo* info);
  void Reset();
  int64_t received() const;
  bool finished() const;

 private:
  bool ReadyLocked() const;

  const int64_t chunk_, left_, right_;
  mutable std::mutex mu_;
  RingBuffer ring_;
  int64_t next_ = 0;  // index of the next window to pop
  bool finished_ = false;
};

}  // namespace audioenc
