// ref: audioenc/frontend.py log_mel_spectrogram_ref (torch.stft on the same device).
#include "mel/log_mel_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

namespace audioenc {

namespace {

constexpr int kWarps = 8;  // frames per block, one warp each

__device__ void atomic_max_float(float* addr, float v) {
  // Non-negative floats order like ints, negative ones reversed like unsigned ints.
  if (v >= 0.0f)
    atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  else
    atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
}

template <int I, int R>
__device__ void warp_stage(const float* xr, const float* xi, float* yr, float* yi, const float* tab,
                           int lane) {
  constexpr int s = kStageS[I], m = kStageN[I] / R, off = kTwOffset[I];
  for (int j = lane; j < kHalf / R; j += 32)
    fft_butterfly<R>(xr, xi, yr, yi, s, m, j / s, j % s, tab + kTabTwRe + off, tab + kTabTwIm + off);
  __syncwarp();
}

template <typename T>
__global__ void log_mel_frames(const T* audio, int64_t stride, const int64_t* lengths,
                               int64_t padding, float scale, const float* tables, int n_tables,
                               int n_mels, int kind, float* out, int64_t out_stride,
                               float* item_max) {
  extern __shared__ float smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int tab_size = (n_tables + 31) / 32 * 32;
  float* tab = smem;
  float* re0 = smem + tab_size + warp * 4 * kHalf;
  float* im0 = re0 + kHalf;
  float* re1 = im0 + kHalf;
  float* im1 = re1 + kHalf;  // re1 and im1 are contiguous: the 201 power bins go there
  float* mel = smem + tab_size + kWarps * 4 * kHalf;  // n_mels x kWarps
  for (int i = tid; i < n_tables; i += blockDim.x) tab[i] = tables[i];
  __syncthreads();

  const int64_t b = blockIdx.y;
  const int64_t len = lengths[b], padded = len + padding, frames = padded / kHop;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const T* x = audio + b * stride;
  const int n_out = kind == 0 ? kBins : n_mels;
  float* y = out + b * n_out * out_stride;
  if (f < frames) {
    for (int n = lane; n < kNfft; n += 32) {  // reflect padding at both ends; zeros from padding
      int64_t j = f * kHop - kNfft / 2 + n;
      if (j < 0) j = -j;
      if (j >= padded) j = 2 * (padded - 1) - j;
      const float v = (j < len ? static_cast<float>(x[j]) * scale : 0.0f) * tab[kTabWindow + n];
      (n % 2 ? im0 : re0)[n / 2] = v;
    }
    __syncwarp();
    warp_stage<0, 4>(re0, im0, re1, im1, tab, lane);
    warp_stage<1, 2>(re1, im1, re0, im0, tab, lane);
    warp_stage<2, 5>(re0, im0, re1, im1, tab, lane);
    warp_stage<3, 5>(re1, im1, re0, im0, tab, lane);
    float* power = re1;
    for (int k = lane; k < kBins; k += 32)
      rfft_power(re0, im0, k, tab[kTabPostRe + k], tab[kTabPostIm + k], power + k);
    __syncwarp();
    if (kind == 0) {
      for (int k = lane; k < kBins; k += 32) y[k * out_stride + f] = power[k];
    } else {
      const float* begin = tab + kTabMel;
      const float* count = begin + n_mels;
      const float* offset = count + n_mels;
      const float* weights = offset + n_mels;
      for (int m = lane; m < n_mels; m += 32) {
        const int lo = static_cast<int>(begin[m]), n = static_cast<int>(count[m]);
        const float* w = weights + static_cast<int>(offset[m]);
        float acc = 0.0f;
        for (int j = 0; j < n; ++j) acc = fmaf(power[lo + j], w[j], acc);
        // fmaxf would turn a NaN (an overflowing spectrogram) into the floor: keep it for the caller's check
        mel[m * kWarps + warp] = log10f(isnan(acc) ? acc : fmaxf(acc, 1e-10f));
      }
    }
  }
  if (kind == 0) return;
  __syncthreads();
  // Write the block's frames row by row (kWarps consecutive floats per mel row) and reduce the max.
  float peak = -INFINITY;
  for (int i = tid; i < n_mels * kWarps; i += blockDim.x) {
    const int64_t ff = static_cast<int64_t>(blockIdx.x) * kWarps + i % kWarps;
    if (ff < frames) {
      const float v = mel[i];
      y[(i / kWarps) * out_stride + ff] = v;
      peak = fmaxf(peak, v);
    }
  }
  for (int o = 16; o > 0; o /= 2) peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, o));
  __shared__ float warp_peak[kWarps];
  if (lane == 0) warp_peak[warp] = peak;
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < kWarps; ++w) peak = fmaxf(peak, warp_peak[w]);
    if (peak > -INFINITY) atomic_max_float(item_max + b, peak);
  }
}

__global__ void fill_lowest(float* x, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = -INFINITY;
}

__global__ void normalize_log_mel(float* out, int64_t n_mels, int64_t out_stride,
                                  const int64_t* lengths, int64_t padding, const float* item_max,
                                  int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / (n_mels * out_stride), col = i % out_stride;
    if (col < (lengths[b] + padding) / kHop)
      out[i] = isnan(out[i]) ? out[i] : (fmaxf(out[i], item_max[b] - 8.0f) + 4.0f) * 0.25f;  // NaN: as above
  }
}

}  // namespace

const char* log_mel_cuda(const void* audio, int dtype, int64_t stride, const int64_t* lengths,
                         int64_t batch, int64_t max_frames, int64_t padding, const float* tables,
                         int n_tables, int n_mels, int kind, float* out, int64_t out_stride,
                         float* item_max, int device, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (batch == 0 || max_frames == 0) return nullptr;
  // This runtime is linked statically, so its current device is not the caller's (torch's).
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const size_t smem = sizeof(float) * ((n_tables + 31) / 32 * 32 + kWarps * 4 * kHalf +
                                       (kind == 0 ? 0 : n_mels * kWarps));
  const dim3 grid(static_cast<unsigned>((max_frames + kWarps - 1) / kWarps), static_cast<unsigned>(batch));
  const int threads = 32 * kWarps;
  if (kind == 2) fill_lowest<<<static_cast<unsigned>((batch + 255) / 256), 256, 0, st>>>(item_max, batch);
  if (dtype == 0) {
    err = cudaFuncSetAttribute(log_mel_frames<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return cudaGetErrorString(err);
    log_mel_frames<float><<<grid, threads, smem, st>>>(
        static_cast<const float*>(audio), stride, lengths, padding, 1.0f, tables, n_tables, n_mels,
        kind, out, out_stride, item_max);
  } else {
    err = cudaFuncSetAttribute(log_mel_frames<int16_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return cudaGetErrorString(err);
    log_mel_frames<int16_t><<<grid, threads, smem, st>>>(
        static_cast<const int16_t*>(audio), stride, lengths, padding, 1.0f / 32768.0f, tables,
        n_tables, n_mels, kind, out, out_stride, item_max);
  }
  if (kind == 2) {
    const int64_t total = batch * n_mels * out_stride;
    const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535);
    normalize_log_mel<<<static_cast<unsigned>(blocks), 256, 0, st>>>(out, n_mels, out_stride, lengths,
                                                                     padding, item_max, total);
  }
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace audioenc
