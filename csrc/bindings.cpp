// pybind11 module afie_fast._C: turns DLPack tensors into raw buffers, checks every
// argument once, and calls the core. No numerics here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "blas.h"
#include "build_info.h"
#include "comoments.h"
#include "gram.h"
#include "dlpack.h"
#include "entropy.h"
#include "linalg.h"
#ifdef AFIE_WITH_CUDA
#include "cuda/ops.h"
#endif

namespace py = pybind11;
using afie::DType;

#define AFIE_STR2(x) #x
#define AFIE_STR(x) AFIE_STR2(x)

namespace {

// A borrowed view of any object with __dlpack__ (torch, numpy, CuPy, JAX). Owns the
// DLManagedTensor until destruction; the caller keeps the object itself alive.
class Buffer {
 public:
  Buffer(py::handle obj, const char* name) : name_(name) {
    if (PyCapsule_CheckExact(obj.ptr()) && PyCapsule_IsValid(obj.ptr(), "dltensor")) {
      take(obj);  // a capsule already (torch.utils.dlpack.to_dlpack): the fast path for hot calls
      return;
    }
    if (!py::hasattr(obj, "__dlpack__"))
      throw py::type_error(name_ + ": expected a tensor or array (an object with __dlpack__), got " +
                           std::string(py::str(py::type::of(obj).attr("__name__"))));
    py::tuple dev = obj.attr("__dlpack_device__")();
    const int dev_type = dev[0].cast<int>();
    // CUDA producers sync to the stream we pass; -1 says "no sync", since kernels run on
    // the caller's current stream, passed explicitly.
    py::object cap = dev_type == kDLCUDA ? obj.attr("__dlpack__")(py::arg("stream") = -1) : obj.attr("__dlpack__")();
    take(cap);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (mt_ && mt_->deleter) mt_->deleter(mt_);
  }

 private:
  // Takes ownership of the DLManagedTensor in an unused "dltensor" capsule.
  void take(py::handle cap) {
    mt_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
    if (!mt_) throw py::error_already_set();
    PyCapsule_SetName(cap.ptr(), "used_dltensor");  // we call the deleter ourselves
    const DLTensor& t = mt_->dl_tensor;
    data = static_cast<char*>(t.data) + t.byte_offset;
    device_type = t.device.device_type;
    device_id = t.device.device_id;
    shape.assign(t.shape, t.shape + t.ndim);
    strides.resize(t.ndim);
    int64_t s = 1;  // default (row-major) strides, in 64 bits: tensors pass 2^31 elements
    for (int i = t.ndim - 1; i >= 0; --i) {
      strides[i] = t.strides ? t.strides[i] : s;
      s *= t.shape[i];
    }
    code = t.dtype.code, bits = t.dtype.bits, lanes = t.dtype.lanes;
  }

 public:

  int64_t ndim() const { return int64_t(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  bool contiguous() const {
    int64_t s = 1;
    for (int64_t i = ndim() - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != s) return false;
      s *= shape[i];
    }
    return true;
  }
  bool on_cuda() const { return device_type == kDLCUDA || device_type == kDLCUDAManaged; }
  std::string device_str() const {
    return on_cuda() ? "cuda:" + std::to_string(device_id) : device_type == kDLCPU ? "cpu" : "device type " + std::to_string(device_type);
  }
  std::string dtype_str() const {
    if (lanes != 1) return "vector type";
    const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    return std::string(code <= 6 ? kinds[code] : "code" + std::to_string(code)) + std::to_string(bits);
  }

  // Any float type the accumulator reads (fp16, bf16, fp32, fp64).
  DType float_dtype() const {
    if (lanes == 1 && code == kDLFloat && bits == 16) return DType::f16;
    if (lanes == 1 && code == kDLBfloat && bits == 16) return DType::bf16;
    if (lanes == 1 && code == kDLFloat && bits == 32) return DType::f32;
    if (lanes == 1 && code == kDLFloat && bits == 64) return DType::f64;
    throw py::type_error(name_ + ": dtype " + dtype_str() +
                         " is not supported; expected float16, bfloat16, float32 or float64");
  }
  void expect_dtype(DType want) const {
    if (float_dtype() != want)
      throw py::type_error(name_ + ": expected dtype " + afie::dtype_name(want) + ", got " + dtype_str());
  }
  void expect_shape(const std::vector<int64_t>& want) const {
    if (shape != want) throw py::value_error(name_ + ": expected shape " + fmt(want) + ", got " + fmt(shape));
  }
  void expect_contiguous() const {
    if (!contiguous()) throw py::value_error(name_ + ": must be contiguous");
  }
  void expect_same_device(const Buffer& other) const {
    if (device_type != other.device_type || device_id != other.device_id)
      throw py::value_error(name_ + " is on " + device_str() + " but " + other.name_ + " is on " + other.device_str());
  }
  void expect_cpu(const char* op) const {
    if (device_type != kDLCPU) throw py::value_error(name_ + ": " + op + " runs on CPU buffers, got " + device_str());
  }
  static std::string fmt(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
  }

  void* data = nullptr;
  int device_type = 0, device_id = 0;
  std::vector<int64_t> shape, strides;
  uint8_t code = 0, bits = 0;
  uint16_t lanes = 0;

 private:
  std::string name_;
  DLManagedTensor* mt_ = nullptr;
};

template <class T> T* ptr(const Buffer& b) { return static_cast<T*>(b.data); }

#ifndef AFIE_WITH_CUDA
[[noreturn]] void no_cuda(const char* op) {
  throw py::value_error(std::string(op) + ": got CUDA tensors, but afie_fast was built without CUDA kernels");
}
#endif

// State of one accumulator: n [1] float64, mean [C], m2 [C, C] (float32 or float64,
// contiguous, all on one device). Returns the state's dtype.
DType check_state(const Buffer& n, const Buffer& mean, const Buffer& m2) {
  n.expect_dtype(DType::f64);
  n.expect_shape({1});
  const DType acc = mean.float_dtype();
  if (acc != DType::f32 && acc != DType::f64) mean.expect_dtype(DType::f64);
  m2.expect_dtype(acc);
  if (mean.ndim() != 1) throw py::value_error("mean: expected a 1-D tensor, got shape " + Buffer::fmt(mean.shape));
  const int64_t C = mean.shape[0];
  m2.expect_shape({C, C});
  for (const Buffer* b : {&n, &mean, &m2}) b->expect_contiguous();
  mean.expect_same_device(n);
  m2.expect_same_device(n);
  return acc;
}

void comoments_update(py::handle y_obj, py::handle n_obj, py::handle mean_obj, py::handle m2_obj, int threads,
                      std::uintptr_t stream, py::object scratch_obj, py::object rejected_obj, bool float_products,
                      py::object work_obj) {
  Buffer y(y_obj, "y"), n(n_obj, "n"), mean(mean_obj, "mean"), m2(m2_obj, "m2");
  const DType acc = check_state(n, mean, m2);
  if (y.ndim() != 4) throw py::value_error("y: expected a 4-D (N, C, H, W) tensor, got shape " + Buffer::fmt(y.shape));
  const DType in = y.float_dtype();
  if (y.shape[1] != mean.shape[0])
    throw py::value_error("y: has " + std::to_string(y.shape[1]) + " channels, the accumulator " +
                          std::to_string(mean.shape[0]));
  y.expect_same_device(mean);
  if (y.numel() == 0) throw py::value_error("y: empty batch (shape " + Buffer::fmt(y.shape) + ")");
  afie::Batch4 b{y.data, in, {}, {}};
  for (int i = 0; i < 4; ++i) b.shape[i] = y.shape[i], b.strides[i] = y.strides[i];
  if (y.on_cuda()) {
#ifdef AFIE_WITH_CUDA
    if (scratch_obj.is_none() || rejected_obj.is_none())
      throw py::value_error("comoments_update: CUDA states need scratch [C + 2] float64 and rejected [1] int32 buffers");
    Buffer scratch(scratch_obj, "scratch"), rejected(rejected_obj, "rejected");
    scratch.expect_dtype(DType::f64), scratch.expect_contiguous(), scratch.expect_same_device(y);
    scratch.expect_shape({mean.shape[0] + 2});
    if (rejected.code != kDLInt || rejected.bits != 32 || rejected.numel() != 1)
      throw py::type_error("rejected: expected one int32, got " + rejected.dtype_str() + " " + Buffer::fmt(rejected.shape));
    rejected.expect_same_device(y);
    float* wp = nullptr;
    int64_t w_floats = 0;
    std::optional<Buffer> work;
    if (!work_obj.is_none()) {
      work.emplace(work_obj, "work");
      work->expect_dtype(DType::f32), work->expect_contiguous(), work->expect_same_device(y);
      wp = ptr<float>(*work), w_floats = work->numel();
    }
    py::gil_scoped_release nogil;
    auto* sp = ptr<double>(scratch);
    auto* rp = ptr<int32_t>(rejected);
    if (acc == DType::f64) afie::cuda::comoments_update(b, ptr<double>(n), ptr<double>(mean), ptr<double>(m2), sp, rp, wp, w_floats, stream);
    else afie::cuda::comoments_update(b, ptr<double>(n), ptr<float>(mean), ptr<float>(m2), sp, rp, wp, w_floats, stream);
    return;
#else
    (void)stream, (void)scratch_obj, (void)rejected_obj, (void)work_obj;
    no_cuda("comoments_update");
#endif
  }
  y.expect_cpu("comoments_update");
  py::gil_scoped_release nogil;
  if (acc == DType::f64) afie::comoments_update_cpu(b, ptr<double>(n), ptr<double>(mean), ptr<double>(m2), threads, float_products);
  else afie::comoments_update_cpu(b, ptr<double>(n), ptr<float>(mean), ptr<float>(m2), threads, float_products);
}

void comoments_merge(py::handle na_o, py::handle ma_o, py::handle m2a_o, py::handle nb_o, py::handle mb_o,
                     py::handle m2b_o, std::uintptr_t stream, py::object scratch_obj) {
  Buffer na(na_o, "n_a"), ma(ma_o, "mean_a"), m2a(m2a_o, "m2_a");
  Buffer nb(nb_o, "n_b"), mb(mb_o, "mean_b"), m2b(m2b_o, "m2_b");
  const DType acc = check_state(na, ma, m2a);
  if (check_state(nb, mb, m2b) != acc) mb.expect_dtype(acc);
  if (mb.shape != ma.shape)
    throw py::value_error("cannot merge accumulators of " + std::to_string(ma.shape[0]) + " and " +
                          std::to_string(mb.shape[0]) + " channels");
  nb.expect_same_device(na);
  const int64_t C = ma.shape[0];
  if (na.on_cuda()) {
#ifdef AFIE_WITH_CUDA
    if (scratch_obj.is_none()) throw py::value_error("comoments_merge: CUDA states need a scratch [C + 2] float64 buffer");
    Buffer scratch(scratch_obj, "scratch");
    scratch.expect_dtype(DType::f64), scratch.expect_contiguous(), scratch.expect_same_device(na);
    scratch.expect_shape({C + 2});
    py::gil_scoped_release nogil;
    if (acc == DType::f64)
      afie::cuda::comoments_merge(C, ptr<double>(na), ptr<double>(ma), ptr<double>(m2a), ptr<double>(nb), ptr<double>(mb), ptr<double>(m2b), ptr<double>(scratch), stream);
    else
      afie::cuda::comoments_merge(C, ptr<double>(na), ptr<float>(ma), ptr<float>(m2a), ptr<double>(nb), ptr<float>(mb), ptr<float>(m2b), ptr<double>(scratch), stream);
    return;
#else
    (void)stream, (void)scratch_obj;
    no_cuda("comoments_merge");
#endif
  }
  na.expect_cpu("comoments_merge");
  if (acc == DType::f64)
    afie::comoments_merge_cpu(C, ptr<double>(na), ptr<double>(ma), ptr<double>(m2a), ptr<double>(nb), ptr<double>(mb), ptr<double>(m2b));
  else
    afie::comoments_merge_cpu(C, ptr<double>(na), ptr<float>(ma), ptr<float>(m2a), ptr<double>(nb), ptr<float>(mb), ptr<float>(m2b));
}

void eigh(py::list a_l, py::list w_l, py::object v_o, int threads, bool single) {
  const bool vectors = !v_o.is_none();
  py::list v_l = vectors ? py::list(v_o) : py::list();
  if (w_l.size() != a_l.size() || (vectors && v_l.size() != a_l.size()))
    throw py::value_error("eigh: a, w (and v) must be lists of the same length");
  std::vector<std::unique_ptr<Buffer>> held;  // borrowed views stay alive while LAPACK runs
  std::vector<afie::EighJob> jobs;
  for (size_t i = 0; i < a_l.size(); ++i) {
    const std::string at = "a[" + std::to_string(i) + "]", wt = "w[" + std::to_string(i) + "]",
                      vt = "v[" + std::to_string(i) + "]";
    auto& a = *held.emplace_back(std::make_unique<Buffer>(a_l[i], at.c_str()));
    a.expect_dtype(DType::f64), a.expect_cpu("eigh"), a.expect_contiguous();
    if (a.ndim() != 2 || a.shape[0] != a.shape[1])
      throw py::value_error(at + ": expected a square (C, C) matrix, got shape " + Buffer::fmt(a.shape));
    const int64_t C = a.shape[0];
    auto& w = *held.emplace_back(std::make_unique<Buffer>(w_l[i], wt.c_str()));
    w.expect_dtype(DType::f64), w.expect_contiguous(), w.expect_same_device(a), w.expect_shape({C});
    double* vp = nullptr;
    if (vectors) {
      auto& v = *held.emplace_back(std::make_unique<Buffer>(v_l[i], vt.c_str()));
      v.expect_dtype(DType::f64), v.expect_contiguous(), v.expect_same_device(a), v.expect_shape({C, C});
      vp = ptr<double>(v);
    }
    jobs.push_back({C, ptr<double>(a), ptr<double>(w), vp});
  }
  py::gil_scoped_release nogil;
  afie::eigh_cpu(jobs, single, threads);
}

void singular_values(py::handle m_o, py::handle s_o, int threads) {
  Buffer m(m_o, "m"), s(s_o, "s");
  m.expect_dtype(DType::f64), m.expect_cpu("singular_values"), m.expect_contiguous();
  if (m.ndim() != 2) throw py::value_error("m: expected a 2-D matrix, got shape " + Buffer::fmt(m.shape));
  s.expect_dtype(DType::f64), s.expect_contiguous(), s.expect_same_device(m);
  s.expect_shape({std::min(m.shape[0], m.shape[1])});
  py::gil_scoped_release nogil;
  afie::singular_values_cpu(m.shape[0], m.shape[1], ptr<double>(m), ptr<double>(s), threads);
}

// The co-moment kernel alone (benchmarks/bench_core.py times it, the tests check it).
void gram_upper_add(py::handle a_o, py::handle c_o) {
  Buffer a(a_o, "a"), c(c_o, "c");
  a.expect_dtype(DType::f32), a.expect_cpu("gram_upper_add"), a.expect_contiguous();
  c.expect_dtype(DType::f64), c.expect_contiguous(), c.expect_same_device(a);
  const int64_t n = c.ndim() == 2 ? c.shape[0] : -1;
  if (n < 0 || c.shape[1] != n) throw py::value_error("c: expected a square matrix, got shape " + Buffer::fmt(c.shape));
  const int64_t rows = (n + afie::kGramRows - 1) / afie::kGramRows * afie::kGramRows;
  if (a.ndim() != 2 || a.shape[0] != rows || a.shape[1] % afie::kGramCols != 0)
    throw py::value_error("a: expected [" + std::to_string(rows) + ", a multiple of " + std::to_string(afie::kGramCols) +
                          "] for a " + std::to_string(n) + "-row c, got " + Buffer::fmt(a.shape));
  const float* pa = ptr<float>(a);
  if (std::any_of(pa + n * a.shape[1], pa + rows * a.shape[1], [](float v) { return v != 0.0f; }))
    throw py::value_error("a: its padding rows (from row " + std::to_string(n) + ") must be zero");
  py::gil_scoped_release nogil;
  afie::gram_upper_add(pa, n, a.shape[1], ptr<double>(c), 0, n);
}

void leave_one_out(py::handle w_o, py::handle v_o, py::handle out_o, int threads) {
  Buffer w(w_o, "w"), v(v_o, "v"), out(out_o, "out");
  w.expect_dtype(DType::f64), w.expect_cpu("leave_one_out"), w.expect_contiguous();
  if (w.ndim() != 1) throw py::value_error("w: expected 1-D eigenvalues, got shape " + Buffer::fmt(w.shape));
  const int64_t C = w.shape[0];
  v.expect_dtype(DType::f64), v.expect_contiguous(), v.expect_same_device(w), v.expect_shape({C, C});
  out.expect_dtype(DType::f64), out.expect_contiguous(), out.expect_same_device(w);
  out.expect_shape({C, std::max<int64_t>(C - 1, 0)});
  const double* wp = ptr<double>(w);
  for (int64_t i = 1; i < C; ++i)
    if (!(wp[i] >= wp[i - 1])) throw py::value_error("w: eigenvalues must be finite and ascending");
  py::gil_scoped_release nogil;
  afie::leave_one_out_cpu(C, wp, ptr<double>(v), ptr<double>(out), threads);
}

void congruence(py::handle a_o, py::handle w_o, py::handle out_o, int threads) {
  Buffer a(a_o, "a"), w(w_o, "w"), out(out_o, "out");
  a.expect_dtype(DType::f64), a.expect_cpu("congruence"), a.expect_contiguous();
  if (a.ndim() != 2 || a.shape[0] != a.shape[1])
    throw py::value_error("a: expected a square (K, K) matrix, got shape " + Buffer::fmt(a.shape));
  const int64_t K = a.shape[0];
  w.expect_dtype(DType::f64), w.expect_contiguous(), w.expect_same_device(a);
  if (w.ndim() != 2 || w.shape[1] != K)
    throw py::value_error("w: expected a (C, " + std::to_string(K) + ") matrix, got shape " + Buffer::fmt(w.shape));
  const int64_t C = w.shape[0];
  out.expect_dtype(DType::f64), out.expect_contiguous(), out.expect_same_device(a), out.expect_shape({C, C});
  py::gil_scoped_release nogil;
  afie::congruence_cpu(C, K, ptr<double>(a), ptr<double>(w), ptr<double>(out), threads);
}

void congruence_reduced(py::list a_l, py::list w_l, py::list m_l, py::list d_l, bool single, int threads) {
  if (w_l.size() != a_l.size() || m_l.size() != a_l.size() || d_l.size() != a_l.size())
    throw py::value_error("congruence_reduced: a, w, m and d must be lists of the same length");
  std::vector<std::unique_ptr<Buffer>> held;  // borrowed views stay alive while BLAS runs
  std::vector<afie::CongruenceJob> jobs;
  for (size_t i = 0; i < a_l.size(); ++i) {
    const std::string at = "a[" + std::to_string(i) + "]", wt = "w[" + std::to_string(i) + "]",
                      mt = "m[" + std::to_string(i) + "]", dt = "d[" + std::to_string(i) + "]";
    auto& a = *held.emplace_back(std::make_unique<Buffer>(a_l[i], at.c_str()));
    a.expect_dtype(DType::f64), a.expect_cpu("congruence_reduced"), a.expect_contiguous();
    if (a.ndim() != 2 || a.shape[0] != a.shape[1])
      throw py::value_error(at + ": expected a square (K, K) matrix, got shape " + Buffer::fmt(a.shape));
    const int64_t K = a.shape[0];
    auto& w = *held.emplace_back(std::make_unique<Buffer>(w_l[i], wt.c_str()));
    w.expect_dtype(DType::f64), w.expect_contiguous(), w.expect_same_device(a);
    if (w.ndim() != 2 || w.shape[1] != K || w.shape[0] < K)
      throw py::value_error(wt + ": expected a (C, " + std::to_string(K) + ") matrix with C >= " + std::to_string(K) +
                            ", got shape " + Buffer::fmt(w.shape));
    const int64_t C = w.shape[0];
    auto& m = *held.emplace_back(std::make_unique<Buffer>(m_l[i], mt.c_str()));
    m.expect_dtype(DType::f64), m.expect_contiguous(), m.expect_same_device(a), m.expect_shape({K, K});
    auto& d = *held.emplace_back(std::make_unique<Buffer>(d_l[i], dt.c_str()));
    d.expect_dtype(DType::f64), d.expect_contiguous(), d.expect_same_device(a), d.expect_shape({C});
    jobs.push_back({C, K, ptr<double>(a), ptr<double>(w), ptr<double>(m), ptr<double>(d)});
  }
  py::gil_scoped_release nogil;
  afie::congruence_reduced_cpu(jobs, single, threads);
}

double spectrum_entropy(py::handle s_o) {
  Buffer s(s_o, "s");
  s.expect_dtype(DType::f64), s.expect_cpu("spectrum_entropy"), s.expect_contiguous();
  if (s.ndim() != 1 || s.shape[0] == 0)
    throw py::value_error("s: expected a non-empty 1-D spectrum, got shape " + Buffer::fmt(s.shape));
  const double* p = ptr<double>(s);
  for (int64_t i = 0; i < s.shape[0]; ++i)
    if (!std::isfinite(p[i])) throw py::value_error("s: spectrum contains NaN or Inf");
  return afie::spectrum_entropy(p, s.shape[0]);
}

py::dict blas_info() {
  py::dict d;
  d["name"] = "scipy-openblas32";
  d["config"] = std::string(AFIE_BLAS(openblas_get_config)());
  d["threads"] = AFIE_BLAS(openblas_get_num_threads)();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "afie_fast core: streaming co-moments, eigensolves and AFIE entropy on raw buffers";
  m.attr("__version__") = AFIE_STR(AFIE_VERSION);
#ifdef AFIE_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", &afie::cuda::device_count, "CUDA devices visible to the runtime (0 without a driver)");
  m.def("cuda_workspace_floats", &afie::cuda::workspace_floats, py::arg("C"), py::arg("m"),
        "float32 workspace a CUDA float32 state's update needs for m observations of C channels");
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
  m.attr("cuda_setting") = AFIE_CUDA_SETTING;  // AFIE_CUDA at build time: AUTO, ON or OFF
  m.attr("cuda_reason") = AFIE_CUDA_REASON;    // why the kernels are not in (empty when they are)
  m.attr("cmake_version") = AFIE_CMAKE_VERSION;
#ifdef _OPENMP
  m.attr("openmp") = true;  // parallel.h's fork_join runs on the OpenMP pool
#else
  m.attr("openmp") = false;  // ... or on std::threads
#endif
  m.attr("compiler") =
#if defined(__clang__)
      "clang " __clang_version__;
#elif defined(__GNUC__)
      "gcc " __VERSION__;
#else
      "unknown";
#endif
  m.def("comoments_update", &comoments_update, py::arg("y"), py::arg("n"), py::arg("mean"), py::arg("m2"),
        py::arg("threads") = 1, py::arg("stream") = 0, py::arg("scratch") = py::none(), py::arg("rejected") = py::none(),
        py::arg("float_products") = false, py::arg("work") = py::none(),
        "Add a (N, C, H, W) batch y to the state (n [1] f64, mean [C], m2 [C, C]). NaN/Inf batches are rejected. "
        "CUDA float32 states also need work: cuda_workspace_floats(C, N*H*W) float32.");
  m.def("comoments_merge", &comoments_merge, py::arg("n_a"), py::arg("mean_a"), py::arg("m2_a"), py::arg("n_b"),
        py::arg("mean_b"), py::arg("m2_b"), py::arg("stream") = 0, py::arg("scratch") = py::none(), "Merge state b into state a (Chan et al.).");
  m.def("eigh", &eigh, py::arg("a"), py::arg("w"), py::arg("v") = py::none(), py::arg("threads") = 1,
        py::arg("single") = false,
        "For each symmetric a[i] [C_i, C_i] (lists), eigenvalues (ascending) into w[i] [C_i] and optionally "
        "eigenvectors into v[i] [C_i, C_i]; widest first over the threads; single: solve in float32.");
  m.def("singular_values", &singular_values, py::arg("m"), py::arg("s"), py::arg("threads") = 1,
        "Singular values (descending) of m [R, K] into s [min(R, K)].");
  m.def("leave_one_out", &leave_one_out, py::arg("w"), py::arg("v"), py::arg("out"), py::arg("threads") = 1,
        "Eigenvalues of every principal (C-1)x(C-1) submatrix, from eigenpairs w [C], v [C, C], into out [C, C-1].");
  m.def("congruence", &congruence, py::arg("a"), py::arg("w"), py::arg("out"), py::arg("threads") = 1,
        "out [C, C] = w a wT for a symmetric a [K, K] and w [C, K] (float64): the covariance of y = w x.");
  m.def("congruence_reduced", &congruence_reduced, py::arg("a"), py::arg("w"), py::arg("m"), py::arg("d"),
        py::arg("single") = false, py::arg("threads") = 1,
        "For each w[i] [C, K], C >= K, and symmetric a[i] [K, K] (lists, float64): m[i] [K, K] = xT x with "
        "x = w l, a = l lT (Cholesky, pivoted where a is semi-definite), whose eigenvalues are those of w a wT "
        "but for C - K zeros, and d[i] [C] = the diagonal of w a wT; single: xT x formed in float32; "
        "costliest first over the threads.");
  m.def("spectrum_entropy", &spectrum_entropy, py::arg("s"), "AFIE entropy K of a spectrum s [p] (float64).");
  m.def("blas_info", &blas_info);
  m.def("gram_upper_add", &gram_upper_add, py::arg("a"), py::arg("c"),
        "c [n, n] (float64) += the upper triangle of a·aT, a [n rounded up to 24, a multiple of 16] float32 with "
        "zero padding rows: the co-moment kernel alone, on this thread.");
  m.def("gram_kernel", &afie::gram_kernel,
        "The kernel of csrc/gram.cpp that narrow float32 co-moments run on: avx512, avx2 or none (BLAS)");
}
