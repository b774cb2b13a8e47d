// ovr_kernels._C: CPU ops (and CUDA launchers when built with nvcc) over raw pointers.
// No torch headers on purpose (DESIGN.md): the Python wrappers validate tensors and pass data_ptr()s, sizes
// and, for CUDA, the current stream handle. The binding trusts what it receives.
#include <pybind11/pybind11.h>

namespace py = pybind11;

static bool has_cuda() {
#ifdef OVR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ovr_kernels C++/CUDA ops on raw pointers";
  m.def("has_cuda", &has_cuda, "True when the module was built with nvcc (CUDA launchers linked in).");
}
