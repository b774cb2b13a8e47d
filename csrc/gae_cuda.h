// Launcher of the CUDA GAE scan (csrc/gae.cu), declared for the binding in ovr_ext.cpp. Only built with nvcc.
#pragma once

#include <cstdint>

namespace ovr {

// rewards/values/adv/ret: (T,) device pointers of `dtype` (checks.h DType), cu: (num_seqs+1,) int32 device pointer,
// stream: a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream), device: the tensors' CUDA index.
// One launch on `stream`; asynchronous (no sync). Throws std::runtime_error if the launch fails.
void gae_cuda(uintptr_t rewards, uintptr_t values, uintptr_t cu, int64_t num_seqs, uintptr_t adv, uintptr_t ret,
              double gamma, double lam, int dtype, int device, uintptr_t stream);

}  // namespace ovr
