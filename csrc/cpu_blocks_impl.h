// The bodies of cpu_blocks.h's functions, for the ISA of the file that includes this:
// that file sets the target (#pragma GCC target) and MINALIGN_BLOCKS, the namespace
// of its build, before including it.

#include <limits>
#include <type_traits>

#include "cpu_blocks.h"
#include "cpu_simd.h"

namespace minalign {
namespace MINALIGN_BLOCKS {
namespace {

constexpr int64_t kPrefetchAhead = 2048;  // floats: the loops ask for the cache line 8 KiB ahead
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Asks for the cache line holding p, into L2 (prefetches never fault, so p may lie past
// the end of the logits).
MINALIGN_INLINE void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

// Calls f(std::true_type{}) or f(std::false_type{}): a run-time flag made a template
// argument (decltype(flag)::value inside f), so that a loop does not test it on every
// vector.
template <typename F>
MINALIGN_INLINE auto with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

template <bool kKeep, bool kEntropy, bool kAhead>
BlockSums sweep_as(const float* x, int64_t n, float m, float* keep) {
  floatv block_max = splat(kNegInf), s = splat(0.f), t = splat(0.f);
  auto fold = [&](floatv v) {
    block_max = vmax(block_max, v);  // ignores NaN, which surfaces in the sums
    floatv d = v - m;                // <= kSlack, or the block is swept again
    floatv e = expv(d);
    s += e;
    if constexpr (kEntropy) t += select(e == 0.f, splat(0.f), e * d);  // 0 * -inf counts as 0
    return e;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    if constexpr (kAhead) prefetch(x + i + kPrefetchAhead);
    floatv e = fold(loadv(x + i));
    if constexpr (kKeep) storev(keep + i, e);
  }
  if (i < n) {
    floatv e = fold(loadv_partial(x + i, n - i, kNegInf));
    if constexpr (kKeep) storev_partial(keep + i, n - i, e);
  }
  return {hmax(block_max), hsum(s), hsum(t)};
}

BlockSums sweep(const float* x, int64_t n, float m, bool with_entropy, bool ahead, float* keep) {
  return with_flag(keep != nullptr, [&](auto kKeep) {
    return with_flag(with_entropy, [&](auto kEntropy) {
      return with_flag(ahead, [&](auto kAhead) {
        return sweep_as<decltype(kKeep)::value, decltype(kEntropy)::value, decltype(kAhead)::value>(x, n, m, keep);
      });
    });
  });
}

void grad_kept(const float* e, int64_t n, float c, float g, float* out) {
  const floatv smallest_normal = splat(std::numeric_limits<float>::min());
  for (int64_t i = 0; i < n; i += kLanes) {
    floatv p = (i + kLanes <= n ? loadv(e + i) : loadv_partial(e + i, n - i, 0.f)) * c;
    floatv grad = -g * select(p < smallest_normal, splat(0.f), p);
    if (i + kLanes <= n) storev(out + i, grad);
    else storev_partial(out + i, n - i, grad);
  }
}

float max(const float* x, int64_t n) {
  floatv block_max = splat(kNegInf);
  for (int64_t i = 0; i < n; i += kLanes)
    block_max = vmax(block_max, i + kLanes <= n ? loadv(x + i) : loadv_partial(x + i, n - i, kNegInf));
  return hmax(block_max);
}

// Each vector is read before it is overwritten, so out may be x.
template <bool kEntropy, bool kAhead>
void grad_as(const float* x, int64_t n, float lse, float g, float gh, float entropy, float* out) {
  auto grad_of = [&](floatv v) {
    floatv d = v - lse;  // log p: <= 0 up to rounding
    floatv p = expv(d);
    if constexpr (kEntropy) return select(p == 0.f, splat(0.f), -p * (g + gh * (d + entropy)));
    return -g * p;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    if constexpr (kAhead) prefetch(x + i + kPrefetchAhead);
    storev(out + i, grad_of(loadv(x + i)));
  }
  if (i < n) storev_partial(out + i, n - i, grad_of(loadv_partial(x + i, n - i, kNegInf)));
}

void grad(const float* x, int64_t n, float lse, float g, float gh, float entropy, bool ahead, float* out) {
  with_flag(gh != 0.f, [&](auto kEntropy) {
    with_flag(ahead, [&](auto kAhead) {
      grad_as<decltype(kEntropy)::value, decltype(kAhead)::value>(x, n, lse, g, gh, entropy, out);
    });
  });
}

MINALIGN_INLINE floatv widenv(bitsv h, bool bfloat16) { return bfloat16 ? bf16_to_f32(h) : f16_to_f32(h); }
MINALIGN_INLINE bitsv roundv(floatv v, bool bfloat16) { return bfloat16 ? f32_to_bf16(v) : f32_to_f16(v); }

template <bool kBFloat16>
void widen_as(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch(src + i + 2 * kPrefetchAhead);  // 8 KiB ahead, as for float32
    storev(dst + i, widenv(loadv_bits(src + i), kBFloat16));
  }
  if (i < n) storev_partial(dst + i, n - i, widenv(loadv_bits_partial(src + i, n - i), kBFloat16));
}

template <bool kBFloat16>
void round_as(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) storev_bits(dst + i, roundv(loadv(src + i), kBFloat16));
  if (i < n) storev_bits_partial(dst + i, n - i, roundv(loadv_partial(src + i, n - i, 0.f), kBFloat16));
}

void widen(const uint16_t* src, int64_t n, bool bfloat16, float* dst) {
  bfloat16 ? widen_as<true>(src, n, dst) : widen_as<false>(src, n, dst);
}

void round(const float* src, int64_t n, bool bfloat16, uint16_t* dst) {
  bfloat16 ? round_as<true>(src, n, dst) : round_as<false>(src, n, dst);
}

}  // namespace

#define MINALIGN_NAME_OF(build) #build
#define MINALIGN_NAME(build) MINALIGN_NAME_OF(build)  // the macro's value, in quotes
extern const CpuBlocks blocks = {sweep, max, grad, grad_kept, widen, round, MINALIGN_NAME(MINALIGN_BLOCKS)};
#undef MINALIGN_NAME
#undef MINALIGN_NAME_OF

}  // namespace MINALIGN_BLOCKS
}  // namespace minalign
