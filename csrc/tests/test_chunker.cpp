// ref: audioenc/chunker.py _PyChunker; here checked through the property that the centres of the
// windows rebuild the stream, with random blocks and with a producer and a consumer thread.
#include <atomic>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "stream/chunker.h"
#include "tests/check.h"

using namespace audioenc;

namespace {

// Appends the centre of every window popped; checks the context against the stream.
void drain(Chunker& c, const std::vector<float>& stream, std::vector<float>& centres) {
  std::vector<float> w(c.window_size());
  WindowInfo info;
  while (c.Pop(w.data(), &info)) {
    for (int64_t i = 0; i < c.window_size(); ++i) {
      const int64_t pos = info.start + i;
      const bool valid = pos >= info.start + c.left() - info.valid_left &&
                         pos < info.start + c.left() + info.valid_centre + info.valid_right;
      CHECK(w[i] == (valid ? stream[pos] : 0.0f));
    }
    centres.insert(centres.end(), w.begin() + c.left(), w.begin() + c.left() + info.valid_centre);
  }
}

}  // namespace

TEST(chunker_random_blocks) {
  std::mt19937 rng(4);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t chunk = 1 + rng() % 50, left = rng() % 30, right = rng() % 30;
    const int64_t cap = trial % 2 ? 0 : left + chunk + right + rng() % 10;
    Chunker c(chunk, left, right, cap);
    std::vector<float> stream(rng() % 500);
    for (size_t i = 0; i < stream.size(); ++i) stream[i] = static_cast<float>(i + 1);
    std::vector<float> centres;
    size_t done = 0;
    while (done < stream.size()) {
      const int64_t block = std::min<int64_t>(1 + rng() % 120, stream.size() - done);
      int64_t taken = 0;
      while (taken < block) {
        taken += c.AcceptWaveform(stream.data() + done + taken, block - taken);
        drain(c, stream, centres);
      }
      done += block;
    }
    c.InputFinished();
    drain(c, stream, centres);
    c.InputFinished();
    drain(c, stream, centres);
    CHECK(centres == stream);
  }
}

TEST(chunker_bad_parameters) {
  auto throws = [](int64_t chunk, int64_t left, int64_t right, int64_t cap) {
    try {
      Chunker c(chunk, left, right, cap);
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  CHECK(throws(0, 0, 0, 0));
  CHECK(throws(-3, 0, 0, 0));
  CHECK(throws(4, -1, 0, 0));
  CHECK(throws(4, 0, -1, 0));
  CHECK(throws(4, 2, 2, 7));
  CHECK(!throws(4, 2, 2, 8));
}

TEST(chunker_producer_consumer_threads) {
  const int64_t n = 200000;
  std::vector<float> stream(n);
  for (int64_t i = 0; i < n; ++i) stream[i] = static_cast<float>(i % 9973) + 0.5f;
  Chunker c(160, 40, 80, 600);
  std::vector<float> centres;
  std::thread producer([&] {
    std::mt19937 rng(5);
    int64_t done = 0;
    while (done < n) {
      const int64_t block = std::min<int64_t>(1 + rng() % 700, n - done);
      const int64_t taken = c.AcceptWaveform(stream.data() + done, block);
      if (taken == 0) std::this_thread::yield();
      done += taken;
    }
    c.InputFinished();
  });
  std::thread consumer([&] {
    while (true) {
      const bool finished = c.finished();  // read before draining: nothing can follow it
      drain(c, stream, centres);
      if (finished && !c.Ready()) break;
      std::this_thread::yield();
    }
  });
  producer.join();
  consumer.join();
  CHECK(centres == stream);
}

TEST(chunker_rejects_windows_whose_size_overflows) {
  // left + chunk + right wrapping around int64 once sized the window (and the caller's buffer) at
  // 1 sample while Pop zero-filled 2^63 of them.
  const int64_t big = INT64_MAX;
  bool threw = false;
  try {
    Chunker c(big, big, 3);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  threw = false;
  try {
    Chunker c(int64_t{1} << 62, int64_t{1} << 62, int64_t{1} << 62);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}
