// Deterministic sums over a grid: the K sums of the numbers summands(i) gives for
// i in [0, n), with no atomics, so results are bit-identical from run to run.
//
// Stage 1: a fixed number of blocks (a function of n alone) each add up a
// grid-stride share in a fixed tree (block_sum) and write one partial per sum.
// Stage 2: one block adds up the partials and hands the K totals to `finish`.
// Every addition happens in an order fixed by n, not by the scheduler. Nothing of
// size n is created: the partials are K * at most kMaxPartials floats.
//
// ppo_cuda.cu uses it for its masked means; a Summands type holds the inputs and
//
//   static constexpr int K;                                  // how many sums
//   __device__ void operator()(int64_t i, float (&out)[K]);  // element i's summands

#pragma once

#include "cuda_common.cuh"

#include <algorithm>

namespace minalign {

constexpr int kSumThreads = 256;
// Blocks of stage 1, at most. The CPU build of these kernels in tests/cuda_on_cpu takes
// fewer, so that its test of a sum over more than one pass of the grid runs quickly.
#ifndef MINALIGN_SUM_MAX_PARTIALS
#define MINALIGN_SUM_MAX_PARTIALS 1024
#endif
constexpr int64_t kMaxPartials = MINALIGN_SUM_MAX_PARTIALS;

// Stage 1: block b sums its grid-stride share of each summand into
// partials[k * gridDim.x + b].
template <typename Summands>
__global__ void __launch_bounds__(kSumThreads)
partial_sums_kernel(Summands summands, int64_t n, float* __restrict__ partials) {
  constexpr int K = Summands::K;
  __shared__ float scratch[kSumThreads / kWarpSize];
  float acc[K] = {};
  for (int64_t i = blockIdx.x * int64_t(kSumThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kSumThreads) {
    float terms[K];
    summands(i, terms);
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] += terms[k];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float total = block_sum<kSumThreads>(acc[k], scratch);
    if (threadIdx.x == 0) partials[k * gridDim.x + blockIdx.x] = total;
  }
}

// Stage 2: one block sums the partials of each summand and hands the K totals
// to `finish` (run by thread 0).
template <int K, typename Finish>
__global__ void __launch_bounds__(kSumThreads)
finish_sums_kernel(const float* __restrict__ partials, int num_partials, Finish finish) {
  __shared__ float scratch[kSumThreads / kWarpSize];
  float totals[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float acc = 0.f;
    for (int b = threadIdx.x; b < num_partials; b += kSumThreads) {
      acc += partials[k * num_partials + b];
    }
    totals[k] = block_sum<kSumThreads>(acc, scratch);
  }
  if (threadIdx.x == 0) finish(totals);
}

// Blocks of stage 1 (and partials per summand): a function of n alone, so the
// order of every addition is too.
inline int reduce_blocks(int64_t n) {
  return static_cast<int>(
      std::clamp<int64_t>(ceil_div<int64_t>(n, kSumThreads), 1, kMaxPartials));
}

#ifndef MINALIGN_CUDA_ON_CPU  // see cuda_common.cuh

// Runs both stages on the current stream; `like` gives the device of the partials.
template <typename Summands, typename Finish>
void reduce(const Summands& summands, int64_t n, const Finish& finish, const at::Tensor& like) {
  constexpr int K = Summands::K;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int num_partials = reduce_blocks(n);
  at::Tensor partials = at::empty({K * num_partials}, like.options().dtype(at::kFloat));
  partial_sums_kernel<<<num_partials, kSumThreads, 0, stream>>>(summands, n,
                                                               partials.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_sums_kernel<K><<<1, kSumThreads, 0, stream>>>(partials.data_ptr<float>(), num_partials,
                                                       finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // MINALIGN_CUDA_ON_CPU

}  // namespace minalign
