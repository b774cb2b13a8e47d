// GAE over packed sequences on CUDA: one warp per sequence, a reverse scan in chunks of 32 tokens.
// Twin of reference.gae_ref (the test oracle). A_t = delta_t + c * A_{t+1} with c = gamma * lam is a linear
// recurrence, so a warp scans 32 tokens at once: a suffix scan with weights c^offset inside the chunk, then the
// carry (A just past the chunk) enters lane i with weight c^(32 - i). Loads of a chunk are coalesced and do not
// depend on the carry, so unrolled iterations keep several chunks' loads in flight. Accumulation in fp32 (fp64 for
// fp64 inputs); fp16/bf16 are converted on load and store. Only CUDA headers: no torch, so no rebuild when torch changes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "checks.h"
#include "gae_cuda.h"

namespace ovr {
namespace {

constexpr int kWarpsPerBlock = 4;  // 128 threads: 4 sequences per block
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// rewards/values/adv/ret (T,), cu (num_seqs+1,) int32; grid = ceil(num_seqs / kWarpsPerBlock) blocks of 128 threads.
template <typename T>
__global__ void gae_warp_kernel(const T* __restrict__ rewards, const T* __restrict__ values,
                                const int32_t* __restrict__ cu, int64_t num_seqs, T* __restrict__ adv,
                                T* __restrict__ ret, typename AccOf<T>::type gamma, typename AccOf<T>::type c) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t seq = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (seq >= num_seqs) return;  // uniform across the warp: the shuffles below see full warps
  const int64_t start = cu[seq];
  const int64_t end = cu[seq + 1];
  A carry_w = A(1);  // c^(32 - lane): weight of the A value just past the chunk
  for (int i = lane; i < 32; ++i) carry_w *= c;
  A carry = A(0);  // A past the sequence's end is 0
#pragma unroll 4
  for (int64_t base = end - 32; base + 32 > start; base -= 32) {
    const int64_t t = base + lane;
    const bool valid = t >= start;  // lanes before the sequence start hold delta = 0 and store nothing
    A v = A(0), delta = A(0);
    if (valid) {
      v = to_acc(values[t]);
      const A next_v = t + 1 < end ? to_acc(values[t + 1]) : A(0);  // V = 0 past the end
      delta = to_acc(rewards[t]) + gamma * next_v - v;
    }
    // Inclusive suffix scan x_i = sum_{j >= i in chunk} c^(j - i) delta_j, doubling the window each step.
    A x = delta;
    A pw = c;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const A y = __shfl_down_sync(kFullMask, x, off);
      if (lane + off < 32) x += pw * y;
      pw *= pw;
    }
    x += carry_w * carry;
    if (valid) {
      adv[t] = from_acc<T>(x);
      ret[t] = from_acc<T>(x + v);
    }
    carry = __shfl_sync(kFullMask, x, 0);  // A at the chunk's first token, for the chunk before it
  }
}

template <typename T>
void launch(uintptr_t rewards, uintptr_t values, uintptr_t cu, int64_t num_seqs, uintptr_t adv, uintptr_t ret,
            double gamma, double lam, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const unsigned blocks = static_cast<unsigned>((num_seqs + kWarpsPerBlock - 1) / kWarpsPerBlock);
  gae_warp_kernel<T><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
      reinterpret_cast<const T*>(rewards), reinterpret_cast<const T*>(values), reinterpret_cast<const int32_t*>(cu),
      num_seqs, reinterpret_cast<T*>(adv), reinterpret_cast<T*>(ret), static_cast<A>(gamma),
      static_cast<A>(gamma * lam));
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("gae_cuda: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

void gae_cuda(uintptr_t rewards, uintptr_t values, uintptr_t cu, int64_t num_seqs, uintptr_t adv, uintptr_t ret,
              double gamma, double lam, int dtype, int device, uintptr_t stream) {
  if (num_seqs == 0) return;
  // This module links its own (static) CUDA runtime: select the tensors' device in it (CUDAGuard's job in torch).
  int prev = 0;
  check_cuda(cudaGetDevice(&prev), "cudaGetDevice");
  if (prev != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch<float>(rewards, values, cu, num_seqs, adv, ret, gamma, lam, s); break;
    case kFloat64: launch<double>(rewards, values, cu, num_seqs, adv, ret, gamma, lam, s); break;
    case kFloat16: launch<__half>(rewards, values, cu, num_seqs, adv, ret, gamma, lam, s); break;
    case kBFloat16: launch<__nv_bfloat16>(rewards, values, cu, num_seqs, adv, ret, gamma, lam, s); break;
    default: throw std::invalid_argument("gae_cuda: unknown dtype code " + std::to_string(dtype));
  }
  const cudaError_t err = cudaGetLastError();
  if (prev != device) cudaSetDevice(prev);
  check_cuda(err, "kernel launch");
}

}  // namespace ovr
