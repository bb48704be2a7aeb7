// Portable SIMD for the CPU kernels: a vector of 16 floats and a vectorised e^x.
//
// f32x16 is a GCC/Clang vector-extension type. Arithmetic on it compiles to one
// AVX-512 instruction, two AVX2 ones, or four SSE/NEON ones, so the same source
// serves x86-64 and aarch64. On x86-64 Linux with GCC, a function marked
// MINALIGN_SIMD_CLONES is compiled three times (x86-64-v4 = AVX-512, v3 = AVX2 + FMA,
// and the baseline) and the loader picks the best one the CPU supports (GCC's
// target_clones, resolved once through an ifunc). Everywhere else it is compiled
// once for the build's own ISA. The helpers below are always_inline so that they
// are compiled with the ISA of the function that calls them.
//
// exp16 computes e^d as 2^k e^r with k = round(d / ln 2) and |r| <= ln(2)/2:
// e^r by its Taylor polynomial of degree 7 (truncation error below 6e-9, under
// float rounding), 2^k written straight into the float's exponent bits.
//
// bfloat16 and float16 are widened to float and rounded back 16 values at a time:
// one value at a time, the conversions cost more than the kernels' arithmetic.
#pragma once

// The helpers below pass 64-byte vectors by value but are always inlined, so the
// ABI note GCC gives for them (vector passing without AVX-512) does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MINALIGN_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MINALIGN_SIMD_CLONES
#endif
#define MINALIGN_INLINE static inline __attribute__((always_inline))

namespace minalign {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));  // also the type of f32x16 comparisons
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));  // 16 bfloat16 or float16 bit patterns

MINALIGN_INLINE f32x16 splat(float c) { return f32x16{} + c; }

MINALIGN_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

// The first n < 16 floats of p, the other lanes set to `fill`.
MINALIGN_INLINE f32x16 load16_partial(const float* p, int64_t n, float fill) {
  f32x16 v = splat(fill);
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

MINALIGN_INLINE void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

MINALIGN_INLINE void store16_partial(float* p, int64_t n, f32x16 v) {
  std::memcpy(p, &v, n * sizeof(float));
}

// 16 16-bit values at p; or the first n < 16 of them, the other lanes 0.
MINALIGN_INLINE u16x16 load16_bits(const uint16_t* p) {
  u16x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

MINALIGN_INLINE u16x16 load16_bits_partial(const uint16_t* p, int64_t n) {
  u16x16 v = {};
  std::memcpy(&v, p, n * sizeof(uint16_t));
  return v;
}

MINALIGN_INLINE void store16_bits(uint16_t* p, u16x16 v) { std::memcpy(p, &v, sizeof v); }

MINALIGN_INLINE void store16_bits_partial(uint16_t* p, int64_t n, u16x16 v) { std::memcpy(p, &v, n * sizeof(uint16_t)); }

// bfloat16 is the top half of a float: widening is exact.
MINALIGN_INLINE f32x16 bf16_to_f32(u16x16 h) { return (f32x16)(__builtin_convertvector(h, u32x16) << 16); }

// Rounds to the nearest bfloat16, ties to even, and NaN to 0x7FC0, as c10::BFloat16 does.
MINALIGN_INLINE u16x16 f32_to_bf16(f32x16 v) {
  const u32x16 w = (u32x16)v;
  const u32x16 rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  return __builtin_convertvector(v != v ? u32x16{} + 0x7FC0u : rounded, u16x16);
}

// float16 <-> float in integer arithmetic (GCC 12 converts _Float16 vectors one lane
// at a time). Exact, and independent of the flush-denormals setting: no
// float denormal is ever an operand. h is the float16's bits, a = |h| = h & 0x7FFF.
//   a < 0x400 (zero, subnormal):   a * 2^-24, from an exact int-to-float conversion
//   a < 0x7C00 (normal):           rebias the exponent: (a << 13) + (127 - 15) << 23
//   else (inf, NaN):               all-ones exponent, the payload kept, a NaN made quiet
MINALIGN_INLINE f32x16 f16_to_f32(u16x16 h) {
  const u32x16 w = __builtin_convertvector(h, u32x16);
  const u32x16 a = w & 0x7FFFu, sign = (w & 0x8000u) << 16;
  const u32x16 normal = (a << 13) + (112u << 23);
  const u32x16 special = (a << 13) | 0x7F800000u | ((u32x16)(a > 0x7C00u) & 0x00400000u);
  const u32x16 subnormal = (u32x16)(__builtin_convertvector((i32x16)a, f32x16) * 0x1p-24f);
  return (f32x16)(sign | (a < 0x400u ? subnormal : a < 0x7C00u ? normal : special));
}

// Rounds to the nearest float16, ties to even; NaN to 0x7E00 and overflow to inf, with
// the sign, as c10::Half does. a = |bits|:
//   a < 2^-14 (float16 subnormal): |x| + 0.5 rounds |x| to a multiple of 2^-24 (the ulp
//     of 0.5), and its bits minus those of 0.5 count the multiples
//   normal: rebias, then add half an ulp (less one, plus the kept bit for ties) and
//     shift: a carry out of the mantissa bumps the exponent, up to 0x7C00 = inf
MINALIGN_INLINE u16x16 f32_to_f16(f32x16 v) {
  const u32x16 w = (u32x16)v, a = w & 0x7FFFFFFFu, sign = (w >> 16) & 0x8000u;
  const u32x16 subnormal = (u32x16)((f32x16)a + 0.5f) - 0x3F000000u;
  u32x16 normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  normal = normal < 0x7C00u ? normal : u32x16{} + 0x7C00u;
  const u32x16 h = a > 0x7F800000u ? u32x16{} + 0x7E00u : a < 0x38800000u ? subnormal : normal;
  return __builtin_convertvector(sign | h, u16x16);
}

// mask ? a : b, lane by lane (mask lanes are all ones or all zeros, as comparisons give).
MINALIGN_INLINE f32x16 select(i32x16 mask, f32x16 a, f32x16 b) { return mask ? a : b; }

// Lane-wise and horizontal max. NaN never wins here: callers see NaN in the sums instead.
MINALIGN_INLINE f32x16 vmax(f32x16 a, f32x16 b) { return select(b > a, b, a); }

MINALIGN_INLINE float hmax(f32x16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

MINALIGN_INLINE float hsum(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// e^d lane by lane, for d <= 88 (larger d is clamped); d < -87.3 gives 0, as does
// d = -inf; NaN propagates. Relative error about 2 ulp.
MINALIGN_INLINE f32x16 exp16(f32x16 d) {
  const float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kLn2Hi = 0.693359375f;  // ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 9 bits,
  const float kLn2Lo = -2.12194440e-4f;  // so k * kLn2Hi is exact for |k| < 2^15
  d = select(d > 88.0f, splat(88.0f), d);
  f32x16 shifted = d * 1.44269504f + kShift;        // k + 1.5 * 2^23, k = round(d / ln 2)
  i32x16 k = (i32x16)shifted - (i32x16)splat(kShift);  // k, read from the mantissa bits
  f32x16 kf = shifted - kShift;
  f32x16 r = d - kf * kLn2Hi - kf * kLn2Lo;         // |r| <= ln(2) / 2
  f32x16 p = splat(1.f / 5040);                     // e^r = sum_{i<=7} r^i / i!, Horner
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  f32x16 two_k = (f32x16)((k + 127) << 23);         // 2^k: a normal float for k >= -126
  return select(d < -87.3f, splat(0.f), p * two_k);
}

}  // namespace minalign
