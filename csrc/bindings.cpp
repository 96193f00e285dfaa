// The only PYBIND11_MODULE of audioenc._C: thin wrappers that check arguments, release the GIL
// and call the core functions declared in the per-concept headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "wave/normalize.h"

namespace py = pybind11;

namespace {

template <typename T>
py::array_t<float> normalize_typed(py::array x, py::array_t<int64_t, py::array::c_style> lengths,
                                   float scale, bool normalize, float eps) {
  auto xc = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(x);
  if (xc.ndim() != 2) throw std::invalid_argument("waveforms must be 2-D (batch, samples)");
  const int64_t batch = xc.shape(0), stride = xc.shape(1);
  if (lengths.ndim() != 1 || lengths.shape(0) != batch)
    throw std::invalid_argument("lengths must be 1-D with one entry per row");
  const int64_t* len = lengths.data();
  for (int64_t b = 0; b < batch; ++b)
    if (len[b] < 0 || len[b] > stride)
      throw std::invalid_argument("lengths[" + std::to_string(b) + "] = " +
                                  std::to_string(len[b]) + " is outside [0, " +
                                  std::to_string(stride) + "]");
  py::array_t<float> out({batch, stride});
  const T* src = xc.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    audioenc::normalize_waveforms<T>(src, len, batch, stride, scale, normalize, eps, dst);
  }
  return out;
}

py::array_t<float> normalize_waveforms(py::array x, py::array_t<int64_t, py::array::c_style> lengths,
                                       bool normalize, float eps) {
  const auto kind = x.dtype().kind();
  const auto size = x.dtype().itemsize();
  if (kind == 'f' && size == 4) return normalize_typed<float>(x, lengths, 1.0f, normalize, eps);
  if (kind == 'f' && size == 8) return normalize_typed<double>(x, lengths, 1.0f, normalize, eps);
  if (kind == 'i' && size == 2)
    return normalize_typed<int16_t>(x, lengths, 1.0f / 32768.0f, normalize, eps);
  if (kind == 'i' && size == 4)
    return normalize_typed<int32_t>(x, lengths, 1.0f / 2147483648.0f, normalize, eps);
  throw py::type_error("unsupported sample type " + std::string(py::str(x.dtype())) +
                       "; expected float32, float64, int16 or int32");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "audioenc native core";
  m.def("normalize_waveforms", &normalize_waveforms, py::arg("waveforms"), py::arg("lengths"),
        py::arg("normalize") = true, py::arg("eps") = 1e-7f,
        "PCM (B, T) of float32/float64/int16/int32 -> float32 (B, T); int PCM scaled to [-1, 1); "
        "each row normalised to zero mean and unit variance over its first lengths[b] samples, "
        "the rest set to 0.");
#ifdef AUDIOENC_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
