// ovr_kernels._C: CPU ops (and CUDA launchers when built with nvcc) over raw pointers.
// No torch headers on purpose (no rebuild when torch changes): the Python wrappers validate tensors and pass data_ptr()s, sizes
// and, for CUDA, the current stream handle. The bindings check sizes and scalars (checks.h: std::invalid_argument
// -> ValueError); the kernels trust what they receive.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "checks.h"
#ifdef OVR_WITH_CUDA
#include "gae_cuda.h"
#endif

namespace py = pybind11;

namespace ovr {
// packing.cpp
void cu_seqlens_from_lengths_cpu(const int64_t* lengths, int64_t n, int32_t* cu);
void position_ids_cpu(const int32_t* cu, int64_t num_seqs, int64_t* pos);
std::vector<std::vector<int64_t>> ffd_microbatches_cpu(const int64_t* lengths, int64_t n, int64_t max_tokens);
std::pair<std::vector<std::vector<int64_t>>, std::vector<int64_t>> kk_partition_cpu(const int64_t* lengths, int64_t n,
                                                                                   int64_t k, bool quadratic);
// gae.cpp
void gae_cpu(uintptr_t rewards, uintptr_t values, uintptr_t cu, int64_t num_seqs, uintptr_t adv, uintptr_t ret,
             double gamma, double lam, int dtype);
}  // namespace ovr

namespace {

bool has_cuda() {
#ifdef OVR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// lengths: (n,) int64, cu: (n+1,) int32 (written).
void cu_seqlens_from_lengths(uintptr_t lengths, int64_t n, uintptr_t cu) {
  OVR_CHECK_NONNEG(n, n);
  OVR_CHECK_PTR(lengths, lengths, n);
  OVR_CHECK_PTR(cu, cu, n + 1);
  ovr::cu_seqlens_from_lengths_cpu(reinterpret_cast<const int64_t*>(lengths), n, reinterpret_cast<int32_t*>(cu));
}

// cu: (num_seqs+1,) int32, pos: (cu[num_seqs],) int64 (written).
void position_ids(uintptr_t cu, int64_t num_seqs, uintptr_t pos) {
  OVR_CHECK_NONNEG(num_seqs, num_seqs);
  OVR_CHECK_PTR(cu, cu, num_seqs + 1);
  py::gil_scoped_release no_gil;
  ovr::position_ids_cpu(reinterpret_cast<const int32_t*>(cu), num_seqs, reinterpret_cast<int64_t*>(pos));
}

// lengths: (n,) int64 -> bins of sequence indices (first-fit decreasing); checks 0 <= lengths[i] <= max_tokens.
std::vector<std::vector<int64_t>> ffd_microbatches(uintptr_t lengths, int64_t n, int64_t max_tokens) {
  OVR_CHECK_NONNEG(n, n);
  OVR_CHECK_PTR(lengths, lengths, n);
  OVR_CHECK(max_tokens > 0, "max_tokens must be > 0, got " << max_tokens);
  return ovr::ffd_microbatches_cpu(reinterpret_cast<const int64_t*>(lengths), n, max_tokens);
}

// lengths: (n,) int64 -> (num_parts lists of sequence indices, their loads) (Karmarkar-Karp); checks lengths >= 0
// and that the total cost (length or length^2 when quadratic) fits int64.
std::pair<std::vector<std::vector<int64_t>>, std::vector<int64_t>> kk_partition(uintptr_t lengths, int64_t n,
                                                                                int64_t num_parts, bool quadratic) {
  OVR_CHECK_NONNEG(n, n);
  OVR_CHECK_PTR(lengths, lengths, n);
  OVR_CHECK(num_parts > 0, "num_parts must be > 0, got " << num_parts);
  return ovr::kk_partition_cpu(reinterpret_cast<const int64_t*>(lengths), n, num_parts, quadratic);
}

// rewards/values/adv/ret: (T,) float32 or float64 host pointers; cu: (num_seqs+1,) int32.
void gae_cpu(uintptr_t rewards, uintptr_t values, uintptr_t cu, int64_t num_seqs, uintptr_t adv, uintptr_t ret,
             double gamma, double lam, int dtype) {
  OVR_CHECK_NONNEG(num_seqs, num_seqs);
  OVR_CHECK_PTR(cu, cu, num_seqs + 1);
  OVR_CHECK_RANGE(gamma, gamma, 0.0, 1.0);
  OVR_CHECK_RANGE(lam, lam, 0.0, 1.0);
  OVR_CHECK(dtype == ovr::kFloat32 || dtype == ovr::kFloat64,
            "dtype code must be 0 (float32) or 1 (float64), got " << dtype);
  py::gil_scoped_release no_gil;
  ovr::gae_cpu(rewards, values, cu, num_seqs, adv, ret, gamma, lam, dtype);
}

#ifdef OVR_WITH_CUDA
// Same as gae_cpu with device pointers, fp16/bf16 too (dtype codes 0-3), on `stream` of CUDA device `device`.
void gae_cuda(uintptr_t rewards, uintptr_t values, uintptr_t cu, int64_t num_seqs, uintptr_t adv, uintptr_t ret,
              double gamma, double lam, int dtype, int device, uintptr_t stream) {
  OVR_CHECK_NONNEG(num_seqs, num_seqs);
  OVR_CHECK_PTR(cu, cu, num_seqs + 1);
  OVR_CHECK_RANGE(gamma, gamma, 0.0, 1.0);
  OVR_CHECK_RANGE(lam, lam, 0.0, 1.0);
  OVR_CHECK(dtype >= ovr::kFloat32 && dtype <= ovr::kBFloat16, "dtype code must be in 0..3, got " << dtype);
  OVR_CHECK_NONNEG(device, device);
  ovr::gae_cuda(rewards, values, cu, num_seqs, adv, ret, gamma, lam, dtype, device, stream);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ovr_kernels C++/CUDA ops on raw pointers";
  m.def("has_cuda", &has_cuda, "True when the module was built with nvcc (CUDA launchers linked in).");
  m.def("cu_seqlens_from_lengths", &cu_seqlens_from_lengths, py::arg("lengths_ptr"), py::arg("n"),
        py::arg("cu_ptr"), "lengths (n,) int64 -> cu_seqlens (n+1,) int32, written in place.");
  m.def("position_ids", &position_ids, py::arg("cu_ptr"), py::arg("num_seqs"), py::arg("pos_ptr"),
        "cu_seqlens (B+1,) int32 -> position ids (T,) int64, written in place.");
  m.def("ffd_microbatches", &ffd_microbatches, py::arg("lengths_ptr"), py::arg("n"), py::arg("max_tokens"),
        "First-fit-decreasing bins of sequence indices with total length <= max_tokens.");
  m.def("kk_partition", &kk_partition, py::arg("lengths_ptr"), py::arg("n"), py::arg("num_parts"),
        py::arg("quadratic"), "Karmarkar-Karp partition of sequence indices into num_parts lists, and their loads.");
  m.def("gae_cpu", &gae_cpu, py::arg("rewards_ptr"), py::arg("values_ptr"), py::arg("cu_ptr"), py::arg("num_seqs"),
        py::arg("adv_ptr"), py::arg("ret_ptr"), py::arg("gamma"), py::arg("lam"), py::arg("dtype"),
        "GAE reverse loop over packed sequences (float64 accumulation), written in place.");
#ifdef OVR_WITH_CUDA
  m.def("gae_cuda", &gae_cuda, py::arg("rewards_ptr"), py::arg("values_ptr"), py::arg("cu_ptr"),
        py::arg("num_seqs"), py::arg("adv_ptr"), py::arg("ret_ptr"), py::arg("gamma"), py::arg("lam"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "GAE warp scan over packed sequences on a CUDA stream (asynchronous), written in place.");
#endif
}
