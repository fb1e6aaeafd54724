// Helpers for the levels that have AVX-512 (included inside their namespace, as simd.h is): a
// transpose of 16 x 16 32-bit elements in registers, lane masks, a vpdpbusd that keeps its
// accumulator in place.
#pragma once

#include "simd.h"  // TORCHSLIM_INLINE, aligned_data

// The first n of 16 lanes (none for n <= 0).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// r[i] <- column i of the 16 x 16 matrix of 32-bit elements whose rows are r[0..15].
inline void transpose_16x16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane of r[4 a + b] now holds a 4 x 4 block: rows 4 (lane) + ..., of the group
  // of four input rows 4 a; the two shuffles below move the blocks to their final places.
  for (int i = 0; i < 16; i += 8) {
    for (int b = 0; b < 4; ++b) {
      t[i + b] = _mm512_shuffle_i32x4(r[i + b], r[i + b + 4], 0x88);
      t[i + b + 4] = _mm512_shuffle_i32x4(r[i + b], r[i + b + 4], 0xdd);
    }
  }
  for (int b = 0; b < 8; ++b) {
    r[b] = _mm512_shuffle_i32x4(t[b], t[b + 8], 0x88);
    r[b + 8] = _mm512_shuffle_i32x4(t[b], t[b + 8], 0xdd);
  }
}

// acc + a . b (vpdpbusd) in acc's own register: GCC 12 keeps the intrinsic's accumulators in
// other registers and copies each one in and back out on every step (two moves a multiply).
inline TORCHSLIM_INLINE __m512i dpbusd_in_place(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
