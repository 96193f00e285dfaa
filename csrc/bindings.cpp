// The only PYBIND11_MODULE of audioenc._C: thin wrappers that check arguments, release the GIL
// and call the core functions declared in the per-concept headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>
#include <algorithm>

#include "wave/normalize.h"
#include "mel/fft.h"
#include "mel/log_mel.h"
#include "mel/log_mel_cuda.h"
#include "mel/mel_filters.h"
#include "stream/chunker.h"

namespace py = pybind11;

namespace {

// numpy hands over unaligned arrays (np.frombuffer at an odd offset) as they are unless asked:
// the core reads T* and int64_t*, so every array it reads is requested aligned (copied if not).
constexpr int kIn = py::array::c_style | py::detail::npy_api::NPY_ARRAY_ALIGNED_;

template <typename T>
py::array_t<float> normalize_typed(py::array x, py::array_t<int64_t, kIn> lengths,
                                   float scale, bool normalize, float eps) {
  auto xc = py::array_t<T, kIn | py::array::forcecast>::ensure(x);
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

py::array_t<float> normalize_waveforms(py::array x, py::array_t<int64_t, kIn> lengths,
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


// ------------------------------------------------------------------------------- log-mel (CPU)

audioenc::MelOutput parse_kind(const std::string& kind) {
  if (kind == "power") return audioenc::MelOutput::kPower;
  if (kind == "log") return audioenc::MelOutput::kLogMel;
  if (kind == "normalized") return audioenc::MelOutput::kNormalized;
  throw std::invalid_argument("kind must be 'power', 'log' or 'normalized', got '" + kind + "'");
}

template <typename T>
void log_mel_typed(py::array audio, const int64_t* len, int64_t padding, float scale,
                   const audioenc::SparseFilters* filters, audioenc::MelOutput kind, float* out,
                   int64_t out_stride, int threads) {
  auto a = py::array_t<T, kIn>::ensure(audio);
  if (!a) throw std::invalid_argument("audio must be C-contiguous");
  const int64_t batch = a.shape(0), stride = a.shape(1);
  std::vector<uint8_t> bad(batch, 0);
  {
    py::gil_scoped_release release;
    audioenc::log_mel_cpu<T>(a.data(), stride, len, batch, padding, scale, filters, kind, out,
                             out_stride, threads, bad.data());
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (bad[b] & 1)
      throw std::invalid_argument("audio item " + std::to_string(b) +
                                  " contains NaN or Inf (or samples beyond float32's range)");
    if (bad[b] & 2)
      throw std::invalid_argument("audio item " + std::to_string(b) + ": its spectrogram overflows float32 "
                                  "(samples beyond float32's range, or too large to square; audio is "
                                  "expected within [-1, 1])");
  }
}

void log_mel_cpu(py::array audio, py::array_t<int64_t, kIn> lengths,
                 py::array out, py::object filters, int64_t padding,
                 const std::string& kind_name, int threads) {
  const auto kind = parse_kind(kind_name);
  if (audio.ndim() != 2) throw std::invalid_argument("audio must be 2-D (batch, samples)");
  const int64_t batch = audio.shape(0), stride = audio.shape(1);
  if (lengths.ndim() != 1 || lengths.shape(0) != batch)
    throw std::invalid_argument("lengths must be 1-D with one entry per row");
  if (padding < 0 || padding > (int64_t{1} << 60))
    throw std::invalid_argument("padding must be in [0, 2^60]");  // len + padding stays an int64
  const int64_t* len = lengths.data();
  int64_t max_frames = 0;
  for (int64_t b = 0; b < batch; ++b) {
    if (len[b] < 0 || len[b] > stride)
      throw std::invalid_argument("lengths[" + std::to_string(b) + "] is outside [0, " + std::to_string(stride) + "]");
    if (len[b] + padding <= audioenc::kNfft / 2)
      throw std::invalid_argument("log-mel needs more than 200 samples (reflect padding of n_fft // 2); item " +
                                  std::to_string(b) + " has " + std::to_string(len[b] + padding));
    max_frames = std::max(max_frames, audioenc::mel_frames(len[b] + padding));
  }
  audioenc::SparseFilters sparse;
  int64_t n_out = audioenc::kBins;
  if (kind != audioenc::MelOutput::kPower) {
    auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(filters);
    if (!f || f.ndim() != 2 || f.shape(1) != audioenc::kBins)
      throw std::invalid_argument("filters must be a (n_mels, 201) float32 array");
    sparse = audioenc::sparsify_filters(f.data(), static_cast<int>(f.shape(0)), audioenc::kBins);
    n_out = f.shape(0);
  }
  // out is written in place: it must be the caller's own float32 C-contiguous buffer, never a
  // converted copy (whose results the caller would not see).
  const bool is_f32 = py::isinstance<py::array_t<float>>(out);  // native-order float32
  const int out_flags = out.flags();
  const bool c_aligned = (out_flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) &&
                         (out_flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_);
  if (!is_f32 || !c_aligned || out.ndim() != 3 || out.shape(0) != batch || out.shape(1) != n_out ||
      out.shape(2) < max_frames)
    throw std::invalid_argument("out must be a C-contiguous, aligned float32 array (batch, " +
                                std::to_string(n_out) + ", >= " + std::to_string(max_frames) + ")");
  float* dst = static_cast<float*>(out.mutable_data());
  const int64_t out_stride = out.shape(2);
  const auto* fp = kind == audioenc::MelOutput::kPower ? nullptr : &sparse;
  const auto dk = audio.dtype().kind();
  const auto size = audio.dtype().itemsize();
  if (dk == 'f' && size == 4) return log_mel_typed<float>(audio, len, padding, 1.0f, fp, kind, dst, out_stride, threads);
  if (dk == 'f' && size == 8) return log_mel_typed<double>(audio, len, padding, 1.0f, fp, kind, dst, out_stride, threads);
  if (dk == 'i' && size == 2)
    return log_mel_typed<int16_t>(audio, len, padding, 1.0f / 32768.0f, fp, kind, dst, out_stride, threads);
  throw py::type_error("unsupported sample type " + std::string(py::str(audio.dtype())) +
                       "; expected float32, float64 or int16");
}

// ---------------------------------------------------------------------------------- chunker

py::object chunker_pop(audioenc::Chunker& c) {
  py::array_t<float> out(c.window_size());
  float* dst = out.mutable_data();
  audioenc::WindowInfo info;
  bool ok;
  {
    py::gil_scoped_release release;
    ok = c.Pop(dst, &info);
  }
  if (!ok) return py::none();
  return py::make_tuple(info.index, info.start, out, info.valid_left, info.valid_centre, info.valid_right);
}

int64_t chunker_accept(audioenc::Chunker& c, py::array_t<float, kIn | py::array::forcecast> x) {
  if (x.ndim() != 1) throw std::invalid_argument("accept_waveform takes a 1-D block of samples");
  const float* src = x.data();
  const int64_t n = x.shape(0);
  py::gil_scoped_release release;
  return c.AcceptWaveform(src, n);
}

// ------------------------------------------------------------------------------ log-mel (CUDA)

py::array_t<float> mel_cuda_tables(py::object filters) {
  std::vector<float> tab;
  if (filters.is_none()) {
    tab = audioenc::cuda_mel_tables(nullptr);
  } else {
    auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(filters);
    if (!f || f.ndim() != 2 || f.shape(1) != audioenc::kBins)
      throw std::invalid_argument("filters must be a (n_mels, 201) float32 array");
    const auto sparse = audioenc::sparsify_filters(f.data(), static_cast<int>(f.shape(0)), audioenc::kBins);
    tab = audioenc::cuda_mel_tables(&sparse);
  }
  py::array_t<float> out(static_cast<py::ssize_t>(tab.size()));
  std::copy(tab.begin(), tab.end(), out.mutable_data());
  return out;
}

#ifdef AUDIOENC_WITH_CUDA
void log_mel_cuda(uintptr_t audio, int dtype, int64_t stride, uintptr_t lengths, int64_t batch,
                  int64_t max_frames, int64_t padding, uintptr_t tables, int n_tables, int n_mels,
                  int kind, uintptr_t out, int64_t out_stride, uintptr_t item_max, int device,
                  uintptr_t stream) {
  const char* err;
  {
    py::gil_scoped_release release;
    err = audioenc::log_mel_cuda(reinterpret_cast<const void*>(audio), dtype, stride,
                                 reinterpret_cast<const int64_t*>(lengths), batch, max_frames, padding,
                                 reinterpret_cast<const float*>(tables), n_tables, n_mels, kind,
                                 reinterpret_cast<float*>(out), out_stride,
                                 reinterpret_cast<float*>(item_max), device,
                                 reinterpret_cast<void*>(stream));
  }
  if (err != nullptr) throw std::runtime_error(std::string("log_mel_cuda: ") + err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "audioenc native core";
  m.def("normalize_waveforms", &normalize_waveforms, py::arg("waveforms"), py::arg("lengths"),
        py::arg("normalize") = true, py::arg("eps") = 1e-7f,
        "PCM (B, T) of float32/float64/int16/int32 -> float32 (B, T); int PCM scaled to [-1, 1); "
        "each row normalised to zero mean and unit variance over its first lengths[b] samples, "
        "the rest set to 0.");
  m.def("log_mel_cpu", &log_mel_cpu, py::arg("audio"), py::arg("lengths"), py::arg("out"),
        py::arg("filters"), py::arg("padding") = 0, py::arg("kind") = "normalized",
        py::arg("threads") = 0,
        "Whisper log-mel of audio (B, T) float32/float64/int16 (int16 scaled by 2^-15), row b "
        "holding lengths[b] samples plus `padding` zeros, written into out (B, n_mels, >= frames) "
        "in place; kind 'power' (201 rows, filters unused), 'log' or 'normalized' (max - 8 floor "
        "and (x + 4) / 4 per item). threads <= 0: all cores. Releases the GIL.");
  m.attr("log_mel_cpu_isa") = audioenc::log_mel_cpu_isa();
  py::class_<audioenc::Chunker>(m, "Chunker",
                                "Ring-buffer chunker: windows of left + chunk + right samples "
                                "(see csrc/stream/chunker.h). One producer and one consumer thread "
                                "may call it at once.")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("chunk"), py::arg("left") = 0,
           py::arg("right") = 0, py::arg("capacity") = 0)
      .def("accept_waveform", &chunker_accept, py::arg("samples"),
           "Takes as many float32 samples as fit and returns how many.")
      .def("input_finished", &audioenc::Chunker::InputFinished,
           py::call_guard<py::gil_scoped_release>())
      .def("ready", &audioenc::Chunker::Ready, py::call_guard<py::gil_scoped_release>())
      .def("pop", &chunker_pop,
           "(index, start, samples, valid_left, valid_centre, valid_right) or None.")
      .def("reset", &audioenc::Chunker::Reset, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("chunk", &audioenc::Chunker::chunk)
      .def_property_readonly("left", &audioenc::Chunker::left)
      .def_property_readonly("right", &audioenc::Chunker::right)
      .def_property_readonly("capacity", &audioenc::Chunker::capacity)
      .def_property_readonly("window_size", &audioenc::Chunker::window_size)
      .def_property_readonly("received", &audioenc::Chunker::received)
      .def_property_readonly("finished", &audioenc::Chunker::finished);
  m.def("mel_cuda_tables", &mel_cuda_tables, py::arg("filters"),
        "The float32 table (window, twiddles, sparse filters) that log_mel_cuda reads; copy it "
        "to the device once.");
#ifdef AUDIOENC_WITH_CUDA
  m.def("log_mel_cuda", &log_mel_cuda, py::arg("audio_ptr"), py::arg("dtype"), py::arg("stride"),
        py::arg("lengths_ptr"), py::arg("batch"), py::arg("max_frames"), py::arg("padding"),
        py::arg("tables_ptr"), py::arg("n_tables"), py::arg("n_mels"), py::arg("kind"),
        py::arg("out_ptr"), py::arg("out_stride"), py::arg("item_max_ptr"), py::arg("device"), py::arg("stream"),
        "Launches the log-mel kernels on `stream` with device pointers (see csrc/mel/log_mel_cuda.h); "
        "dtype 0 float32, 1 int16; kind 0 power, 1 log, 2 normalized.");
#endif
#ifdef AUDIOENC_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
