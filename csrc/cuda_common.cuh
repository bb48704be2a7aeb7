// Small pieces shared by minalign's CUDA kernels: 16-byte vector types, warp/block
// sums, and argument checks with messages a user understands.
//
// Every reduction here combines values in a fixed order (a butterfly inside a
// warp, then warp 0 over the warps in index order), so a kernel that uses them
// with a fixed launch shape gives bit-identical results run after run.

#pragma once

#include <cstdint>

// MINALIGN_CUDA_ON_CPU: tests/cuda_on_cpu compiles the device code alone for the CPU,
// with stand-ins for CUDA's built-ins, and leaves out everything of the host's.
#ifndef MINALIGN_CUDA_ON_CPU
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "dtype_name.h"
#endif

namespace minalign {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;  // exp(x) == exp2(x * kLog2e)

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// --------------------------------------------------------------- vectors (device)

// N elements of T loaded or stored with one instruction; sizeof(T) * N is 16 bytes
// for the kernels here (8 bf16/fp16 or 4 fp32), the widest load a thread can issue.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// The `count` vectors VecT (of 16 bytes, or of one element) at `p`. A vector access at
// an address that is not a multiple of its size faults on the GPU; the CPU emulation,
// where it could silently work, stops here with a message instead (`count` 0: a row
// with no vectors, whose pointer is never dereferenced, is not checked).
template <typename VecT, typename T>
__device__ __forceinline__ VecT* as_vectors(T* p, int64_t count) {
#ifdef MINALIGN_CUDA_ON_CPU
  if (count > 0) emulation::check_aligned(p, sizeof(VecT));
#endif
  return reinterpret_cast<VecT*>(p);
}

#ifndef MINALIGN_CUDA_ON_CPU
// The block's dynamic shared memory (the launch's third argument), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char bytes[];
  return reinterpret_cast<T*>(bytes);
}
#endif

// ------------------------------------------------------------ reductions (device)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarp, v, offset);
  }
  return v;
}

// Sum of `v` over the block, returned to thread 0 (other threads get garbage).
// `scratch` holds one float per warp. Ends with the block synchronised, so the
// caller may call it again with the same scratch.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kWarpSize * kWarpSize,
                "block_sum needs whole warps, at most 32 of them");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : 0.f;
    v = warp_sum(v);
  }
  __syncthreads();  // scratch may be reused right away
  return v;
}

// ---------------------------------------------------------------- checks (host)
#ifndef MINALIGN_CUDA_ON_CPU

// `t` is a contiguous CUDA tensor of dtype `dtype`, on the device of `like`.
inline void check_cuda_input(const at::Tensor& t, const char* op, const char* name,
                             at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but the other inputs are on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous (call .contiguous() on it first)");
}

// `t` has exactly the shape of `like` (names used in the message).
inline void check_same_shape(const at::Tensor& t, const at::Tensor& like, const char* op,
                             const char* name, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ",
              like_name, " has shape ", like.sizes(), "; they must match");
}
#endif

}  // namespace minalign
