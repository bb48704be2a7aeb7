// Portable SIMD for the CPU kernels: a vector of kLanes floats and a vectorised e^x.
//
// floatv is a GCC/Clang vector-extension type as wide as the widest registers of the
// ISA it is compiled for: 16 floats with AVX-512, 8 with AVX2, 4 otherwise (SSE,
// NEON). Wider than the registers, GCC 12 compiles a lane comparison or select one
// lane at a time, through memory (about 4x slower e^x with 16 floats on AVX2). On
// x86-64 Linux with GCC, cpu_blocks*.cpp compile the kernels that use it three times
// (AVX-512, AVX2 + FMA, the baseline) and the best one the CPU supports is picked once;
// everywhere else they are compiled once, for the build's own ISA. Everything here is
// always_inline, so it is compiled with the ISA of the function that calls it.
//
// expv computes e^d as 2^k e^r with k = round(d / ln 2) and |r| <= ln(2)/2:
// e^r = 1 + r + r^2 q(r), q of degree 4 fitted for the least relative error on that
// interval (minimax by Lawson's iteration; each coefficient rounded to float in turn
// and the later ones fitted again): 3.1e-9 before float rounding, where Taylor's
// polynomial of degree 6 errs by 1.6e-7 and of degree 7, one multiply-add more, by
// 7.0e-9. 2^k is written straight into the float's exponent bits.
//
// bfloat16 and float16 are widened to float and rounded back a vector at a time:
// one value at a time, the conversions cost more than the kernels' arithmetic.
#pragma once

// The helpers below pass vectors wider than 16 bytes by value but are always inlined, so the
// ABI note GCC gives for them (vector passing without AVX or AVX-512) does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <cstdint>
#include <cstring>

#define MINALIGN_INLINE static inline __attribute__((always_inline))

namespace minalign {

#if defined(MINALIGN_LANES)  // set by a file that changes its target ISA (cpu_blocks_*.cpp)
constexpr int kLanes = MINALIGN_LANES;
#elif defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float floatv __attribute__((vector_size(4 * kLanes)));
typedef int32_t intv __attribute__((vector_size(4 * kLanes)));  // also the type of floatv comparisons
typedef uint32_t uintv __attribute__((vector_size(4 * kLanes)));
typedef uint16_t bitsv __attribute__((vector_size(2 * kLanes)));  // bfloat16 or float16 bit patterns

MINALIGN_INLINE floatv splat(float c) { return floatv{} + c; }

MINALIGN_INLINE floatv loadv(const float* p) {
  floatv v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

// The first n < kLanes floats of p, the other lanes set to `fill`.
MINALIGN_INLINE floatv loadv_partial(const float* p, int64_t n, float fill) {
  floatv v = splat(fill);
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

MINALIGN_INLINE void storev(float* p, floatv v) { std::memcpy(p, &v, sizeof v); }

MINALIGN_INLINE void storev_partial(float* p, int64_t n, floatv v) {
  std::memcpy(p, &v, n * sizeof(float));
}

// kLanes 16-bit values at p; or the first n < kLanes of them, the other lanes 0.
MINALIGN_INLINE bitsv loadv_bits(const uint16_t* p) {
  bitsv v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

MINALIGN_INLINE bitsv loadv_bits_partial(const uint16_t* p, int64_t n) {
  bitsv v = {};
  std::memcpy(&v, p, n * sizeof(uint16_t));
  return v;
}

MINALIGN_INLINE void storev_bits(uint16_t* p, bitsv v) { std::memcpy(p, &v, sizeof v); }

MINALIGN_INLINE void storev_bits_partial(uint16_t* p, int64_t n, bitsv v) { std::memcpy(p, &v, n * sizeof(uint16_t)); }

// bfloat16 is the top half of a float: widening is exact.
MINALIGN_INLINE floatv bf16_to_f32(bitsv h) { return (floatv)(__builtin_convertvector(h, uintv) << 16); }

// Rounds to the nearest bfloat16, ties to even, and NaN to 0x7FC0, as c10::BFloat16 does.
MINALIGN_INLINE bitsv f32_to_bf16(floatv v) {
  const uintv w = (uintv)v;
  const uintv rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  return __builtin_convertvector(v != v ? uintv{} + 0x7FC0u : rounded, bitsv);
}

// float16 <-> float in integer arithmetic (GCC 12 converts _Float16 vectors one lane
// at a time). Exact, and independent of the flush-denormals setting: no
// float denormal is ever an operand. h is the float16's bits, a = |h| = h & 0x7FFF.
//   a < 0x400 (zero, subnormal):   a * 2^-24, from an exact int-to-float conversion
//   a < 0x7C00 (normal):           rebias the exponent: (a << 13) + (127 - 15) << 23
//   else (inf, NaN):               all-ones exponent, the payload kept, a NaN made quiet
MINALIGN_INLINE floatv f16_to_f32(bitsv h) {
  const uintv w = __builtin_convertvector(h, uintv);
  const uintv a = w & 0x7FFFu, sign = (w & 0x8000u) << 16;
  const uintv normal = (a << 13) + (112u << 23);
  const uintv special = (a << 13) | 0x7F800000u | ((uintv)(a > 0x7C00u) & 0x00400000u);
  const uintv subnormal = (uintv)(__builtin_convertvector((intv)a, floatv) * 0x1p-24f);
  return (floatv)(sign | (a < 0x400u ? subnormal : a < 0x7C00u ? normal : special));
}

// Rounds to the nearest float16, ties to even; NaN to 0x7E00 and overflow to inf, with
// the sign, as c10::Half does. a = |bits|:
//   a < 2^-14 (float16 subnormal): |x| + 0.5 rounds |x| to a multiple of 2^-24 (the ulp
//     of 0.5), and its bits minus those of 0.5 count the multiples
//   normal: rebias, then add half an ulp (less one, plus the kept bit for ties) and
//     shift: a carry out of the mantissa bumps the exponent, up to 0x7C00 = inf
MINALIGN_INLINE bitsv f32_to_f16(floatv v) {
  const uintv w = (uintv)v, a = w & 0x7FFFFFFFu, sign = (w >> 16) & 0x8000u;
  const uintv subnormal = (uintv)((floatv)a + 0.5f) - 0x3F000000u;
  uintv normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  normal = normal < 0x7C00u ? normal : uintv{} + 0x7C00u;
  const uintv h = a > 0x7F800000u ? uintv{} + 0x7E00u : a < 0x38800000u ? subnormal : normal;
  return __builtin_convertvector(sign | h, bitsv);
}

// mask ? a : b, lane by lane (mask lanes are all ones or all zeros, as comparisons give).
MINALIGN_INLINE floatv select(intv mask, floatv a, floatv b) { return mask ? a : b; }

// Lane-wise and horizontal max. NaN never wins here: callers see NaN in the sums instead.
MINALIGN_INLINE floatv vmax(floatv a, floatv b) { return select(b > a, b, a); }

MINALIGN_INLINE float hmax(floatv v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

MINALIGN_INLINE float hsum(floatv v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// e^d lane by lane, for d <= 88: callers guarantee it (larger d gives a meaningless
// value; +inf gives NaN): a sweep's d is at most kSlack above its reference or the
// sweep is discarded, a gradient's d = x - lse is at most 0 up to rounding. d < -87.3
// gives 0, as does d = -inf; NaN propagates.
// Relative error at most 0.88 ulp with FMA, 1.16 ulp without (x86-64's baseline),
// measured against double's exp on 4.8e7 points.
MINALIGN_INLINE floatv expv(floatv d) {
  const float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kLn2Hi = 0.693359375f;  // ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 9 bits,
  const float kLn2Lo = -2.12194440e-4f;  // so k * kLn2Hi is exact for |k| < 2^15
  floatv shifted = d * 1.44269504f + kShift;        // k + 1.5 * 2^23, k = round(d / ln 2)
  uintv k = (uintv)shifted - (uintv)splat(kShift);  // k (mod 2^32), from the mantissa bits
  floatv kf = shifted - kShift;
  floatv r = d - kf * kLn2Hi - kf * kLn2Lo;         // |r| <= ln(2) / 2
  floatv p = splat(0x1.6a5118p-10f);                // e^r, Horner; the coefficients
  p = p * r + 0x1.12397cp-7f;                       // (0.001382129, 0.008368669,
  p = p * r + 0x1.5558acp-5f;                       // 0.04166826, 0.1666652,
  p = p * r + 0x1.555492p-3f;                       // 0.49999994, then 1 and 1)
  p = p * r + 0x1.fffffcp-2f;                       // are near Taylor's 1/i!
  p = p * r + 1.f;
  p = p * r + 1.f;
  floatv two_k = (floatv)((k + 127u) << 23);        // 2^k: a normal float for k >= -126
  return select(d < -87.3f, splat(0.f), p * two_k);
}

}  // namespace minalign
