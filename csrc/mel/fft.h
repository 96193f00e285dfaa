// Real FFT of Whisper's frame (n_fft 400) as a complex FFT of 200 points (even samples in the
// real part, odd samples in the imaginary part) plus one post-processing step per bin.
// The 200-point FFT is a mixed-radix Stockham FFT with radices 4, 2, 5, 5 (no bit reversal).
// Tables are computed in double and rounded once to float32.
// The butterfly templates work on a float (one frame: CUDA threads, tests) or on a GCC vector
// of floats (one frame per lane: the CPU path), so the CPU and CUDA paths share this arithmetic.
// ref: audioenc/frontend.py log_mel_spectrogram_ref (torch.stft with a periodic Hann window).
#pragma once

#if defined(__CUDACC__)
#define AUDIOENC_HD __host__ __device__ __forceinline__
#else
#define AUDIOENC_HD inline __attribute__((always_inline))
#endif

namespace audioenc {

constexpr int kNfft = 400;
constexpr int kHop = 160;
constexpr int kHalf = kNfft / 2;      // complex FFT length
constexpr int kBins = kNfft / 2 + 1;  // rfft bins

// Stage i of the Stockham FFT: radix r, sub-transform length n, stride s; m = n / r.
// Twiddles of a stage: w_n^(p*k) for p < m, 1 <= k < r, at offset + p * (r - 1) + k - 1.
constexpr int kStages = 4;
constexpr int kRadix[kStages] = {4, 2, 5, 5};
constexpr int kStageN[kStages] = {200, 50, 25, 5};
constexpr int kStageS[kStages] = {1, 4, 8, 40};
constexpr int kTwOffset[kStages] = {0, 150, 175, 195};
constexpr int kTwiddles = 195;  // the last stage (m = 1) needs none

struct FftTables {
  float window[kNfft];               // periodic Hann
  float tw_re[kTwiddles], tw_im[kTwiddles];
  float post_re[kBins], post_im[kBins];  // exp(-2 pi i k / 400)
};

// Computed once (thread-safe static), in double.
const FftTables& fft_tables();

// Power spectrum |rfft(frame * window)|^2 of one frame of 400 samples, scalar; for tests and
// as the readable version of what the vectorised paths do.
void power_spectrum_frame(const float* frame, float* power);

// One radix-R butterfly of a Stockham stage: reads x[q + s * (p + j * m)], j < R, writes
// y[q + s * (R * p + k)] = w^(p k) * sum_j x_j exp(-2 pi i j k / R).
template <int R, typename V>
AUDIOENC_HD void fft_butterfly(const V* xr, const V* xi, V* yr, V* yi, int s, int m, int p,
                               int q, const float* twr, const float* twi) {
  V ar[R], ai[R];
  for (int j = 0; j < R; ++j) {
    ar[j] = xr[q + s * (p + j * m)];
    ai[j] = xi[q + s * (p + j * m)];
  }
  V br[R], bi[R];
  if (R == 2) {
    br[0] = ar[0] + ar[1]; bi[0] = ai[0] + ai[1];
    br[1] = ar[0] - ar[1]; bi[1] = ai[0] - ai[1];
  } else if (R == 4) {
    const V s0r = ar[0] + ar[2], s0i = ai[0] + ai[2];
    const V d0r = ar[0] - ar[2], d0i = ai[0] - ai[2];
    const V s1r = ar[1] + ar[3], s1i = ai[1] + ai[3];
    const V d1r = ar[1] - ar[3], d1i = ai[1] - ai[3];
    br[0] = s0r + s1r; bi[0] = s0i + s1i;
    br[2] = s0r - s1r; bi[2] = s0i - s1i;
    br[1] = d0r + d1i; bi[1] = d0i - d1r;  // d0 - i d1
    br[3] = d0r - d1i; bi[3] = d0i + d1r;  // d0 + i d1
  } else {  // R == 5
    const float c1 = 0.30901699437494745f, c2 = -0.8090169943749475f;
    const float s1 = 0.9510565162951535f, s2 = 0.5877852522924731f;
    const V t1r = ar[1] + ar[4], t1i = ai[1] + ai[4];
    const V t2r = ar[2] + ar[3], t2i = ai[2] + ai[3];
    const V t3r = ar[1] - ar[4], t3i = ai[1] - ai[4];
    const V t4r = ar[2] - ar[3], t4i = ai[2] - ai[3];
    br[0] = ar[0] + t1r + t2r; bi[0] = ai[0] + t1i + t2i;
    const V e1r = ar[0] + c1 * t1r + c2 * t2r, e1i = ai[0] + c1 * t1i + c2 * t2i;
    const V e2r = ar[0] + c2 * t1r + c1 * t2r, e2i = ai[0] + c2 * t1i + c1 * t2i;
    const V d1r = s1 * t3r + s2 * t4r, d1i = s1 * t3i + s2 * t4i;
    const V d2r = s2 * t3r - s1 * t4r, d2i = s2 * t3i - s1 * t4i;
    br[1] = e1r + d1i; bi[1] = e1i - d1r;  // e1 - i d1
    br[4] = e1r - d1i; bi[4] = e1i + d1r;
    br[2] = e2r + d2i; bi[2] = e2i - d2r;
    br[3] = e2r - d2i; bi[3] = e2i + d2r;
  }
  yr[q + s * R * p] = br[0];
  yi[q + s * R * p] = bi[0];
  for (int k = 1; k < R; ++k) {
    V vr = br[k], vi = bi[k];
    if (p != 0) {  // w^0 = 1
      const float wr = twr[p * (R - 1) + k - 1], wi = twi[p * (R - 1) + k - 1];
      vr = br[k] * wr - bi[k] * wi;
      vi = br[k] * wi + bi[k] * wr;
    }
    yr[q + s * (R * p + k)] = vr;
    yi[q + s * (R * p + k)] = vi;
  }
}

// |X[k]|^2 of the 400-point real FFT from Z = FFT_200(even + i odd):
// X[k] = (Z[k] + conj(Z[200 - k])) / 2 - i w^k (Z[k] - conj(Z[200 - k])) / 2, w = exp(-2 pi i / 400).
template <typename V>
AUDIOENC_HD void rfft_power(const V* zr, const V* zi, int k, float wr, float wi, V* power) {
  const int j = k == 0 || k == kHalf ? 0 : kHalf - k;
  const int kk = k == kHalf ? 0 : k;
  const V ar = zr[kk], ai = zi[kk], br = zr[j], bi = zi[j];
  const V sr = ar + br, si = ai - bi;  // Z[k] + conj(Z[200 - k])
  const V dr = ar - br, di = ai + bi;  // Z[k] - conj(Z[200 - k])
  const V xr = sr + wr * di + wi * dr;
  const V xi = si + wi * di - wr * dr;
  *power = (xr * xr + xi * xi) * 0.25f;
}

}  // namespace audioenc
