// ref: audioenc/frontend.py log_mel_spectrogram_ref (openai-whisper's log_mel_spectrogram).
#include "mel/log_mel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "mel/fft.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AUDIOENC_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace audioenc {

// Baseline path: 4 lanes, which every x86-64 CPU (SSE2) and every other target runs natively.
namespace mel_base {
typedef float V __attribute__((vector_size(16)));
typedef int32_t VI __attribute__((vector_size(16)));
constexpr int W = 4;
inline V madd(V a, V b, V c) { return a * b + c; }
inline void transpose(V* r) {
  float t[W][W];
  for (int i = 0; i < W; ++i)
    for (int j = 0; j < W; ++j) t[i][j] = r[j][i];
  std::memcpy(r, t, sizeof(t));
}
#include "mel/log_mel_kernel.inc"
}  // namespace mel_base

#ifdef AUDIOENC_X86_DISPATCH
// AVX2 + FMA path, compiled for those instructions only here and chosen at run time.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace mel_avx2 {
typedef float V __attribute__((vector_size(32)));
typedef int32_t VI __attribute__((vector_size(32)));
constexpr int W = 8;
inline V madd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline void transpose(V* r) {  // 8 x 8 in registers: unpack, shuffle, swap 128-bit halves
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#include "mel/log_mel_kernel.inc"
}  // namespace mel_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// AVX-512 path: 16 lanes, chosen at run time like the AVX2 one.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#endif
namespace mel_avx512 {
typedef float V __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));
constexpr int W = 16;
inline V madd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline void transpose(V* r) {  // 16 x 16: 4 x 4 transposes within 128-bit lanes, then of the lanes
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // u[4a + c], 128-bit lane k: rows 4a .. 4a + 3 of column 4k + c
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[c + 4], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[c + 4], 0xee);
    const __m512 v2 = _mm512_shuffle_f32x4(u[c + 8], u[c + 12], 0x44), v3 = _mm512_shuffle_f32x4(u[c + 8], u[c + 12], 0xee);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[c + 4] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
    r[c + 8] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
  }
}
#include "mel/log_mel_kernel.inc"
}  // namespace mel_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {

bool has_avx2() {
#ifdef AUDIOENC_X86_DISPATCH
  // AUDIOENC_NO_AVX2=1 forces the baseline path (tests run both).
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("AUDIOENC_NO_AVX2") == nullptr;
  return ok;
#else
  return false;
#endif
}

bool has_avx512() {
#ifdef AUDIOENC_X86_DISPATCH
  // AUDIOENC_NO_AVX512=1 forces the AVX2 path (AUDIOENC_NO_AVX2=1 the baseline).
  static const bool ok = has_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && std::getenv("AUDIOENC_NO_AVX512") == nullptr;
  return ok;
#else
  return false;
#endif
}

// Runs fn(first, last, worker) over [0, n) split into `threads` contiguous parts; the calling
// thread takes the first part, and the parts of threads that could not be started (a process or
// container thread limit, no memory for a stack). Every started thread is joined before an
// exception (the first one thrown by any part) leaves: a joinable std::thread destroyed during
// unwinding, or an exception escaping a thread, would call std::terminate.
template <typename F>
void parallel_for(int64_t n, int threads, F fn) {
  std::exception_ptr error;
  std::mutex error_mu;
  auto part = [&](int t) {
    try {
      fn(n * t / threads, n * (t + 1) / threads, t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  int started = 1;
  try {
    pool.reserve(static_cast<size_t>(threads));
    for (; started < threads; ++started) pool.emplace_back(part, started);
  } catch (...) {  // run the parts left over here
  }
  part(0);
  for (int t = started; t < threads; ++t) part(t);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

// Fewer threads for short inputs: starting one costs about as much as 256 frames.
int pick_threads(int threads, int64_t work, int64_t min_per_thread) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, work / min_per_thread)));
}

}  // namespace

const char* log_mel_cpu_isa() { return has_avx512() ? "avx512" : has_avx2() ? "avx2" : "sse2"; }

template <typename T>
void log_mel_cpu(const T* audio, int64_t stride, const int64_t* lengths, int64_t batch,
                 int64_t padding, float scale, const SparseFilters* filters, MelOutput kind,
                 float* out, int64_t out_stride, int threads, uint8_t* nonfinite) {
  const bool avx512 = has_avx512(), avx2 = has_avx2();
  const int w = avx512 ? 16 : avx2 ? 8 : 4;
  std::vector<int64_t> block_start(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b)
    block_start[b + 1] = block_start[b] + (mel_frames(lengths[b] + padding) + w - 1) / w;
  const int64_t blocks = block_start[batch];
  const int nt = pick_threads(threads, blocks, 256 / w);
  const float lowest = -std::numeric_limits<float>::infinity();
  std::vector<float> peaks(static_cast<size_t>(nt) * batch, lowest);
  std::vector<uint8_t> bad(static_cast<size_t>(nt) * batch, 0);
  parallel_for(blocks, nt, [&](int64_t first, int64_t last, int t) {
    float* pk = peaks.data() + t * batch;
    uint8_t* bd = bad.data() + t * batch;
#ifdef AUDIOENC_X86_DISPATCH
    if (avx512) {
      mel_avx512::run_blocks(audio, stride, lengths, block_start.data(), batch, padding, scale,
                             filters, kind, out, out_stride, first, last, pk, bd);
      return;
    }
    if (avx2) {
      mel_avx2::run_blocks(audio, stride, lengths, block_start.data(), batch, padding, scale,
                           filters, kind, out, out_stride, first, last, pk, bd);
      return;
    }
#endif
    mel_base::run_blocks(audio, stride, lengths, block_start.data(), batch, padding, scale,
                         filters, kind, out, out_stride, first, last, pk, bd);
  });
  for (int64_t b = 0; b < batch; ++b) {
    nonfinite[b] = 0;
    for (int t = 0; t < nt; ++t) nonfinite[b] |= bad[t * batch + b];
  }
  if (kind != MelOutput::kNormalized) return;

  // Second pass: floor at the item's max - 8, then (x + 4) / 4; rows are independent.
  const int64_t n_mels = filters->n_mels;
  std::vector<float> floor(batch, lowest);
  for (int64_t b = 0; b < batch; ++b) {
    for (int t = 0; t < nt; ++t) floor[b] = std::max(floor[b], peaks[t * batch + b]);
    floor[b] -= 8.0f;
  }
  const int64_t rows = batch * n_mels;
  parallel_for(rows, pick_threads(threads, rows * out_stride, 1 << 18), [&](int64_t first, int64_t last, int) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t b = r / n_mels;
      const float fl = floor[b];
      float* row = out + r * out_stride;
      const int64_t frames = mel_frames(lengths[b] + padding);
      for (int64_t i = 0; i < frames; ++i) row[i] = (std::max(row[i], fl) + 4.0f) * 0.25f;
    }
  });
}

template void log_mel_cpu<float>(const float*, int64_t, const int64_t*, int64_t, int64_t, float,
                                 const SparseFilters*, MelOutput, float*, int64_t, int, uint8_t*);
template void log_mel_cpu<double>(const double*, int64_t, const int64_t*, int64_t, int64_t, float,
                                  const SparseFilters*, MelOutput, float*, int64_t, int, uint8_t*);
template void log_mel_cpu<int16_t>(const int16_t*, int64_t, const int64_t*, int64_t, int64_t,
                                   float, const SparseFilters*, MelOutput, float*, int64_t, int,
                                   uint8_t*);

}  // namespace audioenc
