// CUDA's built-ins for the CPU, enough to run minalign's CUDA kernels there.
//
// A launch runs its blocks one after another on `threads` std::threads, one per CUDA
// thread. __syncthreads is a barrier over them; a warp shuffle is a barrier over the
// warp's 32 threads around a buffer the warp shares; __shared__ variables are
// statics, shared by the block that runs. This checks a kernel's arithmetic, its
// indexing and its barriers (a read of a value another thread writes without a
// barrier in between is a data race here too, which ThreadSanitizer reports). It says
// nothing of speed, and the CPU's exp2f and logf are not the GPU's: compare the
// kernels here with each other bit for bit, and with the reference to a tolerance.

#pragma once

#define MINALIGN_CUDA_ON_CPU

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

namespace emulation {

constexpr int kWarpSize = 32;

struct Warp {
  std::barrier<> barrier{kWarpSize};
  float values[kWarpSize];
};

struct Block {
  explicit Block(unsigned threads, std::size_t shared_bytes)
      : barrier(threads), warps(threads / kWarpSize), shared(shared_bytes / 16 + 1) {}
  std::barrier<> barrier;
  std::vector<Warp> warps;
  struct alignas(16) Bytes16 {
    unsigned char b[16];
  };
  std::vector<Bytes16> shared;  // the launch's dynamic shared memory
};

inline Block* block = nullptr;  // of the launch that runs

// Runs kernel() as a grid of `grid` blocks of `threads` threads (a multiple of 32).
template <typename Kernel>
void launch(unsigned grid, unsigned threads, std::size_t shared_bytes, Kernel kernel) {
  Block b(threads, shared_bytes);
  block = &b;
  gridDim.x = grid;
  blockDim.x = threads;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx.x = t;
      for (unsigned i = 0; i < grid; ++i) {
        blockIdx.x = i;
        kernel();
        b.barrier.arrive_and_wait();  // the next block starts when this one is done
      }
    });
  }
  for (auto& thread : pool) thread.join();
  block = nullptr;
}

}  // namespace emulation

inline void __syncthreads() { emulation::block->barrier.arrive_and_wait(); }

namespace emulation {
// Every lane of the warp gives v and gets the v of lane source(its own lane).
template <typename Source>
float shuffle(float v, Source source) {
  const unsigned lane = threadIdx.x % kWarpSize;
  Warp& warp = block->warps[threadIdx.x / kWarpSize];
  warp.barrier.arrive_and_wait();  // every lane has read the previous shuffle's value
  warp.values[lane] = v;
  warp.barrier.arrive_and_wait();  // every lane has written
  return warp.values[source(lane)];
}
}  // namespace emulation

// The mask is always the whole warp here.
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return emulation::shuffle(v, [&](unsigned lane) { return lane ^ lane_mask; });
}

inline float __shfl_down_sync(unsigned, float v, unsigned delta) {  // lanes past 31 keep v
  return emulation::shuffle(v, [&](unsigned lane) {
    return lane + delta < emulation::kWarpSize ? lane + delta : lane;
  });
}

namespace emulation {
// A vector access at `p` would fault on the GPU unless p is a multiple of `bytes`: say
// where, and stop (a CPU may silently allow it).
inline void check_aligned(const void* p, std::size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "cuda_on_cpu: a %zu-byte vector access at %p, not %zu-byte aligned: "
                 "it faults on a GPU\n", bytes, p, bytes);
    std::abort();
  }
}
}  // namespace emulation

struct alignas(16) float4 {
  float x, y, z, w;
};

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*address);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

namespace minalign {
template <typename T>
T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(emulation::block->shared.data());
}
}  // namespace minalign
