// Vector primitives, one set per ISA level, behind the same static interface.
//
// Included by int8_gemm.h inside namespace torchslim::cpu::TORCHSLIM_ISA_NS, after the ISA's
// target has been enabled (see isa_*.cpp). Two families:
//
//   Dot kinds (I8Dot, F32Dot): a K-step of a dot product between a row of A and a row of B,
//   accumulated in a vector and reduced to one scalar at the end:
//     AT, BT       element types of A and B       Sum   scalar result type
//     kStep        elements of K per step         Acc   vector accumulator
//     load_a/b     load one step                  dot   acc += a . b (lane-wise partial sums)
//     reduce       horizontal sum                 mul   one scalar product (for the K tail)
//     kOffset      B is loaded as (b + 128), the unsigned side of VNNI's u8 x s8: each of
//                  row i's sums comes out 128 * sum_k a[i, k] over the vector steps too
//                  (offset(), once per row and block of columns), which the kernel takes off.
//   FVec: fp32 lanes for row-wise quantization (load fp32/bf16, abs, max, round(x / scale) and
//   store).
#pragma once

// On a kernel's inner lambdas and helpers: GCC's inliner gives up on some of them at wider ISA
// levels (the AVX-512 2:4 step, the block kernel's per-block body), and an out-of-line call
// per step keeps the accumulators in memory: 2-3x slower.
#ifndef TORCHSLIM_INLINE
#define TORCHSLIM_INLINE __attribute__((always_inline))
#endif

// A 64-byte aligned view of v's data (v holds 64 bytes more than it needs): a tile load or store
// whose rows straddle cache lines takes 3x as long, and so does a zmm load split across two.
template <class Vector>
auto aligned_data(Vector& v) -> decltype(v.data()) {
  using Pointer = decltype(v.data());
  return reinterpret_cast<Pointer>((reinterpret_cast<std::uintptr_t>(v.data()) + 63) / 64 * 64);
}

inline float bf16_bits_to_f32(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// fp32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE fp16 bits -> fp32 (exact: every half is a float).
inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);  // inf, NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    u = sign;  // +-0
  } else {     // subnormal: normalise the mantissa
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// An fp16 value in memory (bf16 travels as plain uint16_t bits).
struct Half {
  uint16_t bits;
};

inline float load_f32(const float* p) { return *p; }
inline float load_f32(const uint16_t* p) { return bf16_bits_to_f32(*p); }
inline float load_f32(const Half* p) { return f16_bits_to_f32(p->bits); }
inline float load_f32(const int8_t* p) { return static_cast<float>(*p); }

// Softmax on every level takes its exponents in base 2: attention.h's as 2^((S - m) log2(e)),
// the bf16 pair kernel's with log2(e) folded into the scores' scale. FVec::exp2(x): 2^n 2^f
// with n = round(x), |f| <= 1/2, 2^f by the degree-5 polynomial kExp2P fitted on [-1/2, 1/2]
// (relative error 2.7e-7 in fp32; 2^0 is exactly 1); 0 below kExp2Lowest (and for -inf), NaN
// kept; x <= 127. Every result is 0 or a normal float: a subnormal one (a masked key's 2^-150,
// say) costs a microcode assist of the order of a hundred cycles, which made causal blocks,
// with most of their lanes masked, slower than full ones.
constexpr float kLog2e = 1.44269504088896341f, kExp2Lowest = -125.0f;
constexpr float kExp2P[5] = {1.3400432166e-03f, 9.6760370979e-03f, 5.5503272142e-02f,
                             2.4022107356e-01f, 6.9314720671e-01f};  // f^5 .. f^1; f^0: 1

// A softmax row's exponents are taken against a reference point m that moves only when a score
// passes it by more than kMaxSlack (log2 units), not at every new max (as FlashAttention-4
// does): P stays below 2^kMaxSlack, and most blocks need no max across the row nor any
// rescaling of what the row has summed so far.
constexpr float kMaxSlack = 8.0f;

// round(x / s) without a divide per element: q = x * fl(1 / s) is within 1.5 ulp of the
// quotient fl(x / s) (two roundings of 2^-24 each, relative), so both round to the same integer
// unless q lies that close to a half-integer. A vector divides only where some lane has
// |q - round(q)| + |q| kQuotientSlack >= 0.5, a margin 8x the error (about 1 vector in 500 of
// random data), or where q is NaN (an infinite 1 / s, say): the codes are the divide's bit for
// bit, for a fifth of its cost (a 512-bit divide issues once per 16 cycles here).
constexpr float kQuotientSlack = 0x1p-20f;

inline int8_t quantize_scalar(float v) {
  float r = __builtin_rintf(v);  // half to even in the default rounding mode
  r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
  return static_cast<int8_t>(r);
}

// A quantization group's amax as bits: |v| compared as unsigned integers puts NaN above inf
// above every finite value, so a NaN is kept where a float max (which returns one operand for a
// NaN) may drop it, and the group's scale comes out NaN (torchslim.reference.int8).
inline float float_from_bits(uint32_t bits) {
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}
inline float max_abs_bits(float acc, float v) {
  uint32_t a, b;
  __builtin_memcpy(&a, &acc, sizeof a);
  __builtin_memcpy(&b, &v, sizeof b);
  b &= 0x7fffffffu;
  return float_from_bits(a > b ? a : b);
}
// The scale of a group of amax (max_abs_bits): amax / 127, 1 where that is 0 (an amax of 0, or
// one so small that the quotient underflows), NaN for inf or NaN.
inline float scale_from_amax(float amax) {
  if (!(amax <= 3.4028235e38f)) return __builtin_nanf("");
  const float scale = amax / 127.0f;
  return scale == 0.0f ? 1.0f : scale;
}

#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

#endif

#if defined(TORCHSLIM_ISA_AVX512)

#include "simd_quotient.h"

struct I8Dot {
  using AT = int8_t;
  using BT = int8_t;
  using Sum = int32_t;
  using Acc = __m512i;
  using AV = __m512i;
  using BV = __m512i;
  static constexpr int kStep = 64;
  static constexpr bool kOffset = true;
  static Acc zero() { return _mm512_setzero_si512(); }
  // vpdpbusd multiplies unsigned by signed bytes: the weights flip their sign bit (w + 128 as
  // u8), and each activation row's 128 x its sum of codes comes off at the end. The sum is the
  // row's, once per block; the weights' own sums, once per tile column per step, took as many
  // vpdpbusd as the products themselves at M = 1.
  static AV load_a(const int8_t* p) { return _mm512_loadu_si512(p); }
  static BV load_b(const int8_t* p) {
    return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(static_cast<char>(0x80)));
  }
  static Acc dot(Acc acc, AV a, BV b) { return _mm512_dpbusd_epi32(acc, b, a); }
  // 128 x sum of a[k] for k < K - K % kStep (the steps dot() takes).
  static Sum offset(const int8_t* a, int64_t K) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = 0; k + kStep <= K; k += kStep) {
      s = _mm512_dpbusd_epi32(s, _mm512_set1_epi8(1), _mm512_loadu_si512(a + k));
    }
    return 128 * _mm512_reduce_add_epi32(s);
  }
  static Sum reduce(Acc v) { return _mm512_reduce_add_epi32(v); }
  static Sum mul(int8_t a, int8_t b) { return static_cast<int32_t>(a) * b; }
};

struct F32Dot {
  using AT = float;
  using BT = int8_t;
  using Sum = float;
  using Acc = __m512;
  using AV = __m512;
  using BV = __m512;
  static constexpr int kStep = 16;
  static constexpr bool kOffset = false;
  static Acc zero() { return _mm512_setzero_ps(); }
  static AV load_a(const float* p) { return _mm512_loadu_ps(p); }
  static BV load_b(const int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static Acc dot(Acc acc, AV a, BV b) { return _mm512_fmadd_ps(a, b, acc); }
  static Sum reduce(Acc v) { return _mm512_reduce_add_ps(v); }
  static Sum mul(float a, int8_t b) { return a * static_cast<float>(b); }
};

struct FVec {
  using R = __m512;
  static constexpr int kWidth = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float s) { return _mm512_set1_ps(s); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R load(const uint16_t* p) {
    const __m512i u =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static R load(const Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static R load(const int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // The first n <= 16 values at p and zeros after them; nothing past p + n is read.
  static __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  static R load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static R load_first(const uint16_t* p, int64_t n) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static R load_first(const Half* p, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p));
  }
  static void store_first(float* p, R v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  // 2^x, see kExp2P.
  static R exp2(R x) {
    const R lowest = _mm512_set1_ps(kExp2Lowest);
    const __mmask16 kept = _mm512_cmp_ps_mask(x, lowest, _CMP_NLT_UQ);  // x >= lowest or NaN
    x = _mm512_max_ps(lowest, x);  // max returns its second operand for a NaN
    const R n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm512_sub_ps(x, n);
    R p = _mm512_set1_ps(kExp2P[0]);
    for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2P[i]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(kept, p, n);
  }
  // Whether some lane of a is above b's.
  static bool any_greater(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
  static float reduce_add(R v) { return _mm512_reduce_add_ps(v); }
  static R abs(R v) { return _mm512_abs_ps(v); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static float reduce_max(R v) { return _mm512_reduce_max_ps(v); }
  // max(acc, |v|) per lane, as max_abs_bits; acc starts at zero().
  static R max_abs(R acc, R v) {
    return _mm512_castsi512_ps(
        _mm512_max_epu32(_mm512_castps_si512(acc), _mm512_castps_si512(_mm512_abs_ps(v))));
  }
  static float reduce_max_abs(R acc) {
    return float_from_bits(_mm512_reduce_max_epu32(_mm512_castps_si512(acc)));
  }
  // inv = 1 / scale (any rounding).
  static void quantize_store(int8_t* q, R x, R scale, R inv) {
    R v = round_quotient_ps(x, scale, inv);
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
};

constexpr int kI8MR = 4, kI8NR = 4, kF32MR = 4, kF32NR = 4, kQ4MR = 4, kQ4NR = 3;

#elif defined(TORCHSLIM_ISA_AVX2)

// AVX2's int8 dot product, vpmaddubsw, multiplies unsigned by signed bytes and saturates the
// int16 sum of each pair. The sign trick keeps it exact: |w| (u8, at most 128) times
// x * sign(w) (s8) is x * w, and a pair sums to at most 2 * 128 * 127 = 32512 < 32767, provided
// the activation codes avoid -128 (negating it overflows), which symmetric quantization
// guarantees. vpmaddwd against ones then widens pairs to int32: 32 MACs in four ops.
struct I8Dot {
  using AT = int8_t;
  using BT = int8_t;
  using Sum = int32_t;
  using Acc = __m256i;
  using AV = __m256i;
  struct BV {
    __m256i abs, raw;
  };
  static constexpr int kStep = 32;
  static constexpr bool kOffset = false;
  static Acc zero() { return _mm256_setzero_si256(); }
  static AV load_a(const int8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static BV load_b(const int8_t* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_abs_epi8(raw), raw};
  }
  static Acc dot(Acc acc, AV a, const BV& b) {
    const __m256i pairs = _mm256_maddubs_epi16(b.abs, _mm256_sign_epi8(a, b.raw));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  static Sum reduce(Acc v) { return hsum_epi32(v); }
  static Sum mul(int8_t a, int8_t b) { return static_cast<int32_t>(a) * b; }
};

struct F32Dot {
  using AT = float;
  using BT = int8_t;
  using Sum = float;
  using Acc = __m256;
  using AV = __m256;
  using BV = __m256;
  static constexpr int kStep = 8;
  static constexpr bool kOffset = false;
  static Acc zero() { return _mm256_setzero_ps(); }
  static AV load_a(const float* p) { return _mm256_loadu_ps(p); }
  static BV load_b(const int8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static Acc dot(Acc acc, AV a, BV b) { return _mm256_fmadd_ps(a, b, acc); }
  static Sum reduce(Acc v) { return hsum_ps(v); }
  static Sum mul(float a, int8_t b) { return a * static_cast<float>(b); }
};

struct FVec {
  using R = __m256;
  static constexpr int kWidth = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float s) { return _mm256_set1_ps(s); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R load(const uint16_t* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static R load(const Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static R load(const int8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  // 2^x, see kExp2P.
  static R exp2(R x) {
    const R lowest = _mm256_set1_ps(kExp2Lowest);
    const R kept = _mm256_cmp_ps(x, lowest, _CMP_NLT_UQ);  // x >= lowest or NaN
    x = _mm256_max_ps(lowest, x);  // max returns its second operand for a NaN
    const R n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm256_sub_ps(x, n);
    R p = _mm256_set1_ps(kExp2P[0]);
    for (int i = 1; i < 5; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2P[i]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i two_n =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(kept, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
  }
  // Whether some lane of a is above b's.
  static bool any_greater(R a, R b) {
    return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0;
  }
  static float reduce_add(R v) { return hsum_ps(v); }
  static R abs(R v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static float reduce_max(R v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  // max(acc, |v|) per lane, as max_abs_bits; acc starts at zero().
  static R max_abs(R acc, R v) {
    return _mm256_castsi256_ps(
        _mm256_max_epu32(_mm256_castps_si256(acc), _mm256_castps_si256(abs(v))));
  }
  static float reduce_max_abs(R acc) {
    const __m256i a = _mm256_castps_si256(acc);
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    return float_from_bits(static_cast<uint32_t>(_mm_cvtsi128_si32(m)));
  }
  // round(x / scale) half to even, as the divide gives it (kQuotientSlack).
  static R round_quotient(R x, R scale, R inv) {
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const R q = _mm256_mul_ps(x, inv);
    const R r = _mm256_round_ps(q, kNearest);
    const R margin =
        _mm256_fmadd_ps(abs(q), _mm256_set1_ps(kQuotientSlack), abs(_mm256_sub_ps(q, r)));
    if (_mm256_movemask_ps(_mm256_cmp_ps(margin, _mm256_set1_ps(0.5f), _CMP_NLT_UQ)) == 0) {
      return r;
    }
    return _mm256_round_ps(_mm256_div_ps(x, scale), kNearest);
  }
  // inv = 1 / scale (any rounding).
  static void quantize_store(int8_t* q, R x, R scale, R inv) {
    R v = round_quotient(x, scale, inv);
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    const __m256i i = _mm256_cvtps_epi32(v);
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(p16, p16));
  }
};

constexpr int kI8MR = 4, kI8NR = 2, kF32MR = 4, kF32NR = 3, kQ4MR = 2, kQ4NR = 2;

#else  // portable: eight scalar lanes, left to the compiler's auto-vectorizer

// Eight independent partial sums, like one AVX2 register: the K sum is split the same way as
// on the SIMD paths (and its rounding error grows with K/8, not K).
template <typename T>
struct Lanes {
  T v[8];
};

struct I8Dot {
  using AT = int8_t;
  using BT = int8_t;
  using Sum = int32_t;
  using Acc = Lanes<int32_t>;
  using AV = Lanes<int32_t>;
  using BV = Lanes<int32_t>;
  static constexpr int kStep = 8;
  static constexpr bool kOffset = false;
  static Acc zero() { return {}; }
  static Lanes<int32_t> load(const int8_t* p) {
    Lanes<int32_t> r;
    for (int l = 0; l < 8; ++l) r.v[l] = p[l];
    return r;
  }
  static AV load_a(const int8_t* p) { return load(p); }
  static BV load_b(const int8_t* p) { return load(p); }
  static Acc dot(Acc acc, const AV& a, const BV& b) {
    for (int l = 0; l < 8; ++l) acc.v[l] += a.v[l] * b.v[l];
    return acc;
  }
  static Sum reduce(const Acc& a) {
    Sum s = 0;
    for (int l = 0; l < 8; ++l) s += a.v[l];
    return s;
  }
  static Sum mul(int8_t a, int8_t b) { return static_cast<int32_t>(a) * b; }
};

struct F32Dot {
  using AT = float;
  using BT = int8_t;
  using Sum = float;
  using Acc = Lanes<float>;
  using AV = Lanes<float>;
  using BV = Lanes<float>;
  static constexpr int kStep = 8;
  static constexpr bool kOffset = false;
  static Acc zero() { return {}; }
  static AV load_a(const float* p) {
    Lanes<float> r;
    for (int l = 0; l < 8; ++l) r.v[l] = p[l];
    return r;
  }
  static BV load_b(const int8_t* p) {
    Lanes<float> r;
    for (int l = 0; l < 8; ++l) r.v[l] = static_cast<float>(p[l]);
    return r;
  }
  static Acc dot(Acc acc, const AV& a, const BV& b) {
    for (int l = 0; l < 8; ++l) acc.v[l] += a.v[l] * b.v[l];
    return acc;
  }
  static Sum reduce(const Acc& a) {
    const float s0 = (a.v[0] + a.v[4]) + (a.v[1] + a.v[5]);
    const float s1 = (a.v[2] + a.v[6]) + (a.v[3] + a.v[7]);
    return s0 + s1;
  }
  static Sum mul(float a, int8_t b) { return a * static_cast<float>(b); }
};

struct FVec {
  using R = float;
  static constexpr int kWidth = 1;
  static R zero() { return 0.0f; }
  static R set1(float s) { return s; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R v) { *p = v; }
  static R load(const uint16_t* p) { return bf16_bits_to_f32(*p); }
  static R load(const Half* p) { return load_f32(p); }
  static R load(const int8_t* p) { return load_f32(p); }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R mul(R a, R b) { return a * b; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R exp2(R x) { return x < kExp2Lowest ? 0.0f : __builtin_exp2f(x); }
  static bool any_greater(R a, R b) { return a > b; }
  static float reduce_add(R v) { return v; }
  static R abs(R v) { return __builtin_fabsf(v); }
  static R max(R a, R b) { return a > b ? a : b; }
  static float reduce_max(R v) { return v; }
  static R max_abs(R acc, R v) { return max_abs_bits(acc, v); }
  static float reduce_max_abs(R acc) { return acc; }
  static void quantize_store(int8_t* q, R x, R scale, R) { *q = quantize_scalar(x / scale); }
};

// Portable twin of the SIMD Q4Dot below: same lanes, same integer sums.
struct Q4Dot {
  using Acc = Lanes<float>;
  using SV = Lanes<float>;
  struct WV {
    uint8_t lo[32], hi[32];
  };
  struct XV {
    int8_t lo[32], hi[32];
    const int32_t* bias;
  };
  static Acc zero() { return {}; }
  static WV load_w(const uint8_t* p) {
    WV w;
    for (int l = 0; l < 32; ++l) {
      w.lo[l] = p[l] & 0x0f;
      w.hi[l] = p[l] >> 4;
    }
    return w;
  }
  static XV load_x(const int8_t* p, const int32_t* bias) {
    XV x;
    for (int l = 0; l < 32; ++l) {
      x.lo[l] = p[l];
      x.hi[l] = p[32 + l];
    }
    x.bias = bias;
    return x;
  }
  static SV scales(float first, float second) {
    SV s;
    for (int l = 0; l < 8; ++l) s.v[l] = l < 4 ? first : second;
    return s;
  }
  static SV scales(const float* two) { return scales(two[0], two[1]); }
  static SV mul(const SV& a, const SV& b) {
    SV s;
    for (int l = 0; l < 8; ++l) s.v[l] = a.v[l] * b.v[l];
    return s;
  }
  static Acc fma(Acc acc, const WV& w, const XV& x, const SV& d) {
    for (int l = 0; l < 8; ++l) {
      int32_t p = x.bias[l];
      for (int t = 4 * l; t < 4 * l + 4; ++t) p += w.lo[t] * x.lo[t] + w.hi[t] * x.hi[t];
      acc.v[l] += static_cast<float>(p) * d.v[l];
    }
    return acc;
  }
  // One block of 32: 16 packed bytes against 16 even then 16 odd activation codes.
  static Acc fma_block(Acc acc, const uint8_t* p, const int8_t* x, const int32_t* bias, float d) {
    for (int l = 0; l < 4; ++l) {
      int32_t lo = bias[l], hi = bias[4 + l];
      for (int t = 4 * l; t < 4 * l + 4; ++t) {
        lo += (p[t] & 0x0f) * x[t];
        hi += (p[t] >> 4) * x[16 + t];
      }
      acc.v[l] += static_cast<float>(lo) * d;
      acc.v[4 + l] += static_cast<float>(hi) * d;
    }
    return acc;
  }
  static float reduce(const Acc& a) { return F32Dot::reduce(a); }
};

constexpr int kI8MR = 4, kI8NR = 4, kF32MR = 4, kF32NR = 4, kQ4MR = 4, kQ4NR = 4;

#endif

#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)

// int4 x Q8 activation blocks (see int4_gemm.h). 32 packed bytes hold 64 weights: the low
// nibbles are the even k and the high nibbles the odd k, so one load, two ANDs and a shift
// unpack them against an activation chunk stored as 32 even then 32 odd codes. Codes stay
// unsigned (0..15), as a u8 x s8 dot product takes them; the activation's lane bias (-8 times
// the lane's activation codes) turns each int32 sum into the exact sum of (code - 8) * x, and
// the zero point enters once per group outside the loop. Bytes 0-15 of either half come from
// the chunk's first block of 32 and bytes 16-31 from its second, so int32 lanes 0-3 carry the
// first block and lanes 4-7 the second, each scaled by its own activation scale.
struct Q4Dot {
  using Acc = __m256;
  using SV = __m256;
  struct WV {
    __m256i lo, hi;
  };
  struct XV {
    __m256i lo, hi, bias;
  };
  static Acc zero() { return _mm256_setzero_ps(); }
  static WV load_w(const uint8_t* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i mask = _mm256_set1_epi8(0x0f);
    return {_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)};
  }
  static XV load_x(const int8_t* p, const int32_t* bias) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias))};
  }
  static SV scales(float first, float second) {
    return _mm256_set_m128(_mm_set1_ps(second), _mm_set1_ps(first));
  }
  // scales(two[0], two[1]) in two instructions: a 64-bit load and a lane permute. (The load
  // goes through __m128i, which may alias the floats; _mm_load_sd reads a double.)
  static SV scales(const float* two) {
    const __m128 pair = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(two)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair),
                                    _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
  static SV mul(SV a, SV b) { return _mm256_mul_ps(a, b); }
  static __m256i dot(const WV& w, const XV& x) {
#if defined(TORCHSLIM_ISA_AVX512)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(x.bias, w.lo, x.lo), w.hi, x.hi);
#else
    // A u8 x s8 pair sums to at most 2 * 15 * 127; two of them still fit int16.
    const __m256i pairs =
        _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, x.lo), _mm256_maddubs_epi16(w.hi, x.hi));
    return _mm256_add_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)), x.bias);
#endif
  }
  // acc += d * (w . x), lane-wise
  static Acc fma(Acc acc, const WV& w, const XV& x, SV d) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot(w, x)), d, acc);
  }
  // One block of 32: 16 packed bytes (broadcast, the high copy shifted by 4) against 16 even
  // then 16 odd activation codes.
  static Acc fma_block(Acc acc, const uint8_t* p, const int8_t* x, const int32_t* bias, float d) {
    const __m256i v =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i codes = _mm256_and_si256(
        _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0f));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias));
#if defined(TORCHSLIM_ISA_AVX512)
    const __m256i sums = _mm256_dpbusd_epi32(b, codes, xv);
#else
    const __m256i sums = _mm256_add_epi32(
        _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1)), b);
#endif
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d), acc);
  }
  static float reduce(Acc v) { return hsum_ps(v); }
};

#endif

#if defined(TORCHSLIM_ISA_AVX512)

// 16 fp32 lanes to bf16 bits, rounded as f32_to_bf16_bits does (to nearest even; a NaN stays a
// quiet NaN).
inline __m256i f32_to_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v), high = _mm512_srli_epi32(u, 16);
  const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
  __m512i r =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), high,
                           _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// int4 x Q8 activation codes in steps of 128 weights (see int4_gemm.h, w4_tile_zmm): 64 packed
// bytes, one zmm, hold a step's 128 weights, its low nibbles the even k and its high nibbles the
// odd k. The Q8 layout is Q4Dot's (each chunk of 64 as 32 even then 32 odd codes), so the step's
// two chunks load as (even, even) and (odd, odd) halves; int32 lane l < 8 carries lane l of the
// first chunk and lane l + 8 lane l of the second, which is how the chunks' lane biases lie in
// memory, and lanes 4b .. 4b + 3 carry the step's block b of 32.
struct Q4Step128 {
  struct WV {
    __m512i lo, hi;
  };
  struct XV {
    __m512i lo, hi, bias;
  };
  static WV nibbles(__m512i v) {
    const __m512i mask = _mm512_set1_epi8(0x0f);
    return {_mm512_and_si512(v, mask), _mm512_and_si512(_mm512_srli_epi16(v, 4), mask)};
  }
  static WV load_w(const uint8_t* p) { return nibbles(_mm512_loadu_si512(p)); }
  // p: the step's 128 codes (two chunks), bias: its 16 lane biases.
  static XV load_x(const int8_t* p, const int32_t* bias) {
    auto halves = [](const int8_t* a, const int8_t* b) {
      return _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
    };
    return {halves(p, p + kQ4Chunk), halves(p + kQ4Chunk / 2, p + kQ4Chunk + kQ4Chunk / 2),
            _mm512_loadu_si512(bias)};
  }
  // Four values, one per block of 32 of the step, to the lanes that carry that block (4b..4b+3).
  static __m512 per_block(const float* four) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_loadu_ps(four)));
  }
  // Two values, one per 64 (a group of 64 is two blocks), to the lanes of their blocks.
  static __m512 per_half(const float* two) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(_mm_castsi128_ps(
                                     _mm_loadl_epi64(reinterpret_cast<const __m128i*>(two)))));
  }
  // A half step (K % 128 == 64: the row's last chunk of 64): its 32 packed bytes, 64 codes and 8
  // lane biases in the low halves, zero in the high ones, so lanes 8 .. 15 of its dot are zero.
  static WV load_w_low(const uint8_t* p) {
    return nibbles(_mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  static XV load_x_low(const int8_t* p, const int32_t* bias) {
    const auto low = [](const void* a) {
      return _mm512_zextsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(a)));
    };
    return {low(p), low(p + kQ4Chunk / 2), low(bias)};
  }
  // The half step's two values, one per block of 32, to lanes 0 .. 3 and 4 .. 7 (and the first
  // to lanes 8 .. 15, whose sums are zero); reads two floats.
  static __m512 per_block_low(const float* two) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(_mm_castsi128_ps(
                                     _mm_loadl_epi64(reinterpret_cast<const __m128i*>(two)))));
  }
  // The step's exact sum of (code - 8) * x, in 16 int32 lanes.
  static __m512i dot(const WV& w, const XV& x) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(x.bias, w.lo, x.lo), w.hi, x.hi);
  }
};

#endif
