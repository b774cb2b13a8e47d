// Argument checks for the pybind11 entry points (flash-attn's TORCH_CHECK style, without torch).
// The bindings check what they can see (sizes, scalars); a failed check throws std::invalid_argument, which
// pybind11 turns into a Python ValueError. Kernels trust what passed: the Python wrappers validate tensors.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#define OVR_CHECK(cond, msg)                                                   \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::ostringstream ovr_check_os_;                                        \
      ovr_check_os_ << msg;                                                    \
      throw std::invalid_argument(ovr_check_os_.str());                        \
    }                                                                          \
  } while (0)

// A size/count argument must be >= 0.
#define OVR_CHECK_NONNEG(name, value) OVR_CHECK((value) >= 0, #name " must be >= 0, got " << (value))

// A data pointer must be non-null when it addresses at least one element.
#define OVR_CHECK_PTR(name, ptr, count) \
  OVR_CHECK((count) == 0 || (ptr) != 0, #name " is a null pointer for " << (count) << " elements")

// A float scalar must lie in [lo, hi] (NaN fails).
#define OVR_CHECK_RANGE(name, value, lo, hi) \
  OVR_CHECK((value) >= (lo) && (value) <= (hi), #name " must be in [" << (lo) << ", " << (hi) << "], got " << (value))

// Dtype codes shared by the Python wrappers and the kernels (ovr_kernels/gae.py: _DTYPE_CODE).
namespace ovr {
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
}  // namespace ovr
