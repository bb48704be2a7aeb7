// The vectorised inner loops of the CPU log-prob kernels, over one block of a row:
// the sweeps of the online log-sum-exp, the gradient, and the 16-bit conversions.
// softmax_cpu.h builds the rows from them (the math is there).
//
// Each is compiled once per ISA with vectors as wide as its registers (cpu_simd.h
// says why): cpu_blocks_avx512.cpp, cpu_blocks_avx2.cpp and the baseline in
// cpu_blocks.cpp, which also picks, once, the widest build the CPU runs. The lane
// count changes the order of a block's additions, so results may differ in the last
// bit between machines of different ISAs; on one machine every kernel uses the same.

#pragma once

#include <cstdint>

// Where GCC can build for several ISAs and pick one at run time.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MINALIGN_MULTI_ISA
#endif

namespace minalign {

// The max of a block and its two sums relative to a reference m.
struct BlockSums {
  float max;
  float sum;   // sum e^{x - m}
  float xsum;  // sum e^{x - m} (x - m), when the entropy is wanted
};

struct CpuBlocks {
  // One sweep over n logits: their max and their sums relative to m (xsum only
  // `with_entropy`). `ahead` turns on the prefetch (off when x is a widened copy).
  // Unless `keep` is null, each term e^{x - m} is also written there.
  BlockSums (*sweep)(const float* x, int64_t n, float m, bool with_entropy, bool ahead, float* keep);
  // The max of n logits.
  float (*max)(const float* x, int64_t n);
  // The gradient of n logits (without the [j = y] term) for a row of log-sum-exp lse,
  // upstream gradients g (of log p_y) and gh (of the entropy H): out may be x itself.
  void (*grad)(const float* x, int64_t n, float lse, float g, float gh, float entropy, bool ahead, float* out);
  // The gradient of n logits (without the [j = y] term) from their kept terms
  // e = e^{x - M} and c = e^{M - lse}: p = c e, 0 below float's smallest normal (as e^x
  // gives 0 from e^-87.3), then -g p as grad writes it. out may be e.
  void (*grad_kept)(const float* e, int64_t n, float c, float g, float* out);
  // n bfloat16 (or float16) bit patterns widened to floats, exactly.
  void (*widen)(const uint16_t* src, int64_t n, bool bfloat16, float* dst);
  // n floats rounded to bfloat16 (or float16), to nearest even, as c10 rounds.
  void (*round)(const float* src, int64_t n, bool bfloat16, uint16_t* dst);
  const char* name;  // the build: "avx512", "avx2" or "baseline"
};

// The build for the widest ISA this CPU supports.
const CpuBlocks& cpu_blocks();

namespace avx512 { extern const CpuBlocks blocks; }
namespace avx2 { extern const CpuBlocks blocks; }
namespace baseline { extern const CpuBlocks blocks; }

}  // namespace minalign
