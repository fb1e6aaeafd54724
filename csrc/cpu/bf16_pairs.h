// bf16 in the pair layout of the bf16 dot products (TDPBF16PS on the tile unit, VDPBF16PS in
// vectors: 32-bit element j holds the pair (2j, 2j + 1) of a row), for the levels that have
// AVX512_BF16. Included inside the level's namespace, after avx512_helpers.h (transpose_16x16).
//
// TORCHSLIM_PAIRS: the target attribute of these functions and of their callers where the
// level's own target lacks AVX512_BF16 (the avx512 level, which checks the CPU at run time:
// attention.h); empty where the level has it (amx).
#pragma once

#ifndef TORCHSLIM_PAIRS
#define TORCHSLIM_PAIRS
#endif

// bf16 bit patterns as fp32 (exact: bf16 is the top half of an fp32).
TORCHSLIM_PAIRS inline __m512 bf16_low_to_f32(__m512i v) {  // the 16 bf16 in the low 256 bits
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
}
TORCHSLIM_PAIRS inline __m512 bf16_high_to_f32(__m512i v) {  // the 16 bf16 in the high 256 bits
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}
TORCHSLIM_PAIRS inline __m512i to_bf16(__m512 lo, __m512 hi) {  // 32 bf16: lo's 16, then hi's
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// 32 int8 codes src[0 .. 32) as bf16 (exact), zero from src[left] on (nothing read there).
TORCHSLIM_PAIRS inline __m512i int8_to_bf16(const int8_t* src, int64_t left) {
  __m128i a, b;
  if (left >= 32) {
    a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
  } else {
    a = _mm_maskz_loadu_epi8(first_lanes(left), src);
    b = _mm_maskz_loadu_epi8(first_lanes(left - 16), src + 16);
  }
  return to_bf16(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)),
                 _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
}

// The bf16 parts of 32 fp32 values (lo, hi): each the rounding of what the ones before leave.
TORCHSLIM_PAIRS inline void split_parts(__m512 lo, __m512 hi, int64_t parts, __m512i (&out)[3]) {
  for (int64_t t = 0; t < parts; ++t) {
    out[t] = to_bf16(lo, hi);
    if (t + 1 == parts) break;
    lo = _mm512_sub_ps(lo, bf16_low_to_f32(out[t]));
    hi = _mm512_sub_ps(hi, bf16_high_to_f32(out[t]));
  }
}

// Stores 16 rows (one per activation row, each 32 bf16 of one part) as rows q0 .. q0 + 15 of
// a panel part: pairs of columns become the 32-bit elements that the transpose moves.
TORCHSLIM_PAIRS inline void store_pairs(__m512i (&rows)[16], uint16_t* part, int64_t q0) {
  transpose_16x16(rows);
  for (int q = 0; q < 16; ++q) _mm512_storeu_si512(part + (q0 + q) * 32, rows[q]);
}
